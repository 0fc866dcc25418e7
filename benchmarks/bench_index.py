"""Benchmark of `hgm_mm.retrieval.index.ProductIndex`: exact vs approximate search on synthetic catalogues.

    python benchmarks/bench_index.py --sizes 100000 1000000 --out benchmarks/results/index.json

The catalogue is synthetic but clustered like real embeddings: a mixture of Gaussians in a
low-dimensional latent space (products of one style and category sit together), mapped into
D dimensions by a random orthonormal projection, plus isotropic noise, then L2-normalised.
Queries ("room photo" vectors) are fresh draws from the same mixture, not catalogue members.

For each size it builds the exact index and each approximate kind, then measures single-query
top-10 latency (median and p95 over --queries queries, through `ProductIndex.search`), the same
with a category filter keeping ~20% of the catalogue, recall@10 against exact search, build time
and index memory (its serialised size). Ratios are to exact search. Writes JSON and prints Markdown rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from hgm_mm.retrieval.index import IndexParams, ProductIndex  # noqa: E402

CATEGORIES = ("sofa", "chair", "table", "lamp", "bed")  # 20% each: the filtered query keeps one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="catalogue sizes")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (the model's embed_dim)")
    parser.add_argument("--approx", nargs="*", default=["hnsw", "ivfpq"], choices=["hnsw", "ivfpq"],
                        help="approximate kinds to compare with exact search (none: exact only)")
    parser.add_argument("--queries", type=int, default=300, help="single queries timed per index (>= 200)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="FAISS OpenMP threads for building (default: FAISS's own, usually the core count)")
    parser.add_argument("--query-threads", type=int, default=None,
                        help="FAISS OpenMP threads while timing queries (default: as --threads)")
    parser.add_argument("--latent-dim", type=int, default=64, help="intrinsic dimension of the synthetic data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index.json"))
    return parser.parse_args(argv)


class ClusteredUnitVectors:
    """A mixture of Gaussians in `latent_dim` dimensions, projected to `dim` and normalised."""

    def __init__(self, dim: int, latent_dim: int, n_clusters: int, seed: int):
        rng = np.random.default_rng(seed)
        self.dim, self.latent_dim = dim, latent_dim
        self.centers = rng.standard_normal((n_clusters, latent_dim))  # (C, L)
        q, _ = np.linalg.qr(rng.standard_normal((dim, latent_dim)))  # (D, L) orthonormal columns
        self.projection = q.T  # (L, D)
        self.spread = 0.6  # within-cluster std relative to the centres' spread
        self.noise = 0.15  # isotropic noise per dimension, relative to the latent signal

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)  # (N, D)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z = self.centers[rng.integers(0, len(self.centers), m)]  # (m, L)
            z = z + self.spread * rng.standard_normal((m, self.latent_dim))
            x = z @ self.projection  # (m, D)
            x += self.noise * np.sqrt(self.latent_dim / self.dim) * rng.standard_normal((m, self.dim))
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def rss_mb() -> float:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "faiss_version": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "numpy_version": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def time_queries(index: ProductIndex, queries: np.ndarray, k: int, filter: dict | None) -> tuple[dict, list]:
    index.search(queries[:5], k, filter=filter)  # warm-up: filter columns, caches
    times, results = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(index.search(q[None, :], k, filter=filter)[0])
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95))}, results


def recall(results: list, truth: list, k: int) -> float:
    return float(np.mean([len(set(r.ids) & set(t.ids)) / max(1, min(k, len(t.ids))) for r, t in zip(results, truth)]))


def bench_size(n: int, args: argparse.Namespace) -> list[dict]:
    data = ClusteredUnitVectors(args.dim, args.latent_dim, n_clusters=max(32, n // 1000), seed=args.seed)
    vectors = data.sample(n, seed=args.seed + 1)  # (N, D)
    queries = data.sample(args.queries, seed=args.seed + 2)  # (Q, D)
    ids = [f"p{i}" for i in range(n)]
    rng = np.random.default_rng(args.seed + 3)
    metadata = [{"category": CATEGORIES[c], "price": float(p)}
                for c, p in zip(rng.integers(0, len(CATEGORIES), n), rng.uniform(20, 2000, n).round(2))]
    flt = {"category": "sofa"}

    rows, truth = [], {}
    for kind in ["exact", *args.approx]:
        before = rss_mb()
        start = time.perf_counter()
        faiss.omp_set_num_threads(args.build_threads)
        index = ProductIndex.build(ids, vectors, metadata, kind=kind, params=IndexParams())
        build_s = time.perf_counter() - start
        rss_delta = rss_mb() - before
        index_mb = faiss.serialize_index(index._index).nbytes / 2**20  # ~ its size in memory
        faiss.omp_set_num_threads(args.query_threads)
        lat, results = time_queries(index, queries, args.k, None)
        flat, fresults = time_queries(index, queries, args.k, flt)
        row = {"n": n, "dim": args.dim, "kind": kind, "build_s": build_s, "memory_mb": index_mb,
               "rss_growth_mb": rss_delta, **lat, "filtered_p50_ms": flat["p50_ms"],
               "filtered_p95_ms": flat["p95_ms"]}
        if kind == "exact":
            truth = {"all": results, "filtered": fresults}
            row.update(recall_at_10=1.0, filtered_recall_at_10=1.0)
        else:
            row.update(recall_at_10=recall(results, truth["all"], args.k),
                       filtered_recall_at_10=recall(fresults, truth["filtered"], args.k))
            exact = rows[0]
            row["ratios_to_exact"] = {key: row[key] / exact[key] for key in
                                      ("p50_ms", "p95_ms", "filtered_p50_ms", "build_s", "memory_mb")
                                      if exact[key] > 0}
        row["params"] = index.params.to_dict()
        rows.append(row)
        print(markdown_row(row), flush=True)
        del index
        gc.collect()
    return rows


def markdown_row(row: dict) -> str:
    ratio = row.get("ratios_to_exact", {})
    p50_ratio = f"{ratio['p50_ms']:.3f}x" if "p50_ms" in ratio else "1x"
    return (f"| {row['n']:,} | {row['kind']} | {row['build_s']:.1f} | {row['memory_mb']:.0f} | "
            f"{row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {p50_ratio} | {row['filtered_p50_ms']:.2f} | "
            f"{row['recall_at_10']:.4f} | {row['filtered_recall_at_10']:.4f} |")


MARKDOWN_HEADER = ("| products | kind | build s | memory MB | p50 ms | p95 ms | p50 vs exact | filtered p50 ms | "
                   "recall@10 | filtered recall@10 |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.queries < 200:
        raise SystemExit(f"--queries {args.queries}: time at least 200 queries for a stable p95")
    args.build_threads = args.threads or faiss.omp_get_max_threads()
    args.query_threads = args.query_threads or args.build_threads
    report = {"benchmark": "hgm_mm.retrieval.index.ProductIndex", "machine": machine(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": "clustered unit vectors: Gaussian mixture (max(32, N/1000) clusters) in latent-dim "
                      "dimensions, random orthonormal projection to dim, isotropic noise, L2-normalised; "
                      "queries are fresh draws; filtered queries keep category 'sofa' (~20%); latency is one "
                      "query per ProductIndex.search call (Python overhead included); memory_mb is the "
                      "serialised FAISS index",
              "results": []}
    print(MARKDOWN_HEADER, flush=True)
    for n in args.sizes:
        report["results"].extend(bench_size(n, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))  # after each size: a long run keeps what it measured
    write_results_md(report)
    return report


def write_results_md(report: dict) -> None:
    """One RESULTS.md line per size and approximate kind: latency and recall against exact search."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import update_results_md

    exact = {row["n"]: row for row in report["results"] if row["kind"] == "exact"}
    for row in report["results"]:
        if row["kind"] == "exact" or row["n"] not in exact:
            continue
        reference = exact[row["n"]]
        cells = (f"| query latency, {row['n']:,} products ({row['kind']}) | p50 {row['p50_ms']:.2f} ms, "
                 f"p95 {row['p95_ms']:.2f} ms, recall@10 {row['recall_at_10']:.4f} | exact search p50 "
                 f"{reference['p50_ms']:.2f} ms, p95 {reference['p95_ms']:.2f} ms | "
                 f"{reference['p50_ms'] / row['p50_ms']:.0f}× faster at p50 |")
        update_results_md(f"index_{row['n']}_{row['kind']}", cells, report["machine"])


if __name__ == "__main__":
    main()
