"""The `hgm-mm` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DATA_ENV = "HGM_DATA"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hgm-mm", description="Scene-aware furniture matching.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embed rooms and products of a dataset and show what matches")
    demo.add_argument("--data", type=Path, default=None,
                      help=f"dataset folder (products.jsonl, rooms.jsonl, pairs.csv); default ${DATA_ENV}")
    demo.add_argument("--model", default="hgm-lite-en", help="model name (see `hgm-mm models`)")
    demo.add_argument("--rooms", type=int, default=3, help="rooms to show")
    demo.add_argument("--products", type=int, default=300, help="catalogue products to compare against")
    demo.add_argument("--query", default="a grey fabric sofa", help="a text query to search product texts")

    sub.add_parser("models", help="list the built-in models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "models":
            return _models()
        if args.command == "demo":
            return _demo(args)
    except (ValueError, FileNotFoundError) as err:  # input errors: one clear line, no traceback
        print(f"hgm-mm {args.command}: {err}", file=sys.stderr)
        return 2
    return 1


def _models() -> int:
    from .pretrained import builtin_model_names

    for name in builtin_model_names():
        print(name)
    return 0


def find_dataset(data: Path | None) -> Path:
    """The dataset folder from --data or $HGM_DATA; a data root holding `ikea/` also works."""
    if data is None:
        if not os.environ.get(DATA_ENV):
            raise FileNotFoundError(f"no dataset given: pass --data DIR or set {DATA_ENV} to a folder with "
                                    "products.jsonl, rooms.jsonl and pairs.csv")
        data = Path(os.environ[DATA_ENV])
    for candidate in (data, data / "ikea"):
        if (candidate / "products.jsonl").is_file():
            return candidate
    raise FileNotFoundError(f"{data} holds no products.jsonl (nor ikea/products.jsonl)")


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .data.text import product_text
    from .embedding import embed_images, embed_texts
    from .factory import create_model

    root = find_dataset(args.data)
    dataset = load_dataset(root)
    positives = dataset.positives()
    rooms = [room for room in dataset.rooms if room.room_id in positives][: args.rooms]
    if not rooms:
        raise ValueError(f"{root}: no room has products in pairs.csv; the demo needs rooms with products")
    products_by_id = dataset.products_by_id
    pool_ids = list(dict.fromkeys(
        [pid for room in rooms for pid in positives[room.room_id]] + [p.product_id for p in dataset.products]))
    pool = [products_by_id[pid] for pid in pool_ids[: max(args.products, 1)]]

    started = time.perf_counter()
    print(f"hgm-mm demo: model {args.model}, data {root}: {len(rooms)} rooms against {len(pool)} products")
    model = create_model(args.model)
    with torch.no_grad():
        product_images = embed_images(model, [p.image for p in pool], desc="product photos")
        room_images = embed_images(model, [r.image for r in rooms], desc="room photos")
        product_texts = embed_texts(model, [product_text(p) for p in pool])
        query = model.encode_text([args.query])

    rooms = [rooms[i] for i in room_images.kept]
    pool = [pool[i] for i in product_images.kept]
    product_texts = product_texts[product_images.kept]
    similarity = room_images.embeddings @ product_images.embeddings.T  # (R, P)
    pool_index = {pid: i for i, pid in enumerate(p.product_id for p in pool)}
    for r, room in enumerate(rooms):
        in_room = {pool_index[pid] for pid in positives[room.room_id] if pid in pool_index}
        top = similarity[r].topk(min(5, len(pool))).indices.tolist()
        print(f"\nroom {room.room_id} ({room.scene}): {room.image}")
        for rank, j in enumerate(top, 1):
            mark = "*" if j in in_room else " "
            print(f"  {rank}. {mark} {similarity[r, j]:.3f}  {pool[j].title} ({pool[j].category})  {pool[j].image}")
    text_scores = (query @ product_texts.T)[0]  # (P,)
    print(f"\nproducts whose text is nearest {args.query!r}:")
    for j in text_scores.topk(min(5, len(pool))).indices.tolist():
        print(f"  {text_scores[j]:.3f}  {product_text(pool[j])[:90]}")
    skipped = product_images.skipped + room_images.skipped
    print(f"\n* = the product appears in that room. {len(skipped)} unreadable photos skipped. "
          f"Done in {time.perf_counter() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
