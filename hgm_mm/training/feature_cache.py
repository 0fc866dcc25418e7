"""Outputs of the locked layers, computed once per photo and text instead of at every step.

A locked layer computes the same function at every step: its BatchNorm statistics are frozen and
it runs in eval mode. When the image tower is locked below its top stages, the activation that
enters the first unlocked stage depends only on the photo, and when a text tower is fully locked
its pooled output depends only on the text. Training then runs the unlocked stages alone, which
on a CPU is what turns an hour of recomputation into minutes. Photos are preprocessed
deterministically (no augmentation), so a step on cached features computes what the step on
pixels would, to float rounding (tested to 1e-5), and validation uses the same cache. The cache
is computed through the tower's folded inference copy, which is faster and agrees to that rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from ..data.images import ImageError
from ..data.records import Product, Room
from ..data.text import product_text, room_text
from ..evaluation.evaluate import RetrievalEvaluation, relevance, retrieval_metrics
from ..data.loading import PhotoDecoder, PhotoFiles
from ..models.export import folded_copy, locked_outputs
from ..models.towers import TimmImageTower


@dataclass
class FeatureCache:
    """Cached inputs of the trainable layers for every product and room of a run."""

    image_stage: int  # image inputs enter this stage of `TimmImageTower.feature_stages()`
    product_images: torch.Tensor  # (N, C, H, W); zeros where the photo was unreadable
    product_readable: torch.Tensor  # (N,) bool
    room_views: torch.Tensor  # (R, P, C, H, W), P = `RoomViews.n_passes`, for the rooms given to `build_feature_cache`
    room_readable: torch.Tensor  # (R,) bool
    product_text: torch.Tensor | None  # (N, H) pooled text-tower outputs when that tower is locked
    scene_text: torch.Tensor | None  # (R, H) pooled scene-text outputs of the room captions
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo, reason)

    @property
    def nbytes(self) -> int:
        tensors = (self.product_images, self.room_views, self.product_text, self.scene_text)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def text_inputs(self, cached: torch.Tensor | None, indices: Sequence[int], tokenize, texts) -> dict:
        """Token dict for `indices`: the cached tower outputs when there are some, else real tokens."""
        if cached is not None:
            return {"tower_features": cached[list(indices)]}
        return tokenize(texts)


def cacheable_image_stage(model, *, freeze_norm_stats: bool) -> int:
    """The image-tower stage whose input can be cached for this model as locked (0: none).

    Caching needs a timm tower with known stages, a locked prefix, and frozen BatchNorm
    statistics there (otherwise the locked layers would change with every batch).
    """
    tower = model.image_tower
    if not isinstance(tower, TimmImageTower) or not freeze_norm_stats:
        return 0
    stage = tower.locked_prefix()
    if stage and not _stages_compose_to_forward(tower, stage, model.config.image_tower.image_size):
        return 0
    return stage


@torch.no_grad()
def _stages_compose_to_forward(tower: TimmImageTower, stage: int, side: int) -> bool:
    """Whether running the stages from `stage` on the cached prefix gives the tower's own output."""
    was_training = tower.training
    tower.eval()
    try:
        pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(next(tower.parameters()).device)
        expected = tower(pixels)
        got = tower(tower.prefix_features(pixels, stage), start_stage=stage)
        return got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        tower.train(was_training)


def fully_locked(tower) -> bool:
    return tower is not None and not any(p.requires_grad for p in tower.parameters())


