"""The `hgm-mm` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..log import LEVELS, log_to_console
from ..retrieval.milvus import MissingCollectionError
from ..version import __version__

DATA_ENV = "HGM_DATA"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one subparser per subcommand, each built by its `_add_..._command` below."""
    parser = argparse.ArgumentParser(prog="hgm-mm", description="Scene-aware furniture matching.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # every subcommand takes these: what hgm_mm logs is shown on the console at this level
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("--log-level", choices=LEVELS, default="INFO", type=str.upper,
                      help="show hgm_mm's messages of this level and above (default: %(default)s)")
    logs.add_argument("--quiet", action="store_true", help="warnings and errors only (--log-level WARNING)")
    _add_demo_command(sub, logs)
    _add_evaluate_command(sub, logs)
    _add_train_command(sub, logs)
    _add_train_scenes_command(sub, logs)
    _add_index_command(sub, logs)
    _add_match_command(sub, logs)
    _add_serve_command(sub, logs)
    _add_models_command(sub, logs)
    return parser.parse_args(argv)


def _add_demo_command(sub, logs) -> None:
    """`hgm-mm demo` and its flags."""
    demo = sub.add_parser(
        "demo", parents=[logs],
        help="train briefly on the IKEA room dataset, index its catalogue, match held-out rooms and draw a "
             "contact sheet",
        epilog="example: hgm-mm demo --data ../shared/data --output runs/demo")
    demo.add_argument("--data", type=Path, default=None,
                      help=f"dataset folder (products.jsonl, rooms.jsonl, pairs.csv) or a folder holding ikea/; "
                           f"default ${DATA_ENV}, else the public IKEA dataset, downloaded into ~/.cache/hgm_mm")
    demo.add_argument("--output", type=Path, default=None, help="folder for everything the demo writes "
                                                                "(default runs/demo)")
    demo.add_argument("--model", default="hgm-lite-en", help="starting model (see `hgm-mm models`)")
    demo.add_argument("--rooms", type=int, default=None, help="held-out rooms to match and show (default: all)")
    demo.add_argument("--train-rooms", type=int, default=24, help="rooms in the subset (training and held out)")
    demo.add_argument("--products", type=int, default=240, help="catalogue products in the subset")
    demo.add_argument("--steps", type=int, default=24, help="training steps")
    demo.add_argument("--batch-size", type=int, default=32, help="catalogue products per training step")
    demo.add_argument("-k", "--top-k", type=int, default=5, help="products shown per room")


def _add_evaluate_command(sub, logs) -> None:
    """`hgm-mm evaluate` and its flags."""
    evaluate = sub.add_parser(
        "evaluate", parents=[logs],
        help="room -> product retrieval metrics over a whole catalogue",
        epilog="example: hgm-mm evaluate --model runs/ikea/model --catalog ikea/products.jsonl --rooms "
               "ikea/rooms.jsonl --pairs ikea/pairs.csv --baselines")
    evaluate.add_argument("--model", help="model name or local-dir:PATH of a saved model (with --guide: the trained "
                                           "model folder, whose recorded training rooms are left out)")
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
    evaluate.add_argument("--report", type=Path, help="write an HTML report into this folder: sampled rooms beside "
                                                      "their top products, hits marked, the scene confusion matrix")
    evaluate.add_argument("--all-rooms", action="store_true",
                          help="also score the rooms a trained model was trained on (left out by default)")
    evaluate.add_argument("--guide", type=Path, metavar="INDEX_DIR",
                          help="measure what `hgm-mm match` returns with this index folder: scene accuracy from "
                               "photo, words and both (confusion matrix, ECE), its ranking beside similarity "
                               "alone, product-set precision and coverage; needs --rooms and --pairs")
    evaluate.add_argument("--texts", type=Path, help="with --guide: texts.jsonl phrases whose scene is measured")


def _add_train_command(sub, logs) -> None:
    """`hgm-mm train` and its flags."""
    train = sub.add_parser(
        "train", parents=[logs],
        help="fine-tune a model on a dataset folder (also under accelerate launch)",
        epilog="example: hgm-mm train --data ../shared/data/ikea --scene-data ../shared/data/places365-rooms "
               "--output runs/ikea")
    train.add_argument("--data", type=Path, required=True, help="dataset folder: products.jsonl, rooms.jsonl, pairs.csv")
    train.add_argument("--output", type=Path, default=None,
                       help="run folder: best model, checkpoint, config (default: runs/<model name>)")
    train.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig settings; the flags below win")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    train.add_argument("--scene-data", type=Path, help="images.jsonl scene set (or its folder, e.g. places365-rooms) "
                                                       "the photo scene head also learns from")
    train.add_argument("--scene-texts", type=Path, help="texts.jsonl of scene-labelled phrases the scene-text "
                                                        "classifier also learns from")
    _add_train_settings(train.add_argument_group("training settings (TrainConfig; files of trackers go to "
                                                 "OUTPUT/tracking)"))


def _add_train_scenes_command(sub, logs) -> None:
    """`hgm-mm train-scenes` and its flags."""
    scenes = sub.add_parser(
        "train-scenes", parents=[logs],
        help="train a model's scene heads alone (photo scene head by the measured recipe, scene-text "
             "classifier), calibrated",
        epilog="example: hgm-mm train-scenes --data ../shared/data/places365-rooms --model hgm-lite-en --output "
               "runs/scenes")
    scenes.add_argument("--data", type=Path, help="images.jsonl scene set or its folder (train/ and val/ folders "
                                                  "keep their split)")
    scenes.add_argument("--texts", type=Path, help="texts.jsonl of scene-labelled phrases")
    scenes.add_argument("--model", required=True, help="model name or the folder of a trained model")
    scenes.add_argument("--output", type=Path, required=True, help="folder to save the model with its scene heads")
    scenes.add_argument("--epochs", type=int, help="photo scene head epochs (default: the measured recipe's)")
    scenes.add_argument("--branch-stages", type=int, help="top image-tower stages the head tunes in its own copy "
                                                          "(default 4; 0: the linear head alone, much faster)")
    scenes.add_argument("--random-crops", type=int, help="random crops per training photo (default 2)")
    scenes.add_argument("--scene-image-size", type=int, help="side the whole photo is resized to (default 384)")
    scenes.add_argument("--seed", type=int, default=0)


def _add_index_command(sub, logs) -> None:
    """`hgm-mm index` and its flags."""
    index = sub.add_parser(
        "index", parents=[logs],
        help="embed a catalogue into a folder that `hgm-mm match` searches",
        epilog="example: hgm-mm index --model runs/ikea/model --catalog ikea/products.jsonl --output "
               "runs/catalogue")
    index.add_argument("--model", required=True, help="model name, or the folder of a trained model")
    index.add_argument("--catalog", type=Path, required=True, help="products.jsonl of the catalogue")
    index.add_argument("--output", type=Path, required=True, help="folder to write (index, model copy, prior)")
    index.add_argument("--pairs", type=Path, help="pairs.csv of training rooms: which categories belong in which "
                                                  "scene (default: the model folder's scene_categories.json)")
    index.add_argument("--rooms", type=Path, help="rooms.jsonl naming the scenes of the --pairs rooms")
    index.add_argument("--kind", default="auto", choices=["auto", "exact", "hnsw", "ivfpq"],
                       help="index kind (auto: exact up to 100k products, HNSW beyond; ivfpq: FAISS only)")
    index.add_argument("--store", default="faiss",
                       help="where the vectors live: faiss (inside --output, the default), milvus-lite:PATH.db "
                            "(Milvus Lite in a local file) or milvus://HOST:PORT (a Milvus server that replicas "
                            "share; a token comes from MILVUS_TOKEN)")
    index.add_argument("--collection", help="the Milvus collection (default hgm_catalogue)")
    index.add_argument("--batch-size", type=int, default=32, help="product photos per forward pass")


def _add_match_command(sub, logs) -> None:
    """`hgm-mm match` and its flags."""
    match = sub.add_parser(
        "match", parents=[logs],
        help="products (and a product set) for a room photo",
        epilog='example: hgm-mm match --index runs/catalogue room.jpg --text "a Nordic living room, warm light"')
    match.add_argument("photo", nargs="?", type=Path, help="the room photo")
    where = match.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", type=Path, help="folder written by `hgm-mm index`")
    where.add_argument("--service", help="URL of a running `hgm-mm serve` to ask instead (http://127.0.0.1:8080)")
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


def _add_serve_command(sub, logs) -> None:
    """`hgm-mm serve` and its flags."""
    serve = sub.add_parser(
        "serve", parents=[logs],
        help="serve an index folder as a JSON HTTP API (OpenAPI at /docs); needs pip install 'hgm-mm[serve]'",
        epilog="example: hgm-mm serve --index runs/catalogue --port 8080")
    serve.add_argument("--index", type=Path, required=True, help="folder written by `hgm-mm index`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: 8080)")
    serve.add_argument("--max-upload-mb", type=float, default=16.0, help="largest photo in MiB (default: 16)")
    serve.add_argument("--max-megapixels", type=float, default=25.0, help="largest photo in megapixels (default: 25)")
    serve.add_argument("--device", help="torch device for the model (default: a GPU when there is one)")
    serve.add_argument("--model", help="query with this model instead of the index folder's copy "
                                       "(refused unless it built the index)")


def _add_models_command(sub, logs) -> None:
    """`hgm-mm models` and its flags."""
    sub.add_parser(
        "models", parents=[logs],
        help="list the built-in models",
        epilog="example: hgm-mm models")


def _add_train_settings(group) -> None:
    """One flag per `TrainConfig` setting (`--max-steps` for max_steps), with its meaning and default;
    a flag left out keeps the --config file's value, else the default."""
    import dataclasses
    import typing

    from ..training.config import TrainConfig, setting_help

    meaning, types = setting_help(), typing.get_type_hints(TrainConfig)
    for setting in dataclasses.fields(TrainConfig):
        flag = "--" + setting.name.replace("_", "-")
        default = setting.default if setting.default is not dataclasses.MISSING else setting.default_factory()
        text = f"{meaning.get(setting.name, '')} (default: {default})".strip().replace("%", "%%")
        kinds = {t for t in typing.get_args(types[setting.name]) or (types[setting.name],) if t is not type(None)}
        if kinds == {bool}:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif any(typing.get_origin(t) is list for t in kinds):
            group.add_argument(flag, nargs="+", metavar=setting.name.upper(), default=None, help=text)
        else:
            (kind,) = kinds - {str} or kinds  # int | None -> int; str | ... -> str
            group.add_argument(flag, type=kind, default=None, metavar=setting.name.upper(), help=text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_console("WARNING" if args.quiet else args.log_level)
    try:
        if args.command == "models":
            return _models()
        if args.command == "demo":
            return _demo(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "train":
            return _train(args)
        if args.command == "train-scenes":
            return _train_scenes(args)
        if args.command == "index":
            return _index(args)
        if args.command == "match":
            return _match(args)
        if args.command == "serve":
            return _serve(args)
    except (ValueError, FileNotFoundError, ConnectionError, MissingCollectionError, ImportError) as err:
        print(f"hgm-mm {args.command}: {err}", file=sys.stderr)  # input errors: one clear line, no traceback
        return 2
    return 1


def _models() -> int:
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


def _demo(args: argparse.Namespace) -> int:
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


def _train(args: argparse.Namespace) -> int:
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


def _train_scenes(args: argparse.Namespace) -> int:
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


def _evaluate(args: argparse.Namespace) -> int:
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


def _index(args: argparse.Namespace) -> int:
    from ..data import read_pairs, read_products, read_rooms
    from ..ranking.matcher import SCENE_CATEGORIES_FILE, SceneCategoryPrior, build_catalog_index, check_output_dir
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


def _match(args: argparse.Namespace) -> int:
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


def _serve(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())
