"""Quality on the IKEA development rooms: the default training recipe against its baselines, same split.

    python benchmarks/bench_quality.py [--data ../shared/data] [--model hgm-lite-en] [--max-steps N] \
        [--output benchmarks/results]

Trains `hgm_mm.TrainConfig()` (the measured recipe, seed 0; rooms split by room with
`split_rooms(val_fraction=0.2, seed=0)`) on the IKEA rooms in a temporary run folder, then
measures the baselines on the same validation rooms with the same training pairs: random
(expected value), popularity and scene popularity (counts of the training pairs) and the
starting model's frozen features. The reference is the best baseline by Recall@10; ratios are
the trained model's figures over that baseline's. The trained model is the run's best
validation evaluation (the one `train` saves), so it is selected on these rooms.

Writes `quality.json` and `quality.png` (validation Recall@10 and NDCG@10 against training
time, baselines as horizontal lines) into --output, and the benchmark's line in
benchmarks/RESULTS.md when --output is the default folder. `--model hgm-tiny --max-steps 2
--output /tmp/quality` checks the script end to end in a few minutes without touching the
recorded results. `--run DIR` reads a finished run of the default recipe instead of training
again (e.g. the folder of `hgm-mm train --data ../shared/data/ikea --model hgm-lite-en`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine, machine_summary, today, update_results_md  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_MODEL = "hgm-lite-en"
CURVES = (("recall@10", "Recall@10"), ("ndcg@10", "NDCG@10"))  # plotted metrics: history key, axis label
TABLE_COLUMNS = ("recall@10", "recall@50", "ndcg@10", "map", "hit_rate@10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help=f"IKEA dataset folder, or a data root holding ikea/ "
                             f"(default: $HGM_DATA, else {DEFAULT_DATA})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="starting model of the recipe (and the frozen baseline)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps (default: "
                                                                    "the recipe's epochs)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR,
                        help="folder for quality.json and quality.png; RESULTS.md is updated only for the default")
    parser.add_argument("--run", type=Path, default=None,
                        help="a finished run folder (history.json, model/) to report instead of training again")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import hgm_mm
    from hgm_mm.apps.commands import find_dataset
    from hgm_mm.data import load_dataset, read_pairs
    from hgm_mm.data.split import split_rooms
    from hgm_mm.evaluation import baseline_evaluations

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        data = find_dataset(args.data if args.data is not None
                            else Path(os.environ["HGM_DATA"]) if os.environ.get("HGM_DATA") else DEFAULT_DATA)
        if args.run is not None:
            config = hgm_mm.TrainConfig.from_file(args.run / "train_config.json")
        else:
            config = hgm_mm.TrainConfig.from_dict(
                {"model": args.model, **({"max_steps": args.max_steps} if args.max_steps is not None else {})},
                origin="command line")
    except (FileNotFoundError, ValueError) as err:
        print(f"bench_quality: {err}", file=sys.stderr)
        return 2
    machine = {**describe_machine(), "load_average_at_start": os.getloadavg()}
    dataset = load_dataset(data)

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as run:
        trained = finished_run(args.run) if args.run is not None else \
            hgm_mm.train(config, data=data, output=run, resume=False)
        history = check_history(trained.history)
        val_ids = (Path(trained.model_dir) / "val_rooms.txt").read_text(encoding="utf-8").split()
        product_ids = {p.product_id for p in dataset.products}
        train_pairs = read_pairs(Path(trained.model_dir) / "train_pairs.csv",
                                 room_ids={r.room_id for r in dataset.rooms}, product_ids=product_ids)
    _, split_val = split_rooms(dataset.rooms, val_fraction=config.val_fraction, seed=config.seed)
    if sorted(val_ids) != sorted(r.room_id for r in split_val):
        raise SystemExit("bench_quality: the run's validation rooms differ from split_rooms(val_fraction="
                         f"{config.val_fraction}, seed={config.seed}); the baselines would not share its split")
    val_rooms = [r for r in dataset.rooms if r.room_id in set(val_ids)]
    train_rooms = [r for r in dataset.rooms if r.room_id not in set(val_ids)]

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hgm_mm.RandomInitWarning)
        frozen = hgm_mm.create_model(config.model)
    baselines = baseline_evaluations(dataset.products, val_rooms, dataset.pairs, train_pairs=train_pairs,
                                     train_rooms=train_rooms, frozen_model=frozen)
    baseline_seconds = time.perf_counter() - started

    best_name = max(baselines, key=lambda name: baselines[name]["recall@10"])
    reference = baselines[best_name]
    model_metrics = trained.best_metrics
    ratios = {metric: model_metrics[metric] / reference[metric] if reference[metric] > 0 else None
              for metric in TABLE_COLUMNS}
    positives = dataset.positives()
    n_evaluated = sum(1 for room in val_rooms if positives.get(room.room_id))
    result = {
        "benchmark": "quality", "data": str(data), "model": config.model, "train_config": config.to_dict(),
        "split": {"val_fraction": config.val_fraction, "seed": config.seed, "train_rooms": len(train_rooms),
                  "val_rooms": len(val_rooms), "val_rooms_with_products": n_evaluated,
                  "catalogue": len(dataset.products)},
        "trained": {"metrics": model_metrics, "best_step": trained.best_step, "steps": trained.steps,
                    "wall_seconds": trained.wall_seconds, "selected_on": "validation Recall@10 (these rooms)",
                    "history": history},
        "baselines": baselines, "baseline_seconds": baseline_seconds,
        "reference": best_name, "ratios_to_reference": ratios, "machine": machine, "date": today(),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "quality.json", result)
    plot(args.output / "quality.png", history, baselines, config.model, machine_summary(machine))

    label = "default recipe" if args.max_steps is None else f"recipe, {args.max_steps} steps"
    line = (f"| quality, IKEA dev rooms ({config.model}, {label}; {n_evaluated} validation rooms, "
            f"{len(dataset.products):,} products) | Recall@10 {model_metrics['recall@10']:.4f}, "
            f"NDCG@10 {model_metrics['ndcg@10']:.4f} (step {trained.best_step}, "
            f"{trained.wall_seconds / 60:.1f} min training) | best baseline {best_name}: Recall@10 "
            f"{reference['recall@10']:.4f}, NDCG@10 {reference['ndcg@10']:.4f} | "
            f"{_ratio(ratios['recall@10'])} Recall@10, {_ratio(ratios['ndcg@10'])} NDCG@10 |")
    if args.output.resolve() == RESULTS_DIR.resolve():
        key = "quality" if config.model == DEFAULT_MODEL and args.max_steps is None \
            else f"quality_{config.model}_{args.max_steps or 'recipe'}"
        update_results_md(key, line, machine)
    print(table(model_metrics, baselines, config.model))
    print(line)
    print(f"wrote {args.output / 'quality.json'} and {args.output / 'quality.png'}")
    return 0


def finished_run(folder: Path):
    """What `hgm_mm.train` returned for a run folder it finished (its history.json)."""
    import json
    from types import SimpleNamespace

    path = folder / "history.json"
    if not path.is_file():
        raise SystemExit(f"bench_quality: {path} is missing; --run takes the folder of a finished training run")
    recorded = json.loads(path.read_text(encoding="utf-8"))
    return SimpleNamespace(model_dir=folder / "model", **recorded)


def check_history(history: list[dict]) -> list[dict]:
    """The validation evaluations of the run; each must carry its wall time to be plotted."""
    if not history:
        raise SystemExit("bench_quality: the run recorded no validation evaluation; nothing to report")
    missing = [entry.get("step") for entry in history if "seconds" not in entry]
    if missing:
        raise SystemExit(f"bench_quality: validation evaluations at steps {missing} carry no 'seconds' (wall time "
                         "since training started); this hgm_mm does not record it, so quality against training "
                         "time cannot be plotted. Update hgm_mm (TrainResult.history)")
    return [dict(entry) for entry in history]


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def table(model_metrics: dict, baselines: dict, model: str) -> str:
    rows = [f"| model | {' | '.join(TABLE_COLUMNS)} |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, values in {f"{model} (trained)": model_metrics, **baselines}.items():
        rows.append(f"| {name} | " + " | ".join(f"{values.get(c, float('nan')):.4f}" for c in TABLE_COLUMNS) + " |")
    return "\n".join(rows)


def write_json(path: Path, document: dict) -> None:
    import json

    from hgm_mm.files import atomic_text

    atomic_text(path, json.dumps(document, indent=2) + "\n")


def plot(path: Path, history: list[dict], baselines: dict, model: str, machine: str) -> None:
    """Validation Recall@10 and NDCG@10 against training minutes; baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    from hgm_mm.files import atomic_write

    minutes = [entry["seconds"] / 60 for entry in history]
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    figure, axes = plt.subplots(1, len(CURVES), figsize=(11, 4.2), constrained_layout=True)
    for axis, (key, label) in zip(axes, CURVES):
        axis.plot(minutes, [entry[key] for entry in history], marker="o", color="C0", label=f"{model}, trained")
        for n, (name, values) in enumerate(baselines.items()):
            axis.axhline(values[key], color=f"C{n + 1}", linestyle=styles[n % len(styles)], label=name)
        axis.set_xlabel("training time (minutes, wall clock)")
        axis.set_ylabel(f"validation {label}")
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle(f"IKEA development rooms: {model} recipe vs baselines\n{machine}", fontsize="medium")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
