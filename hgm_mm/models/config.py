"""Dataclass configs of a model: its towers, fusion, scene head and preprocessing.

A `ModelConfig` is everything needed to rebuild a model's architecture with no network:
`save_pretrained` writes it as JSON beside the weights, and `model_configs/*.json` hold the
built-in ones. Unknown keys are an error, never silently dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..json_config import JsonConfig
from ..data.scenes import DEFAULT_SCENE_LABELS  # the scene vocabulary, re-exported here as before

IMAGE_TOWER_SOURCES = ("timm", "open_clip")
TEXT_TOWER_SOURCES = ("hf", "open_clip")
POOLING_MODES = ("mean", "cls")
VIEW_POOLINGS = ("lse", "max", "mean")
ROOM_VIEW_KINDS = ("crops", "feature_map")  # how room views are encoded (ModelConfig.room_views)
PROJECTIONS = ("linear", "none")
SCENE_SOURCES = ("room", "photo")


def _check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; expected one of {list(allowed)}")


@dataclass
class ImageTowerConfig(JsonConfig):
    """An image tower and how to feed it."""

    source: str = "timm"  # "timm": any timm model; "open_clip": the visual tower of an open_clip model
    name: str = "tf_efficientnet_lite0"  # timm model name, or open_clip model name
    pretrained: str | None = None  # weight source, see `hgm_mm.models.pretrained.resolve_weight_source`
    image_size: int = 224  # square input side, pixels
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"  # resize filter: "bicubic" or "bilinear"
    crop_pct: float = 1.0  # resize shorter side to image_size / crop_pct, then centre crop
    projection: str = "linear"  # "linear" maps features to embed_dim; "none" keeps them (must equal embed_dim)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs for timm.create_model

    def __post_init__(self) -> None:
        _check_choice("ImageTowerConfig", "source", self.source, IMAGE_TOWER_SOURCES)
        _check_choice("ImageTowerConfig", "projection", self.projection, PROJECTIONS)
        _check_choice("ImageTowerConfig", "interpolation", self.interpolation, ("bicubic", "bilinear"))
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"ImageTowerConfig.image_size={self.image_size!r}; expected an int >= 8")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"ImageTowerConfig.crop_pct={self.crop_pct!r}; expected a value in [0.1, 1.0]")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ImageTowerConfig mean/std must be 3 numbers, std > 0; got {self.mean}, {self.std}")


@dataclass
class TextTowerConfig(JsonConfig):
    """A text tower (a BERT-style transformers encoder, or an open_clip text tower)."""

    source: str = "hf"  # "hf": any transformers encoder; "open_clip": the text tower of an open_clip model
    name: str = ""  # transformers model id or folder; open_clip model name; informational once saved
    pretrained: str | None = None  # weight source, see `hgm_mm.models.pretrained.resolve_weight_source`
    pooling: str = "mean"  # how token states become one vector (hf towers)
    max_length: int = 64  # tokens per text, longer texts are truncated
    prefix: str = ""  # prepended to every text (e5 models expect "query: ")
    projection: str = "linear"
    hf_config: dict[str, Any] | None = None  # transformers config dict when built without a hub

    def __post_init__(self) -> None:
        _check_choice("TextTowerConfig", "source", self.source, TEXT_TOWER_SOURCES)
        _check_choice("TextTowerConfig", "pooling", self.pooling, POOLING_MODES)
        _check_choice("TextTowerConfig", "projection", self.projection, PROJECTIONS)
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"TextTowerConfig.max_length={self.max_length!r}; expected an int >= 2")


@dataclass
class FusionConfig(JsonConfig):
    """How two L2-normalised embeddings (image, text) become one."""

    hidden_dim: int = 0  # 0: gated average only; > 0: add a residual MLP of this width
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_dim < 0:
            raise ValueError(f"FusionConfig.hidden_dim={self.hidden_dim!r}; expected >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FusionConfig.dropout={self.dropout!r}; expected a value in [0, 1)")


@dataclass
class ModelConfig(JsonConfig):
    """A whole hgm_mm model: towers, shared embedding space, fusion and scene head."""

    name: str = "custom"
    embed_dim: int = 256  # the shared embedding space of rooms, products, images and texts
    image_tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    # The BERT tower that reads scene text ("a Nordic living room"); None shares `text_tower`.
    scene_text_tower: TextTowerConfig | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)
    scene_labels: tuple[str, ...] = DEFAULT_SCENE_LABELS
    init_logit_scale: float = 2.6592  # log(1 / 0.07), as CLIP
    # A room photo is seen as views: grid g cuts it into g x g tiles (1 = the whole photo), since
    # each product is a small part of a scene. A product's score for a room pools its view scores.
    room_grids: tuple[int, ...] = (1,)
    # How the views are seen. "crops": each tile resized to the tower's input size and encoded on
    # its own (sum of g * g tower passes). "feature_map": the whole photo at `room_map_size` in one
    # pass, the tower's last feature map average-pooled over each tile's cells (timm towers).
    room_views: str = "crops"
    room_map_size: int = 640  # "feature_map": side of the one pass
    view_pooling: str = "lse"  # "lse": soft maximum at `view_temperature`; "max"; "mean"
    view_temperature: float = 0.05
    # What scene recognition reads from a photo. "room": `scene_head` on the fused room vector (the
    # mean of the room views), the head joint training shapes. "photo": `photo_scene_head` on the
    # image tower's pooled features of the whole photo at `scene_image_size`; room tiles dilute
    # the scene, and the tower's features carry more of it than the projected room vector.
    scene_source: str = "room"
    scene_image_size: int | None = None  # "photo": side the whole photo is resized to; None: image_tower.image_size
    scene_flip_average: bool = False  # "photo": average the scene log-probabilities of the photo and its mirror image
    # "photo": the head reads the photo through its own tuned copy of the image tower's top N
    # `feature_stages()` (the tower's lower stages are shared); 0 reads the image tower itself
    scene_branch_stages: int = 0
    # Scene from words: a `SceneTextClassifier` with its own copy of the scene-text tower's top N
    # layers (0: a head on the tower's output); None reads words through `scene_head` on the room vector.
    scene_text_layers: int | None = None
    # Calibration: scene logits are divided by these before the softmax (fitted on validation data).
    photo_scene_temperature: float = 1.0  # the photo reading (photo scene head, or scene_head on the room)
    text_scene_temperature: float = 1.0  # the words reading (the scene-text classifier, or scene_head)

    def __post_init__(self) -> None:
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"ModelConfig.embed_dim={self.embed_dim!r}; expected a positive int")
        self.scene_labels = tuple(self.scene_labels)
        if len(self.scene_labels) < 2 or len(set(self.scene_labels)) != len(self.scene_labels):
            raise ValueError(f"ModelConfig.scene_labels must hold >= 2 distinct labels; got {list(self.scene_labels)}")
        self.room_grids = tuple(self.room_grids)
        if not self.room_grids or any(not isinstance(g, int) or not 1 <= g <= 8 for g in self.room_grids) \
                or len(set(self.room_grids)) != len(self.room_grids):
            raise ValueError(f"ModelConfig.room_grids={list(self.room_grids)}; expected distinct grid sizes 1..8")
        _check_choice("ModelConfig", "room_views", self.room_views, ROOM_VIEW_KINDS)
        if isinstance(self.room_map_size, bool) or not isinstance(self.room_map_size, int) \
                or self.room_map_size < 32 * max(self.room_grids):
            raise ValueError(f"ModelConfig.room_map_size={self.room_map_size!r}; expected an int >= 32 x the largest "
                             f"grid ({32 * max(self.room_grids)}), so each tile covers a cell of the feature map")
        _check_choice("ModelConfig", "view_pooling", self.view_pooling, VIEW_POOLINGS)
        if not self.view_temperature > 0:
            raise ValueError(f"ModelConfig.view_temperature={self.view_temperature!r}; expected > 0")
        _check_choice("ModelConfig", "scene_source", self.scene_source, SCENE_SOURCES)
        if self.scene_image_size is not None and (isinstance(self.scene_image_size, bool)
                                                  or not isinstance(self.scene_image_size, int)
                                                  or self.scene_image_size < 8):
            raise ValueError(f"ModelConfig.scene_image_size={self.scene_image_size!r}; expected None or an int >= 8")
        if not isinstance(self.scene_flip_average, bool):
            raise ValueError(f"ModelConfig.scene_flip_average={self.scene_flip_average!r}; expected true or false")
        if isinstance(self.scene_branch_stages, bool) or not isinstance(self.scene_branch_stages, int) \
                or self.scene_branch_stages < 0:
            raise ValueError(f"ModelConfig.scene_branch_stages={self.scene_branch_stages!r}; expected an int >= 0")
        if self.scene_branch_stages and self.scene_source != "photo":
            raise ValueError(f"ModelConfig.scene_branch_stages={self.scene_branch_stages} belongs to the photo scene "
                             f"head; scene_source is {self.scene_source!r}: set it to 'photo' or the stages to 0")
        if self.scene_text_layers is not None:
            if isinstance(self.scene_text_layers, bool) or not isinstance(self.scene_text_layers, int) \
                    or self.scene_text_layers < 0:
                raise ValueError(f"ModelConfig.scene_text_layers={self.scene_text_layers!r}; expected null or an "
                                 "int >= 0")
            if (self.scene_text_tower or self.text_tower).source != "hf":
                raise ValueError("ModelConfig.scene_text_layers needs a transformers ('hf') scene-text tower; "
                                 "set it to null for an open_clip text tower")
        for name in ("photo_scene_temperature", "text_scene_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"ModelConfig.{name}={value!r}; expected a finite number > 0")
        if self.image_tower.source == "open_clip" and self.text_tower.source == "open_clip":
            if self.image_tower.name != self.text_tower.name:
                raise ValueError("open_clip image and text towers must come from the same open_clip model; got "
                                 f"{self.image_tower.name!r} and {self.text_tower.name!r}")
        if self.scene_text_tower is not None and self.scene_text_tower.source != "hf":
            raise ValueError("scene_text_tower must be a transformers ('hf') tower; "
                             f"got source={self.scene_text_tower.source!r}")
        if self.image_tower.source == "open_clip" and self.text_tower.source != "open_clip":
            raise ValueError("an open_clip image tower needs the open_clip text tower of the same model; "
                             "use a timm image tower to pair with a transformers text tower")

    # -- JSON ---------------------------------------------------------------------------------
    @classmethod
    def _nested(cls, data: dict[str, Any], origin: str) -> dict[str, Any]:
        nested = {"image_tower": ImageTowerConfig, "text_tower": TextTowerConfig,
                  "scene_text_tower": TextTowerConfig, "fusion": FusionConfig}
        for key, sub_cls in nested.items():
            if data.get(key) is not None:
                data[key] = sub_cls.from_dict(data[key], origin=f"{origin}: {key}")
        return data

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); fix or regenerate the file") from err
        return cls.from_dict(data, origin=str(path))
