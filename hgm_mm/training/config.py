"""The training config: every knob of a run, validated, readable from YAML or JSON."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.config import ROOM_VIEW_KINDS, SCENE_SOURCES
from ..json_config import JsonConfig

PRECISIONS = ("no", "bf16", "fp16")
IMAGE_ERROR_POLICIES = ("skip", "raise")
TRAIN_VIEWS = ("all", "whole")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # accelerate trackers a run can report to (training/tracking.py)
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")


@dataclass
class TrainConfig(JsonConfig):
    """A fine-tuning run. The defaults follow the measurements in docs/training.md."""

    _key_noun = "setting"

    model: str = "hgm-lite-en"  # starting model: any name create_model takes
    # "feature_map" is one tower pass a room photo, its feature map pooled per tile: faster, lower Recall@10
    # (docs/training.md)
    room_views: str | None = None  # how a new model encodes room views: "crops" or "feature_map"; None: the model's
    room_map_size: int | None = None  # "feature_map": side of the one pass; None: the model's (640)
    epochs: int = 33  # passes over the catalogue's products
    max_steps: int | None = None  # stop after this many optimiser steps, whatever the epoch
    batch_size: int = 384  # catalogue products per step (photo <-> text contrastive)
    rooms_per_batch: int = 16  # training rooms per step (room -> products contrastive)
    positives_per_room: int = 16  # products of each room added to the step's products
    lr: float = 1e-3  # projections, fusion, scene head, temperature
    tower_lr: float = 3e-4  # unlocked tower layers
    weight_decay: float = 0.05  # AdamW decay of weight matrices (not biases, norms or the temperature)
    warmup_steps: int = 20  # linear learning-rate warm-up before the cosine decay
    product_loss_weight: float = 2.0  # product photo <-> product text
    temperature: float = 0.0  # > 0: contrastive temperature fixed at this value (logit scale log(1 / temperature),
    # not trained; at least 0.01, CLIP's clamp); 0: the model's learned logit scale
    room_temperature: float = 0.0  # > 0: the room -> products loss alone uses this fixed temperature (at least
    # 0.01); 0: the same temperature as the photo <-> text loss
    room_loss_weight: float = 1.0  # room -> its products, several positives
    scene_loss_weight: float = 0.5  # scene cross-entropy from the room
    scene_heads: bool = True  # after retrieval, train the photo scene head and the scene-text classifier
    scene_epochs: int = 4  # of the photo scene head, over rooms and scene set weighed half and half (guide_heads.py)
    scene_image_size: int = 288  # side the photo scene head reads; train_scenes' 384 gained 0.014 on Places365
    # rooms (docs/training.md) for about 1.8x the pixels, too slow for the 40-minute budget of the default run
    room_text_probability: float = 0.0  # share of training rooms that also read their caption (0: photo-only
    # rooms measured better for photo queries, docs/training.md)
    unlocked_image_groups: int = 1  # top layer groups of the image tower left trainable (timm groups)
    unlocked_text_layers: int = 0  # top transformer layers of the text towers left trainable
    freeze_norm_stats: bool = True  # BatchNorm statistics of locked image layers stay as pretrained
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on the towers' linear layers (needs peft)
    lora_alpha: float = 16.0  # LoRA scaling (alpha / rank)
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' inputs
    wise_alpha: float = 1.0  # WiSE-FT: 1 keeps fine-tuned weights, 0 the starting weights
    ema_decay: float = 0.0  # > 0: validate and save an exponential moving average of the trained weights
    # (decay min(ema_decay, (1 + t) / (10 + t)) at step t); 0: the raw weights
    val_fraction: float = 0.2  # rooms held out for validation, by room
    seed: int = 0  # the validation split, every step's batch and the initial weights of new layers
    eval_every_epochs: int = 4  # validation (and keeping the best model) every this many epochs
    patience: int = 5  # evaluations without Recall@10 improvement before stopping early
    precision: str = "no"  # "bf16" or "fp16" autocast where the hardware supports it
    grad_cache_chunk: int = 0  # > 0: embed in chunks of this size and keep the whole contrastive batch
    gradient_checkpointing: bool = False  # recompute the towers' activations in the backward pass (less memory)
    cache_frozen_features: bool = True  # compute locked layers once per photo/text (training/feature_cache.py)
    max_grad_norm: float = 1.0  # gradients clipped to this global norm
    skip_nonfinite: bool = False  # skip a batch whose loss is NaN/inf instead of stopping
    image_errors: str = "skip"  # unreadable photos: "skip" (and count) or "raise"
    num_workers: int = 2  # photo-decoding processes
    checkpoint_every_steps: int = 25  # a resumable checkpoint every this many steps
    log_every_steps: int = 5  # losses and learning rates to the trackers every this many steps
    report_to: list[str] | str | None = None  # trackers for losses, learning rates, validation metrics and this
    # config: "tensorboard", "wandb", "mlflow", a list of them, "all" (every one installed) or "none"; None: tensorboard
    # when it is installed (the behaviour before this setting existed), else none. Read as a list ("none" -> [])

    def __post_init__(self) -> None:
        _check_field_types(self)
        positive_ints = ("epochs", "batch_size", "rooms_per_batch", "positives_per_room", "eval_every_epochs",
                         "patience", "checkpoint_every_steps", "log_every_steps", "scene_epochs")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected an int >= 1")
        for name in ("unlocked_image_groups", "unlocked_text_layers", "lora_rank", "warmup_steps", "grad_cache_chunk",
                     "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected an int >= 0")
        if isinstance(self.scene_image_size, bool) or not isinstance(self.scene_image_size, int) \
                or self.scene_image_size < 8:
            raise ValueError(f"TrainConfig.scene_image_size={self.scene_image_size!r}; expected an int >= 8")
        if self.room_views is not None and self.room_views not in ROOM_VIEW_KINDS:
            raise ValueError(f"TrainConfig.room_views={self.room_views!r}; expected None or one of "
                             f"{list(ROOM_VIEW_KINDS)}")
        if self.room_map_size is not None and (isinstance(self.room_map_size, bool)
                                               or not isinstance(self.room_map_size, int) or self.room_map_size < 32):
            raise ValueError(f"TrainConfig.room_map_size={self.room_map_size!r}; expected None or an int >= 32")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"TrainConfig.max_steps={self.max_steps!r}; expected None or an int >= 1")
        for name in ("lr", "tower_lr", "lora_alpha"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected > 0")
        for name in ("weight_decay", "product_loss_weight", "room_loss_weight", "scene_loss_weight",
                     "max_grad_norm"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected >= 0")
        for name in ("room_text_probability", "wise_alpha", "lora_dropout"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected a value in [0, 1]")
        for name in ("temperature", "room_temperature"):
            value = float(getattr(self, name))
            if not (value == 0.0 or 0.01 <= value <= 1.0):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected 0 (off) or a value in "
                                 "[0.01, 1]")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay!r}; expected a value in [0, 1) (0: off)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction={self.val_fraction!r}; expected a value in (0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}; expected one of {list(PRECISIONS)}")
        if self.image_errors not in IMAGE_ERROR_POLICIES:
            raise ValueError(f"TrainConfig.image_errors={self.image_errors!r}; "
                             f"expected one of {list(IMAGE_ERROR_POLICIES)}")
        if self.product_loss_weight + self.room_loss_weight + self.scene_loss_weight == 0:
            raise ValueError("TrainConfig: every loss weight is 0; nothing would be trained")
        self.report_to = _report_to_list(self.report_to)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Reads a YAML or JSON file; `overrides` (e.g. from the command line) win."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                data = _load_yaml(text) or {}
        except Exception as err:  # json and yaml raise their own error types
            raise ValueError(f"{path}: cannot be parsed ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, origin=str(path))


@dataclass
class SceneTrainConfig(JsonConfig):
    """How `train_scenes` trains a scene head. The defaults are the measured recipe (Places365 rooms
    val accuracy 0.88 for hgm-lite-en, docs/training.md): the photo at 384 px through the head's own
    copy of the top 4 image-tower stages, tuned on the photo, its mirror image and 2 random crops
    for 6 epochs. `branch_stages=0, random_crops=0` trains the linear head alone, several times faster.

    "photo" settings apply to the photo scene head, "room" ones to `scene_head` on the room vector.
    """

    # what the model reads scenes from afterwards: "photo" gives it a new photo_scene_head on the whole
    # photo's tower features and trains it; "room" trains scene_head on the room vector (dropping a photo head)
    scene_source: str = "photo"
    # "photo": side the whole photo is resized to (None: the tower's image size); 384 beat 224 by 0.02-0.03
    # accuracy for hgm-lite-en on Places365 rooms, at about 3x the compute per photo (docs/training.md)
    scene_image_size: int | None = 384
    flip_average: bool = True  # "photo": at inference, average the scene of each photo and its mirror image
    epochs: int = 6  # passes over the training photos
    lr: float = 1e-2  # peak learning rate of the scene head (AdamW, warm-up then cosine decay)
    batch_size: int = 64  # photos per step
    label_smoothing: float = 0.1  # of the cross-entropy
    weight_decay: float = 1e-4  # AdamW decay of the weight matrices
    # "room": > 0 also trains the image projection at this rate; it is shared with products and rooms, so this
    # changes retrieval vectors too
    projection_lr: float = 0.0
    # "room": top layer groups of the image tower trained too (as TrainConfig.unlocked_image_groups); 0 keeps
    # the tower and retrieval as they are
    unlocked_image_groups: int = 0
    tower_lr: float = 2e-4  # learning rate of the unlocked tower groups, or of the scene branch
    # "photo": > 0 gives the head its own copy of the image tower's top stages, tuned with it (its BatchNorms
    # keep their statistics; the tower, and retrieval, stay as they were); for EfficientNet-Lite0, 4 copies the
    # last two block stages and the head convolution. None: 4 for "photo", 0 for "room"
    branch_stages: int | None = None
    # "photo": random crops cached per training photo besides it and its mirror image (each mirrored at random,
    # covering crop_scale to all of the photo, aspect 3/4 to 4/3), one version drawn per photo and epoch; a
    # function of seed and the photo's path. None: 2 for "photo", 0 for "room"
    random_crops: int | None = None
    crop_scale: float = 0.4  # smallest area of a random crop, as a fraction of the photo
    # cache each photo's mirror image too and draw one of the two per photo and epoch; None: True for "photo"
    mirror: bool | None = None
    # "room": "whole" trains on the whole-photo view alone (1/V of the caching); "all" on the mean of all the
    # room views, as inference scores it; both measured the same within noise. Validation uses all the views.
    # Views pooled from one feature map (ModelConfig.room_views "feature_map") always train on them all
    train_views: str = "whole"
    seed: int = 0  # the order of the photos, the mirror draws and the crops; the same seed gives the same weights
    image_errors: str = "skip"  # unreadable photos: "skip" (left out and listed) or "raise"
    # with validation photos, fit the head's temperature on them afterwards (accuracy is unchanged); else it is 1
    calibrate: bool = True

    def resolved(self) -> "SceneTrainConfig":
        """A copy with the settings left to `scene_source` (None) filled in."""
        photo = self.scene_source == "photo"
        return dataclasses.replace(
            self, branch_stages=(4 if photo else 0) if self.branch_stages is None else self.branch_stages,
            random_crops=(2 if photo else 0) if self.random_crops is None else self.random_crops,
            mirror=photo if self.mirror is None else self.mirror)

    def __post_init__(self) -> None:
        if None in (self.branch_stages, self.random_crops, self.mirror):
            self.resolved()  # checks the filled-in values; this config keeps its Nones for `scene_source` to decide
            return
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1")
        for name in ("unlocked_image_groups", "seed", "branch_stages", "random_crops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r}; expected an int >= 0")
        for name in ("lr", "tower_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}; expected a finite number > 0")
        for name in ("projection_lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}; expected a finite number >= 0")
        if isinstance(self.crop_scale, bool) or not (isinstance(self.crop_scale, (int, float))
                                                     and 0.0 < self.crop_scale <= 1.0):
            raise ValueError(f"crop_scale={self.crop_scale!r}; expected a fraction of the photo's area in (0, 1]")
        if not (isinstance(self.label_smoothing, (int, float)) and 0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing={self.label_smoothing!r}; expected a value in [0, 1)")
        for name, allowed in (("image_errors", IMAGE_ERROR_POLICIES), ("train_views", TRAIN_VIEWS),
                              ("scene_source", tuple(sorted(SCENE_SOURCES)))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {list(allowed)}")
        if self.scene_image_size is not None and (isinstance(self.scene_image_size, bool)
                                                  or not isinstance(self.scene_image_size, int)
                                                  or self.scene_image_size < 8):
            raise ValueError(f"scene_image_size={self.scene_image_size!r}; expected None or an int >= 8")
        for name in ("flip_average", "mirror", "calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected True or False")
        if self.scene_source == "photo":
            for name in ("projection_lr", "unlocked_image_groups"):
                if getattr(self, name):
                    raise ValueError(f"{name}={getattr(self, name)!r} trains layers the photo scene head does not "
                                     "own (they make room and product vectors); use scene_source='room' for it, or "
                                     "leave it at 0; branch_stages tunes a copy of the top stages that the scene "
                                     "head owns")
        else:
            for name in ("branch_stages", "random_crops"):
                if getattr(self, name):
                    raise ValueError(f"{name}={getattr(self, name)!r} is for the photo scene head; use "
                                     "scene_source='photo' or leave it at 0")


def setting_help() -> dict[str, str]:
    """What each `TrainConfig` setting means: the comment beside its field above (and the comment
    lines under it), for the command line's help. Empty where the source cannot be read."""
    try:
        lines = inspect.getsource(TrainConfig).splitlines()
    except (OSError, TypeError):  # a build without source files: flags without help
        return {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    found: dict[str, str] = {}
    current = None
    for line in lines:
        setting = re.match(r"    (\w+): [^#]*(?:#\s*(.*))?$", line)
        if setting and setting.group(1) in names:
            current = setting.group(1)
            found[current] = (setting.group(2) or "").strip()
        elif current is not None and line.startswith("    #"):
            found[current] = f"{found[current]} {line.strip().lstrip('#').strip()}".strip()
        else:
            current = None
    return found


_TYPE_NAMES = {int: "an int", float: "a finite number", bool: "true or false", str: "a string", type(None): "null",
               list[str]: "a list of strings"}


def _check_field_types(config) -> None:
    """Refuses a field whose value is not of its declared type: `epochs: true` is not 1 epoch, `lr: fast`
    and `lr: .inf` are not learning rates. An int is a number; a bool is neither."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        declared = hints[f.name]
        allowed = typing.get_args(declared) if typing.get_origin(declared) in (typing.Union, types.UnionType) \
            else (declared,)
        value = getattr(config, f.name)
        if not any(_is_of(value, kind) for kind in allowed):
            expected = " or ".join(_TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind))) for kind in allowed)
            raise ValueError(f"{type(config).__name__}.{f.name}={value!r} ({type(value).__name__}); "
                             f"expected {expected}")


def _report_to_list(value: list[str] | str | None) -> list[str] | None:
    """`report_to` as a list of distinct tracker names, in the order given; None stays None (the default)."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(name.strip().lower() for name in names))
    unknown = [name for name in names if name not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(f"TrainConfig.report_to={value!r}: unknown tracker(s) {unknown}; expected one of "
                         f"{list(REPORT_TO_CHOICES)} or a list of {list(TRACKERS)}")
    if len(names) > 1 and ("all" in names or "none" in names):
        raise ValueError(f"TrainConfig.report_to={value!r}: 'all' and 'none' stand alone; give one of them, or a "
                         f"list of {list(TRACKERS)}")
    return [] if names == ["none"] else names


def _is_of(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is list:  # list[str]: a list whose items are all of the item type
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_is_of(v, item) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _load_yaml(text: str) -> Any:
    """YAML with numbers such as `1e-3` read as numbers: PyYAML follows YAML 1.1, which reads a float
    without a dot (`1e-3`) as the string "1e-3". A quoted value stays a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass: plain data only)
