"""What each training step sees, as a pure function of (seed, step), and the loading of its photos.

Because a step's rooms, products and random choices depend only on the seed and the step
number, a run resumed from a checkpoint sees exactly the batches an unbroken run would, and a
global batch is the same whatever the number of processes (each takes its share).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import ImageError, load_image
from ..data.records import Product, Room


@dataclass
class StepBatch:
    """Indices of one global step: rooms into the training rooms, products into the catalogue."""

    step: int
    room_indices: list[int]
    product_indices: list[int]  # unique; the rooms' sampled positives first, then a catalogue slice
    room_reads_text: list[bool]  # which rooms also read their caption this step


class StepPlan:
    """Global batches: an epoch is one pass over the catalogue, rooms cycle alongside."""

    def __init__(self, n_products: int, room_positives: Sequence[Sequence[int]], *, batch_size: int,
                 rooms_per_batch: int, positives_per_room: int, room_text_probability: float, seed: int):
        if n_products == 0:
            raise ValueError("the catalogue is empty: nothing to train on")
        self.n_products = n_products
        self.room_positives = [list(p) for p in room_positives]
        self.batch_size = min(batch_size, n_products)
        self.rooms_per_batch = min(rooms_per_batch, len(self.room_positives)) if self.room_positives else 0
        self.positives_per_room = positives_per_room
        self.room_text_probability = room_text_probability
        self.seed = seed
        self.steps_per_epoch = math.ceil(n_products / self.batch_size)

    def _permutation(self, n: int, stream: int, index: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream, index]).permutation(n)

    def batch(self, step: int) -> StepBatch:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._permutation(self.n_products, 0, epoch)
        catalogue_slice = order[position * self.batch_size:(position + 1) * self.batch_size].tolist()
        rooms = self._rooms(step)
        rng = np.random.default_rng([self.seed, 2, step])
        sampled: list[int] = []
        for room in rooms:
            positives = self.room_positives[room]
            take = min(self.positives_per_room, len(positives))
            if take:
                sampled.extend(int(i) for i in rng.choice(positives, size=take, replace=False))
        products = list(dict.fromkeys(sampled + catalogue_slice))
        reads_text = (rng.random(len(rooms)) < self.room_text_probability).tolist()
        return StepBatch(step, rooms, products, reads_text)

    def _rooms(self, step: int) -> list[int]:
        rooms: list[int] = []
        if self.rooms_per_batch:
            n_rooms = len(self.room_positives)
            start = step * self.rooms_per_batch
            for cursor in range(start, start + self.rooms_per_batch):
                room_epoch, within = divmod(cursor, n_rooms)
                rooms.append(int(self._permutation(n_rooms, 1, room_epoch)[within]))
        return list(dict.fromkeys(rooms))  # a room twice in one step would be its own negative

    def rooms_drawn(self, steps: range, rank: int = 0, world_size: int = 1) -> list[int]:
        """The training rooms that this process's share of `steps` reads, in ascending order."""
        n_rooms = len(self.room_positives)
        drawn: set[int] = set()
        for step in steps:
            drawn.update(self._rooms(step)[rank::world_size])
            if len(drawn) == n_rooms:
                break
        return sorted(drawn)


class StepPhotos(Dataset):
    """Loads one step's photos for this process's share of the global batch (rank::world_size)."""

    def __init__(self, plan: StepPlan, rooms: Sequence[Room], products: Sequence[Product], transform, room_views,
                 *, steps: range, rank: int = 0, world_size: int = 1, image_errors: str = "skip"):
        self.plan, self.rooms, self.products = plan, rooms, products
        self.transform, self.room_views = transform, room_views
        self.steps, self.rank, self.world_size, self.image_errors = steps, rank, world_size, image_errors

    def __len__(self) -> int:
        return len(self.steps)

    def _load(self, path, skipped: list, transform) -> torch.Tensor | None:
        try:
            return transform(load_image(path))
        except ImageError as err:
            if self.image_errors == "raise":
                raise
            skipped.append((err.source, err.problem))
            return None

    def __getitem__(self, i: int) -> dict:
        batch = self.plan.batch(self.steps[i])
        skipped: list = []
        local_rooms = batch.room_indices[self.rank::self.world_size]
        local_text = batch.room_reads_text[self.rank::self.world_size]
        local_products = batch.product_indices[self.rank::self.world_size]
        room_pixels = [self._load(self.rooms[r].image, skipped, self.room_views) for r in local_rooms]  # (V, 3, S, S)
        product_pixels = [self._load(self.products[p].image, skipped, self.transform) for p in local_products]
        keep_rooms = [k for k, px in enumerate(room_pixels) if px is not None]
        keep_products = [k for k, px in enumerate(product_pixels) if px is not None]
        return {
            "step": batch.step,
            "rooms": [local_rooms[k] for k in keep_rooms],
            "room_reads_text": [local_text[k] for k in keep_rooms],
            "room_pixels": _stack([room_pixels[k] for k in keep_rooms]),
            "products": [local_products[k] for k in keep_products],
            "product_pixels": _stack([product_pixels[k] for k in keep_products]),
            "skipped": skipped,
        }


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(tensors) if tensors else None
