"""What each `hgm-mm` subcommand does with its parsed flags (`cli.py` defines them): a thin layer
over the library that reads the inputs, calls it and prints what people need to see."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..data.ikea_repo import DATA_ENV


def models_command(args: argparse.Namespace) -> int:
    from ..models.pretrained import builtin_model_names

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


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.data, output=args.output, model=args.model, rooms=args.rooms, train_rooms=args.train_rooms,
             products=args.products, steps=args.steps, batch_size=args.batch_size, top_k=args.top_k)
    return 0


def train_config(args: argparse.Namespace):
    """The `TrainConfig` of `hgm-mm train`: the --config file's settings (if any), the flags given over them."""
    import dataclasses

    from ..training import TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.config is not None:
        return TrainConfig.from_file(args.config, **overrides)
    return TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, origin="command line")


def train_command(args: argparse.Namespace) -> int:
    from ..training import train

    config = train_config(args)
    output = args.output or Path("runs") / config.model.replace(":", "-").replace("/", "-")
    result = train(config, data=find_dataset(args.data), output=output, resume=not args.no_resume,
                   scene_data=args.scene_data, scene_texts=args.scene_texts)
    if not result.main_process:  # under accelerate launch, the main process alone reports
        return 0
    metrics = result.best_metrics
    print(f"best model: {result.model_dir} (step {result.best_step} of {result.steps}); validation "
          f"Recall@10 {metrics.get('recall@10', float('nan')):.4f}, NDCG@10 {metrics.get('ndcg@10', float('nan')):.4f}, "
          f"mAP {metrics.get('map', float('nan')):.4f}, hit rate@10 {metrics.get('hit_rate@10', float('nan')):.4f}; "
          f"wall time {result.wall_seconds / 60:.1f} min")
    return 0


