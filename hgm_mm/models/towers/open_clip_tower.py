"""Image and text towers taken from one open_clip model (any architecture, tag, hf-hub or local dir)."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ImageTowerConfig
from ..pretrained import OPEN_CLIP_CONFIG_NAME

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class OpenClipImageTower(nn.Module):
    """open_clip's visual tower: pixels (B, 3, H, W) -> embeddings in the CLIP space (B, E)."""

    def __init__(self, visual: nn.Module, output_dim: int):
        super().__init__()
        self.visual = visual
        self.output_dim = output_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)  # (B, E)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)


class OpenClipTextTower(nn.Module):
    """open_clip's text tower (the CLIP model with its visual tower removed): ids (B, T) -> (B, E)."""

    def __init__(self, clip: nn.Module, output_dim: int):
        super().__init__()
        self.clip = clip
        self.output_dim = output_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.encode_text(input_ids)  # (B, E)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)


@dataclasses.dataclass
class OpenClipParts:
    image_tower: OpenClipImageTower
    text_tower: OpenClipTextTower
    tokenizer: Any
    image_config: ImageTowerConfig
    logit_scale: float
    is_pretrained: bool
    open_clip_config: dict  # {"model_cfg": ..., "preprocess_cfg": ...}, written beside saved weights


def build_open_clip_towers(cfg: ImageTowerConfig, *, load_weights: bool = True,
                           config_dir: Path | None = None) -> OpenClipParts:
    """Creates the open_clip model named by `cfg` and splits it into two towers.

    Args:
        cfg: the image-tower config (`name` is the open_clip model name, `pretrained` its tag or file).
        load_weights: False builds the architecture only (weights come from a saved hgm_mm model).
        config_dir: a folder holding `open_clip_config.json` (and tokenizer files) written by
            `save_open_clip_config`; it replaces `cfg.name` so nothing is fetched.
    """
    import open_clip

    name = f"local-dir:{config_dir}" if config_dir is not None else cfg.name
    from open_clip.factory import parse_model_name

    schema, identifier = parse_model_name(name)
    tag = cfg.pretrained if load_weights and schema is None else None
    try:  # open_clip reads a .bin/.pt checkpoint (a tag's file or a folder's) weights-only
        if schema is None:
            clip = open_clip.create_model(name, pretrained=tag, pretrained_text=False)
        else:
            clip = open_clip.create_model(name, load_weights=load_weights and config_dir is None,
                                          pretrained_text=False)
    except pickle.UnpicklingError:
        source = tag if schema is None else identifier
        raise ValueError(f"{source}: refused: its checkpoint holds objects other than tensors and plain "
                         "containers, and loading them could run code the file carries; hgm_mm reads tensors "
                         "only. Save the weights as .safetensors (open_clip_model.safetensors in a folder)") from None
    if schema is None:
        is_pretrained = tag is not None
    else:
        is_pretrained = load_weights and config_dir is None and (
            schema == "hf-hub" or any(p.suffix in _CHECKPOINT_SUFFIXES for p in Path(identifier).iterdir()))
    model_cfg = open_clip.get_model_config(name)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(clip))
    tokenizer = open_clip.get_tokenizer(name)

    embed_dim = int(model_cfg["embed_dim"])
    visual = clip.visual
    clip.visual = nn.Identity()  # the text tower keeps the rest of the CLIP model
    logit_scale = float(clip.logit_scale.detach()) if hasattr(clip, "logit_scale") else 2.6592
    for unused in ("logit_scale", "logit_bias"):  # the hgm_mm model owns its own temperature
        if isinstance(getattr(clip, unused, None), nn.Parameter):
            delattr(clip, unused)

    size = preprocess_cfg.get("size", cfg.image_size)
    image_config = dataclasses.replace(
        cfg, image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(preprocess_cfg.get("mean", cfg.mean)), std=tuple(preprocess_cfg.get("std", cfg.std)),
        interpolation=preprocess_cfg.get("interpolation", "bicubic"), crop_pct=1.0, projection=cfg.projection)
    return OpenClipParts(
        image_tower=OpenClipImageTower(visual, embed_dim), text_tower=OpenClipTextTower(clip, embed_dim),
        tokenizer=tokenizer, image_config=image_config, logit_scale=logit_scale, is_pretrained=is_pretrained,
        open_clip_config={"model_cfg": model_cfg, "preprocess_cfg": _jsonable(preprocess_cfg)})


def save_open_clip_config(folder: Path, open_clip_config: dict, tokenizer: Any) -> None:
    """Writes what `build_open_clip_towers(config_dir=folder)` needs to rebuild the architecture offline."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(open_clip_config, indent=2), encoding="utf-8")
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "save_pretrained"):
        hf_tokenizer.save_pretrained(str(folder))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))
