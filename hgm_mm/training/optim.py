"""Optimiser groups and the learning-rate schedule of every training: the retrieval run and the scene heads."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def trainable_parameter_groups(model: nn.Module, *, lr: float, tower_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: towers at `tower_lr`, the rest at `lr`; no decay on biases, norms and the temperature."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_tower = name.split(".")[0] in ("image_tower", "text_tower", "scene_text_tower")
        no_decay = param.ndim < 2 or name == "logit_scale"
        groups.setdefault((in_tower, no_decay), []).append(param)
    # "name" lets the tracked run log each learning rate under its own key (tracking.learning_rates)
    return [{"params": params, "lr": tower_lr if in_tower else lr, "weight_decay": 0.0 if no_decay else weight_decay,
             "name": "towers" if in_tower else "heads"}
            for (in_tower, no_decay), params in sorted(groups.items())]


def adamw(groups: Iterable[tuple[nn.Module | Iterable[nn.Parameter], float]], weight_decay: float, *,
          undecayed: Iterable[tuple[nn.Module | Iterable[nn.Parameter], float]] = ()) -> torch.optim.AdamW:
    """AdamW over (module or parameters, learning rate) pairs: weight matrices decay, biases and
    norms do not, nor anything in `undecayed`; parameters that do not require grad are left out."""
    param_groups = []
    for params, lr in undecayed:
        params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0})
    for params, lr in groups:
        params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        param_groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay})
        param_groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in param_groups if g["params"]])


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
