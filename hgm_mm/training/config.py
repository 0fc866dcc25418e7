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

from ..json_config import JsonConfig

PRECISIONS = ("no", "bf16", "fp16")
IMAGE_ERROR_POLICIES = ("skip", "raise")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # accelerate trackers a run can report to (training/tracking.py)
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")


@dataclass
class TrainConfig(JsonConfig):
    """A fine-tuning run. The defaults follow the measurements in docs/training.md."""

    _key_noun = "setting"

    model: str = "hgm-lite-en"  # starting model: any name create_model takes
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
