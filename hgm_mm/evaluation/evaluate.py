"""Room -> product evaluation of a model over a whole catalogue, and the baselines it must beat."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from ..data.records import Product, Room, read_pairs
from ..data.text import product_text, room_text
from . import metrics, scene_metrics

DEFAULT_KS = (10, 50)
TRAIN_PAIRS_FILE = "train_pairs.csv"  # beside a trained model: the pairs it was trained on (room_id,product_id)
TRAIN_ROOM_SCENES_FILE = "train_room_scenes.json"  # beside it: {"format": 1, "scenes": {room_id: scene}}


@dataclass
class RetrievalEvaluation:
    """Room -> product retrieval quality, macro-averaged over rooms, whole catalogue as gallery."""

    metrics: dict[str, float]  # recall@k, ndcg@k, hit_rate@k, map, category_hit_rate@10
    by_scene: dict[str, dict[str, float]]  # scene -> {recall@10, ndcg@10, rooms}
    recall_by_category: dict[str, float]  # product category -> recall@10 of that category's products
    category_hit_rate: dict[str, float]  # the IKEA authors' per-category hit rate@10, by category
    n_rooms: int
    n_products: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable photos (path, reason)
    # what the numbers were computed from, for reports: one row per evaluated room, one column per product
    room_ids: list[str] = field(default_factory=list)  # the rooms of the rows of `scores`, in order
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)  # (R, N)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "by_scene": self.by_scene, "recall_by_category": self.recall_by_category,
                "category_hit_rate": self.category_hit_rate, "n_rooms": self.n_rooms,
                "n_products": self.n_products, "skipped": [list(s) for s in self.skipped]}


def relevance(rooms: Sequence[Room], products: Sequence[Product], pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """(R, N) booleans: product j appears in room i."""
    room_index = {room.room_id: i for i, room in enumerate(rooms)}
    product_index = {product.product_id: j for j, product in enumerate(products)}
    relevant = np.zeros((len(rooms), len(products)), dtype=bool)
    for room_id, product_id in pairs:
        if room_id in room_index and product_id in product_index:
            relevant[room_index[room_id], product_index[product_id]] = True
    return relevant


def retrieval_metrics(scores: np.ndarray, relevant: np.ndarray, products: Sequence[Product],
                      rooms: Sequence[Room], *, ks: Sequence[int] = DEFAULT_KS,
                      skipped: list | None = None) -> RetrievalEvaluation:
    """All retrieval numbers for a (R, N) score matrix; rooms without products are left out."""
    keep = relevant.any(axis=1)
    if not keep.any():
        raise ValueError("no evaluation room has a product of the catalogue in the pairs")
    scores, relevant = scores[keep], relevant[keep]
    rooms = [room for room, kept in zip(rooms, keep) if kept]
    categories = [product.category or "unknown" for product in products]
    report = metrics.retrieval_report(scores, relevant, ks)
    hit = metrics.per_category_hit_rate(scores, relevant, categories, 10)
    report["category_hit_rate@10"] = hit.overall
    ranked = metrics.relevant_ranks(scores, relevant)
    scenes = [room.scene or "unknown" for room in rooms]
    recall, ndcg = metrics.breakdown(ranked.recall_at_k(10), scenes), metrics.breakdown(ranked.ndcg_at_k(10), scenes)
    counts = Counter(scenes)
    by_scene = {scene: {"recall@10": recall[scene], "ndcg@10": ndcg[scene], "rooms": counts[scene]}
                for scene in sorted(counts)}
    return RetrievalEvaluation(
        metrics=report, by_scene=by_scene,
        recall_by_category={str(k): v for k, v in metrics.recall_at_k_by_category(scores, relevant, categories, 10).items()},
        category_hit_rate={str(k): v for k, v in hit.per_category.items()},
        n_rooms=int(keep.sum()), n_products=len(products), skipped=list(skipped or []),
        room_ids=[room.room_id for room in rooms], scores=scores)


def embed_catalog(model, products: Sequence[Product], *, batch_size: int = 32, progress: bool = True,
                  num_workers: int | None = None) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Product vectors (N, D): photo fused with text; a product whose photo is unreadable keeps its text."""
    from ..embedding import embed_images, embed_texts

    with torch.no_grad():
        photos = embed_images(model, [p.image for p in products], batch_size=batch_size, desc="catalogue",
                              progress=progress, num_workers=num_workers)
        texts = embed_texts(model, [product_text(p) for p in products])
        image_embeds = torch.zeros(len(products), model.config.embed_dim)
        image_embeds[photos.kept] = photos.embeddings
        image_present = torch.zeros(len(products), dtype=torch.bool)
        image_present[photos.kept] = True
        fused = model.product_vector(image_embeds.to(model.device), texts.to(model.device),
                                     image_present=image_present.to(model.device))
    return fused.float().cpu(), photos.skipped