@torch.no_grad()
def _prefix_features(model, tower, sources, transform, stage: int, *, batch_size: int, num_workers: int,
                     desc: str, progress: bool, image_errors: str, skipped: list
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) activations entering `stage` for each photo, and which photos were readable.

    `tower` is the model's image tower or its folded inference copy (`models.export.folded_copy`).
    """
    from tqdm.auto import tqdm

    loader = DataLoader(PhotoFiles(sources, PhotoDecoder(transform)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda items: items)
    features: torch.Tensor | None = None
    readable = torch.zeros(len(sources), dtype=torch.bool)
    with tqdm(total=len(sources), desc=desc, unit="photo", disable=not progress) as bar:
        for items in loader:
            kept = [(i, pixels) for i, pixels, _ in items if pixels is not None]
            for _, _, problem in items:
                if problem is not None:
                    if image_errors == "raise":
                        raise ImageError(*problem)
                    skipped.append(problem)
            if kept:
                pixels = torch.stack([p for _, p in kept]).to(model.device)  # (B, 3, S, S) or (B, V, 3, S, S)
                flat = locked_outputs(tower, pixels.flatten(0, pixels.dim() - 4), stage).float().cpu()
                out = flat.view(*pixels.shape[:pixels.dim() - 3], *flat.shape[1:])
                if features is None:
                    features = torch.zeros(len(sources), *out.shape[1:])
                index = torch.tensor([i for i, _ in kept])
                features[index] = out
                readable[index] = True
            bar.update(len(items))
    if features is None:
        raise ValueError(f"none of the {len(sources)} {desc} photos could be read")
    return features, readable


@torch.no_grad()
def _pooled_text(model, tower, tokenizer, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    outputs = []
    for start in range(0, len(texts), batch_size):
        tokens = {k: v.to(model.device) for k, v in tokenizer(texts[start:start + batch_size]).items()}
        outputs.append(tower(tokens["input_ids"], tokens["attention_mask"]).float().cpu())
    return torch.cat(outputs)


def build_feature_cache(model, products: Sequence[Product], rooms: Sequence[Room], *, image_stage: int,
                        num_workers: int = 2, batch_size: int = 32, image_errors: str = "skip",
                        progress: bool = True) -> FeatureCache:
    """Runs every product photo, room view and (locked) text through the locked layers once.

    The model's locked layers must be locked already (`lock_image_tower`, `lock_text_tower`).
    """
    if image_stage < 1:
        raise ValueError("image_stage must be >= 1: the image tower has no locked prefix to cache")
    was_training = model.training
    model.eval()  # locked layers compute as pretrained
    try:
        skipped: list = []
        # BatchNorms folded into their convolutions, channels-last: several times faster than the
        # training tower, outputs equal up to float rounding
        tower = folded_copy(model.image_tower, model.config.image_tower.image_size, model.device,
                            prefix_stage=image_stage)
        product_images, product_readable = _prefix_features(
            model, tower, [p.image for p in products], model.image_transform, image_stage, batch_size=batch_size,
            num_workers=num_workers, desc="caching product photos", progress=progress, image_errors=image_errors,
            skipped=skipped)
        if model.room_views.size != model.config.image_tower.image_size:  # "feature_map": one larger pass a room
            tower = folded_copy(model.image_tower, model.room_views.size, model.device, prefix_stage=image_stage)
        room_views, room_readable = _prefix_features(
            model, tower, [r.image for r in rooms], model.room_views, image_stage, batch_size=max(1, batch_size // 8),
            num_workers=num_workers, desc="caching room views", progress=progress, image_errors=image_errors,
            skipped=skipped)
        product_text_cache = None
        if fully_locked(model.text_tower):
            product_text_cache = _pooled_text(model, model.text_tower, model.tokenizer,
                                              [product_text(p) for p in products])
        scene_tower = model.scene_text_tower or model.text_tower
        scene_text_cache = None
        if fully_locked(scene_tower):
            scene_text_cache = _pooled_text(model, scene_tower, model.scene_tokenizer,
                                            [room_text(r) or "" for r in rooms])
    finally:
        model.train(was_training)
    return FeatureCache(image_stage=image_stage, product_images=product_images, product_readable=product_readable,
                        room_views=room_views, room_readable=room_readable, product_text=product_text_cache,
                        scene_text=scene_text_cache, skipped=skipped)


@torch.no_grad()
def evaluate_cached(model, cache: FeatureCache, products: Sequence[Product], rooms: Sequence[Room],
                    room_positions: Sequence[int], pairs: Sequence[tuple[str, str]], *,
                    batch_size: int = 256) -> RetrievalEvaluation:
    """`hgm_mm.evaluate` (photos only, whole catalogue) computed from the cache.

    Args:
        rooms: the evaluation rooms; `room_positions` are their rows in `cache.room_views`.
    """
    was_training = model.training
    model.eval()
    try:
        with model.image_inputs_from_stage(cache.image_stage):
            image_embeds = torch.cat([model.encode_image(cache.product_images[i:i + batch_size])
                                      for i in range(0, len(products), batch_size)])
            texts = [product_text(p) for p in products]
            text_embeds = torch.cat([
                model.encode_text(cache.text_inputs(cache.product_text, range(i, min(i + batch_size, len(products))),
                                                    model.tokenizer, texts[i:i + batch_size]))
                for i in range(0, len(products), batch_size)])
            product_vectors = model.product_vector(image_embeds, text_embeds,
                                                   image_present=cache.product_readable.to(model.device))
            kept = [k for k, position in enumerate(room_positions) if cache.room_readable[position]]
            views = cache.room_views[[room_positions[k] for k in kept]]
            view_embeds = torch.cat([model.encode_room_views(views[i:i + 16]) for i in range(0, len(kept), 16)])
            scores = model.score_products(product_vectors, view_embeds=view_embeds).float().cpu().numpy()
    finally:
        model.train(was_training)
    kept_rooms = [rooms[k] for k in kept]
    return retrieval_metrics(scores, relevance(kept_rooms, products, pairs), products, kept_rooms,
                             skipped=cache.skipped)