def train_scenes_command(args: argparse.Namespace) -> int:
    import json
    import time

    from ..training.guide_heads import SCENE_REPORT_FILE, read_scene_data, train_guide_heads

    if args.data is None and args.texts is None:
        raise ValueError("nothing to train on: give --data (an images.jsonl scene set) and/or --texts")
    options = {name: value for name, value in (("epochs", args.epochs), ("branch_stages", args.branch_stages),
                                               ("random_crops", args.random_crops),
                                               ("scene_image_size", args.scene_image_size)) if value is not None}
    model = _create_model(args.model)
    data = read_scene_data(args.data, args.texts, labels=model.scene_labels)  # checked before the long work
    started = time.perf_counter()
    report = train_guide_heads(model, [], [], data, seed=args.seed, **options)
    model.save_pretrained(args.output)
    report["seconds"] = time.perf_counter() - started
    (args.output / SCENE_REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if "photo" in report:
        photo = report["photo"]
        print(f"photo scene head: {photo['n_train']} training photos; validation accuracy "
              f"{photo['val_accuracy'] if photo['val_accuracy'] is not None else float('nan'):.4f}, "
              f"macro-F1 {photo['val_macro_f1'] if photo['val_macro_f1'] is not None else float('nan'):.4f} on "
              f"{photo['n_val']} photos; ECE {photo['calibration'].get('val_ece', float('nan')):.3f}")
    if "text" in report:
        print(f"scene-text classifier: {report['text']['n_train']} texts")
    print(f"saved {args.output} in {report['seconds'] / 60:.1f} min")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from ..data import read_pairs, read_products, read_rooms, read_scene_images
    from ..evaluation import (baseline_evaluations, check_report_folder, evaluate, evaluate_scenes, held_out_rooms,
                             write_report)
    from ..evaluation.evaluate import TRAIN_PAIRS_FILE, baseline_training_data
    from ..models.factory import create_model

    if args.guide is not None:
        return _evaluate_guide(args)
    if args.model is None:
        raise ValueError("give --model (or --guide INDEX_DIR to measure a catalogue index)")
    retrieval_args = [args.catalog, args.rooms, args.pairs]
    if any(a is not None for a in retrieval_args) and not all(a is not None for a in retrieval_args):
        raise ValueError("room -> product evaluation needs --catalog, --rooms and --pairs together")
    if args.scenes is None and args.catalog is None:
        raise ValueError("nothing to evaluate: give --catalog, --rooms and --pairs, and/or --scenes")
    if args.report is not None:
        check_report_folder(args.report)  # before the evaluation, not after it
    model = _create_model(args.model)
    model_dir = _saved_model_folder(args.model)
    recorded_pairs = model_dir / TRAIN_PAIRS_FILE if model_dir is not None else None
    document: dict = {}
    scenes = None
    if args.scenes is not None:
        scenes = evaluate_scenes(model, read_scene_images(args.scenes))
        print(f"scenes: {scenes.n_images} photos, accuracy {scenes.accuracy:.4f}, macro-F1 {scenes.macro_f1:.4f}"
              f"{f', {len(scenes.skipped)} unreadable photos skipped' if scenes.skipped else ''}")
        document["scenes"] = scenes.to_dict()
    if args.catalog is None:
        if args.report is not None:
            print(f"wrote {write_report(args.report, scenes=scenes, title=f'hgm-mm evaluate: {args.model}')}")
        _write_document(args.json, document)
        return 0
    catalog = read_products(args.catalog)
    all_rooms = read_rooms(args.rooms)
    pairs = read_pairs(args.pairs, room_ids={r.room_id for r in all_rooms},
                       product_ids={p.product_id for p in catalog})
    pairs_file = args.train_pairs or (recorded_pairs if recorded_pairs and recorded_pairs.is_file() else None)
    rooms, left_out = (all_rooms, 0) if args.all_rooms else held_out_rooms(all_rooms, model_dir)
    if left_out:
        print(f"scoring the {len(rooms)} rooms {args.model} was not trained on "
              f"({left_out} training rooms left out; --all-rooms keeps them)")
    if args.baselines:  # every input of the baselines is read and checked before the evaluation runs
        train_pairs = train_rooms = None
        if pairs_file is None:
            print("popularity baselines skipped: give --train-pairs (and --train-rooms)", file=sys.stderr)
        else:
            train_pairs, train_rooms, source = baseline_training_data(
                pairs_file, catalog, train_rooms=read_rooms(args.train_rooms) if args.train_rooms else None,
                model_folder=model_dir, rooms=all_rooms)
            print(f"popularity baselines count the training pairs of {pairs_file} (scenes from {source})")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = create_model(args.frozen_model)
    result = evaluate(model, catalog, rooms, pairs, use_room_text=args.room_text)
    table = {args.model: result.metrics}
    if args.baselines:
        table.update(baseline_evaluations(catalog, rooms, pairs, train_pairs=train_pairs, train_rooms=train_rooms,
                                          frozen_model=frozen))
    print(f"{result.n_rooms} rooms, {result.n_products} products, {len(result.skipped)} unreadable photos skipped")
    columns = ["recall@10", "recall@50", "ndcg@10", "map", "hit_rate@10"]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{values.get(c, float('nan')):.4f}" for c in columns) + " |")
    document.update({"model": result.to_dict(), "table": table})
    if args.report is not None:
        index = write_report(args.report, result, catalog, rooms, pairs, table=table, scenes=scenes,
                             title=f"hgm-mm evaluate: {args.model}")
        print(f"wrote {index}")
    _write_document(args.json, document)
    return 0


def _evaluate_guide(args: argparse.Namespace) -> int:
    import json

    from ..data import read_pairs, read_rooms, read_scene_texts
    from ..evaluation import evaluate_guide, format_guide_report, held_out_rooms
    from ..ranking.matcher import Matcher

    if args.rooms is None or args.pairs is None:
        raise ValueError("--guide needs --rooms and --pairs (the rooms to match and the products in them)")
    rooms = read_rooms(args.rooms)
    pairs = read_pairs(args.pairs, room_ids={r.room_id for r in rooms})
    texts = read_scene_texts(args.texts) if args.texts is not None else None
    matcher = Matcher.load(args.guide, model=_create_model(args.model) if args.model else None)
    model_dir = _saved_model_folder(args.model) if args.model else None
    if not args.all_rooms:
        rooms, left_out = held_out_rooms(rooms, model_dir)
        if left_out:
            print(f"matching the {len(rooms)} rooms the model was not trained on (--all-rooms keeps the others)")
    result = evaluate_guide(matcher, rooms, pairs, texts=texts)
    print(format_guide_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _saved_model_folder(name: str) -> Path | None:
    """The folder a model name points at (`local-dir:PATH` or a plain folder path), else None."""
    if name.startswith("local-dir:"):
        return Path(name.removeprefix("local-dir:"))
    return Path(name) if ":" not in name and Path(name).is_dir() else None


def _create_model(name: str):
    """A model from a name, or from a folder given as a plain path."""
    from ..models.factory import create_model

    folder = _saved_model_folder(name)
    return create_model(f"local-dir:{folder}" if folder is not None else name)


def index_command(args: argparse.Namespace) -> int:
    from ..data import read_pairs, read_products, read_rooms
    from ..ranking.catalog import build_catalog_index, check_output_dir
    from ..ranking.prior import SCENE_CATEGORIES_FILE, SceneCategoryPrior
    from ..retrieval.milvus import DEFAULT_COLLECTION, parse_store_uri

    if (args.pairs is None) != (args.rooms is None):
        raise ValueError("the scene-category prior needs --pairs and --rooms together")
    check_output_dir(args.output)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}; expected a positive number")
    store = parse_store_uri(args.store)
    if store.engine == "milvus" and args.kind == "ivfpq":
        raise ValueError("--kind ivfpq is FAISS's own; with a Milvus store use --kind hnsw (or auto)")
    if store.engine == "faiss" and args.collection is not None:
        raise ValueError("--collection names a table of a Milvus store; give --store milvus-lite:... or milvus://...")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch or torchrun
        from accelerate import PartialState

        PartialState()  # joins the process group the launcher set up: each process embeds its share
    catalog = read_products(args.catalog)
    prior, prior_source = None, None
    if args.pairs is not None:
        rooms = read_rooms(args.rooms)
        pairs = read_pairs(args.pairs, room_ids={room.room_id for room in rooms})
        prior = SceneCategoryPrior.from_pairs(rooms, catalog, pairs)
        prior_source = f"{args.pairs}"
    elif (folder := _saved_model_folder(args.model)) is not None and (folder / SCENE_CATEGORIES_FILE).is_file():
        prior_source = str(folder / SCENE_CATEGORIES_FILE)
        prior = SceneCategoryPrior.load(prior_source)
    model = _create_model(args.model)
    built = build_catalog_index(model, catalog, args.output, prior=prior, kind=args.kind, store=args.store,
                                collection=args.collection, batch_size=args.batch_size)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # process 0 reports
    where = "" if store.engine == "faiss" else \
        f" (vectors in {store.canonical}, collection {args.collection or DEFAULT_COLLECTION})"
    print(f"indexed {built.n_products} products into {built.folder}{where}: {built.n_embedded} embedded, "
          f"{built.n_reused} kept from the previous build (photo and text unchanged)"
          f"{f'; {len(built.skipped)} unreadable photos: indexed by their text' if built.skipped else ''}")
    for product_id, photo, reason in built.left_out:
        print(f"left out {product_id}: its photo {photo} cannot be read ({reason}) and it has no text; fix the "
              "photo or give it a title, then rerun", file=sys.stderr)
    if prior is None:
        print("no scene-category prior: scene fit is off and product sets follow the top products; give --pairs "
              "and --rooms of the training rooms", file=sys.stderr)
    else:
        print(f"scene-category prior from {prior_source}: {len(prior.scenes)} scenes, {len(prior.categories)} "
              "categories")
    return 0


def match_command(args: argparse.Namespace) -> int:
    import json

    from ..data.events import read_events

    if args.photo is None and not args.text:
        raise ValueError("nothing to match: give a room photo, --text, or both")
    if args.photo is not None and not args.photo.is_file():
        raise FileNotFoundError(f"{args.photo}: no such photo; give the path of a room photo")
    if (args.user_events is None) != (args.user is None):
        raise ValueError("a user profile needs --user-events FILE and --user ID together")
    if args.k < 1:
        raise ValueError(f"-k {args.k}; expected a positive number of products")
    if args.service and args.model:
        raise ValueError("--model works with --index; a service answers with the model it was started with")
    events = None
    if args.user_events is not None:
        events = [event for event in read_events(args.user_events) if event.user_id == args.user]
        if not events:
            raise ValueError(f"unknown user {args.user!r}: {args.user_events} holds no events of theirs")
    filter_: dict = {}
    if args.category:
        filter_["category"] = list(args.category)
    if args.min_price is not None or args.max_price is not None:
        filter_["price"] = (args.min_price, args.max_price)
    if args.service:
        from .service import ServiceClient

        rows = [{"product_id": e.product_id, "event": e.event, "timestamp": e.timestamp} for e in events or []]
        result = ServiceClient(args.service).match(args.photo, text=args.text, k=args.k, filter=filter_ or None,
                                                   events=rows or None)
        personal = events is not None
    else:
        from ..ranking.matcher import Matcher
        from ..ranking.profile import UserProfile
        from .serving import RequestRefused, read_room_photo

        try:  # the photo is read as a service reads an upload, so both answer alike
            photo = read_room_photo(args.photo.read_bytes()) if args.photo is not None else None
        except RequestRefused as refusal:
            raise ValueError(f"{args.photo}: {refusal.message}") from None
        # one photo: the folded torch tower answers sooner than an ONNX export would
        matcher = Matcher.load(args.index, model=_create_model(args.model) if args.model else None, engine="torch")
        profile = UserProfile.from_events(events, args.user, index=matcher.index) if events is not None else None
        result = matcher.match(photo, text=args.text, profile=profile, k=args.k, filter=filter_ or None)
        personal = profile is not None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return 0
    top = ", ".join(f"{scene} {p:.2f}" for scene, p in list(result.scene_probabilities.items())[:3])
    print(f"scene: {result.scene} ({top})" if result.scene_confident else
          f"scene: not sure (maybe {top})")
    print(f"products{f' for user {args.user}' if personal else ''}:")
    for rank, product in enumerate(result.products, 1):
        print(f"  {rank:>2}. {product.score:.3f}  {_describe_product(product)}")
    print("product set:")
    for product in result.product_set:
        print(f"  {product.metadata.get('category')}: {product.score:.3f}  {_describe_product(product)}")
        if product.why:
            print(f"      {product.why}")
    if not result.products:
        print("  (no product matches the filters)")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    try:
        from .service import serve
    except ImportError as err:
        raise ValueError(f"serving needs FastAPI and uvicorn ({err}): pip install 'hgm-mm[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}; expected 0-65535 (0 picks a free port)")
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-megapixels", args.max_megapixels)):
        if not value > 0:
            raise ValueError(f"{flag} {value}; expected a positive number")
    serve(args.index, host=args.host, port=args.port, device=args.device,
          model=_create_model(args.model) if args.model else None,
          max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
          ready=lambda url: print(f"Serving on {url} (API description at {url}/docs)", flush=True))
    return 0


def _describe_product(product) -> str:
    meta = product.metadata
    reasons = ", ".join(f"{term} {value:+.3f}" for term, value in product.reasons.items())
    price = f"  price {meta['price']}" if meta.get("price") not in (None, "") else ""
    return f"{meta.get('title') or product.product_id} ({meta.get('category')}){price} [{reasons}]  {meta.get('image', '')}"


def _write_document(path: Path | None, document: dict) -> None:
    import json

    if path is not None:
        path.write_text(json.dumps(document, indent=2), encoding="utf-8")
        print(f"wrote {path}")

