from pathlib import Path

import pytest

from hgm_mm.data import Room
from hgm_mm.data.split import split_rooms


def rooms(counts):
    return [Room(room_id=f"{scene}-{i}", image=Path("x.jpg"), scene=scene, title="", attributes={})
            for scene, n in counts.items() for i in range(n)]


def test_split_is_by_room_stratified_and_reproducible():
    all_rooms = rooms({"bedroom": 10, "kitchen": 5, "hallway": 2, "laundry": 1})
    train, val = split_rooms(all_rooms, val_fraction=0.2, seed=3)
    assert not {r.room_id for r in train} & {r.room_id for r in val}
    assert len(train) + len(val) == len(all_rooms)
    scenes = [r.scene for r in val]
    assert scenes.count("bedroom") == 2 and scenes.count("kitchen") == 1 and scenes.count("hallway") == 1
    assert "laundry" not in scenes  # a scene with one room stays in training
    assert split_rooms(all_rooms, val_fraction=0.2, seed=3) == (train, val)
    assert split_rooms(all_rooms, val_fraction=0.2, seed=4)[1] != val


def test_split_refuses_bad_fraction_and_duplicate_ids():
    with pytest.raises(ValueError, match="val_fraction"):
        split_rooms(rooms({"a": 3}), val_fraction=1.0)
    with pytest.raises(ValueError, match="unique"):
        split_rooms(rooms({"a": 2}) + rooms({"a": 1}))
