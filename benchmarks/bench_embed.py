"""Catalogue embedding throughput: JPEG file -> vector, hgm_mm's streaming pass against a plain loop.

The plain loop is what a person writes first: PIL open, the model's transform, `encode_image` on
one photo at a time in one process under `torch.no_grad()`. hgm_mm's pass is `embed_to_shards`
with its defaults (worker processes that decode and embed, batches, JPEG draft decoding, and from
`ONNX_MIN_PHOTOS` photos on the image tower in ONNX Runtime), writing its shards to a temporary
folder; its time includes everything the call does, the one-time ONNX export too. Both embed the
same IKEA photos with the same model in the same run, in alternating rounds so that machine noise
hits both alike. Reports images/s, the ratio, and the cosine between the two paths' vectors of
each photo. The default is the whole IKEA catalogue (2,187 product photos).

    python benchmarks/bench_embed.py [--data ../shared/data] [--products N] [--rooms 144] [--rounds 2]
                                     [--engine auto] [--reference-threads N] [--no-record]
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, record_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_photos(jsonl: Path, id_key: str, limit: int | None) -> tuple[list[str], list[str]]:
    """(ids, absolute photo paths) of the first `limit` rows (None: all) of a products.jsonl or rooms.jsonl."""
    ids, photos = [], []
    with jsonl.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if limit is not None and len(ids) >= limit:
                break
            try:
                row = json.loads(line)
                ids.append(str(row[id_key]))
                photos.append(str(jsonl.parent / row["image"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SystemExit(f"{jsonl} line {line_number}: not a row with {id_key!r} and 'image' ({err}); "
                                 "point --data at the shared data folder") from None
    return ids, photos


def plain_loop(model, photos: list[str], threads: int | None = None) -> torch.Tensor:
    """The reference: one photo at a time, PIL open -> model transform -> encode_image -> (N, D)."""
    from PIL import Image

    vectors = []
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    with torch.no_grad():
        for path in photos:
            with Image.open(path) as image:
                pixels = model.image_transform(image.convert("RGB")).unsqueeze(0)  # (1, 3, S, S)
            vectors.append(model.encode_image(pixels))
    torch.set_num_threads(default_threads)
    return torch.cat(vectors)


def hgm_pass(model, ids: list[str], photos: list[str], args) -> torch.Tensor:
    """hgm_mm's streaming pass into a fresh folder -> (N, D) in input order."""
    from hgm_mm.embedding import embed_to_shards

    with tempfile.TemporaryDirectory(prefix="bench_embed_") as folder:
        result = embed_to_shards(model, ids, photos, folder, batch_size=args.batch_size,
                                 num_workers=args.num_workers, engine=args.engine, progress=False)
        got_ids, vectors = result.load()
    if got_ids != ids:
        raise SystemExit("the streaming pass skipped photos; every benchmark photo should be readable")
    return vectors


def measure(model, name: str, ids: list[str], photos: list[str], args) -> dict:
    for path in photos:  # both paths then read from the page cache
        Path(path).read_bytes()
    plain_loop(model, photos[:4])  # warm-up: allocator, lazy initialisation
    hgm_pass(model, ids[:8], photos[:8], args)
    rates = {"hgm_mm": [], "plain_loop": []}
    vectors = {}
    for _ in range(args.rounds):
        for label, run in (("plain_loop", lambda: plain_loop(model, photos, args.reference_threads)),
                           ("hgm_mm", lambda: hgm_pass(model, ids, photos, args))):
            start = time.perf_counter()
            vectors[label] = run()
            rates[label].append(len(photos) / (time.perf_counter() - start))
    cosine = torch.nn.functional.cosine_similarity(vectors["hgm_mm"], vectors["plain_loop"].float())  # (N,)
    hgm_rate, plain_rate = statistics.median(rates["hgm_mm"]), statistics.median(rates["plain_loop"])
    return {"photos": name, "n": len(photos), "hgm_mm_images_per_s": hgm_rate,
            "reference_images_per_s": plain_rate, "ratio": hgm_rate / plain_rate,
            "cosine_min": cosine.min().item(), "cosine_mean": cosine.mean().item(), "all_rates": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hgm-lite-en")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HGM_DATA", REPO_ROOT.parent / "shared" / "data")),
                        help="the shared data folder (holding ikea/), or the ikea folder itself")
    parser.add_argument("--products", type=int, default=-1,
                        help="IKEA product photos (500 px); -1 (default) the whole catalogue, 0 skips them")
    parser.add_argument("--rooms", type=int, default=144, help="IKEA room photos (1024 px), one vector each; 0 skips")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--engine", default="auto", help="embed_to_shards engine: auto, torch or onnxruntime")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding processes; default: the library's")
    parser.add_argument("--reference-threads", type=int, default=None,
                        help="torch threads of the plain loop; default torch's own (one per core)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embed.json")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the JSON and RESULTS.md alone")
    args = parser.parse_args(argv)

    ikea = args.data if (args.data / "products.jsonl").is_file() else args.data / "ikea"
    if not (ikea / "products.jsonl").is_file():
        raise SystemExit(f"no IKEA data at {args.data}: give --data DIR (the folder holding ikea/) or set HGM_DATA")

    import hgm_mm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model(args.model)
    sets = [("products", ikea / "products.jsonl", "product_id", args.products),
            ("rooms", ikea / "rooms.jsonl", "room_id", args.rooms)]
    measured = []
    for name, jsonl, id_key, limit in sets:
        if limit != 0:
            ids, photos = read_photos(jsonl, id_key, limit if limit > 0 else None)
            measured.append(measure(model, name, ids, photos, args))
    machine = describe_machine()
    result = {"benchmark": "embed", "model": args.model, "batch_size": args.batch_size, "engine": args.engine,
              "reference_threads": args.reference_threads or torch.get_num_threads(),
              "num_workers": args.num_workers, "rounds": args.rounds, "results": measured, "machine": machine}
    sizes = {"products": "500 px", "rooms": "1024 px"}
    for item in measured:
        line = (f"| catalogue embedding, IKEA {item['photos']} JPEG {sizes[item['photos']]} → vector "
                f"({args.model}, {item['n']} photos, engine {args.engine}) | "
                f"{item['hgm_mm_images_per_s']:.1f} images/s, cosine to "
                f"reference min {item['cosine_min']:.4f} | plain loop {item['reference_images_per_s']:.1f} images/s "
                f"({result['reference_threads']} threads) "
                f"| {item['ratio']:.2f}× |")
        if not args.no_record:
            record_result(args.out, result, f"embed_{item['photos']}", line)
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
