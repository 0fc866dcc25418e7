"""Tracked runs: which accelerate trackers a run reports to, and what it sends them.

`TrainConfig.report_to` names the trackers ("tensorboard", "wandb", "mlflow", "all" or none).
A run logs its losses and learning rates every `log_every_steps`, its validation metrics (overall,
by scene, by category) at each validation, and its resolved config once at the start. Files go
under the run folder, `OUTPUT/tracking/`, where the tracker lets the caller choose:

- tensorboard: event files in `OUTPUT/tracking/hgm_mm/`;
- wandb: `OUTPUT/tracking/wandb/` unless `WANDB_DIR` says otherwise (offline with `WANDB_MODE=offline`);
- mlflow: wherever `MLFLOW_TRACKING_URI` points (MLflow's own setting; its default is `./mlflow.db`).

Metric names are the same on every tracker: MLflow refuses "@" in a name, so `recall@10` is
logged as `val/recall_at_10`.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from .config import TRACKERS

PROJECT_NAME = "hgm_mm"  # accelerate's project name: tensorboard's subfolder, wandb's project, MLflow's experiment
TRACKING_DIR = "tracking"  # under the run folder: the trackers' local files
# the module each tracker needs, and the package that brings it
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                     "mlflow": ("mlflow", "mlflow-skinny")}
_UNSAFE_KEY = re.compile(r"[^0-9A-Za-z_\-./ ]")  # what MLflow allows in a metric name, the strictest of the three


def resolve_trackers(report_to: list[str] | None) -> list[str]:
    """The trackers to hand to `Accelerator(log_with=...)`.

    Args:
        report_to: `TrainConfig.report_to` (already a list): None means tensorboard when it is
            installed, as runs did before `report_to` existed; [] means none; ["all"] every
            tracker accelerate finds installed.

    Raises:
        ImportError: a named tracker is not installed (accelerate would drop it silently).
    """
    if report_to is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    if report_to == ["all"]:
        return ["all"]
    missing = [name for name in report_to if not _installed(name)]
    if missing:
        packages = " ".join(_TRACKER_PACKAGES[name][1] for name in missing)
        raise ImportError(f"TrainConfig.report_to={report_to!r}: {', '.join(missing)} not installed; install it "
                          f"(pip install {packages}) or leave it out of report_to")
    return list(report_to)


def tracker_init_kwargs(output: Path, run_name: str) -> dict[str, dict[str, Any]]:
    """`Accelerator.init_trackers(init_kwargs=...)`: each run named after its folder, wandb's files in it."""
    wandb: dict[str, Any] = {"name": run_name}
    if not os.environ.get("WANDB_DIR"):  # wandb's own setting wins; else the run folder, not the working directory
        wandb_dir = output / TRACKING_DIR
        wandb_dir.mkdir(parents=True, exist_ok=True)
        wandb["dir"] = str(wandb_dir)
    return {"wandb": wandb, "mlflow": {"run_name": run_name}}


def flat_config(settings: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as tracker hyper-parameters: nested mappings as dotted keys, lists as one string, None as
    "none" (tensorboard's hparams take only bool, int, float and str)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value) if value else "none"
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def metric_key(name: str) -> str:
    """A metric name every tracker takes: `recall@10` -> `recall_at_10`, other odd characters -> `_`."""
    return _UNSAFE_KEY.sub("_", name.replace("@", "_at_"))


def validation_log(result: Any) -> dict[str, float]:
    """A validation's metrics as tracker scalars: `val/<metric>`, `val/scene/<scene>/<metric>`,
    `val/category/<category>/recall_at_10`.

    Args:
        result: an `evaluation.RetrievalEvaluation`.
    """
    logged = {f"val/{metric_key(k)}": float(v) for k, v in result.metrics.items() if _is_number(v)}
    for scene, values in result.by_scene.items():
        logged.update({f"val/scene/{metric_key(scene)}/{metric_key(k)}": float(v) for k, v in values.items()
                       if _is_number(v)})
    logged.update({f"val/category/{metric_key(category)}/recall_at_10": float(v)
                   for category, v in result.recall_by_category.items() if _is_number(v)})
    return logged


def learning_rates(optimizer, scheduler) -> dict[str, float]:
    """The scheduled learning rates: `lr` of the projections and heads (as logged before `tower_lr`
    existed in the log), `tower_lr` of the unlocked tower layers when there are any."""
    rates: dict[str, float] = {}
    for group, rate in zip(optimizer.param_groups, scheduler.get_last_lr()):
        rates.setdefault("tower_lr" if group.get("name") == "towers" else "lr", float(rate))
    return rates


def _installed(tracker: str) -> bool:
    return tracker in TRACKERS and importlib.util.find_spec(_TRACKER_PACKAGES[tracker][0]) is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
