"""How a model reads the scene of a room photo: one reader, chosen when the model is built.

`ModelConfig.scene_source` names the reader once; `HGMModel.scene_reader` is it, and everything
that reads or trains the photo scene (the model's `scene_logits`, `train_scenes`, the evaluation)
asks the reader instead of checking the name.

- `RoomVectorScenes` ("room"): `scene_head` on the fused room vector, the mean of the room views;
  the head joint training shapes.
- `WholePhotoScenes` ("photo"): `photo_scene_head` on the image tower's L2-normalised pooled
  features of the whole photo at `config.scene_image_size`, optionally through the head's own
  copy of the tower's top stages (`photo_scene_branch`) and averaged with the mirror image.

Both read pixels their `transform` gives, and the cached outputs of the image tower's locked
layers that scene training runs on (`logits_from_cache`), so training measures what inference
computes. The readers hold no weights: the heads are the model's modules, saved under their own
names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import WholePhoto


class RoomVectorScenes:
    """Scenes from `scene_head` on the room vector (`config.scene_source` "room")."""

    source = "room"

    def head(self, model) -> nn.Module:
        """The linear head scene training changes."""
        return model.scene_head

    def branch(self, model) -> nn.ModuleList | None:
        """The head's own tower stages: none."""
        return None

    def transform(self, model):
        """A PIL photo -> the room views (V, 3, S, S) the reader pools."""
        return model.room_views

    def logits(self, model, images, view_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Uncalibrated scene logits (B, S) of room photos (paths, PIL images or room-view pixels);
        `view_embeds` (B, V, D), the photos' views already encoded, spare encoding them again."""
        return model.scene_head(model.encode_room(images, view_embeds=view_embeds))

    def logits_from_cache(self, model, features: torch.Tensor, stage: int | None) -> torch.Tensor:
        """Cached locked-layer outputs (B, V, ...) of the V views of each photo -> scene logits (B, S):
        the views through the rest of the tower and the projection, the room vector, then the head."""
        features = features.to(model.device, model.scene_head.weight.dtype)
        if stage is None:  # pooled tower outputs (B, V, C)
            views = F.normalize(model.image_proj(features), dim=-1)  # (B, V, D)
        else:
            with model.image_inputs_from_stage(stage):
                views = model.encode_room_views(features)  # (B, V, D)
        room = model.room_vector(views)  # (B, D)
        return model.scene_head(room)

    def logits_from_cached_versions(self, model, features: torch.Tensor, stage: int | None) -> torch.Tensor:
        """Cached outputs (B, A, V, ...) of A versions of each photo -> logits (B, S) of the first
        version, the photo itself (inference reads no mirror image of the room views)."""
        return self.logits_from_cache(model, features[:, 0], stage)


class WholePhotoScenes:
    """Scenes from `photo_scene_head` on the whole photo (`config.scene_source` "photo")."""

    source = "photo"

    def head(self, model) -> nn.Module:
        return model.photo_scene_head

    def branch(self, model) -> nn.ModuleList | None:
        """The head's own tuned copy of the tower's top stages, or None when it reads the tower."""
        return model.photo_scene_branch

    def transform(self, model):
        """A PIL photo -> the whole photo (3, S, S) at `config.scene_image_size`."""
        return WholePhoto(model.config.image_tower, model.config.scene_image_size)

    def logits(self, model, images, view_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Scene logits (B, S) of whole photos; the head reads the photo itself, not `view_embeds`."""
        return model.photo_scene_logits(images)

    def logits_from_cache(self, model, features: torch.Tensor, stage: int | None) -> torch.Tensor:
        """Cached features (B, 1, ...) of one version of each photo (pooled tower features, or the
        activation entering the branch) -> scene logits (B, S), before any mirror averaging."""
        features = features[:, 0].to(model.device, model.photo_scene_head.weight.dtype)
        if model.photo_scene_branch is not None:
            features = model.scene_branch_features(features)
        return model.photo_scene_head(F.normalize(features, dim=-1))

    def logits_from_cached_versions(self, model, features: torch.Tensor, stage: int | None) -> torch.Tensor:
        """Cached features (B, A, 1, ...) of A versions of each photo (the photo, its mirror image)
        -> scene logits (B, S) as inference computes them: the mean of the versions' log-probabilities."""
        versions = features[:, :, 0].to(model.device)
        if model.photo_scene_branch is not None:
            pooled = model.scene_branch_features(versions.flatten(0, 1).float())  # (B * A, C)
            versions = pooled.view(*versions.shape[:2], -1)
        return model.photo_scene_logits_from_features(versions)


SCENE_READERS = {reader.source: reader for reader in (RoomVectorScenes(), WholePhotoScenes())}


def scene_reader(source: str) -> RoomVectorScenes | WholePhotoScenes:
    """The reader `ModelConfig.scene_source` names."""
    try:
        return SCENE_READERS[source]
    except KeyError:
        raise ValueError(f"scene_source={source!r}; expected one of {list(SCENE_READERS)}") from None
