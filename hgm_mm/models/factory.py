"""One entry point that turns any model name a user has into an `HGMModel`."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from .config import ImageTowerConfig, ModelConfig, TextTowerConfig
from .hgm import HGMModel, load_model
from .pretrained import (HGM_CONFIG_NAME, OPEN_CLIP_CONFIG_NAME, RandomInitWarning, builtin_model_config,
                         hub_hgm_folder, parse_model_name)


def create_model(
    name: str,
    *,
    pretrained: str | None = None,
    image_tower: str | ImageTowerConfig | None = None,
    text_tower: str | TextTowerConfig | None = None,
    scene_text_tower: str | TextTowerConfig | None = None,
    embed_dim: int | None = None,
    scene_labels: list[str] | tuple[str, ...] | None = None,
    room_views: str | None = None,
    room_map_size: int | None = None,
    device: str | torch.device | None = None,
) -> HGMModel:
    """Creates a model from a built-in name, an open_clip architecture, `hf-hub:` or `local-dir:`.

    Args:
        name: `hgm-lite-en`, `hgm-lite-multilingual`, `hgm-tiny`; an open_clip architecture such
            as `ViT-B-32`; `hf-hub:org/repo`; or `local-dir:PATH` (a folder written by
            `save_pretrained`, or an open_clip folder with `open_clip_config.json`).
        pretrained: the open_clip pretrained tag or checkpoint file for an open_clip architecture.
        image_tower: replaces the image tower: a timm model name (`timm:convnext_tiny` or
            `convnext_tiny`, pretrained from timm's hub) or a full `ImageTowerConfig`.
        text_tower: replaces the product-text tower: a transformers model id or folder
            (pretrained through transformers) or a `TextTowerConfig`.
        scene_text_tower: a separate BERT tower for scene text, same forms as `text_tower`;
            by default the text tower also reads scene text.
        embed_dim: size of the shared embedding space.
        scene_labels: the scene classes of the scene head.
        room_views: how room views are encoded, "crops" or "feature_map" (`ModelConfig.room_views`).
        room_map_size: "feature_map": the side of the one pass.
        device: where to put the model.

    A model with randomly initialised towers is announced with a `RandomInitWarning`.
    """
    parsed = parse_model_name(name)
    if parsed.kind == "local-dir":
        folder = Path(parsed.identifier).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"local-dir: {folder} is not a folder")
        if (folder / HGM_CONFIG_NAME).is_file():
            _refuse_overrides(name, pretrained, image_tower, text_tower, scene_text_tower, embed_dim, scene_labels,
                              room_views, room_map_size)
            return load_model(folder, device=device)
        if not (folder / OPEN_CLIP_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"local-dir: {folder} holds neither {HGM_CONFIG_NAME} (an hgm_mm model) "
                                    f"nor {OPEN_CLIP_CONFIG_NAME} (an open_clip model)")
        config = _open_clip_config(f"local-dir:{folder}", None)
    elif parsed.kind == "hf-hub":
        hgm_folder = hub_hgm_folder(parsed.identifier)
        if hgm_folder is not None:
            _refuse_overrides(name, pretrained, image_tower, text_tower, scene_text_tower, embed_dim, scene_labels,
                              room_views, room_map_size)
            return load_model(hgm_folder, device=device)
        config = _open_clip_config(name, None)
    elif parsed.kind == "open_clip":
        config = _open_clip_config(name, pretrained)
    else:
        config = ModelConfig.from_dict(builtin_model_config(name), origin=f"built-in model {name!r}")
    if pretrained is not None and parsed.kind != "open_clip":
        raise ValueError(f"pretrained={pretrained!r} only applies to open_clip architectures, not {name!r}")

    config = _apply_overrides(config, image_tower, text_tower, scene_text_tower, embed_dim, scene_labels)
    room_changes = {k: v for k, v in (("room_views", room_views), ("room_map_size", room_map_size)) if v is not None}
    if room_changes:  # replace() runs ModelConfig's checks again
        config = dataclasses.replace(config, **room_changes)
    model = HGMModel(config)
    random_towers = [tower for tower, pretrained_ in model.tower_pretrained.items() if not pretrained_]
    if random_towers:
        warnings.warn(f"hgm_mm model {name!r}: {', '.join(random_towers)} randomly initialised; its embeddings "
                      "mean nothing until trained", RandomInitWarning, stacklevel=2)
    return model.to(device) if device is not None else model


def _open_clip_config(name: str, pretrained: str | None) -> ModelConfig:
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no config for {name!r}")
    embed_dim = int(model_cfg["embed_dim"])
    return ModelConfig(
        name=name, embed_dim=embed_dim,
        image_tower=ImageTowerConfig(source="open_clip", name=name, pretrained=pretrained, projection="none"),
        text_tower=TextTowerConfig(source="open_clip", name=name, pretrained=pretrained, projection="none"))


def _apply_overrides(config, image_tower, text_tower, scene_text_tower, embed_dim, scene_labels) -> ModelConfig:
    changes = {}
    if image_tower is not None:
        if config.image_tower.source == "open_clip":
            raise ValueError("image_tower cannot replace the tower of an open_clip model; start from "
                             "'hgm-lite-en' (or any built-in) to combine a timm image tower with a text tower")
        changes["image_tower"] = _image_tower_config(image_tower)
    if text_tower is not None:
        if config.text_tower.source == "open_clip":
            raise ValueError("text_tower cannot replace the tower of an open_clip model; use scene_text_tower "
                             "to add a BERT scene-text tower, or start from a built-in model")
        changes["text_tower"] = _text_tower_config(text_tower)
    if scene_text_tower is not None:
        changes["scene_text_tower"] = _text_tower_config(scene_text_tower)
    if embed_dim is not None:
        changes["embed_dim"] = embed_dim
    if scene_labels is not None:
        changes["scene_labels"] = tuple(scene_labels)
    if not changes:
        return config
    if "image_tower" in changes or "text_tower" in changes:
        changes.setdefault("name", f"{config.name}+custom")
    return dataclasses.replace(config, **changes)


def _image_tower_config(spec: str | ImageTowerConfig) -> ImageTowerConfig:
    if isinstance(spec, ImageTowerConfig):
        return spec
    import timm

    name = spec[len("timm:"):] if spec.startswith("timm:") else spec
    pretrained_cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    if pretrained_cfg is None:
        return ImageTowerConfig(name=name, pretrained="hub")  # TimmImageTower raises with suggestions
    interpolation = pretrained_cfg.interpolation if pretrained_cfg.interpolation in ("bicubic", "bilinear") \
        else "bicubic"
    return ImageTowerConfig(source="timm", name=name, pretrained="hub", image_size=int(pretrained_cfg.input_size[-1]),
                            mean=tuple(pretrained_cfg.mean), std=tuple(pretrained_cfg.std),
                            interpolation=interpolation, crop_pct=float(pretrained_cfg.crop_pct))


def _text_tower_config(spec: str | TextTowerConfig) -> TextTowerConfig:
    if isinstance(spec, TextTowerConfig):
        return spec
    return TextTowerConfig(source="hf", name=spec, pretrained="hub")


def _refuse_overrides(name, *overrides) -> None:
    if any(o is not None for o in overrides):
        raise ValueError(f"{name!r} is a saved hgm_mm model; it loads as saved, without tower or size overrides")
