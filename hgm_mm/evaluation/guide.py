"""The whole shopping guide measured on rooms: the scene it reads, the products it ranks, the set it builds.

    from hgm_mm.data import load_dataset, read_scene_texts
    data = load_dataset("ikea")
    result = evaluate_guide(Matcher.load("catalogue"), data.rooms, data.pairs,
                            texts=read_scene_texts("texts.jsonl"))
    print(format_guide_report(result))

Each room is queried as a shopper uploading its photo would query it: `Matcher.encode_query` of
the photo alone, ranked by `Matcher.rank` under the matcher's weights. Beside each number is
what the guide would do without its scene: the similarity-only ranking, and a product set made
from it with no scene (the best product of each category in ranking order, as many as the
guide's set holds for that room).

Scenes are read from four sources: the photo, the room's caption (its words), photo and words
combined (`hgm_mm.data.scenes.combine_scene_probabilities`), and, when given, labelled phrases
(`texts.jsonl`). Each source reports accuracy, the confusion matrix, the calibration of its top
probability (ECE, 10 bins) and how often the guide is sure of the scene
(top probability >= `hgm_mm.ranking.matcher.SCENE_CONFIDENCE`).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.images import ImageError
from ..ranking.weights import RankingWeights
from ..data.scenes import combine_scene_probabilities
from . import metrics, scene_metrics

if TYPE_CHECKING:
    from ..data.records import Room, SceneText
    from ..ranking.matcher import Matcher

logger = logging.getLogger(__name__)

SCENE_SOURCES = ("photo", "words", "both", "phrases")
ECE_BINS = 10


@dataclass
class SceneSourceEvaluation:
    """How well one source (photo, words, both, phrases) gives the scene; None where n is 0."""

    source: str
    n: int  # queries with a true scene
    accuracy: float | None
    chance_accuracy: float | None  # share of the most common true scene: always guessing it scores this
    ece: float | None  # expected calibration error of the top-scene probability
    mean_confidence: float | None  # mean top-scene probability
    confident_share: float | None  # share of queries whose top probability reaches SCENE_CONFIDENCE
    confident_accuracy: float | None  # accuracy on those queries; None when there are none
    confusion: np.ndarray  # (L, L) counts, rows true, columns predicted, over the model's scene labels

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the confusion matrix as nested lists."""
        return {"source": self.source, "n": self.n, "accuracy": self.accuracy,
                "chance_accuracy": self.chance_accuracy, "ece": self.ece, "mean_confidence": self.mean_confidence,
                "confident_share": self.confident_share, "confident_accuracy": self.confident_accuracy,
                "confusion": self.confusion.tolist()}


@dataclass
class RankingScores:
    """Recall@k and NDCG@k of one ranking, means over the rooms with products in the index."""

    recall: float | None
    ndcg: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"recall": self.recall, "ndcg": self.ndcg}


@dataclass
class SetScores:
    """One kind of product set, means over rooms.

    `precision` and `category_coverage` are over the rooms whose guide set is not empty (the
    comparison is on the same rooms); coverage also needs a room product with a category.
    """

    precision: float | None  # share of set items that are among the room's products
    category_coverage: float | None  # share of the room's product categories the set covers
    mean_size: float | None  # over every room with products, empty sets included

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "category_coverage": self.category_coverage,
                "mean_size": self.mean_size}


@dataclass
class GuideEvaluation:
    """What `evaluate_guide` measured.

    `ranking` and `sets` are keyed by what is compared: "guide" against "similarity_only" and
    "no_scene" (the set built from the similarity-only ranking without the scene).
    """

    scene_labels: list[str]  # rows and columns of every confusion matrix
    scenes: dict[str, SceneSourceEvaluation]  # photo, words, both, and phrases when texts were given
    ranking: dict[str, RankingScores]  # guide, similarity_only
    sets: dict[str, SetScores]  # guide, no_scene
    k: int
    set_size: int
    n_rooms: int  # rooms whose photo was read
    n_ranked_rooms: int  # of those, rooms with at least one product in the index (ranking and set metrics)
    n_set_rooms: int  # of those, rooms whose guide set is not empty (set precision)
    n_coverage_rooms: int  # of those, rooms with a product of known category (set coverage)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (room_id, reason): unreadable photos

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"scene_labels": list(self.scene_labels),
                "scenes": {source: s.to_dict() for source, s in self.scenes.items()},
                "ranking": {name: r.to_dict() for name, r in self.ranking.items()},
                "sets": {name: s.to_dict() for name, s in self.sets.items()},
                "k": self.k, "set_size": self.set_size, "n_rooms": self.n_rooms,
                "n_ranked_rooms": self.n_ranked_rooms, "n_set_rooms": self.n_set_rooms,
                "n_coverage_rooms": self.n_coverage_rooms, "skipped": [list(s) for s in self.skipped]}


