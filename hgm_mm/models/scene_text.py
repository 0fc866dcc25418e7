"""Scene from words: a classifier on the scene-text tower, as the design's BERT scene classifier.

The tower's lower layers are shared and stay frozen; the classifier owns a copy of the top
`n_layers` transformer layers (tuned by `training.train_scene_texts`), pools their output as the
tower does, L2-normalises it and applies a linear head. Before any training the head holds each
scene's mean description vector (`hgm_mm.data.scenes.scene_descriptions`), so "a cosy living room" or
"北欧风格的客厅" already lands in living_room: the classifier starts as nearest-description
matching in the tower's own space and training moves it from there.

Retrieval never reads the classifier, so training it changes no room or product vector.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import fit_temperature
from ..data.scenes import scene_descriptions


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a transformers encoder (BERT, MiniLM, e5, RoBERTa, ...)."""
    stack = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"{type(encoder).__name__} has no encoder.layer stack; the scene-text classifier needs a "
                         "BERT-style transformers encoder (scene_text_layers: null turns it off)")
    return stack


class SceneTextClassifier(nn.Module):
    """Scene logits (B, S) from scene-text tokens, on top of the scene-text tower's lower layers.

    Args:
        tower: the scene-text tower (`HFTextTower`) whose lower layers are read; not owned.
        n_labels: scene labels.
        n_layers: top transformer layers copied into the classifier (0: the head reads the tower's output).
    """

    def __init__(self, tower: nn.Module, n_labels: int, n_layers: int):
        super().__init__()
        stack = transformer_layers(tower.encoder)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 0 <= n_layers < len(stack):
            raise ValueError(f"scene_text_layers={n_layers!r}: the scene-text tower has {len(stack)} layers; "
                             f"use 0..{len(stack) - 1} (lower layers must stay shared)")
        self.n_layers = n_layers
        self.pooling = tower.pooling
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in stack[len(stack) - n_layers:])
        self.head = nn.Linear(tower.output_dim, n_labels)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def lower_hidden(self, tower: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states (B, T, H) entering the classifier's layers: the tower's output below its top
        `n_layers` layers, without gradients (those layers are frozen here)."""
        with torch.no_grad():
            out = tower.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                output_hidden_states=True)
        return out.hidden_states[len(out.hidden_states) - 1 - self.n_layers]

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, H) from `lower_hidden` -> unit features (B, H) through the copied layers."""
        if self.layers:
            # additive mask (B, 1, 1, T): eager and SDPA attention both add it to the scores
            additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            for layer in self.layers:
                out = layer(hidden, attention_mask=additive)
                hidden = out[0] if isinstance(out, tuple) else out
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Unit features (B, H) -> uncalibrated scene logits (B, S)."""
        return self.head(features.to(self.head.weight.dtype))

    def log_probabilities(self, tower: nn.Module, tokens: dict[str, torch.Tensor], temperature: float = 1.0
                          ) -> torch.Tensor:
        """Scene-text tokens -> scene log-probabilities (B, S) at the calibration `temperature`."""
        features = self.features(self.lower_hidden(tower, tokens), tokens["attention_mask"])
        return (self.logits(features) / temperature).log_softmax(dim=-1)

    @torch.no_grad()
    def init_from_descriptions(self, tower: nn.Module, tokenizer, labels: Sequence[str]) -> None:
        """Sets the head to each label's mean description vector (zero bias), times a scale: the
        classifier then picks the scene whose descriptions the text is closest to.

        Towers differ in how close unrelated sentences sit (e5's cosines crowd near 0.8, MiniLM's
        spread out), so the scale is fitted: the temperature of the descriptions' cosines to the
        scene vectors (`calibration.fit_temperature`). Leaving each description out of its own
        scene's vector was tried; a tower that cannot read the Chinese descriptions (MiniLM) then
        gets a near-uniform classifier, so the fit is in-sample, somewhat overconfident, and
        training recalibrates it on validation texts.
        """
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        features, owners = [], []
        for i, label in enumerate(labels):
            descriptions = list(scene_descriptions(label))
            tokens = {k: v.to(device) for k, v in tokenizer(descriptions).items()}
            features.append(self.features(self.lower_hidden(tower, tokens), tokens["attention_mask"]))  # (n, H)
            owners += [i] * len(descriptions)
        sums = torch.stack([f.sum(dim=0) for f in features])  # (S, H)
        counts = torch.tensor([len(f) for f in features], device=device, dtype=sums.dtype)  # (S,)
        prototypes = F.normalize(sums / counts[:, None], dim=-1)  # (S, H)
        every = torch.cat(features)  # (N, H)
        owners_t = torch.tensor(owners, device=device)
        cosines = every @ prototypes.T  # (N, S)
        scale = 1.0 / fit_temperature(cosines.cpu(), owners_t.cpu())
        self.head.weight.copy_(prototypes * scale)
        self.head.bias.zero_()
        self.train(was_training)


def check_temperature(value: float) -> float:
    """A calibration temperature: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature={value!r}; expected a finite number > 0")
    return float(value)
