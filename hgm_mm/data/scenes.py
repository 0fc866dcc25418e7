"""The scene vocabulary: one canonical label per kind of room, its aliases and its descriptions.

Datasets name the same scene differently (Places365's `entrance_hall` is IKEA's `hallway`); every
reader of scene labels (`rooms.jsonl`, `images.jsonl`, `texts.jsonl`) maps a known alias to its
canonical label with `canonical_scene`, so one scene is one label everywhere. The descriptions
are what the scene-text classifier starts from before any training (`SceneTextClassifier`): the
text tower embeds them, and each scene's mean description vector is its first class weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Scene:
    """A kind of room: its canonical label, other names datasets give it, and how people describe it."""

    label: str
    aliases: tuple[str, ...]
    descriptions: tuple[str, ...]  # English and Chinese, general rather than tied to one dataset


SCENES: tuple[Scene, ...] = (
    Scene("bathroom", ("bath", "bath_room", "washroom", "restroom", "toilet", "shower_room"), (
        "a bathroom", "a bathroom with a shower, a bathtub, a washbasin and a toilet",
        "a bathroom with towels, a mirror above the sink and storage for toiletries",
        "浴室", "卫生间", "带淋浴、浴缸、洗手盆和马桶的卫生间", "洗手间里的毛巾、镜子和浴室柜")),
    Scene("bedroom", ("bed_room", "master_bedroom", "guest_room", "sleeping_room"), (
        "a bedroom", "a bedroom with a double bed, bedside tables and a wardrobe",
        "a quiet room to sleep in, with pillows, a duvet and soft bedside lamps",
        "卧室", "主卧", "有双人床、床头柜和衣柜的卧室", "安静舒适、适合睡觉的房间，有枕头和被子")),
    Scene("children_room", ("childrens_room", "children's_room", "kids_room", "kid_room", "nursery",
                            "playroom", "child_room"), (
        "a children's room", "a kids' bedroom with a small bed, toys and a play area",
        "a colourful nursery or playroom for a baby or a child, with toy storage",
        "儿童房", "儿童卧室", "有小床、玩具和游戏区的孩子房间", "色彩缤纷的婴儿房或游戏室，有玩具收纳")),
    Scene("dining_room", ("dining", "dining_area", "dinning_room"), (
        "a dining room", "a dining room with a dining table and chairs for family meals",
        "a place to eat dinner together, with a table set with plates and glasses under a pendant lamp",
        "餐厅", "饭厅", "有餐桌和餐椅、一家人吃饭的地方", "摆着碗盘和杯子的餐桌，上方挂着吊灯")),
    Scene("hallway", ("entrance_hall", "entrance", "entryway", "entry", "foyer", "hall", "corridor",
                      "vestibule", "mudroom"), (
        "a hallway", "an entrance hall with a coat rack, a shoe cabinet and a mirror",
        "the entryway of a home where you take off your shoes and hang your coat",
        "玄关", "门厅", "走廊", "进门处放鞋柜、衣帽架和穿衣镜的地方")),
    Scene("home_office", ("office", "study", "study_room", "workspace", "work_room", "den"), (
        "a home office", "a study with a desk, an office chair, a computer and bookshelves",
        "a quiet corner to work from home, with a desk lamp and filing storage",
        "书房", "家庭办公室", "有书桌、办公椅、电脑和书架的书房", "在家工作的安静角落，有台灯和文件收纳")),
    Scene("kitchen", ("kitchenette", "cooking_area"), (
        "a kitchen", "a kitchen with cabinets, a worktop, a sink, a stove and an oven",
        "a place to cook, with pots and pans, kitchen utensils and a fridge",
        "厨房", "开放式厨房", "有橱柜、台面、水槽、灶台和烤箱的厨房", "做饭的地方，有锅碗瓢盆、厨具和冰箱")),
    Scene("laundry", ("laundry_room", "utility_room", "utility", "washing_room"), (
        "a laundry room", "a utility room with a washing machine, a dryer and a drying rack",
        "a space for washing, drying and ironing clothes, with laundry baskets",
        "洗衣房", "家务间", "有洗衣机、烘干机和晾衣架的洗衣间", "洗衣、晾晒和熨烫衣物的空间，有脏衣篮")),
    Scene("living_room", ("livingroom", "lounge", "sitting_room", "family_room", "salon"), (
        "a living room", "a living room with a sofa, armchairs, a coffee table and a TV",
        "a cosy lounge where the family relaxes, with cushions, a rug and a floor lamp",
        "客厅", "起居室", "有沙发、扶手椅、茶几和电视的客厅", "一家人放松休息的温馨客厅，有靠垫、地毯和落地灯")),
    Scene("outdoor", ("outdoors", "garden", "patio", "balcony", "terrace", "porch", "deck", "backyard", "yard"), (
        "an outdoor space", "a balcony, patio or garden with outdoor furniture and plants",
        "a terrace with garden chairs, a table in the sun and potted plants",
        "户外", "阳台", "花园", "露台上的户外桌椅、遮阳伞和绿植")),
)

DEFAULT_SCENE_LABELS: tuple[str, ...] = tuple(scene.label for scene in SCENES)
_BY_LABEL = {scene.label: scene for scene in SCENES}
_ALIASES = {alias: scene.label for scene in SCENES for alias in scene.aliases}


def _key(label: str) -> str:
    return label.strip().lower().replace(" ", "_").replace("-", "_")


def canonical_scene(label: str) -> str:
    """The canonical label of a scene name: a known alias (`entrance_hall`, "Living room") gives
    its scene's label (`hallway`, `living_room`); any other name is returned unchanged."""
    key = _key(label)
    if key in _BY_LABEL:
        return key
    return _ALIASES.get(key, label)


def scene_descriptions(label: str) -> tuple[str, ...]:
    """How people describe the scene, in English and Chinese; for a label outside the vocabulary,
    the label itself in words ("wine_cellar" -> "a wine cellar")."""
    scene = _BY_LABEL.get(canonical_scene(label))
    if scene is not None:
        return scene.descriptions
    return (label.replace("_", " "), f"a {label.replace('_', ' ')}")


def combine_scene_probabilities(*distributions) -> dict[str, float]:
    """Scene probabilities from independent readings of one room (its photo, its words) -> one
    distribution, most likely first: their normalised product, so readings that agree grow surer
    and a confident reading outweighs an unsure one. `None` readings are left out.

    Each reading maps every label to its probability; labels missing from one reading get 0 there.
    """
    readings = [d for d in distributions if d]
    if not readings:
        raise ValueError("no scene probabilities to combine")
    labels = list(readings[0])
    log_scores = {label: sum(math.log(max(float(d.get(label, 0.0)), 1e-12)) for d in readings) for label in labels}
    top = max(log_scores.values())
    weights = {label: math.exp(score - top) for label, score in log_scores.items()}
    total = sum(weights.values())
    return dict(sorted(((label, w / total) for label, w in weights.items()), key=lambda kv: -kv[1]))


_WORDS = {"children_room": "children's room", "home_office": "home office", "laundry": "laundry room",
          "outdoor": "outdoor space"}


def scene_words(label: str) -> str:
    """A scene label in lower-case words for people: ``living_room`` -> "living room",
    ``outdoor`` -> "outdoor space"."""
    return _WORDS.get(label, label.replace("_", " ").strip())
