"""Measures the matcher's ranking weights on the IKEA validation rooms: Recall@10 and NDCG@10 per setting.

    python benchmarks/tune_ranking.py --data ../shared/data/ikea [--model hgm-lite-en] [--out result.json] [--cache vectors.npz]

The development rooms are split with `split_rooms(val_fraction=0.2, seed=0)`; the scene-category
prior is counted from the training rooms' pairs only; the whole catalogue is indexed. Each
validation room is encoded once from its photo (no caption: a shopper's photo comes without one)
and ranked by `Matcher.rank` under every weight setting, so the figures are those of the code
the guide runs. The reference is the model's own ranking of the whole catalogue
(`score_products`, as `hgm-mm evaluate` ranks), which the similarity-only setting should equal.
"Oracle scene" rows give the matcher the room's true scene instead of the model's prediction:
what scene fit is worth once the scene head is trained. "Near-duplicates" counts, per room, the
pairs of products in its top 10 whose vectors have cosine >= 0.9 (one series in several colours):
what the diversity term is there to remove.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from hgm_mm.data import load_dataset  # noqa: E402
from hgm_mm.data.split import split_rooms  # noqa: E402
from hgm_mm.evaluation.evaluate import embed_catalog  # noqa: E402
from hgm_mm.retrieval.index import ProductIndex, model_fingerprint  # noqa: E402
from hgm_mm.ranking.catalog import product_metadata  # noqa: E402
from hgm_mm.ranking.matcher import Matcher  # noqa: E402
from hgm_mm.ranking.prior import SceneCategoryPrior  # noqa: E402
from hgm_mm.ranking.weights import RankingWeights  # noqa: E402

SCENE_FIT = (0.0, 0.05, 0.1, 0.15, 0.2)
DIVERSITY = (0.0, 0.01, 0.02, 0.05, 0.1)
K = 10
NEAR_DUPLICATE = 0.9  # cosine between two products' vectors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ikea",
                        help="IKEA dataset folder (products.jsonl, rooms.jsonl, pairs.csv)")
    parser.add_argument("--model", default="hgm-lite-en", help="model name or local-dir:PATH")
    parser.add_argument("--candidates", type=int, default=RankingWeights().candidates)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (an untrained scene head is random)")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--cache", type=Path, help="keep the catalogue and room embeddings in this .npz between runs "
                                                   "(reused only for the same model weights and data)")
    return parser.parse_args(argv)


def recall_ndcg(ranked: list[str], relevant: set[str], k: int = K) -> tuple[float, float]:
    """Recall@k and NDCG@k (binary gains) of one ranked list."""
    gains = [1.0 if pid in relevant else 0.0 for pid in ranked[:k]]
    dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), k)))
    return sum(gains) / len(relevant), dcg / ideal


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from hgm_mm import create_model

    started = time.perf_counter()
    dataset = load_dataset(args.data)
    train_rooms, val_rooms = split_rooms(dataset.rooms, val_fraction=0.2, seed=0)
    train_ids = {room.room_id for room in train_rooms}
    positives = dataset.positives()
    val_rooms = [room for room in val_rooms if positives.get(room.room_id)]
    prior = SceneCategoryPrior.from_pairs(train_rooms, dataset.products,
                                          [pair for pair in dataset.pairs if pair[0] in train_ids])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(args.model)
    model.eval()

    ids = [p.product_id for p in dataset.products]
    fingerprint = model_fingerprint(model)
    cached = _read_cache(args.cache, fingerprint, ids, [room.room_id for room in val_rooms])
    if cached is None:
        vectors, skipped = embed_catalog(model, dataset.products, progress=False)
        with torch.no_grad():
            views = torch.cat([model.encode_room_views(str(room.image)).float() for room in val_rooms])  # (R, V, D)
        if args.cache is not None:
            np.savez(args.cache, fingerprint=fingerprint, product_ids=np.array(ids), vectors=vectors.numpy(),
                     room_ids=np.array([room.room_id for room in val_rooms]), views=views.numpy())
    else:
        vectors, views, skipped = torch.from_numpy(cached["vectors"]), torch.from_numpy(cached["views"]), []
    index = ProductIndex.build(ids, vectors.numpy(), [product_metadata(p) for p in dataset.products],
                               model_identity=fingerprint)
    matcher = Matcher(model, index, prior=prior)
    # the scene as the guide reads it from the photo (the photo scene head of a trained model, calibrated)
    scenes = model.predict_scene([str(room.image) for room in val_rooms])
    queries = [matcher.query_from_embeddings(views[r:r + 1], scene_probabilities=scenes[r])
               for r in range(len(val_rooms))]
    embedded_at = time.perf_counter() - started

    # The reference: the model's ranking of the whole catalogue, as hgm-mm evaluate ranks rooms.
    with torch.no_grad():
        scores = model.score_products(vectors, view_embeds=views).numpy()  # (R, N)
    reference = np.mean([recall_ndcg([ids[j] for j in np.argsort(-scores[r])[:K]], set(positives[room.room_id]))
                         for r, room in enumerate(val_rooms)], axis=0)

    def measure(weights: RankingWeights, oracle: bool = False) -> tuple[float, float, float]:
        figures = []
        for room, query in zip(val_rooms, queries):
            if oracle:
                query = replace(query, scene_probabilities={room.scene: 1.0})
            result = matcher.rank(query, k=K, weights=weights, set_size=0)
            top = [p.product_id for p in result.products]
            cosines = index.vectors(top) @ index.vectors(top).T  # (K, K)
            twins = int((np.triu(cosines, 1) >= NEAR_DUPLICATE).sum())
            figures.append((*recall_ndcg(top, set(positives[room.room_id])), twins))
        return tuple(np.mean(figures, axis=0))

    rows = []
    for oracle in (False, True):
        for scene_fit in SCENE_FIT:
            for diversity in DIVERSITY:
                weights = RankingWeights(scene_fit=scene_fit, diversity=diversity, profile=0.0,
                                         candidates=args.candidates)
                recall, ndcg, twins = measure(weights, oracle)
                rows.append({"scene": "oracle" if oracle else "predicted", "scene_fit": scene_fit,
                             "diversity": diversity, "recall@10": recall, "ndcg@10": ndcg,
                             "near_duplicates@10": twins})
    scene_accuracy = float(np.mean([next(iter(q.scene_probabilities)) == room.scene
                                    for room, q in zip(val_rooms, queries)]))

    print(f"{args.model}: {len(val_rooms)} validation rooms, {len(dataset.products)} products "
          f"({len(skipped)} unreadable photos), prior from {len(train_rooms)} training rooms; scene accuracy of "
          f"the model {scene_accuracy:.3f}; candidates {args.candidates} per query vector")
    print(f"reference (score_products over the whole catalogue): recall@10 {reference[0]:.4f}, "
          f"ndcg@10 {reference[1]:.4f}")
    print("| scene | scene_fit | diversity | recall@10 | ndcg@10 | near-duplicate pairs in top 10 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['scene']} | {row['scene_fit']} | {row['diversity']} | {row['recall@10']:.4f} | "
              f"{row['ndcg@10']:.4f} | {row['near_duplicates@10']:.2f} |")
    print(f"done in {time.perf_counter() - started:.0f} s (embedding {embedded_at:.0f} s)")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "model": args.model, "validation_rooms": len(val_rooms), "products": len(dataset.products),
            "candidates": args.candidates, "scene_accuracy": scene_accuracy,
            "reference": {"recall@10": reference[0], "ndcg@10": reference[1]}, "rows": rows}, indent=2),
            encoding="utf-8")
    return 0


def _read_cache(path: Path | None, fingerprint: str, product_ids: list[str], room_ids: list[str]) -> dict | None:
    if path is None or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as cache:
        if (str(cache["fingerprint"]) != fingerprint or cache["product_ids"].tolist() != product_ids
                or cache["room_ids"].tolist() != room_ids):
            return None
        return {"vectors": cache["vectors"], "views": cache["views"]}


if __name__ == "__main__":
    raise SystemExit(main())
