"""Temperature scaling: one number per scene head that makes its probabilities mean what they say."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the cross-entropy of `logits / T` on held-out examples.

    Dividing by one T keeps every prediction's ranking (accuracy is unchanged) and only makes the
    probabilities sharper (T < 1) or flatter (T > 1), as Guo et al. 2017 calibrate networks.

    Args:
        logits: (N, S) scene logits (or log-probabilities) of held-out examples.
        labels: (N,) their true label indices.

    Returns:
        T, within [0.001, 100].

    Raises:
        ValueError: no examples, or shapes that do not match.
    """
    if logits.dim() != 2 or labels.dim() != 1 or len(logits) != len(labels):
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected (N, S) and (N,)")
    if len(labels) == 0:
        raise ValueError("no held-out examples to calibrate on")
    logits, labels = logits.detach().double(), labels.detach().long()
    # the loss is convex in 1/T: a fine grid over log T, then golden-section refinement, needs no tuning
    grid = torch.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), 200, dtype=torch.float64)
    losses = torch.stack([F.cross_entropy(logits / t.exp(), labels) for t in grid])
    best = int(losses.argmin())
    low, high = grid[max(best - 1, 0)].item(), grid[min(best + 1, len(grid) - 1)].item()
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if F.cross_entropy(logits / math.exp(a), labels) < F.cross_entropy(logits / math.exp(b), labels):
            high = b
        else:
            low = a
    return float(min(max(math.exp((low + high) / 2), MIN_TEMPERATURE), MAX_TEMPERATURE))
