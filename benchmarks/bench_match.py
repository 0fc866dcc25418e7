"""Photo -> top-10 latency: `Matcher.match` on real IKEA room photos over large synthetic catalogues.

The query side is real: room photos of the IKEA data, each encoded by the model (all its room
views) and its scene predicted (`Matcher.encode_query`), then ranked (`Matcher.rank`: index
search for the room vector and every view, re-ranking by similarity and scene fit, a product
set). The catalogue side is synthetic, as issue 4 allows, but lies where a real catalogue's
vectors lie: the whole IKEA catalogue is embedded by the same model, and each synthetic product
is a blend of two real products of one category plus noise, with that category (random vectors
from elsewhere would leave the photos' queries far from every product, a needlessly hard and
unrealistic case for approximate search). The scene-category prior is counted from the IKEA
room pairs. Each size is searched through an approximate index and, in the same run, through
exact search; both rank the same encoded queries. Reports median and p95 of photo -> top-10
(encoding plus ranking, one photo at a time), of each part, and recall@10 of the approximate
top-10 against the exact one.

    python benchmarks/bench_match.py [--data ../shared/data] [--sizes 100000 1000000]
                                     [--kinds hnsw ivfpq] [--photos 40] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, record_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def ikea_folder(data: Path) -> Path:
    ikea = data if (data / "products.jsonl").is_file() else data / "ikea"
    if not (ikea / "products.jsonl").is_file():
        raise SystemExit(f"no IKEA data at {data}: give --data DIR (the folder holding ikea/) or set HGM_DATA")
    return ikea


def scene_prior_and_rooms(ikea: Path):
    """The prior P(category | scene) from the IKEA pairs, and the IKEA rooms."""
    from hgm_mm.data.records import read_pairs, read_products, read_rooms
    from hgm_mm.ranking.prior import SceneCategoryPrior

    products = {p.product_id: p for p in read_products(ikea / "products.jsonl", check_images=False)}
    rooms = {r.room_id: r for r in read_rooms(ikea / "rooms.jsonl", check_images=False)}
    counts: dict[str, Counter] = defaultdict(Counter)
    for room_id, product_id in read_pairs(ikea / "pairs.csv"):
        room, product = rooms.get(room_id), products.get(product_id)
        if room is not None and product is not None and room.scene and product.category:
            counts[room.scene][product.category] += 1
    return SceneCategoryPrior(counts), list(rooms.values())


def embedded_catalogue(model, ikea: Path, workdir: Path) -> tuple[np.ndarray, list[str]]:
    """The IKEA catalogue's vectors (N, D), as `hgm-mm index` computes them, and each product's category."""
    from hgm_mm.data.records import read_products
    from hgm_mm.ranking.catalog import build_catalog_index
    from hgm_mm.ranking.matcher import Matcher

    products = [p for p in read_products(ikea / "products.jsonl") if p.category]
    build_catalog_index(model, products, workdir / "ikea-index", progress=False)
    index = Matcher.load(workdir / "ikea-index").index
    ids = index.ids
    categories = {p.product_id: p.category for p in products}
    return index.vectors(ids), [categories[i] for i in ids]


def catalogue_like_vectors(real: np.ndarray, categories: list[str], n: int, seed: int,
                           noise: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """`n` unit vectors, each a random blend of two real products of one category plus isotropic
    noise of norm about `noise`, and its category."""
    rng = np.random.default_rng(seed)
    names, category_of = np.unique(np.array(categories), return_inverse=True)  # (N,) category number
    first = rng.integers(0, len(real), n)
    second = np.empty(n, dtype=np.int64)
    for c in range(len(names)):
        members, drawn = np.flatnonzero(category_of == c), np.flatnonzero(category_of[first] == c)
        second[drawn] = members[rng.integers(0, len(members), len(drawn))]
    share = rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
    vectors = share * real[first] + (1 - share) * real[second]
    vectors += (noise / np.sqrt(real.shape[1])) * rng.standard_normal(vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), [categories[i] for i in first]


def synthetic_index(model, vectors: np.ndarray, categories: list[str], kind: str):
    from hgm_mm.retrieval.index import IndexParams, ProductIndex

    metadata = [{"category": c} for c in categories]
    start = time.perf_counter()
    index = ProductIndex.build([f"p{i}" for i in range(len(vectors))], vectors, metadata, kind=kind,
                               params=IndexParams(), model_identity=model)
    return index, time.perf_counter() - start


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": statistics.median(ms), "p95_ms": float(np.percentile(ms, 95))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hgm-lite-en", help="a model name or a saved model folder")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HGM_DATA", REPO_ROOT.parent / "shared" / "data")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["hnsw", "ivfpq"],
                        help="approximate index per size, in the order of --sizes (hnsw builds slowly at 1M)")
    parser.add_argument("--photos", type=int, default=40, help="room photos timed (one query each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "match.json")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the JSON and RESULTS.md alone")
    args = parser.parse_args(argv)
    if len(args.kinds) not in (1, len(args.sizes)):
        raise SystemExit(f"--kinds: give one kind or one per size ({len(args.sizes)})")

    import hgm_mm
    from hgm_mm.ranking.matcher import Matcher

    ikea = ikea_folder(args.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.load_model(args.model) if Path(args.model).is_dir() else hgm_mm.create_model(args.model)
    model.eval()
    prior, rooms = scene_prior_and_rooms(ikea)
    photos = [room.image for room in rooms[:args.photos]]

    machine = describe_machine()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        real_vectors, real_categories = embedded_catalogue(model, ikea, Path(workdir))
    for n, kind in zip(args.sizes, args.kinds * len(args.sizes) if len(args.kinds) == 1 else args.kinds):
        vectors, vector_categories = catalogue_like_vectors(real_vectors, real_categories, n, args.seed)
        approximate, build_s = synthetic_index(model, vectors, vector_categories, kind)
        exact, _ = synthetic_index(model, vectors, vector_categories, "exact")
        del vectors
        matchers = {"approximate": Matcher(model, approximate, prior=prior),
                    "exact": Matcher(model, exact, prior=prior)}
        for matcher in matchers.values():  # warm-up: allocator, filter columns
            matcher.match(photos[0], k=10)
        encode_ms, rank_ms, recalls = [], {"approximate": [], "exact": []}, []
        for photo in photos:
            start = time.perf_counter()
            query = matchers["exact"].encode_query(photo)
            encode_ms.append((time.perf_counter() - start) * 1e3)
            top = {}
            for name, matcher in matchers.items():
                start = time.perf_counter()
                top[name] = [p.product_id for p in matcher.rank(query, k=10).products]
                rank_ms[name].append((time.perf_counter() - start) * 1e3)
            recalls.append(len(set(top["approximate"]) & set(top["exact"])) / max(1, len(top["exact"])))
        total = {name: [e + r for e, r in zip(encode_ms, ms)] for name, ms in rank_ms.items()}
        row = {"n": n, "kind": kind, "build_s": build_s, "photos": len(photos), "encode": percentiles(encode_ms),
               **{f"rank_{name}": percentiles(ms) for name, ms in rank_ms.items()},
               **{f"photo_to_top10_{name}": percentiles(ms) for name, ms in total.items()},
               "recall_at_10": float(np.mean(recalls))}
        results.append(row)
        approx_total, exact_total = row["photo_to_top10_approximate"], row["photo_to_top10_exact"]
        line = (f"| photo → top-10 (`Matcher.match`), {n:,} products near the IKEA catalogue's vectors "
                f"({kind}; {args.model}, {len(photos)} IKEA room photos) "
                f"| p50 {approx_total['p50_ms']:.0f} ms, p95 {approx_total['p95_ms']:.0f} ms "
                f"(encoding p50 {row['encode']['p50_ms']:.0f} ms, ranking p50 {row['rank_approximate']['p50_ms']:.1f} ms), "
                f"recall@10 {row['recall_at_10']:.4f} | exact search: p50 {exact_total['p50_ms']:.0f} ms, "
                f"p95 {exact_total['p95_ms']:.0f} ms (ranking p50 {row['rank_exact']['p50_ms']:.1f} ms) "
                f"| {exact_total['p50_ms'] / approx_total['p50_ms']:.2f}× faster at p50 |")
        print(line, flush=True)
        if not args.no_record:
            report = {"benchmark": "match", "model": args.model, "torch_threads": torch.get_num_threads(),
                      "results": results, "machine": machine}
            record_result(args.out, report, f"match_{n}_{kind}", line)
        del matchers, approximate, exact
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