class _SceneTally:
    """The (true, predicted, top probability) readings of one source."""

    def __init__(self) -> None:
        self.truth: list[str] = []
        self.predicted: list[str] = []
        self.confidence: list[float] = []

    def add(self, truth: str, probabilities: dict[str, float]) -> None:
        predicted = max(probabilities, key=probabilities.get)
        self.truth.append(truth)
        self.predicted.append(predicted)
        self.confidence.append(float(probabilities[predicted]))

    def result(self, source: str, labels: list[str], sure_at: float) -> SceneSourceEvaluation:
        n = len(self.truth)
        if n == 0:
            return SceneSourceEvaluation(source, 0, None, None, None, None, None, None,
                                         np.zeros((len(labels), len(labels)), dtype=np.int64))
        correct = np.array(self.truth) == np.array(self.predicted)  # (n,)
        confidence = np.clip(np.array(self.confidence), 0.0, 1.0)  # (n,) float rounding can pass 1
        sure = confidence >= sure_at  # (n,)
        return SceneSourceEvaluation(
            source=source, n=n, accuracy=float(correct.mean()),
            chance_accuracy=Counter(self.truth).most_common(1)[0][1] / n,
            ece=scene_metrics.expected_calibration_error(confidence, correct, n_bins=ECE_BINS),
            mean_confidence=float(confidence.mean()), confident_share=float(sure.mean()),
            confident_accuracy=float(correct[sure].mean()) if sure.any() else None,
            confusion=scene_metrics.confusion_matrix(self.truth, self.predicted, labels))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _check_int(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r}; expected an int >= {least}")
    return value


def _relevant_in_index(matcher, room_ids: set[str], pairs) -> dict[str, set[str]]:
    """Each evaluated room's products that the index holds; pairs naming others are counted and left out."""
    relevant_of: dict[str, set[str]] = {}
    outside = 0
    for room_id, product_id in pairs:
        if room_id not in room_ids:
            continue
        if product_id in matcher.index:
            relevant_of.setdefault(room_id, set()).add(product_id)
        else:
            outside += 1
    if outside:
        logger.warning("%d pair(s) name products missing from the index; they are left out", outside)
    return relevant_of


class _RankingTally:
    """Per room: Recall@k and NDCG@k of the guide's ranking and of similarity alone, and the
    product set's precision, coverage and size beside a set of the top products per category."""

    def __init__(self, matcher, k: int, set_size: int):
        self.matcher, self.k, self.set_size = matcher, k, set_size
        self.similarity_only = RankingWeights(similarity=1.0, scene_fit=0.0, profile=0.0, diversity=0.0,
                                              candidates=matcher.weights.candidates)
        # Without diversity the order is a plain sort, so the top k of the longer ranking is the
        # similarity-only top k: one ranking serves Recall@k and the no-scene set.
        self.similarity_k = max(k, matcher.weights.candidates)
        self.recall: dict[str, list[float]] = {"guide": [], "similarity_only": []}
        self.ndcg: dict[str, list[float]] = {"guide": [], "similarity_only": []}
        self.precision: dict[str, list[float]] = {"guide": [], "no_scene": []}
        self.coverage: dict[str, list[float]] = {"guide": [], "no_scene": []}
        self.sizes: dict[str, list[int]] = {"guide": [], "no_scene": []}
        self._categories: dict[str, Any] = {}

    def category_of(self, product_id: str):
        if product_id not in self._categories:
            self._categories[product_id] = self.matcher.index.metadata(product_id).get("category")
        return self._categories[product_id]

    def add(self, query, relevant: set[str]) -> None:
        k = self.k
        guide = self.matcher.rank(query, k=k, set_size=self.set_size)
        by_similarity = [p.product_id for p in self.matcher.rank(query, k=self.similarity_k,
                                                                 weights=self.similarity_only, set_size=0).products]
        for name, ranked in (("guide", [p.product_id for p in guide.products]),
                             ("similarity_only", by_similarity[:k])):
            self.recall[name].append(metrics.recall_at_k_ranked(ranked, relevant, k))
            self.ndcg[name].append(metrics.ndcg_at_k_ranked(ranked, relevant, k))
        guide_set = [p.product_id for p in guide.product_set]
        plain_set = no_scene_set(by_similarity, self.category_of, len(guide_set))
        self.sizes["guide"].append(len(guide_set))
        self.sizes["no_scene"].append(len(plain_set))
        if not guide_set:
            return
        room_categories = {c for c in map(self.category_of, relevant) if isinstance(c, str)}
        for name, chosen in (("guide", guide_set), ("no_scene", plain_set)):
            # an empty no-scene set beside a non-empty guide set scores 0: it showed nothing
            self.precision[name].append(sum(pid in relevant for pid in chosen) / len(chosen) if chosen else 0.0)
            if room_categories:
                covered = {self.category_of(pid) for pid in chosen} & room_categories
                self.coverage[name].append(len(covered) / len(room_categories))


