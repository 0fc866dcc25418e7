"""Batched embedding of many photos or texts: parallel decoding, skip-and-count for bad photos."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .data.images import ImageError, load_image


@dataclass
class EmbeddedImages:
    """Embeddings of the photos that could be read, and what was skipped."""

    embeddings: torch.Tensor  # (N_kept, D) unit vectors on the CPU; (N_kept, V, D) for room views
    kept: list[int]  # input positions of the rows of `embeddings`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo, reason)


class _PhotoFiles(Dataset):
    def __init__(self, sources: Sequence[str | os.PathLike], transform):
        self.sources = list(sources)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.sources[i])), None
        except ImageError as err:
            return i, None, (err.source, err.problem)


def _collate(items):
    kept = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    skipped = [problem for _, pixels, problem in items if pixels is None]
    pixels = torch.stack([p for _, p in kept]) if kept else None
    return [i for i, _ in kept], pixels, skipped


def embed_images(model, sources: Sequence[str | os.PathLike], *, batch_size: int = 32,
                 num_workers: int | None = None, on_error: str = "skip", desc: str = "photos",
                 progress: bool = True, room_views: bool = False) -> EmbeddedImages:
    """Embeds photo files with `model.encode_image`, decoding them in worker processes.

    Args:
        sources: photo paths.
        room_views: embed each photo as a room, one vector per view: embeddings (N, V, D).
        batch_size: photos per forward pass.
        num_workers: decoding processes; default: the CPU count, at most 4.
        on_error: "skip" leaves unreadable photos out and lists them; "raise" stops at the first.
        desc: label of the progress bar.
        progress: show a progress bar.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    transform = model.room_views if room_views else model.image_transform
    loader = DataLoader(_PhotoFiles(sources, transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    from tqdm.auto import tqdm

    chunks, kept, skipped = [], [], []
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not progress) as bar:
        for indices, pixels, problems in loader:
            if problems and on_error == "raise":
                source, reason = problems[0]
                raise ImageError(source, reason)
            skipped.extend(problems)
            if pixels is not None:
                encode = model.encode_room_views if room_views else model.encode_image
                chunks.append(encode(pixels).float().cpu())
                kept.extend(indices)
            bar.update(len(indices) + len(problems))
    empty_shape = (0, model.room_views.n_views, model.config.embed_dim) if room_views else (0, model.config.embed_dim)
    embeddings = torch.cat(chunks) if chunks else torch.empty(empty_shape)
    return EmbeddedImages(embeddings, kept, skipped)


def embed_texts(model, texts: Sequence[str], *, batch_size: int = 64, scene: bool = False) -> torch.Tensor:
    """Embeds texts in batches with `encode_text` (or `encode_scene_text` when `scene`) -> (N, D)."""
    encode = model.encode_scene_text if scene else model.encode_text
    chunks = [encode(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)
