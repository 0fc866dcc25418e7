"""The retrieval run's objective: the model's outputs for one step -> its named losses and their weighted sum.

    objective = RetrievalObjective.from_config(config, model, rank=rank, world_size=world)
    losses = objective(StepOutputs.from_model(model, model(**inputs)), targets)
    losses["loss"].backward()   # losses also holds "product_loss", "room_loss", "scene_loss"

The training loop calls it on a whole step's outputs, and GradCache on the outputs it re-embeds
chunk by chunk; either way the same terms are computed from the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..losses.contrastive import ContrastiveLoss, MultiPositiveContrastiveLoss, scene_loss


@dataclass
class StepOutputs:
    """What the objective reads of the model's outputs for a step's rooms and products."""

    packed_rooms: torch.Tensor | None  # (R, V + 1, D) views and scene text (`HGMModel.pack_rooms`)
    scene_logits: torch.Tensor | None  # (R, S) from the room vectors
    product_image: torch.Tensor | None  # (P, D) product photo vectors
    product_text: torch.Tensor | None  # (P, D) product text vectors
    product_vectors: torch.Tensor | None  # (P, D) photo fused with text
    log_logit_scale: torch.Tensor  # the model's contrastive temperature, as log(1 / temperature)

    @classmethod
    def from_model(cls, model, out) -> "StepOutputs":
        """From an `HGMOutput` of `model` (or of its DDP wrapper)."""
        unwrapped = model.module if hasattr(model, "module") else model
        return cls(rooms_packed(unwrapped, out), out.scene_logits, out.product_image_embeds, out.product_text_embeds,
                   out.product_embeds, out.logit_scale.log())


def rooms_packed(model, out) -> torch.Tensor | None:
    """An `HGMOutput`'s room views and scene text in one tensor (R, V + 1, D), or None without rooms."""
    if out.room_view_embeds is None:
        return None
    return model.pack_rooms(out.room_view_embeds, out.room_text_embeds)


class RetrievalObjective:
    """Photo <-> text contrastive loss over the step's products, room -> products contrastive loss
    with several positives per room (rooms scored per view, as at inference), and the scene
    cross-entropy from the room vector; each weighted, summed as "loss". A term of weight 0 is
    not computed."""

    def __init__(self, *, product_weight: float, room_weight: float, scene_weight: float,
                 room_temperature: float = 0.0, contrastive, room_contrastive, world_size: int = 1):
        """
        Args:
            product_weight, room_weight, scene_weight: the terms' weights.
            room_temperature: > 0: the room loss's fixed temperature; 0: the model's, as the product loss.
            contrastive: the photo <-> text loss (`ContrastiveLoss`), gathered across processes.
            room_contrastive: the room -> products loss (`MultiPositiveContrastiveLoss`).
            world_size: processes the scene loss averages over.
        """
        self.weights = {"product_loss": product_weight, "room_loss": room_weight, "scene_loss": scene_weight}
        self.room_temperature = room_temperature
        self.contrastive, self.room_contrastive, self.world_size = contrastive, room_contrastive, world_size

    @classmethod
    def from_config(cls, config, model, *, rank: int = 0, world_size: int = 1) -> "RetrievalObjective":
        """The objective of a `TrainConfig`, for `model` (unwrapped) as process `rank` of `world_size`."""
        return cls(product_weight=config.product_loss_weight, room_weight=config.room_loss_weight,
                   scene_weight=config.scene_loss_weight, room_temperature=config.room_temperature,
                   contrastive=ContrastiveLoss(rank=rank, world_size=world_size),
                   room_contrastive=MultiPositiveContrastiveLoss(rank=rank, world_size=world_size,
                                                                 similarity=model.packed_room_scores),
                   world_size=world_size)

    def __call__(self, outputs: StepOutputs, targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Named losses and "loss", their weighted sum.

        Args:
            outputs: the model's outputs for the step.
            targets: "product_ids" (P,) catalogue rows (equal ids are not negatives of each other),
                "room_positive_ids" (R, K) padded rows of each room's products, "room_labels" (R,)
                scene indices (-100: none).
        """
        scale = outputs.log_logit_scale.exp()
        terms = {}
        if self.weights["product_loss"]:
            terms["product_loss"] = self.contrastive(outputs.product_image, outputs.product_text, scale,
                                                     ids=targets["product_ids"])
        if self.weights["room_loss"]:
            room_scale = 1.0 / self.room_temperature if self.room_temperature else scale
            terms["room_loss"] = self.room_contrastive(outputs.packed_rooms, outputs.product_vectors, room_scale,
                                                       room_positive_ids=targets["room_positive_ids"],
                                                       product_ids=targets["product_ids"])
        if self.weights["scene_loss"]:
            terms["scene_loss"] = scene_loss(outputs.scene_logits, targets["room_labels"], world_size=self.world_size)
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms
