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

    evaluate = sub.add_parser("evaluate", help="room -> product retrieval metrics over a whole catalogue")
    evaluate.add_argument("--model", required=True, help="model name or local-dir:PATH of a saved model")
    evaluate.add_argument("--catalog", type=Path, help="products.jsonl of the gallery")
    evaluate.add_argument("--rooms", type=Path, help="rooms.jsonl of the query rooms")
    evaluate.add_argument("--pairs", type=Path, help="pairs.csv: the products in each room")
    evaluate.add_argument("--scenes", type=Path, help="images.jsonl: scene accuracy and macro-F1 of the scene head")
    evaluate.add_argument("--room-text", action="store_true", help="fuse each room's caption into its query")
    evaluate.add_argument("--baselines", action="store_true",
                          help="also random, popularity, scene popularity and frozen pretrained features")
    evaluate.add_argument("--train-pairs", type=Path, help="pairs.csv the popularity baselines count")
    evaluate.add_argument("--train-rooms", type=Path, help="rooms.jsonl of the training rooms (their scenes)")
    evaluate.add_argument("--frozen-model", default="hgm-lite-en", help="untrained model of the frozen baseline")
    evaluate.add_argument("--json", type=Path, help="write every number to this JSON file")

    train = sub.add_parser("train", help="fine-tune a model on a dataset folder (also under accelerate launch)")
    train.add_argument("--data", type=Path, required=True, help="dataset folder: products.jsonl, rooms.jsonl, pairs.csv")
    train.add_argument("--output", type=Path, required=True, help="run folder: best model, checkpoint, config")
    train.add_argument("--model", help="starting model (default: the recipe's)")
    train.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig settings")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--batch-size", type=int, help="catalogue products per step")
    train.add_argument("--lr", type=float, help="learning rate of projections and heads")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")

    index = sub.add_parser("index", help="embed a catalogue into a folder that `hgm-mm match` searches")
    index.add_argument("--model", required=True, help="model name, or the folder of a trained model")
    index.add_argument("--catalog", type=Path, required=True, help="products.jsonl of the catalogue")
    index.add_argument("--output", type=Path, required=True, help="folder to write (index, model copy, prior)")
    index.add_argument("--pairs", type=Path, help="pairs.csv of training rooms: which categories belong in which "
                                                  "scene (default: the model folder's scene_categories.json)")
    index.add_argument("--rooms", type=Path, help="rooms.jsonl naming the scenes of the --pairs rooms")
    index.add_argument("--kind", default="auto", choices=["auto", "exact", "hnsw", "ivfpq"],
                       help="index kind (auto: exact up to 100k products, HNSW beyond)")
    index.add_argument("--batch-size", type=int, default=32, help="product photos per forward pass")

    match = sub.add_parser("match", help="products (and a product set) for a room photo")
    match.add_argument("photo", nargs="?", type=Path, help="the room photo")
    match.add_argument("--index", type=Path, required=True, help="folder written by `hgm-mm index`")
    match.add_argument("--text", help='what the person wants, in words ("a Nordic living room, warm light")')
    match.add_argument("--user-events", type=Path, help="CSV or JSONL of user_id,product_id,event,timestamp")
    match.add_argument("--user", help="the user (in --user-events) whose profile personalises the ranking")
    match.add_argument("-k", type=int, default=10, help="products to show")
    match.add_argument("--category", action="append", help="only this category (repeat for several)")
    match.add_argument("--min-price", type=float, help="only products at or above this price")
    match.add_argument("--max-price", type=float, help="only products at or below this price")
    match.add_argument("--model", help="query with this model instead of the index folder's copy "
                                       "(refused unless it built the index)")
    match.add_argument("--json", action="store_true", help="print the result as JSON")

    sub.add_parser("models", help="list the built-in models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "models":
            return _models()
        if args.command == "demo":
            return _demo(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "train":
            return _train(args)
        if args.command == "index":
            return _index(args)
        if args.command == "match":
            return _match(args)
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
        room_images = embed_images(model, [r.image for r in rooms], desc="room photos", room_views=True)
        product_texts = embed_texts(model, [product_text(p) for p in pool])
        query = model.encode_text([args.query])

    rooms = [rooms[i] for i in room_images.kept]
    pool = [pool[i] for i in product_images.kept]
    product_texts = product_texts[product_images.kept]
    with torch.no_grad():  # each room's views against the product photos
        similarity = model.score_products(product_images.embeddings, view_embeds=room_images.embeddings)  # (R, P)
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


def _train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    overrides = {"model": args.model, "epochs": args.epochs, "max_steps": args.max_steps,
                 "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    if args.config is not None:
        config = TrainConfig.from_file(args.config, **overrides)
    else:
        config = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None},
                                       origin="command line")
    result = train(config, data=find_dataset(args.data), output=args.output, resume=not args.no_resume)
    metrics = result.best_metrics
    print(f"best model: {result.model_dir} (step {result.best_step} of {result.steps}); validation "
          f"Recall@10 {metrics.get('recall@10', float('nan')):.4f}, NDCG@10 {metrics.get('ndcg@10', float('nan')):.4f}, "
          f"mAP {metrics.get('map', float('nan')):.4f}; wall time {result.wall_seconds / 60:.1f} min")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .data import read_pairs, read_products, read_rooms, read_scene_images
    from .evaluation import baseline_evaluations, evaluate, evaluate_scenes
    from .factory import create_model

    retrieval_args = [args.catalog, args.rooms, args.pairs]
    if any(a is not None for a in retrieval_args) and not all(a is not None for a in retrieval_args):
        raise ValueError("room -> product evaluation needs --catalog, --rooms and --pairs together")
    if args.scenes is None and args.catalog is None:
        raise ValueError("nothing to evaluate: give --catalog, --rooms and --pairs, and/or --scenes")
    model = create_model(args.model if ":" in args.model or not Path(args.model).is_dir()
                         else f"local-dir:{args.model}")
    document: dict = {}
    if args.scenes is not None:
        scenes = evaluate_scenes(model, read_scene_images(args.scenes))
        print(f"scenes: {scenes.n_images} photos, accuracy {scenes.accuracy:.4f}, macro-F1 {scenes.macro_f1:.4f}"
              f"{f', {len(scenes.skipped)} unreadable photos skipped' if scenes.skipped else ''}")
        document["scenes"] = scenes.to_dict()
    if args.catalog is None:
        _write_document(args.json, document)
        return 0
    catalog = read_products(args.catalog)
    rooms = read_rooms(args.rooms)
    pairs = read_pairs(args.pairs, room_ids={r.room_id for r in rooms},
                       product_ids={p.product_id for p in catalog})
    result = evaluate(model, catalog, rooms, pairs, use_room_text=args.room_text)
    table = {args.model: result.metrics}
    if args.baselines:
        train_pairs = train_rooms = None
        if args.train_pairs is not None:
            train_rooms = read_rooms(args.train_rooms) if args.train_rooms else rooms
            train_pairs = read_pairs(args.train_pairs, room_ids={r.room_id for r in train_rooms},
                                     product_ids={p.product_id for p in catalog})
        else:
            print("popularity baselines skipped: give --train-pairs (and --train-rooms)", file=sys.stderr)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = create_model(args.frozen_model)
        table.update(baseline_evaluations(catalog, rooms, pairs, train_pairs=train_pairs, train_rooms=train_rooms,
                                          frozen_model=frozen))
    print(f"{result.n_rooms} rooms, {result.n_products} products, {len(result.skipped)} unreadable photos skipped")
    columns = ["recall@10", "recall@50", "ndcg@10", "map", "hit_rate@10"]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{values.get(c, float('nan')):.4f}" for c in columns) + " |")
    document.update({"model": result.to_dict(), "table": table})
    _write_document(args.json, document)
    return 0


def _create_model(name: str):
    """A model from a name, or from a folder given as a plain path."""
    from .factory import create_model

    return create_model(name if ":" in name or not Path(name).is_dir() else f"local-dir:{name}")


def _index(args: argparse.Namespace) -> int:
    from .data import read_pairs, read_products, read_rooms
    from .matching import SCENE_CATEGORIES_FILE, SceneCategoryPrior, build_catalog_index, check_output_dir

    if (args.pairs is None) != (args.rooms is None):
        raise ValueError("the scene-category prior needs --pairs and --rooms together")
    check_output_dir(args.output)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}; expected a positive number")
    catalog = read_products(args.catalog)
    prior, prior_source = None, None
    if args.pairs is not None:
        rooms = read_rooms(args.rooms)
        pairs = read_pairs(args.pairs, room_ids={room.room_id for room in rooms})
        prior = SceneCategoryPrior.from_pairs(rooms, catalog, pairs)
        prior_source = f"{args.pairs}"
    elif Path(args.model.removeprefix("local-dir:"), SCENE_CATEGORIES_FILE).is_file():
        prior_source = str(Path(args.model.removeprefix("local-dir:"), SCENE_CATEGORIES_FILE))
        prior = SceneCategoryPrior.load(prior_source)
    model = _create_model(args.model)
    built = build_catalog_index(model, catalog, args.output, prior=prior, kind=args.kind, batch_size=args.batch_size)
    print(f"indexed {built.n_products} products into {built.folder}"
          f"{f' ({len(built.skipped)} unreadable photos: indexed by their text)' if built.skipped else ''}")
    if prior is None:
        print("no scene-category prior: scene fit is off and product sets follow the top products; give --pairs "
              "and --rooms of the training rooms", file=sys.stderr)
    else:
        print(f"scene-category prior from {prior_source}: {len(prior.scenes)} scenes, {len(prior.categories)} "
              "categories")
    return 0


def _match(args: argparse.Namespace) -> int:
    import json

    from .matching import Matcher
    from .profile import UserProfile, read_events

    if args.photo is None and not args.text:
        raise ValueError("nothing to match: give a room photo, --text, or both")
    if args.photo is not None and not args.photo.is_file():
        raise FileNotFoundError(f"{args.photo}: no such photo; give the path of a room photo")
    if (args.user_events is None) != (args.user is None):
        raise ValueError("a user profile needs --user-events FILE and --user ID together")
    if args.k < 1:
        raise ValueError(f"-k {args.k}; expected a positive number of products")
    events = None
    if args.user_events is not None:
        events = read_events(args.user_events)
        if not any(event.user_id == args.user for event in events):
            raise ValueError(f"unknown user {args.user!r}: {args.user_events} holds no events of theirs")
    filter_: dict = {}
    if args.category:
        filter_["category"] = list(args.category)
    if args.min_price is not None or args.max_price is not None:
        filter_["price"] = (args.min_price, args.max_price)
    model = _create_model(args.model) if args.model else None
    matcher = Matcher.load(args.index, model=model)
    profile = UserProfile.from_events(events, args.user, index=matcher.index) if events is not None else None
    result = matcher.match(str(args.photo) if args.photo is not None else None, text=args.text, profile=profile,
                           k=args.k, filter=filter_ or None)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print("scene: " + ", ".join(f"{scene} {p:.2f}" for scene, p in list(result.scene_probabilities.items())[:3]))
    print(f"products{f' for user {args.user}' if profile is not None else ''}:")
    for rank, product in enumerate(result.products, 1):
        print(f"  {rank:>2}. {product.score:.3f}  {_describe_product(product)}")
    print("product set:")
    for product in result.product_set:
        print(f"  {product.metadata.get('category')}: {product.score:.3f}  {_describe_product(product)}")
    if not result.products:
        print("  (no product matches the filters)")
    return 0


def _describe_product(product) -> str:
    meta = product.metadata
    reasons = ", ".join(f"{term} {value:+.3f}" for term, value in product.reasons.items())
    return f"{meta.get('title') or product.product_id} ({meta.get('category')}) [{reasons}]  {meta.get('image', '')}"


def _write_document(path: Path | None, document: dict) -> None:
    import json

    if path is not None:
        path.write_text(json.dumps(document, indent=2), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
