"""`hgm-mm demo`: the shopping guide end to end on the IKEA room dataset, in a few minutes on a CPU.

    result = run_demo("../shared/data")          # or run_demo(): $HGM_DATA, else the public dataset
    result.contact_sheet                          # each shown room beside its top products

What it does:
  1. Finds the dataset: `data` (a dataset folder, or a folder holding `ikea/`), else `$HGM_DATA`,
     else github.com/IvonaTau/ikea downloaded into the cache and converted (`data.ikea_repo`).
  2. Takes a subset sized for a CPU: `train_rooms` rooms spread over the scenes, their products and
     other catalogue products up to `products`, written as a dataset folder that points at the
     original photos. The rooms are split into training and validation rooms as `train` splits
     them, and the rooms shown are validation rooms: the model never trained on them.
  3. Fine-tunes `model` for `steps` steps on the training rooms (`hgm_mm.train`).
  4. Indexes the subset's catalogue with the trained model (`ranking.catalog.build_catalog_index`), with
     the scene-category prior counted from the pairs of every dataset room except the held-out ones.
  5. Matches the shown rooms' photos (`ranking.matcher.Matcher`), prints the ranked products, writes
     `demo.json` and a contact sheet: each room photo beside its top products, with titles, the
     products that really appear in that room framed in green.
"""
from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Dataset, ImageError, Product, Room, load_dataset, load_image
from ..data.ikea_repo import DATA_ENV, ikea_dataset
from ..data.records import PAIRS_FILE, PRODUCTS_FILE, ROOMS_FILE
from ..data.split import split_rooms
from ..data.scenes import scene_words
from ..files import atomic_text
from .contact_sheet import scene_verdict, write_contact_sheet

DEFAULT_OUTPUT = Path("runs") / "demo"
SCENE_PHOTOS_PER_SCENE = 40  # photos of the scene set per scene the demo's photo scene head learns from
VAL_FRACTION = 0.2  # rooms held out, as TrainConfig's default


@dataclass
class DemoSubset:
    """The part of a dataset the demo trains and shows on.

    Attributes:
        rooms: Every room of the subset (training and validation), in dataset order.
        products: The subset's catalogue, in dataset order.
        pairs: (room_id, product_id) pairs within the subset.
        train_rooms: Rooms the model trains on.
        val_rooms: Rooms held out; the shown rooms are among them.
        shown: The rooms the demo matches and draws.
    """

    rooms: list[Room]
    products: list[Product]
    pairs: list[tuple[str, str]]
    train_rooms: list[Room]
    val_rooms: list[Room]
    shown: list[Room]


@dataclass
class DemoResult:
    """Where `run_demo` put everything, and what it found.

    Attributes:
        data_dir: The dataset folder used.
        subset_dir: The subset dataset folder trained on.
        model_dir: The trained model (`hgm_mm.load_model`).
        index_dir: The catalogue index (`ranking.matcher.Matcher.load`).
        contact_sheet: The image of each shown room beside its top products.
        report: `demo.json`: every match with its per-term scores, and the paths above.
        matches: Room id -> `MatchResult` of the shown rooms.
        hits: Room id -> how many of its top products appear in that room.
        unreadable_photos: Catalogue photos that could not be read (those products are indexed by
            their text alone) and shown rooms whose photo could not be read (not shown).
        skipped_in_training: Unreadable photos the training skipped (`TrainResult.skipped_images`).
        wall_seconds: Time the demo took.
    """

    data_dir: Path
    subset_dir: Path
    model_dir: Path
    index_dir: Path
    contact_sheet: Path
    report: Path
    matches: dict[str, Any] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    unreadable_photos: list[str] = field(default_factory=list)
    skipped_in_training: int = 0
    wall_seconds: float = 0.0


