"""A shopper's taste: built from interaction events, or from one photo of their room.

    events = read_events("events.csv")                  # user_id,product_id,event,timestamp (hgm_mm.data.events)
    profile = UserProfile.from_events(events, "u42", index=index)
    boost = profile.affinity(ids, vectors, metadata)    # (N,), used by the matcher's profile term

Decisions:
  - Each event weighs `event_weights[event] * 0.5 ** (age / half_life)`, its age measured back
    from `now` (default: the user's latest event). Every quantity a profile keeps is normalised
    (a unit vector, shares that sum to 1), so moving `now` changes nothing but the scale of the
    raw weights; the default keeps profiles reproducible. Events later than `now` count as age 0.
  - The preference vector is the weighted mean of the product vectors stored in the index,
    normalised; events on products the index no longer holds are left out with a warning.
  - Style words are the lower-cased words of a product's colour and style attributes ("Black-brown"
    -> black, brown), since those are what catalogues give for looks.
  - The price range spans the prices of the products the user acted on.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.events import EVENT_TYPES, InteractionEvent
from ..data.events import read_events as read_events  # where it was before the events had a module

DEFAULT_EVENT_WEIGHTS = {"view": 1.0, "cart": 3.0, "purchase": 5.0}
STYLE_ATTRIBUTES = ("color", "colour", "style")  # metadata keys whose words describe looks
SECONDS_PER_DAY = 86_400.0
PROFILE_FORMAT = 1
# How `affinity` mixes its parts (each in [-1, 1] or [0, 1]); parts a profile lacks are left out
# and the rest renormalised, so a photo-only profile is its vector similarity alone.
AFFINITY_PARTS = {"vector": 0.55, "category": 0.25, "style": 0.1, "price": 0.1}


# -- the profile ------------------------------------------------------------------------------
@dataclass
class UserProfile:
    """What a user likes, in the terms the matcher ranks by.

    Attributes:
        user_id: whose profile it is.
        vector: (D,) unit preference vector in the model's product space, or None.
        category_affinity: category -> share of the user's (decayed, weighted) interest; sums to 1.
        style_affinity: colour/style word -> share of interest; sums to 1.
        price_range: (lowest, highest) price of the products acted on, or None.
        n_events: events the profile was built from.
    """

    user_id: str
    vector: np.ndarray | None = None
    category_affinity: dict[str, float] = field(default_factory=dict)
    style_affinity: dict[str, float] = field(default_factory=dict)
    price_range: tuple[float, float] | None = None
    n_events: int = 0

    def __post_init__(self) -> None:
        if self.vector is not None:
            vector = np.asarray(self.vector, dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(vector))
            if not math.isfinite(norm) or norm == 0.0:
                raise ValueError(f"profile {self.user_id!r}: the vector is zero or not finite; give a unit vector "
                                 "or None")
            self.vector = vector / norm
        if self.price_range is not None:
            low, high = (float(v) for v in self.price_range)
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(f"profile {self.user_id!r}: price_range={self.price_range!r}; expected (low, high) "
                                 "with low <= high")
            self.price_range = (low, high)

    @classmethod
    def from_events(cls, events: Sequence[InteractionEvent], user_id: str, *, index, now: float | None = None,
                    half_life_days: float = 30.0, event_weights: Mapping[str, float] | None = None
                    ) -> "UserProfile":
        """The profile of `user_id` from their events; vectors and metadata come from `index`.

        Args:
            events: events of any users (the others are ignored).
            user_id: whose profile to build.
            index: the `ProductIndex` of the catalogue (vectors, category, colour, price).
            now: the time ages are measured from, in epoch seconds; default the user's latest event.
            half_life_days: an event this old counts half as much as one at `now`.
            event_weights: weight per event type; default view 1, cart 3, purchase 5.

        Raises:
            ValueError: the user has no events, or the weights or half-life are not positive.
        """
        weights_by_type = dict(DEFAULT_EVENT_WEIGHTS if event_weights is None else event_weights)
        unknown = sorted(set(weights_by_type) - set(EVENT_TYPES))
        if unknown or any(not (isinstance(w, (int, float)) and w >= 0) for w in weights_by_type.values()):
            raise ValueError(f"event_weights={weights_by_type!r}; expected non-negative numbers for "
                             f"{list(EVENT_TYPES)}")
        if not half_life_days > 0:
            raise ValueError(f"half_life_days={half_life_days!r}; expected a positive number of days")
        mine = [e for e in events if e.user_id == user_id]
        if not mine:
            known = sorted({e.user_id for e in events})
            raise ValueError(f"user {user_id!r} has no events; users with events: "
                             f"{known[:10]}{' ...' if len(known) > 10 else ''}")
        now = max(e.timestamp for e in mine) if now is None else float(now)
        known_events = [e for e in mine if e.product_id in index]
        missing = sorted({e.product_id for e in mine} - {e.product_id for e in known_events})
        if missing:
            warnings.warn(f"user {user_id!r}: {len(missing)} product(s) of their events are not in the index "
                          f"(e.g. {missing[:5]}) and are left out of the profile", stacklevel=2)
        profile = cls(user_id=user_id, n_events=len(mine))
        if not known_events:
            return profile
        half_life = half_life_days * SECONDS_PER_DAY
        weights = np.array([weights_by_type.get(e.event, 0.0) * 0.5 ** (max(now - e.timestamp, 0.0) / half_life)
                            for e in known_events])  # (E,)
        if weights.sum() <= 0:
            return profile
        product_ids = [e.product_id for e in known_events]
        vectors = index.vectors(product_ids)  # (E, D)
        mean = weights @ vectors  # (D,)
        if np.linalg.norm(mean) > 1e-8:
            profile.vector = (mean / np.linalg.norm(mean)).astype(np.float32)
        metadata = index.metadata_of(product_ids)
        categories: dict[str, float] = defaultdict(float)
        styles: dict[str, float] = defaultdict(float)
        for weight, meta in zip(weights, metadata):
            if isinstance(meta.get("category"), str) and meta["category"]:
                categories[meta["category"]] += weight
            words = style_words(meta)
            for word in words:
                styles[word] += weight / len(words)  # a product's weight is shared among its words
        profile.category_affinity = _shares(categories)
        profile.style_affinity = _shares(styles)
        prices = [meta["price"] for weight, meta in zip(weights, metadata) if weight > 0 and _is_price(meta.get("price"))]
        if prices:
            profile.price_range = (float(min(prices)), float(max(prices)))
        return profile

    @classmethod
    def from_photo(cls, model, image, user_id: str = "new-user") -> "UserProfile":
        """A new user's profile from one photo of their room: its room vector is the preference.

        Args:
            model: the `HGMModel` that built the catalogue index.
            image: a PIL image or a photo path.
            user_id: the id to give the new profile.
        """
        import torch

        with torch.no_grad():
            vector = model.encode_room(image)[0].float().cpu().numpy()  # (D,)
        return cls(user_id=user_id, vector=vector, n_events=0)

    def affinity(self, product_ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """How well each product suits this user -> (N,) in [-1, 1].

        A weighted mean (`AFFINITY_PARTS`) of the parts the profile holds: cosine to the
        preference vector; the product category's share relative to the user's top category;
        the best share among its style words relative to the top word; 1 for a price inside
        the range, falling off with the distance outside it (0 at one range width away).

        Args:
            product_ids: N product ids.
            vectors: (N, D) unit product vectors.
            metadata: N metadata dicts (category, color, price ...).
        """
        n = len(product_ids)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
        if len(metadata) != n:
            raise ValueError(f"{n} product ids but {len(metadata)} metadata dicts; give one per product")
        parts: list[tuple[float, np.ndarray]] = []
        if self.vector is not None and n:
            if vectors.shape[1] != self.vector.shape[0]:
                raise ValueError(f"product vectors have dimension {vectors.shape[1]} but profile {self.user_id!r} "
                                 f"has {self.vector.shape[0]}; build the profile with the same model and index")
            parts.append((AFFINITY_PARTS["vector"], vectors @ self.vector))
        if self.category_affinity:
            top = max(self.category_affinity.values())
            parts.append((AFFINITY_PARTS["category"], np.array(
                [self.category_affinity.get(m.get("category"), 0.0) / top if isinstance(m.get("category"), str)
                 else 0.0 for m in metadata])))
        if self.style_affinity:
            top = max(self.style_affinity.values())
            parts.append((AFFINITY_PARTS["style"], np.array(
                [max((self.style_affinity.get(w, 0.0) for w in style_words(m)), default=0.0) / top
                 for m in metadata])))
        if self.price_range is not None:
            parts.append((AFFINITY_PARTS["price"], np.array([self._price_fit(m.get("price")) for m in metadata])))
        if not parts or not n:
            return np.zeros(n, dtype=np.float32)
        total = sum(weight for weight, _ in parts)
        return (sum(weight * values for weight, values in parts) / total).astype(np.float32)

    def _price_fit(self, price: Any) -> float:
        if not _is_price(price):
            return 0.0
        low, high = self.price_range
        width = max(high - low, 0.25 * max(abs(high), 1.0))  # a single price still gets a tolerance
        distance = max(low - price, price - high, 0.0)
        return max(1.0 - distance / width, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict` reads it back."""
        return {"format": PROFILE_FORMAT, "user_id": self.user_id,
                "vector": None if self.vector is None else [float(v) for v in self.vector],
                "category_affinity": dict(self.category_affinity), "style_affinity": dict(self.style_affinity),
                "price_range": None if self.price_range is None else list(self.price_range),
                "n_events": self.n_events}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UserProfile":
        """Reads a dict written by `to_dict`; unknown keys and newer formats are refused."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a profile must be a JSON object, got {type(data).__name__}")
        expected = {"format", "user_id", "vector", "category_affinity", "style_affinity", "price_range", "n_events"}
        unknown = sorted(set(data) - expected)
        if unknown:
            raise ValueError(f"profile: unknown key(s) {unknown}; expected {sorted(expected)}")
        if data.get("format", PROFILE_FORMAT) > PROFILE_FORMAT:
            raise ValueError(f"profile format {data['format']} is newer than this hgm_mm reads ({PROFILE_FORMAT}); "
                             "upgrade: pip install -U hgm-mm")
        for key in ("category_affinity", "style_affinity"):
            values = data.get(key) or {}
            if not isinstance(values, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) for k, v in values.items()):
                raise ValueError(f"profile {key} must map strings to numbers; got {values!r}")
        price_range = data.get("price_range")
        return cls(user_id=str(data["user_id"]),
                   vector=None if data.get("vector") is None else np.asarray(data["vector"], dtype=np.float32),
                   category_affinity={k: float(v) for k, v in (data.get("category_affinity") or {}).items()},
                   style_affinity={k: float(v) for k, v in (data.get("style_affinity") or {}).items()},
                   price_range=None if price_range is None else (price_range[0], price_range[1]),
                   n_events=int(data.get("n_events", 0)))


def style_words(metadata: Mapping[str, Any]) -> list[str]:
    """The distinct lower-case words of a product's colour and style attributes, in order."""
    words: list[str] = []
    for key in STYLE_ATTRIBUTES:
        value = metadata.get(key)
        if isinstance(value, str):
            words.extend(w for w in re.split(r"[^\w]+", value.lower()) if w and not w.isdigit())
    return list(dict.fromkeys(words))


def _shares(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        return {}
    return {key: float(value / total) for key, value in sorted(weights.items(), key=lambda kv: -kv[1])}


def _is_price(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