def no_scene_set(ranked_ids: Sequence[str], category_of, size: int) -> list[str]:
    """The product set the guide would make without a scene: the first product of each category
    in `ranked_ids`, in order of first appearance, at most `size` of them.

    Args:
        ranked_ids: product ids, best first (e.g. the similarity-only ranking).
        category_of: product id -> its category, or None (such products are passed over).
        size: most products in the set.
    """
    chosen, seen = [], set()
    for product_id in ranked_ids:
        if len(chosen) >= size:
            break
        category = category_of(product_id)
        if isinstance(category, str) and category not in seen:
            seen.add(category)
            chosen.append(product_id)
    return chosen


def evaluate_guide(matcher: "Matcher", rooms: Sequence["Room"], pairs: Sequence[tuple[str, str]], *,
                   texts: Sequence["SceneText"] | None = None, k: int = 10, set_size: int = 6,
                   progress: bool = True) -> GuideEvaluation:
    """Measures what `Matcher.match` gives for each room photo: its scene, its products, its set.

    For each room the photo alone is encoded (`matcher.encode_query(image=room.image)`) and ranked
    (`matcher.rank`), as a shopper uploading the photo gets it. The room's caption (`room.title`)
    is read on its own for the "words" scene and combined with the photo for "both". Rooms
    without a scene are left out of the scene metrics; rooms without a product in the index are
    left out of the ranking and set metrics. Unreadable photos are skipped and listed.

    Args:
        matcher: the `Matcher` to measure, with its weights, prior and index.
        rooms: `Room` records (room_id, image, scene, title).
        pairs: (room_id, product_id) pairs, the products seen in each room; products missing from
            the index are left out (and counted in a log warning).
        texts: `SceneText` phrases (`hgm_mm.data.read_scene_texts`) for the "phrases" scene source.
        k: cut-off of Recall@k and NDCG@k, and how many products the guide ranks.
        set_size: most categories in the guide's product set.
        progress: show a progress bar.

    Raises:
        ValueError: no rooms, none of the photos can be read, a bad k or set_size, or a room or phrase
            whose scene is not one of `matcher.model.scene_labels` (the model cannot predict it).
    """
    from tqdm.auto import tqdm

    from ..ranking.matcher import SCENE_CONFIDENCE

    k = _check_int("k", k, 1)
    set_size = _check_int("set_size", set_size, 0)
    rooms = list(rooms)
    if not rooms:
        raise ValueError("no rooms to evaluate")
    labels = list(matcher.model.scene_labels)
    texts = list(texts) if texts is not None else None
    unknown = sorted(({r.scene for r in rooms if r.scene} | {t.scene for t in texts or ()}) - set(labels))
    if unknown:
        raise ValueError(f"scene label(s) {unknown} are not among the model's scene labels {labels}; "
                         "map them to these labels or train the scene head on them first")

    relevant_of = _relevant_in_index(matcher, {room.room_id for room in rooms}, pairs)
    scores = _RankingTally(matcher, k, set_size)
    tallies = {source: _SceneTally() for source in SCENE_SOURCES}
    skipped: list[tuple[str, str]] = []
    n_read = 0
    for room in tqdm(rooms, desc="guide rooms", unit="room", disable=not progress):
        try:
            query = matcher.encode_query(image=room.image)
        except ImageError as err:
            skipped.append((room.room_id, str(err)))
            continue
        n_read += 1
        title = room.title.strip() if room.title else ""
        if room.scene:
            tallies["photo"].add(room.scene, query.scene_probabilities)
            if title:
                words = matcher.encode_query(text=title).scene_probabilities
                tallies["words"].add(room.scene, words)
                tallies["both"].add(room.scene, combine_scene_probabilities(query.scene_probabilities, words))

        if relevant_of.get(room.room_id):
            scores.add(query, relevant_of[room.room_id])

    if not n_read:
        raise ValueError(f"none of the {len(rooms)} room photos could be read (first: {skipped[0][1]})")
    if skipped:
        logger.warning("%d of %d room photo(s) could not be read and were skipped (first: %s)",
                       len(skipped), len(rooms), skipped[0][1])

    if texts:
        for row in tqdm(texts, desc="guide phrases", unit="phrase", disable=not progress):
            tallies["phrases"].add(row.scene, matcher.encode_query(text=row.text).scene_probabilities)
    sources = SCENE_SOURCES if texts is not None else SCENE_SOURCES[:-1]
    result = GuideEvaluation(
        scene_labels=labels,
        scenes={source: tallies[source].result(source, labels, SCENE_CONFIDENCE) for source in sources},
        ranking={name: RankingScores(_mean(scores.recall[name]), _mean(scores.ndcg[name])) for name in scores.recall},
        sets={name: SetScores(_mean(scores.precision[name]), _mean(scores.coverage[name]), _mean(scores.sizes[name]))
              for name in scores.precision},
        k=k, set_size=set_size, n_rooms=n_read, n_ranked_rooms=len(scores.recall["guide"]),
        n_set_rooms=len(scores.precision["guide"]), n_coverage_rooms=len(scores.coverage["guide"]), skipped=skipped)
    logger.info("guide evaluation: %d rooms (%d skipped), %d with products; photo scene accuracy %s, "
                "Recall@%d %s (similarity only %s)", n_read, len(skipped), result.n_ranked_rooms,
                _number(result.scenes["photo"].accuracy), k, _number(result.ranking["guide"].recall),
                _number(result.ranking["similarity_only"].recall))
    return result


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_guide_report(result: GuideEvaluation) -> str:
    """A short plain-text summary of a `GuideEvaluation`, for a terminal."""
    lines = [f"Guide: {result.n_rooms} rooms" + (f" ({len(result.skipped)} skipped: unreadable photo)"
                                                  if result.skipped else "")]
    lines += ["", f"{'scene from':<12}{'n':>6}{'accuracy':>10}{'chance':>8}{'ECE':>7}{'sure':>7}{'acc. sure':>11}"]
    for source, s in result.scenes.items():
        lines.append(f"{source:<12}{s.n:>6}{_number(s.accuracy):>10}{_number(s.chance_accuracy):>8}"
                     f"{_number(s.ece):>7}{_number(s.confident_share, 2):>7}{_number(s.confident_accuracy):>11}")
    recall, ndcg = f"Recall@{result.k}", f"NDCG@{result.k}"
    lines += ["", f"{'ranking':<18}{recall:>10}{ndcg:>10}   ({result.n_ranked_rooms} rooms with products)"]
    for name, label in (("guide", "guide"), ("similarity_only", "similarity only")):
        r = result.ranking[name]
        lines.append(f"{label:<18}{_number(r.recall, 4):>10}{_number(r.ndcg, 4):>10}")
    lines += ["", f"{'product set':<18}{'precision':>10}{'coverage':>10}{'size':>6}   "
                  f"({result.n_set_rooms} rooms with a set, up to {result.set_size})"]
    for name, label in (("guide", "guide"), ("no_scene", "no-scene set")):
        s = result.sets[name]
        lines.append(f"{label:<18}{_number(s.precision):>10}{_number(s.category_coverage):>10}"
                     f"{_number(s.mean_size, 1):>6}")
    photo = result.scenes.get("photo")
    if photo is not None and photo.n:
        used = [i for i, _ in enumerate(result.scene_labels)
                if photo.confusion[i].sum() or photo.confusion[:, i].sum()]  # scenes seen or predicted
        names = [result.scene_labels[i] for i in used]
        width = max(len(n) for n in names)
        lines += ["", f"scene from the photo, confusion (rows true, columns predicted: {', '.join(names)})"]
        for i, name in zip(used, names):
            lines.append(f"  {name:<{width}} " + " ".join(f"{int(photo.confusion[i, j]):>3}" for j in used))
    return "\n".join(lines)
