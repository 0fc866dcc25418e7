"""Optimiser groups and the learning-rate schedule of every training: the retrieval run and the scene heads."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def decay_groups(params: Iterable[nn.Parameter], lr: float, weight_decay: float, *, name: str | None = None
                 ) -> list[dict]:
    """AdamW groups of `params` at `lr`: weight matrices decay, biases, norms and scalars such as the
    temperature (fewer than 2 dimensions) do not; parameters that do not require grad are left out."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0}]
    if name is not None:  # lets the tracked run log each learning rate under its own key (tracking.learning_rates)
        for group in groups:
            group["name"] = name
    return [group for group in groups if group["params"]]


def trainable_parameter_groups(model: nn.Module, *, lr: float, tower_lr: float, weight_decay: float) -> list[dict]:
    """The retrieval run's AdamW groups: the towers at `tower_lr`, the rest at `lr` (`decay_groups`)."""
    towers, heads = [], []
    for name, param in model.named_parameters():
        (towers if name.split(".")[0] in ("image_tower", "text_tower", "scene_text_tower") else heads).append(param)
    return decay_groups(heads, lr, weight_decay, name="heads") + decay_groups(towers, tower_lr, weight_decay,
                                                                               name="towers")


def adamw(groups: Iterable[tuple[nn.Module | Iterable[nn.Parameter], float]], weight_decay: float, *,
          undecayed: Iterable[tuple[nn.Module | Iterable[nn.Parameter], float]] = ()) -> torch.optim.AdamW:
    """AdamW over (module or parameters, learning rate) pairs (`decay_groups`), and over `undecayed`
    pairs without weight decay."""
    def parameters(params):
        return list(params.parameters() if isinstance(params, nn.Module) else params)

    param_groups = [group for params, lr in undecayed for group in decay_groups(parameters(params), lr, 0.0)]
    param_groups += [group for params, lr in groups for group in decay_groups(parameters(params), lr, weight_decay)]
    return torch.optim.AdamW(param_groups)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, *,
                  decay_from: str = "warmup") -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up over `warmup_steps`, then a cosine decay to 0 at `total_steps`.

    decay_from: "warmup", the cosine runs over the steps after the warm-up (the retrieval run);
        "start", it runs over all `total_steps` and the warm-up ramp caps it early on (the scene
        heads' measured recipes were trained this way, so it stays theirs).
    """
    if decay_from not in ("warmup", "start"):
        raise ValueError(f"decay_from={decay_from!r}; expected 'warmup' or 'start'")
    if decay_from == "start":
        ramp = max(1, warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / ramp, 0.5 * (1 + math.cos(math.pi * step / total_steps))))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