def find_demo_data(data: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                   download_url: str | None = None, echo: Callable[[str], object] | None = print) -> Path:
    """The dataset folder the demo runs on.

    `data` may be a dataset folder (products.jsonl, rooms.jsonl, pairs.csv) or a folder holding
    one as `ikea/` (the shared data root). Without `data`, ``$HGM_DATA`` is read the same way;
    without either, the public IKEA dataset is downloaded into the cache and converted, and
    `echo` says so.

    Raises:
        FileNotFoundError: The folder given holds no dataset.
        hgm_mm.data.ikea_repo.DownloadError: Nothing given and no network: one sentence saying to
            pass ``--data DIR`` or set ``HGM_DATA``.
    """
    if data is None and os.environ.get(DATA_ENV):
        data = os.environ[DATA_ENV]
    if data is None:
        if echo is not None:
            echo(f"no --data and no {DATA_ENV}: using the public IKEA room dataset (github.com/IvonaTau/ikea)")
        return ikea_dataset(cache_dir, url=download_url, echo=echo)
    folder = Path(data)
    for candidate in (folder, folder / "ikea"):
        if (candidate / PRODUCTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{folder} holds no {PRODUCTS_FILE} (nor ikea/{PRODUCTS_FILE}); pass --data a dataset "
                            f"folder with {PRODUCTS_FILE}, {ROOMS_FILE} and {PAIRS_FILE}")


def choose_subset(dataset: Dataset, *, train_rooms: int = 24, products: int = 240, shown: int | None = None,
                  val_fraction: float = VAL_FRACTION, seed: int = 0) -> DemoSubset:
    """Rooms spread over the scenes, their products, and other products up to `products`.

    Rooms are taken two per scene in turn (seeded order), so the scenes are spread; the
    subset's rooms are split as `hgm_mm.train` splits them (`split_rooms` with the same
    `val_fraction` and `seed`), and the shown rooms are validation rooms of different scenes
    first (`shown` None: every validation room, so what is shown is what is measured). The catalogue keeps the shown rooms' products first, then the other rooms' products (one
    room at a time in turn, so every room keeps some), then random other products, up to `products`.

    Raises:
        ValueError: Too few rooms with products for a training and a validation side.
    """
    if train_rooms < 2 or products < 1 or (shown is not None and shown < 1):
        raise ValueError(f"train_rooms={train_rooms}, products={products}, shown={shown}; the demo needs at least "
                         "2 rooms, 1 product and 1 room to show")
    positives = dataset.positives()
    rng = random.Random(seed)
    by_scene: dict[str, list[Room]] = defaultdict(list)
    for room in dataset.rooms:
        if positives.get(room.room_id):
            by_scene[room.scene or ""].append(room)
    for scene in sorted(by_scene):
        rng.shuffle(by_scene[scene])
    picked: list[Room] = []
    queues = [by_scene[scene] for scene in sorted(by_scene)]
    while len(picked) < train_rooms and any(queues):
        for queue in queues:
            for _ in range(2):  # two at a time: a scene with two rooms has one on each side of the split
                if queue and len(picked) < train_rooms:
                    picked.append(queue.pop())
    picked_ids = {room.room_id for room in picked}
    rooms = [room for room in dataset.rooms if room.room_id in picked_ids]
    train_side, val_side = split_rooms(rooms, val_fraction=val_fraction, seed=seed) if len(rooms) >= 2 else (rooms, [])
    if not train_side or not val_side:
        raise ValueError(f"{dataset.root}: {len(rooms)} room(s) with products; the demo needs rooms on both a training "
                         "and a validation side (two rooms of one scene at least); add rooms or raise --train-rooms")
    shown_rooms = _spread_over_scenes(val_side, len(val_side) if shown is None else shown)

    budget: dict[str, None] = {}
    for room in shown_rooms:
        for product_id in positives[room.room_id][: max(products - len(budget), 0)]:
            budget[product_id] = None
    # the other rooms' products one room at a time in turn, so that every room keeps some
    queues = [list(positives[room.room_id]) for room in val_side + train_side if room not in shown_rooms]
    while len(budget) < products and any(queues):
        for queue in queues:
            if queue and len(budget) < products:
                budget[queue.pop(0)] = None
    others = [p.product_id for p in dataset.products if p.product_id not in budget]
    rng.shuffle(others)
    for product_id in others[: max(products - len(budget), 0)]:
        budget[product_id] = None
    catalogue = [p for p in dataset.products if p.product_id in budget]
    pairs = [(r, p) for r, p in dataset.pairs if r in picked_ids and p in budget]
    return DemoSubset(rooms=rooms, products=catalogue, pairs=pairs, train_rooms=train_side, val_rooms=val_side,
                      shown=shown_rooms)


