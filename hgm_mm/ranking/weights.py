"""The weights of the matcher's ranking terms, stored with every catalogue folder (`matcher.json`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..json_config import JsonConfig


@dataclass
class RankingWeights(JsonConfig):
    """How much each term of `Matcher`'s ranking counts; `hgm_mm.ranking.matcher`'s docstring gives the
    measurements behind the defaults."""

    similarity: float = 1.0  # the model's room-product score (views pooled)
    scene_fit: float = 0.0  # category fit to the predicted scene, in [-1, 1]; a trained model has learnt it
    profile: float = 0.1  # UserProfile.affinity, in [-1, 1]; not measured (no interaction data)
    diversity: float = 0.02  # penalty per unit of cosine to the closest product already picked
    candidates: int = 100  # index hits per query vector (fused room and each view) to re-rank

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "candidates":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"RankingWeights.candidates={value!r}; expected a positive int")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"RankingWeights.{f.name}={value!r}; expected a non-negative number")
