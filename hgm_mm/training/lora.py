"""Low-rank adapters (LoRA, through peft) on the linear layers of the towers.

The adapters train; the tower weights under them stay locked. A saved model has its adapters
merged into the tower weights, so it is an ordinary model of the save format: loading it needs
neither peft nor the adapter settings.
"""
from __future__ import annotations

import copy

from torch import nn

TOWERS = ("image_tower", "text_tower", "scene_text_tower")


def _linear_targets(tower: nn.Module) -> list[str]:
    """Names of the attention and MLP linears of a tower (every nn.Linear outside its embeddings)."""
    return [name for name, module in tower.named_modules()
            if isinstance(module, nn.Linear) and "embeddings" not in name.split(".")]


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0) -> int:
    """Adds LoRA adapters to the linear layers of every tower that has some; returns how many.

    Towers without linear layers (convolutional image towers) are left as they are.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'hgm-mm[peft]'") from err
    adapted = 0
    for name in TOWERS:
        tower = getattr(model, name, None)
        targets = _linear_targets(tower) if tower is not None else []
        if not targets:
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        inject_adapter_in_model(config, tower)
        adapted += len(targets)
    if adapted == 0:
        raise ValueError("LoRA found no linear layer in the towers of this model; use unlocked layer groups instead")
    return adapted


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of the model with every adapter merged into the weight under it and removed."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    return merged