def _spread_over_scenes(rooms: Sequence[Room], count: int) -> list[Room]:
    """Up to `count` rooms, a different scene each while there are scenes left."""
    chosen: list[Room] = []
    seen: set[str | None] = set()
    for room in rooms:
        if room.scene not in seen and len(chosen) < count:
            chosen.append(room)
            seen.add(room.scene)
    for room in rooms:
        if room not in chosen and len(chosen) < count:
            chosen.append(room)
    return chosen


def write_subset(subset: DemoSubset, folder: str | os.PathLike) -> Path:
    """Writes the subset as a dataset folder whose photo paths point at the original photos."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)

    def row(record: Product | Room, id_key: str, fields_: dict[str, Any]) -> str:
        document = {id_key: getattr(record, id_key), "image": os.path.relpath(record.image, folder), **fields_}
        document.update({k: v for k, v in record.attributes.items() if k not in document})
        return json.dumps(document, ensure_ascii=False)

    products = [row(p, "product_id", {"title": p.title, "category": p.category, "description": p.description})
                for p in subset.products]
    rooms = [row(r, "room_id", {"scene": r.scene, "title": r.title}) for r in subset.rooms]
    atomic_text(folder / PRODUCTS_FILE, "\n".join(products) + "\n")
    atomic_text(folder / ROOMS_FILE, "\n".join(rooms) + "\n")
    atomic_text(folder / PAIRS_FILE, "room_id,product_id\n" + "".join(f"{r},{p}\n" for r, p in subset.pairs))
    return folder


def run_demo(data: str | os.PathLike | None = None, *, output: str | os.PathLike | None = None,
             model: str = "hgm-lite-en", rooms: int | None = None, train_rooms: int = 24, products: int = 240,
             steps: int = 24, batch_size: int = 32, top_k: int = 5, seed: int = 0,
             cache_dir: str | os.PathLike | None = None, download_url: str | None = None,
             scene_data: str | os.PathLike | None = None, scene_photos: int = SCENE_PHOTOS_PER_SCENE,
             progress: bool = True, echo: Callable[[str], object] | None = print) -> DemoResult:
    """Trains briefly, indexes the catalogue, matches the held-out rooms and draws a contact sheet.

    Args:
        data: A dataset folder or a folder holding `ikea/`; default ``$HGM_DATA``, else the public
            IKEA dataset, downloaded into the cache (see :func:`find_demo_data`).
        output: Folder for everything the demo writes; default ``runs/demo``.
        model: The starting model (any name `create_model` takes).
        rooms: Validation rooms to match and show; None (default) shows every held-out room.
        train_rooms: Rooms in the subset (training and validation together).
        products: Catalogue products in the subset (the shown rooms' products are always in it).
        steps: Training steps.
        batch_size: Catalogue products per training step.
        top_k: Products shown per room.
        seed: Subset, split and training seed.
        cache_dir: Download cache (default ``~/.cache/hgm_mm``).
        download_url: The IKEA repository archive; default `data.ikea_repo.IKEA_ARCHIVE_URL`.
        scene_data: An `images.jsonl` scene set (or its folder) the photo scene head also learns
            from; default the `places365-rooms/` folder beside the dataset, when there is one.
        scene_photos: Training photos taken from `scene_data` per scene (0: none).
        progress: Progress bars.
        echo: Called with each line of the demo's report; ``None`` for silence.

    Raises:
        FileNotFoundError: No dataset where one was given.
        hgm_mm.data.ikea_repo.DownloadError: No dataset given and no network.
        ValueError: A dataset file breaks the format, or holds too few rooms with products.
    """
    from ..ranking.catalog import build_catalog_index
    from ..ranking.matcher import Matcher
    from ..ranking.prior import SceneCategoryPrior
    from ..models.hgm import load_model
    from ..training import TrainConfig, train

    say = echo if echo is not None else (lambda line: None)
    if (rooms is not None and rooms < 1) or steps < 1 or batch_size < 1 or top_k < 1:
        raise ValueError(f"rooms={rooms}, steps={steps}, batch_size={batch_size}, top_k={top_k}; each must be >= 1")
    started = time.perf_counter()
    root = find_demo_data(data, cache_dir=cache_dir, download_url=download_url, echo=echo)
    dataset = load_dataset(root)
    if not dataset.products or not dataset.rooms or not dataset.pairs:
        raise ValueError(f"{root}: the demo needs {PRODUCTS_FILE}, {ROOMS_FILE} and {PAIRS_FILE}")
    subset = choose_subset(dataset, train_rooms=train_rooms, products=products, shown=rooms,
                           val_fraction=VAL_FRACTION, seed=seed)
    paired = {room_id for room_id, _ in subset.pairs}
    n_train = sum(room.room_id in paired for room in subset.train_rooms)  # rooms left without products don't train
    if not n_train:
        raise ValueError(f"{root}: no training room keeps a product within {products} products; raise --products")
    out = Path(output) if output is not None else DEFAULT_OUTPUT
    out.mkdir(parents=True, exist_ok=True)
    subset_dir = write_subset(subset, out / "data")
    say(f"hgm-mm demo: data {root} ({len(dataset.products)} products, {len(dataset.rooms)} rooms); training {model} "
        f"for {steps} steps on {n_train} rooms and {len(subset.products)} products; {len(subset.val_rooms)} rooms "
        "held out")

    config = TrainConfig(model=model, max_steps=steps, batch_size=min(batch_size, len(subset.products)),
                         rooms_per_batch=min(8, n_train), val_fraction=VAL_FRACTION, seed=seed,
                         warmup_steps=min(10, steps // 3), eval_every_epochs=10**6,
                         checkpoint_every_steps=10**6, log_every_steps=max(1, steps // 5), scene_heads=False)
    trained = train(config, data=subset_dir, output=out / "training", resume=False, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trained model's towers were announced when it was created
        trained_model = load_model(trained.model_dir)
    held_out = {room.room_id for room in subset.val_rooms}
    _train_demo_scene_heads(trained_model, dataset, subset, held_out, root, scene_data, scene_photos,
                            config.scene_image_size, seed, progress, say)
    trained_model.save_pretrained(trained.model_dir)
    # which categories belong in which scene, from every room of the dataset but the held-out ones:
    # a few training rooms alone would leave most scene-category cells empty
    try:
        prior = SceneCategoryPrior.from_pairs([r for r in dataset.rooms if r.room_id not in held_out],
                                              dataset.products, dataset.pairs)
    except ValueError:  # no scenes or no categories in this dataset: ranking without scene fit
        prior = None
    index_dir = out / "index"
    built = build_catalog_index(trained_model, subset.products, index_dir, prior=prior, progress=progress)
    matcher = Matcher.load(index_dir)

    positives = defaultdict(set)
    for room_id, product_id in subset.pairs:
        positives[room_id].add(product_id)
    matches, hits, skipped_rooms = _match_shown_rooms(matcher, subset.shown, positives, top_k, say)
    if not matches:
        raise ValueError(f"{root}: none of the shown rooms' photos can be read ({'; '.join(skipped_rooms)})")

    measured = _measure_held_out(matcher, subset, positives)
    by_id = {room.room_id: room for room in subset.shown}
    sheet = write_contact_sheet(out / "contact_sheet.jpg", [(by_id[rid], result) for rid, result in matches.items()],
                                positives, title=f"hgm-mm demo: {model} fine-tuned {trained.steps} steps; "
                                                 "green frame = the product appears in that room")
    unreadable = sorted({str(photo) for photo, _ in built.skipped} | set(skipped_rooms))
    report = out / "demo.json"
    atomic_text(report, json.dumps({
        "data": str(root), "model": model, "steps": trained.steps, "validation": trained.best_metrics,
        "held_out": measured,
        "subset": {"rooms": len(subset.rooms), "train_rooms": len(subset.train_rooms),
                   "val_rooms": len(subset.val_rooms), "products": len(subset.products)},
        "paths": {"subset": str(subset_dir), "model": str(trained.model_dir), "index": str(index_dir),
                  "contact_sheet": str(sheet)},
        "rooms": [{"room_id": rid, "true_scene": by_id[rid].scene, "image": str(by_id[rid].image),
                   "in_room_among_top": hits[rid], **result.to_dict()} for rid, result in matches.items()],
        "unreadable_photos": unreadable, "skipped_in_training": trained.skipped_images,
    }, indent=2, ensure_ascii=False))

    for room_id, result in matches.items():
        _say_match(say, by_id[room_id], result, positives[room_id])
    wall = time.perf_counter() - started
    _say_summary(say, measured, unreadable, trained, sheet, index_dir, report, wall)
    return DemoResult(data_dir=root, subset_dir=subset_dir, model_dir=Path(trained.model_dir), index_dir=index_dir,
                      contact_sheet=sheet, report=report, matches=matches, hits=hits, unreadable_photos=unreadable,
                      skipped_in_training=trained.skipped_images, wall_seconds=wall)


def _train_demo_scene_heads(model, dataset, subset, held_out: set[str], root: Path, scene_data, scene_photos: int,
                            image_size: int, seed: int, progress: bool, say) -> None:
    """The guide's scene heads, on every room of the dataset but the held-out ones (photos and
    captions are cheap beside retrieval training) and a few photos per scene of the scene set."""
    from ..training.guide_heads import train_guide_heads

    scene_rooms = [r for r in dataset.rooms if r.room_id not in held_out and r.scene]
    extra = _demo_scene_data(root, scene_data, scene_photos, model.scene_labels)
    say(f"training the scene heads on {len(scene_rooms)} rooms' photos and captions"
        f"{f' and {len(extra.train_images)} scene photos' if extra.train_images else ''}")
    # the linear head alone, on the tower's features: a tuned copy of its top stages costs minutes
    train_guide_heads(model, scene_rooms, subset.val_rooms, extra, seed=seed, progress=progress,
                      scene_image_size=image_size, branch_stages=0, random_crops=0, epochs=10)


def _match_shown_rooms(matcher, rooms, positives, top_k: int, say):
    """Each shown room's match, how many of its top products are in the room, and the photos that
    could not be read (their rooms are not shown)."""
    matches, hits, skipped = {}, {}, []
    for room in rooms:
        try:
            photo = load_image(room.image)
        except ImageError as err:
            skipped.append(str(room.image))
            say(f"room {room.room_id} not shown: {err}")
            continue
        result = matcher.match(photo, k=top_k)
        matches[room.room_id] = result
        hits[room.room_id] = sum(p.product_id in positives[room.room_id] for p in result.products)
    return matches, hits, skipped


def _say_match(say, room, result, in_room: set[str]) -> None:
    """One room's lines of the demo's report: its scene, ranked products (* = in the room), the set."""
    say(f"\nroom {room.room_id} (true scene: {scene_words(room.scene or '?')}): the guide sees "
        f"{scene_verdict(result)}; {room.image}")
    for rank, product in enumerate(result.products, 1):
        mark = "*" if product.product_id in in_room else " "
        meta = product.metadata
        say(f"  {rank}. {mark} {meta.get('title') or product.product_id} ({meta.get('category')})  "
            f"{meta.get('image', '')}")
    if result.product_set:
        say("  set: " + ", ".join(f"{p.metadata.get('category')}: {p.metadata.get('title') or p.product_id}"
                                  for p in result.product_set))


def _say_summary(say, measured: dict, unreadable: list[str], trained, sheet: Path, index_dir: Path, report: Path,
                 wall: float) -> None:
    """The demo report's last lines: the held-out measures beside chance, and where everything is."""
    say(f"\non the {measured['rooms']} held-out rooms: scene from the photo right for {measured['scene_correct']} "
        f"(accuracy {measured['scene_accuracy']:.2f}; chance {measured['scene_chance']:.2f}); Recall@10 "
        f"{measured['recall@10']:.3f} (random {measured['random_recall@10']:.3f})")
    say(f"* = the product appears in that room. Unreadable photos: {len(unreadable)} in the catalogue and the shown "
        f"rooms (indexed by their text alone, or not shown), {trained.skipped_images} skipped in training.")
    say(f"contact sheet: {sheet.resolve()}")
    say(f"trained model: {Path(trained.model_dir).resolve()} (validation Recall@10 "
        f"{trained.best_metrics.get('recall@10', float('nan')):.3f})")
    say(f"catalogue index: {index_dir.resolve()}  (hgm-mm match --index {index_dir} PHOTO)")
    say(f"results: {report.resolve()}")
    say(f"Done in {wall:.0f} s.")


