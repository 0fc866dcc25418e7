"""The `hgm-mm` command line: its subcommands, flags, help and examples; `commands.py` runs them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.ikea_repo import DATA_ENV
from ..log import LEVELS, log_to_console
from ..retrieval.milvus import MissingCollectionError
from ..version import __version__
from . import commands

COMMANDS = {  # subcommand -> what runs it (apps/commands.py)
    "demo": commands.demo_command,
    "evaluate": commands.evaluate_command,
    "train": commands.train_command,
    "train-scenes": commands.train_scenes_command,
    "index": commands.index_command,
    "match": commands.match_command,
    "serve": commands.serve_command,
    "models": commands.models_command,
}


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
    """Runs `hgm-mm` with `argv` (default: the process's arguments); the exit status, 2 for bad input."""
    args = parse_args(argv)
    log_to_console("WARNING" if args.quiet else args.log_level)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ConnectionError, MissingCollectionError, ImportError) as err:
        print(f"hgm-mm {args.command}: {err}", file=sys.stderr)  # input errors: one clear line, no traceback
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
