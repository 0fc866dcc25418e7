"""A training run's checkpoint: the whole state written at once and swapped in, restored on resume.

    checkpoint/
      model.safetensors    every weight of the model being trained
      optimizer.pt         the optimiser state (read back with weights_only)
      ema.safetensors      the moving average of the weights (ema_decay > 0)
      scheduler.json       the learning-rate schedule's state
      trainer_state.json   `TrainerState` and the run's config (a resumed run must match it)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_dir, atomic_json
from ..models.pretrained import load_torch_file
from .config import TrainConfig

EMA_FILE = "ema.safetensors"  # the checkpoint's moving average of the weights (ema_decay > 0)


@dataclass
class TrainerState:
    """Where a run stands: saved in every checkpoint, restored on resume."""


    step: int = 0
    best_metrics: dict = field(default_factory=dict)
    best_step: int = -1
    evals_without_gain: int = 0
    history: list = field(default_factory=list)
    skipped_images: int = 0
    skipped_batches: int = 0
    seconds: float = 0.0  # wall time of the run so far, over resumes


class WeightAverage:
    """Exponential moving average of a model's trained parameters and floating buffers (BatchNorm statistics).

    After optimiser step t (0-based) the average moves towards the weights with decay
    min(decay, (1 + t) / (10 + t)), so early on it follows the weights closely instead of
    remembering the starting point. Validation and the saved model use the average
    (`applied`); training continues on the raw weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay!r}; expected a value in (0, 1)")
        self.decay = decay
        state = model.state_dict()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        names += [n for n, b in model.named_buffers() if b.is_floating_point()]
        self.shadow = {n: state[n].detach().clone() for n in dict.fromkeys(names) if n in state}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        state = model.state_dict()
        for name, average in self.shadow.items():
            value = state[name].detach()
            if average.device != value.device:  # the model moved (accelerate's prepare): follow it once
                average = self.shadow[name] = average.to(value.device)
            average.lerp_(value.to(average.dtype), weight)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {missing[:5]}")
        for name, average in self.shadow.items():
            average.copy_(tensors[name])

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the averaged weights inside the block and its own weights again after it."""
        state = model.state_dict()
        own = {name: state[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, average in self.shadow.items():
                state[name].copy_(average)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in own.items():
                    state[name].copy_(value)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainerState, config: TrainConfig,
                     average: WeightAverage | None = None) -> None:
    """Writes the whole training state into a fresh folder, then swaps it in: a kill never leaves half."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if average is not None:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in average.shadow.items()},
                      str(tmp / EMA_FILE))
        atomic_json(tmp / "scheduler.json", scheduler.state_dict())
        atomic_json(tmp / "trainer_state.json", {**state.__dict__, "config": config.to_dict()})

    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(folder, write)


def load_checkpoint(folder: Path, model, optimizer, scheduler, config: TrainConfig,
                     average: WeightAverage | None = None) -> TrainerState:
    """Restores a checkpoint `save_checkpoint` wrote into the model, optimiser, schedule and average;
    refuses one made with settings that change the weights."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    saved_config = saved.pop("config")
    # settings that change what is logged or when the run ends, not the weights; report_to is also absent from
    # checkpoints made before it existed
    resumable = ("epochs", "max_steps", "patience", "num_workers", "log_every_steps", "checkpoint_every_steps",
                 "report_to")
    differing = sorted(k for k, v in config.to_dict().items() if k not in resumable and saved_config.get(k) != v)
    if differing:
        raise ValueError(f"{folder}: the checkpoint was made with other settings ({differing}); resume with the "
                         "same settings, or start a new run in another output folder (or pass resume=False)")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    optimizer.load_state_dict(load_torch_file(folder / "optimizer.pt", fix="delete the checkpoint folder to start the "
                                              "run afresh, or restore the file from the run that wrote it"))
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    if average is not None:
        average.load(load_file(str(folder / EMA_FILE)))
    return TrainerState(**saved)
