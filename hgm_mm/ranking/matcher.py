"""The shopping guide's matcher: a room photo (and words) -> its scene, ranked products, a product set.

    build_catalog_index(model, read_products("products.jsonl"), "catalogue", prior=prior)
    matcher = Matcher.load("catalogue")
    result = matcher.match("living_room.jpg", text="warm Nordic light", profile=profile, k=10)
    result.scene, result.products[0].reasons, result.product_set

How a query is ranked:
  1. The photo is embedded as the model's room views, the words through the scene-text tower; the
     fused room vector gives the scene probabilities (`model.scene_head`).
  2. Candidates: the index is searched with the fused room vector and with every view vector
     (`weights.candidates` hits each, filters applied during the search), so a product that
     matches one part of the photo is found even when the whole-photo vector misses it.
  3. Each candidate gets terms, and its score before diversity is their weighted sum:
     - similarity: `model.score_products` (views pooled, words fused), as evaluation ranks rooms;
     - scene_fit: in [-1, 1], (L - 1) / (L + 1) for the lift L = P(category | scene) /
       (category's share of the catalogue), with P(category | scene) averaged over the predicted
       scene probabilities (`SceneCategoryPrior`, learnt from training pairs). 0 means "as common
       here as in the catalogue"; it keeps a bath mat out of a living room;
     - profile: `UserProfile.affinity` in [-1, 1] (0 without a profile).
  4. Diversity: products are picked greedily (maximal marginal relevance); each pick is penalised by
     `weights.diversity` times its highest cosine to the products already picked, so near-identical
     products (one series in several colours) do not fill the list.
  5. The product set: among the categories the scene does not make clearly rarer (lift at least
     `SET_MIN_LIFT` under the scene probabilities), the best product of each by the same terms,
     the best-scoring ones kept; without a prior, the categories of the top products.

Each result's `reasons` holds the weighted contribution of each term (its `score` is their sum).

Default weights, measured with `benchmarks/tune_ranking.py` (IKEA development rooms, validation
split `split_rooms(val_fraction=0.2, seed=0)`: 27 rooms with products; prior counted from the 114
training rooms' pairs only; photo only, whole catalogue of 2,187 products as the gallery;
near-duplicates: pairs in a top 10 with cosine >= 0.9). On the model `hgm-mm train --data ikea
--scene-data places365-rooms` writes (photo scene accuracy 0.852 on these rooms):

    similarity 1, scene_fit, diversity    Recall@10   NDCG@10   near-duplicate pairs in top 10
    0, 0 (similarity alone)               0.1619      0.2653    0.81   (= the model's own ranking)
    0, 0.02 (the defaults)                0.1619      0.2670    0.67
    0, 0.05                               0.1463      0.2534    0.41
    0.05, 0.05                            0.1510      0.2563    0.52
    0.1, 0.05 (the defaults on the frozen model, before)   0.1483   0.2456   0.48
    0.1, 0 with each room's true scene    0.1418      0.2327    1.19

A trained model has learnt which products belong in which scene: scene fit lowers both figures
even with the true scene, so it is off by default (it still decides the product set's
categories). On the frozen, untrained `hgm-lite-en` scene fit 0.1 had raised NDCG@10 from 0.0380
to 0.0500. Diversity 0.02 removes a sixth of the near-duplicate pairs and costs no Recall@10; 0.05
costs 0.016. The profile weight (0.1) is not measured: IKEA has no interaction data.

`Matcher.match` may be called from several threads at once: the model's encoders (tokenizers are
not thread-safe) run under a lock, searching and ranking run concurrently.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .catalog import MATCHER_FILE, open_index, read_manifest
from ..embedding import photo_encoder, resolve_engine
from ..retrieval.index import ProductIndex, model_fingerprint
from .profile import UserProfile
from .weights import RankingWeights
# the folder builder and the prior, under the names they have always had here
from .catalog import CatalogIndex as CatalogIndex, build_catalog_index as build_catalog_index
from .catalog import check_output_dir as check_output_dir, product_metadata as product_metadata
from .prior import SCENE_CATEGORIES_FILE as SCENE_CATEGORIES_FILE, SceneCategoryPrior as SceneCategoryPrior
from ..data.scenes import combine_scene_probabilities, scene_words

logger = logging.getLogger(__name__)

DEFAULT_SET_SIZE = 6
SCENE_CONFIDENCE = 0.5  # below this top-scene probability the guide says it is not sure of the scene
# A product set's categories are at least half as likely in the scene as in the catalogue: that rules
# out a bed in a dining room. Measured on the IKEA validation rooms with a trained model (set of 6,
# precision / coverage of the rooms' categories): lift >= 1 0.170 / 0.590, >= 0.5 0.210 / 0.684,
# >= 0.25 0.235 / 0.661, no scene at all 0.235 / 0.656.
SET_MIN_LIFT = 0.5
SET_CANDIDATES = 20  # a large set category with no candidate: its products nearest to the room vector, scored
SET_SCORE_WHOLE_MAX = 2000  # a product set's category of at most this many products is scored whole


# -- weights and results --------------------------------------------------------------------------
@dataclass
class RankedProduct:
    """One recommended product with the weighted term contributions that sum to its score."""

    product_id: str
    score: float
    reasons: dict[str, float]  # similarity, scene_fit, profile, diversity (<= 0)
    metadata: dict[str, Any] = field(default_factory=dict)  # title, category, image, price ...
    why: str = ""  # for a shopper: why the product is there ("a sofa: 41% of living-room products")

    def to_dict(self) -> dict[str, Any]:
        return {"product_id": self.product_id, "score": float(self.score),
                "reasons": {k: float(v) for k, v in self.reasons.items()}, "metadata": dict(self.metadata),
                "why": self.why}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "RankedProduct":
        """The product `to_dict` wrote (keys beyond its own are ignored: a service adds ``photo_url``)."""
        return cls(str(row["product_id"]), float(row["score"]), {k: float(v) for k, v in row["reasons"].items()},
                   dict(row.get("metadata") or {}), str(row.get("why") or ""))


@dataclass
class MatchResult:
    """What the guide shows for one room: its scene, ranked products and a product set."""

    scene: str  # the most likely scene, whether or not the guide is sure of it
    scene_probabilities: dict[str, float]  # every scene label, most likely first
    products: list[RankedProduct]
    product_set: list[RankedProduct]  # one product per category that fits the scene, best score first
    scene_confident: bool = True  # the top scene's probability reaches SCENE_CONFIDENCE: say it, else "not sure"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"scene": self.scene, "scene_confident": self.scene_confident,
                "scene_probabilities": {k: float(v) for k, v in self.scene_probabilities.items()},
                "products": [p.to_dict() for p in self.products],
                "product_set": [p.to_dict() for p in self.product_set]}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "MatchResult":
        """The result `to_dict` wrote, e.g. a `hgm-mm serve` response."""
        try:
            return cls(str(document["scene"]), {k: float(v) for k, v in document["scene_probabilities"].items()},
                       [RankedProduct.from_dict(p) for p in document["products"]],
                       [RankedProduct.from_dict(p) for p in document["product_set"]],
                       scene_confident=bool(document.get("scene_confident", True)))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"not a match result ({type(err).__name__}: {err}); expected the keys of "
                             "MatchResult.to_dict()") from None


@dataclass
class RoomQuery:
    """A room photo and/or words, encoded once; `Matcher.rank` ranks it under any weights."""

    view_embeds: torch.Tensor | None  # (1, V, D) the photo's views, or None for words only
    text_embeds: torch.Tensor | None  # (1, D) the words through the scene-text tower, or None
    room_vector: np.ndarray  # (D,) fused unit room vector
    scene_probabilities: dict[str, float]  # most likely first: photo and words combined when both are given
    photo_scene_probabilities: dict[str, float] | None = None  # from the photo alone; None without a photo
    text_scene_probabilities: dict[str, float] | None = None  # from the words alone; None without words


# -- ranking --------------------------------------------------------------------------------------
def diverse_order(base_scores: np.ndarray, vectors: np.ndarray, diversity: float, k: int
                  ) -> tuple[list[int], np.ndarray]:
    """Greedy maximal-marginal-relevance order of the top k.

    Args:
        base_scores: (N,) scores before diversity.
        vectors: (N, D) unit product vectors.
        diversity: penalty per unit of cosine to the closest product already picked.
        k: how many to pick.

    Returns:
        (positions of the picks, best first; (k',) penalty each pick paid, <= 0).
    """
    n = len(base_scores)
    k = min(k, n)
    closest = np.full(n, -np.inf)  # (N,) highest cosine to any pick so far
    taken = np.zeros(n, dtype=bool)
    order, penalties = [], []
    for _ in range(k):
        penalty = diversity * np.maximum(closest, 0.0) if order else np.zeros(n)  # (N,)
        adjusted = np.where(taken, -np.inf, base_scores - penalty)
        pick = int(np.argmax(adjusted))
        order.append(pick)
        penalties.append(0.0 - float(penalty[pick]))  # never -0.0 in JSON
        taken[pick] = True
        if diversity > 0:
            closest = np.maximum(closest, vectors @ vectors[pick])
    return order, np.array(penalties)


class Matcher:
    """Ranks catalogue products for a room photo and/or words; see the module docstring."""

    def __init__(self, model, index: ProductIndex, *, prior: SceneCategoryPrior | None = None,
                 weights: RankingWeights | None = None, engine: str = "auto"):
        """
        Args:
            model: the `HGMModel` that built `index`.
            index: the catalogue `ProductIndex`, with "category" in its metadata for scene fit and sets.
            prior: P(category | scene); None turns the scene-fit term off.
            weights: term weights; default `RankingWeights()`.
            engine: what runs the room views through the image tower, as in catalogue embedding:
                "auto" (ONNX Runtime on a CPU when installed, exported at the first photo; the
                tower in bf16 on CUDA), "onnxruntime", or "torch" (on a CPU the BatchNorm-folded
                copy of the tower: no export, for a process that matches one photo).

        Raises:
            ValueError: the index was built by another model, or its dimension differs.
        """
        if index.dim != model.config.embed_dim:
            raise ValueError(f"the index holds {index.dim}-d vectors but model {model.config.name!r} makes "
                             f"{model.config.embed_dim}-d ones; index the catalogue with this model")
        if index.model_identity is not None:
            identity = model_fingerprint(model)
            if identity != index.model_identity:
                raise ValueError(f"the index was built by model {index.model_identity.rsplit(':sha256:', 1)[0]!r} "
                                 f"but the queries come from model {model.config.name!r} with other weights; their "
                                 "vectors are not comparable. Index the catalogue with this model (hgm-mm index)")
        self.model = model.eval()
        self.engine = resolve_engine(engine, self.model, "auto", None)
        self._view_encoder = None  # built at the first photo or by `warm_up`
        self.index = index
        self.prior = prior
        self.weights = weights if weights is not None else RankingWeights()
        self._lock = threading.Lock()
        counts = index.value_counts("category")
        counts.pop(None, None)
        total = sum(counts.values())
        self._category_count = {c: n for c, n in counts.items() if isinstance(c, str)}
        self._category_share = {c: n / total for c, n in self._category_count.items()} if total else {}

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, device: str | torch.device | None = None, model=None,
             weights: RankingWeights | None = None, engine: str = "auto") -> "Matcher":
        """Opens a folder written by `build_catalog_index` (`hgm-mm index`).

        Args:
            index_dir: the folder.
            device: where to put the model.
            model: query with this model instead of the folder's; refused unless it built the index.
            weights: term weights instead of the folder's.
            engine: what encodes room photos (see `Matcher`).

        Raises:
            FileNotFoundError: the folder or a file in it is missing.
            ValueError: a file is damaged or newer than this hgm_mm, or `model` did not build the index.
        """
        from ..models.hgm import load_model

        folder = Path(index_dir)
        manifest = read_manifest(folder)
        if model is None:
            model = load_model(folder / manifest["model"], device=device)
        elif device is not None:
            model = model.to(device)
        index = open_index(folder, manifest, model)
        prior = SceneCategoryPrior.load(folder / manifest["scene_categories"]) if manifest["scene_categories"] else None
        if weights is None:
            weights = RankingWeights.from_dict(manifest["weights"], origin=f"{folder / MATCHER_FILE}: weights")
        return cls(model, index, prior=prior, weights=weights, engine=engine)

    # -- encoding ------------------------------------------------------------------------------
    def encode_query(self, image=None, text: str | None = None) -> RoomQuery:
        """Embeds a room photo (PIL image or path) and/or words once, with the scene they imply."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        text = text.strip() if text else None
        if image is None and not text:
            raise ValueError("nothing to match: give a room photo, words, or both")
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if image is not None and not isinstance(image, (str, torch.Tensor)) and not hasattr(image, "convert"):
            raise TypeError(f"image must be a PIL image or a photo path, got {type(image).__name__}")
        with self._lock, torch.no_grad():
            view_embeds = self._room_views(image) if image is not None else None  # (1, V, D)
            text_embeds = self.model.encode_scene_text([text]).float() if text else None  # (1, D)
            photo_scenes = self._scene_dict(self.model.photo_scene_log_probs(
                [image] if not isinstance(image, torch.Tensor) else image, view_embeds)) if image is not None else None
            text_scenes = self._scene_dict(self.model.text_scene_log_probs([text])) if text else None
        query = self.query_from_embeddings(view_embeds, text_embeds,
                                           scene_probabilities=combine_scene_probabilities(photo_scenes, text_scenes))
        query.photo_scene_probabilities, query.text_scene_probabilities = photo_scenes, text_scenes
        return query

    def _scene_dict(self, log_probs: torch.Tensor) -> dict[str, float]:
        """(1, S) scene log-probabilities -> {label: probability}, most likely first."""
        probabilities = log_probs[0].exp().float().cpu().tolist()
        return dict(sorted(zip(self.model.scene_labels, probabilities), key=lambda kv: -kv[1]))

    def warm_up(self) -> "Matcher":
        """Builds the room-view encoder now (an ONNX export takes seconds) rather than at the first
        photo; a service calls it before it listens, so its first shopper does not wait."""
        with self._lock:
            self._photo_views_encoder()
        return self

    def _photo_views_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._view_encoder is None:
            self._view_encoder = photo_encoder(self.model, room_views=True, engine=self.engine)
        return self._view_encoder

    def _room_views(self, image) -> torch.Tensor:
        """`model.encode_room_views(image)` -> (1, V, D), through the engine of `self.engine`."""
        views = self.model.preprocess_room_views(image)  # (1, V, 3, S, S)
        return self._photo_views_encoder()(views).to(self.model.device)

    def query_from_embeddings(self, view_embeds: torch.Tensor | None, text_embeds: torch.Tensor | None = None,
                              *, scene_probabilities: Mapping[str, float] | None = None) -> RoomQuery:
        """A `RoomQuery` from ready embeddings: views (1, V, D) of `encode_room_views`, words (1, D)
        of `encode_scene_text`; for callers that embed many rooms in batches. `scene_probabilities`
        (label -> probability, e.g. from `model.predict_scene`) replace the scene head's reading of
        the room vector."""
        if view_embeds is None and text_embeds is None:
            raise ValueError("nothing to match: give view embeddings, text embeddings, or both")
        with torch.no_grad():
            room = self.model.room_vector(view_embeds, text_embeds)  # (1, D)
            if scene_probabilities is None:
                scene_probabilities = self._scene_dict(self.model.scene_head(room).log_softmax(dim=-1))
        scenes = dict(sorted(((k, float(v)) for k, v in scene_probabilities.items()), key=lambda kv: -kv[1]))
        return RoomQuery(view_embeds, text_embeds, room[0].cpu().numpy().astype(np.float32), scenes)

    # -- ranking -------------------------------------------------------------------------------
    def match(self, image=None, text: str | None = None, *, profile: UserProfile | None = None, k: int = 10,
              filter: Mapping[str, Any] | None = None, set_size: int = DEFAULT_SET_SIZE) -> MatchResult:
        """Scene, ranked products and a product set for a room photo and/or words.

        Args:
            image: the room photo, a PIL image or a path; None for words only.
            text: what the person wants, in words ("a Nordic living room, warm light").
            profile: the shopper's `UserProfile`, or None.
            k: products to return.
            filter: metadata conditions passed to `ProductIndex.search` (category, price range ...).
            set_size: most categories in the product set.
        """
        return self.rank(self.encode_query(image, text), profile=profile, k=k, filter=filter, set_size=set_size)

    def rank(self, query: RoomQuery, *, profile: UserProfile | None = None, k: int = 10,
             filter: Mapping[str, Any] | None = None, weights: RankingWeights | None = None,
             set_size: int = DEFAULT_SET_SIZE) -> MatchResult:
        """Ranks an encoded query (`encode_query`); `weights` overrides the matcher's for this call."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}; expected a positive int")
        if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 0:
            raise ValueError(f"set_size={set_size!r}; expected a non-negative int")
        weights = weights if weights is not None else self.weights
        scene = next(iter(query.scene_probabilities))
        confident = query.scene_probabilities[scene] >= SCENE_CONFIDENCE
        category_fit = self._category_fit(query.scene_probabilities)
        # in id order: products that score the same (copies of one photo and text) rank the same way
        # whichever index found them first
        ids = sorted(self.index.candidates(self._search_vectors(query), k=weights.candidates, filter=filter))
        if not ids:
            return MatchResult(scene, query.scene_probabilities, [], [], scene_confident=confident)
        metas = self.index.metadata_of(ids)
        vectors = self.index.vectors(ids)  # (N, D)
        terms = self._terms(query, ids, vectors, metas, category_fit, profile, weights)
        base = terms.sum(axis=1)  # (N,)
        order, penalties = diverse_order(base, vectors, weights.diversity, k)
        explain = _Explainer(query, confident, self.prior.mixture(query.scene_probabilities) if self.prior else {},
                             has_photo=query.view_embeds is not None)
        products = [self._ranked(ids[i], metas[i], terms[i], penalty, explain.product(metas[i], terms[i]))
                    for i, penalty in zip(order, penalties)]
        product_set = self._product_set(query, ids, metas, base, terms, category_fit, profile, weights, filter,
                                        set_size, explain) if set_size else []
        return MatchResult(scene, query.scene_probabilities, products, product_set, scene_confident=confident)

    def _search_vectors(self, query: RoomQuery) -> np.ndarray:
        rows = [query.room_vector[None, :]]
        if query.view_embeds is not None and query.view_embeds.shape[1] > 1:
            rows.append(query.view_embeds[0].cpu().numpy())  # (V, D)
        return np.concatenate(rows).astype(np.float32)  # (Q, D)

    def _terms(self, query: RoomQuery, ids: list[str], vectors: np.ndarray, metas: Sequence[Mapping] | None,
               category_fit: dict[str, float], profile: UserProfile | None, weights: RankingWeights,
               category: str | None = None) -> np.ndarray:
        """(N, 3) weighted terms of products with (N, D) `vectors`: similarity, scene_fit, profile.

        `category`: every product is of this category, and `metas` may be None (they are read
        from the index only when a profile needs them)."""
        with torch.no_grad():
            similarity = self.model.score_products(
                torch.from_numpy(vectors).to(self.model.device), view_embeds=query.view_embeds,
                text_embeds=query.text_embeds)[0].float().cpu().numpy()  # (N,)
        if category is not None:
            fit = np.full(len(ids), category_fit.get(category, 0.0))
        else:
            fit = np.array([category_fit.get(m.get("category"), 0.0) for m in metas])  # (N,)
        if profile is not None:
            metas = metas if metas is not None else self.index.metadata_of(ids)
            affinity = profile.affinity(ids, vectors, metas)
        else:
            affinity = np.zeros(len(ids))
        return np.stack([weights.similarity * similarity, weights.scene_fit * fit, weights.profile * affinity],
                        axis=1)  # (N, 3)

    def _category_fit(self, scene_probabilities: Mapping[str, float]) -> dict[str, float]:
        """Category -> (L - 1) / (L + 1) for its lift L over its catalogue share; empty without a prior."""
        if self.prior is None:
            return {}
        expected = self.prior.mixture(scene_probabilities)
        fit = {}
        for category, share in self._category_share.items():
            p = expected.get(category)
            if p is None:
                p = self.prior.probability(None, category)  # a category training never saw: smoothing mass
            lift = p / share
            fit[category] = (lift - 1.0) / (lift + 1.0)
        return fit

    @staticmethod
    def _ranked(product_id: str, meta: dict, terms: np.ndarray, penalty: float, why: str = "") -> RankedProduct:
        reasons = {"similarity": float(terms[0]), "scene_fit": float(terms[1]), "profile": float(terms[2]),
                   "diversity": float(penalty)}
        return RankedProduct(product_id, float(sum(reasons.values())), reasons, meta, why)

    def _product_set(self, query, ids, metas, base, terms, category_fit, profile, weights, filter, set_size,
                     explain: "_Explainer"):
        """The best product of each category that fits the scene, best score first, `set_size` at most.

        The categories are those the scene makes more likely than the catalogue does (lift above 1
        under the scene probabilities, so an unsure scene rules out fewer); of those, the ones whose
        best product scores highest. A category of at most `SET_SCORE_WHOLE_MAX` products is scored
        whole, so its best product is exact. A larger one gives its best candidate (the candidates
        hold the top hits of the room and of every view), or without one its best of the
        `SET_CANDIDATES` products nearest to the room vector. Against searching each large category
        with every view, that kept 116-117 of 120 set items over `bench_match.py`'s 100k and 1M
        catalogues, at a fraction of the searches."""
        best: dict[str, int] = {}  # category -> candidate position with the best base score
        for i in np.argsort(-base, kind="stable").tolist():
            category = metas[i].get("category")
            if isinstance(category, str) and category not in best:
                best[category] = i
        if self.prior is not None:  # every category the scene does not make clearly rarer than the catalogue
            least = (SET_MIN_LIFT - 1) / (SET_MIN_LIFT + 1)  # the fit of that lift
            wanted = [c for c, f in category_fit.items() if f >= least and _category_allowed(filter, c)]
        else:
            wanted = list(best)[:set_size]
        chosen = []
        position = {pid: i for i, pid in enumerate(ids)}
        for category in wanted:
            within = {**(filter or {}), "category": category}
            large = self._category_count.get(category, 0) > SET_SCORE_WHOLE_MAX
            if large and category in best:  # a filtered search per view would scan most of the index
                product_id = ids[best[category]]
            else:
                if large:  # no candidate of its own: its nearest products to the room
                    pool_ids = self.index.candidates(query.room_vector[None, :], k=SET_CANDIDATES, filter=within)
                    pool_vectors = self.index.vectors(pool_ids)
                else:
                    pool_ids, pool_vectors = self.index.select(within)
                if not pool_ids:
                    continue
                pool_terms = self._terms(query, pool_ids, pool_vectors, None, category_fit, profile, weights,
                                         category=category)
                totals = pool_terms.sum(axis=1)
                top = max(np.flatnonzero(totals == totals.max()).tolist(), key=lambda i: pool_ids[i])  # ties: highest id
                product_id = pool_ids[top]
            if product_id in position:  # the list's own terms, so the set and the list agree to the bit
                product_terms, meta = terms[position[product_id]], metas[position[product_id]]
            else:
                product_terms, meta = pool_terms[top], self.index.metadata(product_id)
            chosen.append(self._ranked(product_id, meta, product_terms, 0.0, explain.set_item(meta)))
        # the categories whose best product fits the room best, rather than the most expected ones
        # first: those gave precision 0.164 against 0.210 (the same rooms as SET_MIN_LIFT's)
        return sorted(chosen, key=lambda p: -p.score)[:set_size]


class _Explainer:
    """The `why` sentence of each product, in the shopper's words, from the terms that placed it."""

    def __init__(self, query: RoomQuery, confident: bool, expected: Mapping[str, float], *, has_photo: bool):
        self.scene = next(iter(query.scene_probabilities))
        self.confident = confident
        self.expected = expected  # P(category) under the scene probabilities
        self.source = "your photo" if has_photo else "your words"
        if query.view_embeds is not None and query.text_embeds is not None:
            self.source = "your photo and words"

    def _place(self) -> str:
        return f"{scene_words(self.scene)}s" if self.confident else "rooms like this one"

    def product(self, meta: Mapping[str, Any], terms: np.ndarray) -> str:
        parts = [f"Matches {self.source}"]
        if terms[1] > 0 and isinstance(meta.get("category"), str):
            parts.append(f"{meta['category']} is common in {self._place()}")
        if terms[2] > 0:
            parts.append("close to what you have browsed and bought")
        return "; ".join(parts) + "."

    def set_item(self, meta: Mapping[str, Any]) -> str:
        category = meta.get("category")
        share = self.expected.get(category)
        if share is None:
            return f"The {category} closest to {self.source}."
        return (f"{str(category).capitalize()} makes up {share:.0%} of the products in {self._place()}; this is the "
                f"one closest to {self.source}.")


def _category_allowed(filter: Mapping[str, Any] | None, category: str) -> bool:
    if not filter or "category" not in filter:
        return True
    condition = filter["category"]
    if isinstance(condition, (list, set, frozenset)):
        return category in condition
    return condition == category


