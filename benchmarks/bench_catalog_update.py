"""Catalogue update cost: `build_catalog_index` on an existing folder against a full rebuild.

Builds the IKEA catalogue's index folder once, then changes the catalogue two ways — 10 new
products; a shop's day: new text for 1 % of the products, 1 % removed, 1 % new products, new prices
for 10 % — and for each times (a) hgm_mm rebuilding a copy of the existing folder, which embeds
only what changed, against (b) a full rebuild of the changed catalogue into a new folder, what the
previous design did every time.
Both in the same run, with the same model; the two folders are then compared (same ids and
metadata, largest vector difference, same top-10 for every product's vector as a query).

    python benchmarks/bench_catalog_update.py [--data ../shared/data] [--model hgm-lite-en] [--no-record]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_summary, record_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def changed_catalogue(products: list, seed: int = 0) -> tuple[list, dict[str, int]]:
    """The catalogue a day later: 1 % new texts, 1 % removed, 1 % new products, 10 % new prices."""
    rng = np.random.default_rng(seed)
    n = len(products)
    share = max(1, n // 100)
    order = rng.permutation(n)
    retexted, removed = set(order[:share].tolist()), set(order[share:2 * share].tolist())
    repriced = set(order[2 * share:2 * share + n // 10].tolist())
    out = []
    for i, product in enumerate(products):
        if i in removed:
            continue
        if i in retexted:
            product = dataclasses.replace(product, title=f"{product.title} (new finish)")
        if i in repriced:
            product = dataclasses.replace(product, attributes={**product.attributes, "price": 9.99 + i})
        out.append(product)
    for j, i in enumerate(order[-share:].tolist()):  # new listings: another product's photo, their own text
        source = products[i]
        out.append(dataclasses.replace(source, product_id=f"new-{j:04d}", title=f"{source.title} bundle"))
    return out, {"retexted": len(retexted), "removed": len(removed), "new": share, "repriced": len(repriced)}


def added_products(products: list, n: int = 10) -> tuple[list, dict[str, int]]:
    """The catalogue with `n` new listings (another product's photo, their own text)."""
    new = [dataclasses.replace(p, product_id=f"added-{j:04d}", title=f"{p.title} set") for j, p in
           enumerate(products[:n])]
    return products + new, {"retexted": 0, "removed": 0, "new": n, "repriced": 0}


def timed_build(model, products, folder: Path) -> tuple[float, object]:
    from hgm_mm.ranking.catalog import build_catalog_index

    start = time.perf_counter()
    built = build_catalog_index(model, products, folder, kind="exact", progress=False)
    return time.perf_counter() - start, built


def compare(updated: Path, fresh: Path) -> dict:
    from hgm_mm import Matcher

    a, b = Matcher.load(updated).index, Matcher.load(fresh).index
    same_ids = a.ids == b.ids
    same_metadata = same_ids and all(a.metadata(i) == b.metadata(i) for i in a.ids)
    va, vb = a.vectors(a.ids), b.vectors(b.ids)
    top_a = [r.ids for r in a.search(vb, k=10)]
    top_b = [r.ids for r in b.search(vb, k=10)]
    return {"same_ids": same_ids, "same_metadata": same_metadata, "max_vector_difference": float(np.abs(va - vb).max()),
            "same_top10_share": float(np.mean([x == y for x, y in zip(top_a, top_b)]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hgm-lite-en")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HGM_DATA", REPO_ROOT.parent / "shared" / "data")),
                        help="the shared data folder (holding ikea/), or the ikea folder itself")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "catalog_update.json")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the JSON and RESULTS.md alone")
    args = parser.parse_args(argv)
    ikea = args.data if (args.data / "products.jsonl").is_file() else args.data / "ikea"
    if not (ikea / "products.jsonl").is_file():
        raise SystemExit(f"no IKEA data at {args.data}: give --data DIR (the folder holding ikea/) or set HGM_DATA")

    import hgm_mm
    from hgm_mm.data import read_products

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model(args.model)
    products = read_products(ikea / "products.jsonl")
    machine = describe_machine()
    scenarios = {"add_10": added_products(products), "day": changed_catalogue(products)}
    measured = []
    with tempfile.TemporaryDirectory(prefix="bench_catalog_update_") as tmp:
        tmp = Path(tmp)
        first_seconds, _ = timed_build(model, products, tmp / "base")
        for name, (changed, changes) in scenarios.items():
            shutil.copytree(tmp / "base", tmp / name)
            update_seconds, updated = timed_build(model, changed, tmp / name)
            full_seconds, fresh = timed_build(model, changed, tmp / f"{name}-fresh")
            measured.append({"scenario": name, "n_after": len(changed), "changes": changes,
                             "update_seconds": update_seconds, "full_rebuild_seconds": full_seconds,
                             "ratio": full_seconds / update_seconds, "n_embedded": updated.n_embedded,
                             "n_reused": updated.n_reused, "fresh_n_embedded": fresh.n_embedded,
                             **compare(tmp / name, tmp / f"{name}-fresh")})
    result = {"benchmark": "catalog_update", "model": args.model, "n_products": len(products),
              "first_build_seconds": first_seconds, "results": measured, "machine": machine}
    for item in measured:
        changes = item["changes"]
        what = ("10 new products" if item["scenario"] == "add_10" else
                f"a day's changes: {changes['retexted']} new texts, {changes['removed']} removed, "
                f"{changes['new']} new, {changes['repriced']} new prices")
        line = (f"| catalogue update, IKEA catalogue ({args.model}, {len(products)} products; {what}) | "
                f"`hgm-mm index` on the existing folder {item['update_seconds']:.1f} s ({item['n_embedded']} "
                f"embedded, {item['n_reused']} kept); against the fresh build: ids and metadata "
                f"{'same' if item['same_metadata'] else 'DIFFER'}, vectors within "
                f"{item['max_vector_difference']:.1e}, top-10 same for {item['same_top10_share']:.0%} of "
                f"{item['n_after']} queries | full rebuild {item['full_rebuild_seconds']:.1f} s | "
                f"{item['ratio']:.1f}× faster |")
        print(line)
        if not args.no_record:
            record_result(args.out, result, f"catalog_update_{item['scenario']}", line)
    print(f"machine: {machine_summary(machine)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
