"""The scene heads the shopping guide reads, trained after retrieval by `hgm-mm train` and `hgm-mm train-scenes`.

- The photo scene head, by the measured recipe (`SceneTrainConfig`), on the training rooms'
  own photos and scenes and, when given, an `images.jsonl` scene set (e.g. Places365 rooms);
  calibrated on the validation rooms and the set's validation photos.
- The scene-text classifier, on the training rooms' captions, an optional `texts.jsonl` and the
  scene vocabulary's descriptions; calibrated on the validation rooms' captions.

Neither changes a room or product vector, so the catalogue index of the model stays valid.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..data.records import Room, SceneImage, SceneText, read_scene_images, read_scene_texts

logger = logging.getLogger(__name__)
SCENE_REPORT_FILE = "scene_heads.json"  # beside the model: what the scene heads were trained on and measured
SCENE_VAL_FRACTION = 0.2  # of a scene set without train/ and val/ folders
# Share of the photo head's training draws that come from the dataset's own rooms when a scene set
# is given too: the rooms are the photos the guide will be shown, and a scene set that outnumbers
# them 26 to 1 (Places365 rooms beside IKEA's) otherwise drowns their scenes (docs/training.md).
ROOM_SHARE = 0.5
MIN_CALIBRATION_ROOMS = 20  # fewer validation rooms are calibrated on together with the scene set's photos
MIN_ROOM_DRAWS = 3000  # room photos drawn per epoch at least: a few hundred rooms alone repeat to about this


@dataclass
class SceneData:
    """Scene-labelled photos and texts for the guide's scene heads, read and checked before training."""

    train_images: list[SceneImage] = field(default_factory=list)
    val_images: list[SceneImage] = field(default_factory=list)
    texts: list[SceneText] = field(default_factory=list)


def read_scene_data(images: str | os.PathLike | None = None, texts: str | os.PathLike | None = None, *,
                    labels: Sequence[str] | None = None) -> SceneData:
    """Reads an `images.jsonl` scene set (a file, or a folder holding one) and a `texts.jsonl`.

    A set whose photos sit under `train/` and `val/` folders keeps that split; any other set is
    split by a hash of each photo's path (`SCENE_VAL_FRACTION` held out).

    Raises:
        FileNotFoundError: a path does not exist or a folder holds no images.jsonl.
        ValueError: a row is invalid (`DataError` names the file and line), or a scene is not
            among `labels` (names the scene and the labels).
    """
    data = SceneData()
    if images is not None:
        path = Path(images)
        if path.is_dir():
            path = path / "images.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{images}: no images.jsonl there; give a scene set's images.jsonl or its folder")
        rows = read_scene_images(path)
        root = path.parent.resolve()
        folders = {item.image.relative_to(root).parts[0] if item.image.is_relative_to(root) else "" for item in rows}
        if {"train", "val"} <= folders:
            data.train_images = [r for r in rows if r.image.relative_to(root).parts[0] == "train"]
            data.val_images = [r for r in rows if r.image.relative_to(root).parts[0] == "val"]
        else:
            for row in rows:
                digest = hashlib.sha256(str(row.image).encode()).digest()
                (data.val_images if digest[0] < 256 * SCENE_VAL_FRACTION else data.train_images).append(row)
        _check_labels(path, {r.scene for r in rows}, labels)
    if texts is not None:
        path = Path(texts)
        data.texts = read_scene_texts(path)
        _check_labels(path, {t.scene for t in data.texts}, labels)
    return data


def _check_labels(path: Path, scenes: set[str], labels: Sequence[str] | None) -> None:
    if labels is None:
        return
    unknown = sorted(scenes - set(labels))
    if unknown:
        raise ValueError(f"{path}: scene(s) {unknown} are not among the model's scene labels {list(labels)}; "
                         "rename them (hgm_mm.data.scenes lists each label's aliases) or leave those rows out")


def train_guide_heads(model, train_rooms: Sequence[Room], val_rooms: Sequence[Room], data: SceneData | None = None,
                      *, seed: int = 0, num_workers: int | None = None, progress: bool = True,
                      **photo_options) -> dict:
    """Trains and calibrates both scene heads of `model` in place; returns what was measured.

    Args:
        model: an `HGMModel` (typically the best model of a retrieval run).
        train_rooms, val_rooms: the run's rooms; their photos, scenes and captions are used.
        data: extra scene photos and texts (`read_scene_data`).
        seed: of both trainings.
        num_workers: photo-decoding processes.
        progress: progress bars.
        photo_options: `train_scenes` arguments that replace the measured recipe's.
    """
    from .scene_text import train_scene_texts
    from .scenes import train_scenes

    data = data or SceneData()
    labels = set(model.scene_labels)
    room_images = lambda rooms: [SceneImage(r.image, r.scene) for r in rooms if r.scene in labels]  # noqa: E731
    captions = lambda rooms: [SceneText(r.title, r.scene) for r in rooms if r.title and r.scene in labels]  # noqa: E731
    report: dict = {}
    rooms_in, rooms_out = room_images(train_rooms), room_images(val_rooms)
    train_images = rooms_in + data.train_images
    if train_images:
        room_draws = max(ROOM_SHARE / (1 - ROOM_SHARE) * len(data.train_images), MIN_ROOM_DRAWS)
        room_repeats = max(1, round(room_draws / len(rooms_in))) if rooms_in else 1
        # calibrated and measured on the rooms' validation photos when there are enough: those are what
        # the guide is shown; the scene set's validation photos are measured apart
        val_images = rooms_out if len(rooms_out) >= MIN_CALIBRATION_ROOMS else rooms_out + data.val_images
        logger.info("training the photo scene head on %d rooms (drawn %d times an epoch) and %d scene-set photos; %d validation "
                    "photos", len(rooms_in), room_repeats, len(data.train_images), len(val_images))
        result = train_scenes(model, train_images, val_images=val_images or None, seed=seed, num_workers=num_workers,
                              repeats=[room_repeats] * len(rooms_in) + [1] * len(data.train_images),
                              progress=progress, **photo_options)
        report["photo"] = {k: v for k, v in result.to_dict().items() if k != "trained_parameters"}
        report["photo"]["room_repeats"] = room_repeats
        if len(rooms_out) >= MIN_CALIBRATION_ROOMS and data.val_images:
            from ..evaluation import evaluate_scenes

            scene_set = evaluate_scenes(model, data.val_images, progress=progress, num_workers=num_workers)
            report["photo_scene_set_val"] = {k: v for k, v in scene_set.to_dict().items() if k != "skipped"}
    if model.scene_text_classifier is not None:
        texts = captions(train_rooms) + data.texts
        result = train_scene_texts(model, texts, val_texts=captions(val_rooms) or None, seed=seed, progress=progress)
        report["text"] = result.to_dict()
    return report
