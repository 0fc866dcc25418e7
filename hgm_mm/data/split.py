"""Train/validation splits of rooms: by room, so that no room is on both sides."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from .records import Room


def split_rooms(rooms: Sequence[Room], *, val_fraction: float = 0.2, seed: int = 0
                ) -> tuple[list[Room], list[Room]]:
    """Splits rooms into (train, validation), stratified by scene and reproducible from `seed`.

    Each scene keeps about `val_fraction` of its rooms for validation (at least one room when
    the scene has two or more), so small scenes are represented on both sides. Order within
    each side follows the input.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r}; expected a value between 0 and 1")
    ids = [room.room_id for room in rooms]
    if len(set(ids)) != len(ids):
        raise ValueError("room ids must be unique to split by room")
    by_scene: dict[str | None, list[str]] = defaultdict(list)
    for room in rooms:
        by_scene[room.scene].append(room.room_id)
    rng = random.Random(seed)
    val_ids: set[str] = set()
    for scene in sorted(by_scene, key=str):
        members = sorted(by_scene[scene])
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val_ids.update(members[:n_val])
    train = [room for room in rooms if room.room_id not in val_ids]
    val = [room for room in rooms if room.room_id in val_ids]
    return train, val
