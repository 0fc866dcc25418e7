"""P(category | scene): which product categories belong in a room of each scene, counted from training pairs.

The matcher's scene fit and its product sets read it (`hgm_mm.ranking.matcher`); training writes the
counts of its training pairs beside the model (`scene_categories.json`), and `hgm-mm index`
stores them with the catalogue.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_text, read_json_object
from ..version import __version__

SCENE_CATEGORIES_FILE = "scene_categories.json"


class SceneCategoryPrior:
    """P(category | scene), Laplace-smoothed, from counts of products per category in rooms of each scene.

    A scene the counts never saw is given the pooled distribution of all scenes.
    """

    def __init__(self, counts: Mapping[str, Mapping[str, float]], *, alpha: float = 1.0):
        """
        Args:
            counts: scene -> category -> count (non-negative numbers).
            alpha: Laplace smoothing added to every (scene, category) count.
        """
        if not isinstance(counts, Mapping):
            raise ValueError(f"counts must be a dict scene -> {{category: count}}, got {type(counts).__name__}")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r}; expected a positive smoothing count")
        clean: dict[str, dict[str, float]] = {}
        for scene, row in counts.items():
            if not isinstance(scene, str) or not isinstance(row, Mapping):
                raise ValueError(f"counts[{scene!r}] must be a dict category -> count; got {row!r}")
            for category, count in row.items():
                if not isinstance(category, str) or isinstance(count, bool) or not isinstance(count, (int, float)) \
                        or not math.isfinite(count) or count < 0:
                    raise ValueError(f"counts[{scene!r}][{category!r}]={count!r}; expected a non-negative number")
            clean[scene] = {category: float(count) for category, count in row.items()}
        self.counts = clean
        self.alpha = float(alpha)
        self.categories = sorted({category for row in clean.values() for category in row})
        pooled: dict[str, float] = defaultdict(float)
        for row in clean.values():
            for category, count in row.items():
                pooled[category] += count
        self._pooled = dict(pooled)

    @property
    def scenes(self) -> list[str]:
        return sorted(self.counts)

    def probabilities(self, scene: str | None) -> dict[str, float]:
        """P(category | scene) over the known categories (sums to 1)."""
        row = self.counts.get(scene, self._pooled) if scene is not None else self._pooled
        total = sum(row.values()) + self.alpha * len(self.categories)
        return {category: (row.get(category, 0.0) + self.alpha) / total for category in self.categories}

    def probability(self, scene: str | None, category: str) -> float:
        """P(category | scene); a category never counted gets the smoothing mass alone."""
        row = self.counts.get(scene, self._pooled) if scene is not None else self._pooled
        total = sum(row.values()) + self.alpha * len(self.categories)
        return (row.get(category, 0.0) + self.alpha) / total

    def mixture(self, scene_probabilities: Mapping[str, float]) -> dict[str, float]:
        """P(category) under uncertain scenes: sum over scenes of P(scene) * P(category | scene)."""
        out = dict.fromkeys(self.categories, 0.0)
        total = sum(scene_probabilities.values())
        for scene, p in scene_probabilities.items():
            if p <= 0:
                continue
            for category, q in self.probabilities(scene).items():
                out[category] += p / total * q
        return out

    @classmethod
    def from_counts(cls, counts: Mapping[str, Mapping[str, float]], *, alpha: float = 1.0) -> "SceneCategoryPrior":
        """The prior from ready counts (scene -> category -> count)."""
        return cls(counts, alpha=alpha)

    @classmethod
    def from_pairs(cls, rooms: Sequence, products: Sequence, pairs: Sequence[tuple[str, str]], *,
                   alpha: float = 1.0) -> "SceneCategoryPrior":
        """Counts, for each pair (room, product), the product's category in the room's scene.

        Rooms without a scene and products without a category are left out. Pass the training
        rooms only, or the prior learns the validation rooms.

        Args:
            rooms: `Room` records (room_id, scene).
            products: `Product` records (product_id, category).
            pairs: (room_id, product_id) pairs.
        """
        counts = cls.count_pairs(rooms, products, pairs)
        if not counts:
            raise ValueError("no pair joins a room with a scene to a product with a category; the prior needs "
                             "rooms.jsonl with 'scene', products.jsonl with 'category' and pairs between them")
        return cls(counts, alpha=alpha)

    @staticmethod
    def count_pairs(rooms: Sequence, products: Sequence, pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, int]]:
        """{scene: {category: pairs joining a room of that scene to a product of that category}}, sorted;
        rooms without a scene and products without a category are left out (see `from_pairs`)."""
        scene_of = {room.room_id: room.scene for room in rooms}
        category_of = {product.product_id: product.category for product in products}
        counts: dict[str, Counter] = defaultdict(Counter)
        for room_id, product_id in pairs:
            scene, category = scene_of.get(room_id), category_of.get(product_id)
            if scene and category:
                counts[scene][category] += 1
        return {scene: dict(sorted(row.items())) for scene, row in sorted(counts.items())}

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "alpha": self.alpha, "counts": self.counts}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes `{"format": 1, "alpha": ..., "counts": {scene: {category: count}}}` atomically."""
        path = Path(path)
        atomic_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SceneCategoryPrior":
        """Reads a file written by `save` (or by training: `scene_categories.json`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; write it with SceneCategoryPrior.save or train a model")
        data = read_json_object(path, fix="write it again with SceneCategoryPrior.save")
        if "counts" not in data:
            raise ValueError(f"{path}: expected {{\"format\": 1, \"counts\": {{scene: {{category: count}}}}}}")
        if not isinstance(data.get("format", 1), int) or data.get("format", 1) > 1:
            raise ValueError(f"{path}: format {data.get('format')!r} is newer than this hgm_mm {__version__} reads; "
                             "upgrade: pip install -U hgm-mm")
        unknown = sorted(set(data) - {"format", "alpha", "counts"})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; expected format, alpha, counts")
        try:
            return cls(data["counts"], alpha=data.get("alpha", 1.0))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