def score_rooms(model, rooms: Sequence[Room], product_vectors: torch.Tensor, *, use_room_text: bool = False,
                batch_size: int = 8, progress: bool = True, num_workers: int | None = None
                ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Scores of every product for the rooms whose photo is readable: (R', N), their positions, what was skipped."""
    from ..embedding import embed_images

    with torch.no_grad():
        views = embed_images(model, [r.image for r in rooms], batch_size=batch_size, desc="rooms", progress=progress,
                             num_workers=num_workers, room_views=True)
        texts = [room_text(rooms[i]) for i in views.kept] if use_room_text else None
        text_embeds, text_present = (model._optional_texts(texts, model.encode_scene_text) if texts else (None, None))
        scores = model.score_products(product_vectors.to(model.device), view_embeds=views.embeddings.to(model.device),
                                      text_embeds=text_embeds, text_present=text_present)
    return scores.float().cpu(), views.kept, views.skipped


def evaluate(model, catalog: Sequence[Product], rooms: Sequence[Room], pairs: Sequence[tuple[str, str]], *,
             ks: Sequence[int] = DEFAULT_KS, use_room_text: bool = False, progress: bool = True,
             num_workers: int | None = None) -> RetrievalEvaluation:
    """Ranks the whole catalogue for every room and measures it against the room's products.

    Args:
        model: an `HGMModel`.
        catalog: every product of the gallery.
        rooms: the query rooms (their photos; their captions too with `use_room_text`).
        pairs: (room_id, product_id) ground truth.
        ks: cut-offs for recall, NDCG and hit rate.
        use_room_text: fuse each room's caption into its query, as a person's words would be.
        progress: show progress bars.
        num_workers: photo-decoding processes (default: up to 4).
    """
    model.eval()
    product_vectors, skipped_products = embed_catalog(model, catalog, progress=progress, num_workers=num_workers)
    scores, kept, skipped_rooms = score_rooms(model, rooms, product_vectors, use_room_text=use_room_text,
                                              progress=progress, num_workers=num_workers)
    rooms = [rooms[i] for i in kept]
    scores = scores.numpy()  # (R, N)
    return retrieval_metrics(scores, relevance(rooms, catalog, pairs), catalog, rooms, ks=ks,
                             skipped=skipped_products + skipped_rooms)


@dataclass
class SceneEvaluation:
    """Scene recognition from photos: accuracy, macro-F1 and the confusion matrix."""

    accuracy: float
    macro_f1: float
    labels: list[str]  # rows and columns of `confusion`
    confusion: list[list[int]]  # confusion[true][predicted]
    n_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ece: float | None = None  # expected calibration error of the top scene's probability (10 bins)
    mean_confidence: float | None = None  # mean probability of the predicted scene

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "ece": self.ece,
                "mean_confidence": self.mean_confidence, "labels": self.labels,
                "confusion": self.confusion, "n_images": self.n_images, "skipped": [list(s) for s in self.skipped]}


def evaluate_scenes(model, scene_images: Sequence, *, progress: bool = True, num_workers: int | None = None,
                    batch_size: int = 16) -> SceneEvaluation:
    """Predicts the scene of each photo with `model.scene_logits` (no text) and scores it against its label.

    Each photo is read as `model.scene_transform` gives it (the whole photo for a photo scene head,
    the room views otherwise), so the numbers are those of `model.predict_scene`. Unreadable
    photos are left out and listed in `skipped`. Photos whose scene is not one of
    `model.scene_labels` are an error naming the label, since the model cannot predict it.

    Args:
        model: an `HGMModel`.
        scene_images: `SceneImage` rows (`hgm_mm.data.read_scene_images`).
        progress: show a progress bar.
        num_workers: photo-decoding processes (default: up to 2; 0 decodes in this process).
        batch_size: photos per forward pass.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data.loading import PhotoDecoder, PhotoFiles

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    unknown = sorted({item.scene for item in scene_images} - set(model.scene_labels))
    if unknown:
        raise ValueError(f"scene label(s) {unknown} are not among the model's scene labels "
                         f"{list(model.scene_labels)}; train the scene head on them first")
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    loader = DataLoader(PhotoFiles([item.image for item in scene_images], PhotoDecoder(model.scene_transform)),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    model.eval()
    kept, skipped, predicted, confidences = [], [], [], []
    with torch.no_grad(), tqdm(total=len(scene_images), desc="scene photos", unit="img",
                               disable=not progress) as bar:
        for items in loader:
            skipped.extend(problem for _, _, problem in items if problem is not None)
            readable = [(i, pixels) for i, pixels, _ in items if pixels is not None]
            if readable:
                logits = model.scene_logits(torch.stack([pixels for _, pixels in readable]))  # (B, S)
                predicted.extend(model.scene_labels[j] for j in logits.argmax(dim=1).tolist())
                confidences.extend(logits.softmax(dim=1).max(dim=1).values.tolist())
                kept.extend(i for i, _ in readable)
            bar.update(len(items))
    if not kept:
        raise ValueError(f"none of the {len(scene_images)} scene photos could be read"
                         + (f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    truth = [scene_images[i].scene for i in kept]
    labels = sorted(set(truth) | set(predicted))
    return SceneEvaluation(
        accuracy=scene_metrics.scene_accuracy(truth, predicted), macro_f1=scene_metrics.macro_f1(truth, predicted),
        labels=labels, confusion=scene_metrics.confusion_matrix(truth, predicted, labels).tolist(),
        n_images=len(truth), skipped=skipped,
        ece=scene_metrics.expected_calibration_error(confidences, [t == p for t, p in zip(truth, predicted)]),
        mean_confidence=float(np.mean(confidences)))


# -- baselines ------------------------------------------------------------------------------------
def popularity_scores(catalog: Sequence[Product], rooms: Sequence[Room], train_pairs: Sequence[tuple[str, str]],
                      train_rooms: Sequence[Room] | Mapping[str, str | None] | None = None, *,
                      by_scene: bool = False) -> np.ndarray:
    """(R, N) scores from how often each product appears in training rooms, overall or in the room's scene.

    `train_rooms` gives the training rooms' scenes: `Room` records, or {room_id: scene} as a trained
    model folder records them (`train_room_scenes.json`). Scene popularity breaks its ties with
    global popularity, so rooms of an unseen scene fall back to it.
    """
    product_index = {p.product_id: j for j, p in enumerate(catalog)}
    global_counts = np.zeros(len(catalog))
    for _, product_id in train_pairs:
        if product_id in product_index:
            global_counts[product_index[product_id]] += 1
    if not by_scene:
        return np.broadcast_to(global_counts, (len(rooms), len(catalog))).copy()
    if train_rooms is None:
        raise ValueError("scene popularity needs the training rooms (for their scenes)")
    scene_of = dict(train_rooms) if isinstance(train_rooms, Mapping) else {r.room_id: r.scene for r in train_rooms}
    scene_counts: dict[str | None, np.ndarray] = {}
    for room_id, product_id in train_pairs:
        if product_id in product_index:
            counts = scene_counts.setdefault(scene_of.get(room_id), np.zeros(len(catalog)))
            counts[product_index[product_id]] += 1
    tie_break = global_counts / (global_counts.max() + 1.0)  # < 1: never outweighs one scene count
    empty = np.zeros(len(catalog))
    return np.stack([scene_counts.get(room.scene, empty) + tie_break for room in rooms])


def baseline_evaluations(catalog: Sequence[Product], rooms: Sequence[Room], pairs: Sequence[tuple[str, str]], *,
                         train_pairs: Sequence[tuple[str, str]] | None = None,
                         train_rooms: Sequence[Room] | Mapping[str, str | None] | None = None, frozen_model=None,
                         ks: Sequence[int] = DEFAULT_KS, progress: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of the baselines a trained model must beat, by name.

    - `random`: the exact expectation under a uniformly random ranking;
    - `popularity` and `scene_popularity`: counts in `train_pairs` (skipped without them);
    - `frozen_features`: room-photo views vs product-photo cosine of `frozen_model`, untrained.
    """
    relevant = relevance(rooms, catalog, pairs)
    keep = relevant.any(axis=1)
    results = {"random": metrics.random_baseline_report(relevant[keep], ks)}
    if train_pairs:
        for name, by_scene in (("popularity", False), ("scene_popularity", True)):
            scores = popularity_scores(catalog, rooms, train_pairs, train_rooms, by_scene=by_scene)
            results[name] = retrieval_metrics(scores, relevant, catalog, rooms, ks=ks).metrics
    if frozen_model is not None:
        from ..embedding import embed_images

        with torch.no_grad():
            product_photos = embed_images(frozen_model, [p.image for p in catalog], desc="catalogue (frozen)",
                                          progress=progress)
            room_photos = embed_images(frozen_model, [r.image for r in rooms], desc="rooms (frozen)",
                                       progress=progress, room_views=True)
            product_vectors = torch.zeros(len(catalog), frozen_model.config.embed_dim)
            product_vectors[product_photos.kept] = product_photos.embeddings
            scores = frozen_model.score_products(product_vectors, view_embeds=room_photos.embeddings).numpy()
        kept_rooms = [rooms[i] for i in room_photos.kept]
        results["frozen_features"] = retrieval_metrics(
            scores, relevance(kept_rooms, catalog, pairs), catalog, kept_rooms, ks=ks).metrics
    return results


def held_out_rooms(rooms: Sequence[Room], model_folder: str | os.PathLike | None) -> tuple[list[Room], int]:
    """The rooms a trained model did not train on, by the `train_pairs.csv` its folder records, and
    how many were left out: measuring a model on its training rooms says nothing of new ones.
    Every room, and 0, when there is no folder or it records no training pairs.

    Raises:
        ValueError: every room is one the model was trained on.
    """
    recorded = Path(model_folder) / TRAIN_PAIRS_FILE if model_folder is not None else None
    if recorded is None or not recorded.is_file():
        return list(rooms), 0
    trained_on = {room for room, _ in read_pairs(recorded)}
    kept = [r for r in rooms if r.room_id not in trained_on]
    if not kept:
        raise ValueError(f"every room is one the model was trained on ({recorded}); give other rooms, or keep "
                         "them on purpose (hgm-mm evaluate --all-rooms)")
    return kept, len(rooms) - len(kept)



def baseline_training_data(pairs_file: str | os.PathLike, catalog: Sequence[Product], *,
                           train_rooms: Sequence[Room] | None = None, model_folder: str | os.PathLike | None = None,
                           rooms: Sequence[Room] = ()) -> tuple[list[tuple[str, str]], dict[str, str | None], str]:
    """What the popularity baselines count: the training pairs and each training room's scene.

    The scenes come from `train_rooms`, else from the record a trained model's folder keeps of them
    (`train_room_scenes.json`), else from `rooms`. A pair naming a room none of these knows is
    refused now, before any evaluation runs.

    Returns:
        (training pairs, room id -> scene, where the scenes were read from).
    """
    recorded = Path(model_folder) / TRAIN_ROOM_SCENES_FILE if model_folder is not None else None
    if train_rooms is not None:
        scenes, source = {r.room_id: r.scene for r in train_rooms}, "the training rooms given"
    elif recorded is not None and recorded.is_file():
        try:
            scenes = json.loads(recorded.read_text(encoding="utf-8"))["scenes"]
            if not isinstance(scenes, dict):
                raise TypeError("scenes")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{recorded}: damaged ({err}); give the training rooms' rooms.jsonl "
                             "(hgm-mm evaluate --train-rooms)") from None
        source = str(recorded)
    else:
        scenes, source = {r.room_id: r.scene for r in rooms}, "the rooms evaluated"
    try:
        train_pairs = read_pairs(pairs_file, room_ids=set(scenes), product_ids={p.product_id for p in catalog})
    except ValueError as err:
        raise ValueError(f"{err}. The popularity baselines need every training room's scene: give the training "
                         f"rooms' rooms.jsonl (hgm-mm evaluate --train-rooms); the scenes were read from {source}") \
            from None
    return train_pairs, scenes, source
