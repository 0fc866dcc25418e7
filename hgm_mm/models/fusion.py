"""Fusion of an image embedding and a text embedding into one, tolerant of a missing modality."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig


class GatedFusion(nn.Module):
    """Fuses L2-normalised image and text embeddings (each (B, D)) into one unit vector (B, D).

    The fused vector is a softmax-gated average of the modalities present for each sample, plus
    (when `hidden_dim > 0`) a residual MLP that starts at zero, so an untrained fusion is the
    plain average and training can only move away from it. A sample with one modality missing
    gets exactly that modality's embedding from the average part.
    """

    def __init__(self, embed_dim: int, cfg: FusionConfig | None = None):
        super().__init__()
        cfg = cfg or FusionConfig()
        self.gate_logits = nn.Parameter(torch.zeros(2))  # (image, text)
        self.mlp = None
        if cfg.hidden_dim > 0:
            self.mlp = nn.Sequential(
                nn.Linear(2 * embed_dim + 2, cfg.hidden_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden_dim, embed_dim))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, image_embeds: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                image_present: torch.Tensor | None = None, text_present: torch.Tensor | None = None) -> torch.Tensor:
        """Fuses what is there.

        Args:
            image_embeds: (B, D) or None when no sample has an image.
            text_embeds: (B, D) or None when no sample has text.
            image_present, text_present: optional (B,) bools marking which rows are real.
        """
        gates, image_embeds, text_embeds, residual = self.parts(image_embeds, text_embeds, image_present,
                                                                text_present)
        fused = gates[:, :1] * image_embeds + gates[:, 1:] * text_embeds  # (B, D)
        return F.normalize(fused if residual is None else fused + residual, dim=-1)

    def parts(self, image_embeds: torch.Tensor | None, text_embeds: torch.Tensor | None,
              image_present: torch.Tensor | None = None, text_present: torch.Tensor | None = None):
        """The pieces of the fused vector before normalisation.

        Returns:
            (gates (B, 2), image_embeds (B, D), text_embeds (B, D), residual (B, D) or None), with
            missing rows zeroed; fused = gates[:, 0] * image + gates[:, 1] * text + residual.
        """
        reference = image_embeds if image_embeds is not None else text_embeds
        if reference is None:
            raise ValueError("fusion needs an image or a text embedding; both are missing")
        batch, dim = reference.shape
        ones = torch.ones(batch, dtype=torch.bool, device=reference.device)
        zeros = torch.zeros(batch, dim, dtype=reference.dtype, device=reference.device)
        image_present = _presence(image_embeds, image_present, ones)
        text_present = _presence(text_embeds, text_present, ones)
        if not bool((image_present | text_present).all()):
            raise ValueError("fusion: some rows have neither an image nor a text")
        image_embeds = zeros if image_embeds is None else image_embeds * image_present.unsqueeze(1)
        text_embeds = zeros if text_embeds is None else text_embeds * text_present.unsqueeze(1)

        present = torch.stack([image_present, text_present], dim=1)  # (B, 2)
        gates = self.gate_logits.expand(batch, 2).masked_fill(~present, float("-inf")).softmax(dim=1)  # (B, 2)
        residual = None
        if self.mlp is not None:
            mlp_in = torch.cat([image_embeds, text_embeds, present.to(reference.dtype)], dim=1)  # (B, 2D + 2)
            residual = self.mlp(mlp_in)  # (B, D)
        return gates, image_embeds, text_embeds, residual


def _presence(embeds: torch.Tensor | None, present: torch.Tensor | None, ones: torch.Tensor) -> torch.Tensor:
    if embeds is None:
        return torch.zeros_like(ones)
    if present is None:
        return ones
    if present.shape != ones.shape:
        raise ValueError(f"presence mask has shape {tuple(present.shape)}; expected {tuple(ones.shape)}")
    return present.to(device=ones.device, dtype=torch.bool)
