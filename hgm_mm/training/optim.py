"""Optimiser groups and the learning-rate schedule of the scene-head trainings."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


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


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, under a cosine decay over all `total_steps`."""
    warmup_steps = max(1, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup_steps, 0.5 * (1 + math.cos(math.pi * step / total_steps))))
