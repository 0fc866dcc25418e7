"""What a run may change: locked towers with their top groups unlocked, and weight-space ensembling."""
from __future__ import annotations

import torch
from torch import nn

from ..models.towers import HFTextTower, TimmImageTower


def lock_image_tower(tower: nn.Module, unlocked_groups: int, *, freeze_norm_stats: bool = True) -> list[nn.Module]:
    """Freezes a timm image tower except its last `unlocked_groups` layer groups (timm's group_matcher).

    Returns:
        The BatchNorm modules of the locked part when `freeze_norm_stats`; keep them in eval
        mode during training (`keep_frozen_norms_eval`) so their statistics stay pretrained.
    """
    if not isinstance(tower, TimmImageTower):
        for param in tower.parameters():  # open_clip towers: all or nothing
            param.requires_grad = unlocked_groups > 0
        return []
    from timm.models import group_modules, group_parameters

    trunk = tower.trunk
    matcher = _head_convolution_apart(trunk.group_matcher(coarse=True))
    groups = group_parameters(trunk, matcher)
    last_locked = max(groups) - unlocked_groups
    for group_id, names in groups.items():
        for name in names:
            trunk.get_parameter(name).requires_grad = group_id > last_locked
    if not freeze_norm_stats:
        return []
    module_groups = group_modules(trunk, matcher, reverse=True)
    return [module for name, module in trunk.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module_groups.get(name, -1) <= last_locked]


def _head_convolution_apart(matcher: dict) -> dict:
    """timm merges the head convolution of convolutional nets (EfficientNet's `conv_head`) into the
    last block's group; here it is a group of its own, so one unlocked group is the head alone, the
    cheapest layer to adapt (measured in docs/training.md)."""
    from timm.models._manipulate import MATCH_PREV_GROUP

    rules = matcher.get("blocks")
    if not isinstance(rules, (list, tuple)):
        return matcher
    apart = [(pattern, (MATCH_PREV_GROUP[0] + 1,)) if ordinal == MATCH_PREV_GROUP and "conv_head" in pattern
             else (pattern, ordinal) for pattern, ordinal in rules]
    return {**matcher, "blocks": apart}


def lock_text_tower(tower: nn.Module, unlocked_layers: int) -> None:
    """Freezes a text tower except its top `unlocked_layers` transformer layers; embeddings stay frozen."""
    for param in tower.parameters():
        param.requires_grad = False
    if unlocked_layers == 0:
        return
    layers = _transformer_layers(tower)
    for layer in layers[-unlocked_layers:]:
        for param in layer.parameters():
            param.requires_grad = True


def _transformer_layers(tower: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList inside the tower."""
    module = tower.encoder if isinstance(tower, HFTextTower) else tower
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"cannot find the transformer layers of {type(module).__name__} to unlock")
    return max(lists, key=len)


def keep_frozen_norms_eval(norms: list[nn.Module]) -> None:
    """Puts locked BatchNorm layers back in eval mode (call after every `model.train()`)."""
    for norm in norms:
        norm.eval()


@torch.no_grad()
def wise_ft(model: nn.Module, start_state: dict[str, torch.Tensor], alpha: float) -> None:
    """Weight-space ensembling (WiSE-FT): weights <- alpha * fine-tuned + (1 - alpha) * starting weights.

    Applied to the tensors present in `start_state` (the towers); new heads keep their trained values.
    """
    if alpha == 1.0:
        return
    state = model.state_dict()
    for name, start in start_state.items():
        if state[name].is_floating_point():
            state[name].copy_(alpha * state[name] + (1.0 - alpha) * start.to(state[name].device))