def _demo_scene_data(root: Path, scene_data, per_scene: int, labels):
    """A few photos per scene of the scene set (`scene_data`, else `places365-rooms/` beside the dataset)."""
    from ..training.guide_heads import SceneData, read_scene_data

    folder = Path(scene_data) if scene_data is not None else root.parent / "places365-rooms"
    if per_scene <= 0 or not ((folder / "images.jsonl").is_file() or folder.is_file()):
        return SceneData()
    full = read_scene_data(folder, labels=labels)

    def per_label(items, n):
        taken: dict[str, int] = defaultdict(int)
        chosen = []
        for item in items:
            if taken[item.scene] < n:
                taken[item.scene] += 1
                chosen.append(item)
        return chosen

    # a quarter as many validation photos: with the few held-out rooms they calibrate the head
    return SceneData(train_images=per_label(full.train_images, per_scene),
                     val_images=per_label(full.val_images, max(1, per_scene // 4)))


def _measure_held_out(matcher, subset: DemoSubset, positives) -> dict[str, Any]:
    """Scene accuracy from the photo and Recall@10 on every held-out room, beside chance and random."""
    from collections import Counter

    from ..evaluation import metrics

    rooms = [r for r in subset.val_rooms if positives.get(r.room_id)]
    correct, recalls, random_recalls = 0, [], []
    for room in rooms:
        result = matcher.match(str(room.image), k=10)
        correct += result.scene == room.scene
        relevant = positives[room.room_id]
        recalls.append(metrics.recall_at_k_ranked([p.product_id for p in result.products], relevant, 10))
        random_recalls.append(metrics.expected_random_recall_at_k(len(matcher.index), len(relevant), 10))
    counts = Counter(r.scene for r in rooms)
    return {"rooms": len(rooms), "scene_correct": correct, "scene_accuracy": correct / max(len(rooms), 1),
            "scene_chance": max(counts.values()) / len(rooms) if rooms else 0.0,
            "recall@10": sum(recalls) / max(len(recalls), 1),
            "random_recall@10": sum(random_recalls) / max(len(random_recalls), 1)}
