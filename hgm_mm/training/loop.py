"""The training loop: one loop under accelerate, from a notebook, the CLI or `accelerate launch`."""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import load_dataset
from ..evaluation.evaluate import TRAIN_PAIRS_FILE, TRAIN_ROOM_SCENES_FILE
from ..files import atomic_json, atomic_text
from ..data.split import split_rooms
from ..data.text import product_text, room_text
from ..losses.grad_cache import grad_cache_step
from ..losses.contrastive import pad_positive_ids
from ..models.model_card import TrainingRecord
from ..models.pretrained import RandomInitWarning
from ..ranking.prior import SCENE_CATEGORIES_FILE, SceneCategoryPrior
from .batches import StepPlan, StepPhotos
from .checkpoint import TrainerState, WeightAverage, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .lora import add_lora, merged_copy
from .objective import RetrievalObjective, StepOutputs, rooms_packed
from .feature_cache import FeatureCache, build_feature_cache, cacheable_image_stage, evaluate_cached
from .guide_heads import SCENE_REPORT_FILE, read_scene_data, train_guide_heads
from .freezing import keep_frozen_norms_eval, lock_image_tower, lock_text_tower, wise_ft
from .optim import trainable_parameter_groups, warmup_cosine
from .tracking import (PROJECT_NAME, TRACKING_DIR, flat_config, learning_rates, resolve_trackers, tracker_init_kwargs,
                       validation_log)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
BEST_MODEL_DIR = "model"
HISTORY_FILE = "history.json"  # the finished run: every validation evaluation, best step, wall time
MAX_CACHE_BYTES = 8 << 30  # larger feature caches are not built: the run recomputes the locked layers
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: temperature never below 0.01


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; nothing of that step was applied or saved."""




@dataclass
class TrainResult:
    """What a run produced."""

    model_dir: Path  # the best model, in the save format
    best_metrics: dict[str, float]  # validation metrics of the best model
    best_step: int
    steps: int  # optimiser steps taken
    wall_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    skipped_images: int = 0
    skipped_batches: int = 0
    main_process: bool = True  # False on the other processes of a multi-process run: the main one reports


def train(config: TrainConfig | None = None, *, data: str | os.PathLike, output: str | os.PathLike,
          resume: bool = True, progress: bool = True, scene_data: str | os.PathLike | None = None,
          scene_texts: str | os.PathLike | None = None) -> TrainResult:
    """Fine-tunes a model on a dataset folder and keeps the best one by validation Recall@10; then
    trains the scene heads the guide reads (`config.scene_heads`, `guide_heads.train_guide_heads`).

    Args:
        config: the run's settings (defaults: the measured recipe).
        data: a dataset folder with products.jsonl, rooms.jsonl and pairs.csv.
        scene_data: an `images.jsonl` scene set (or its folder) the photo scene head also learns from.
        scene_texts: a `texts.jsonl` of scene-labelled phrases the scene-text classifier also learns from.
        output: the run folder: `model/` (best model, save format, with metrics and the training
            pairs beside it, and its model card `README.md`), `checkpoint/` (the last state, for
            resuming), `train_config.json`, and `tracking/` (the trackers of `config.report_to`).
        resume: continue from `output/checkpoint` when it exists (the same config is required).
        progress: show progress bars.

    The loop stays in this one function so that a step's order (inputs, losses, update, logging,
    validation, checkpoint) reads top to bottom in one place; each part is a helper below.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config or TrainConfig()
    output = Path(output)
    started = time.perf_counter()
    # the trackers' local files (tensorboard's events, wandb's offline runs) go under the run folder
    accelerator = Accelerator(mixed_precision=config.precision, log_with=resolve_trackers(config.report_to),
                              project_dir=str(output / TRACKING_DIR))
    set_seed(config.seed)
    main = accelerator.is_main_process
    say = logger.info if main else _silent  # the run's lines come from the main process alone
    rank, world = accelerator.process_index, accelerator.num_processes

    run = _read_run_data(config, data)
    dataset, train_rooms, val_rooms, train_pairs = run.dataset, run.train_rooms, run.val_rooms, run.train_pairs
    model = _starting_model(config, main, say)
    extra_scenes = read_scene_data(scene_data, scene_texts, labels=model.scene_labels) \
        if config.scene_heads else None  # read and checked before the long work
    scene_index = {label: i for i, label in enumerate(model.scene_labels)}
    room_labels = torch.tensor([scene_index.get(r.scene, -100) for r in train_rooms])
    frozen_norms = lock_image_tower(model.image_tower, config.unlocked_image_groups,
                                    freeze_norm_stats=config.freeze_norm_stats)
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                   if k.startswith(("image_tower.", "text_tower.", "scene_text_tower."))} \
        if config.wise_alpha < 1.0 else {}
    locked_towers = [tower for tower in (model.image_tower, model.text_tower, model.scene_text_tower)
                     if tower is not None and not any(p.requires_grad for p in tower.parameters())]

    say(f"training {config.model} on {len(train_rooms)} rooms and {len(dataset.products)} products "
        f"({len(val_rooms)} validation rooms); processes: {world}; run folder: {output}")
    plan = StepPlan(len(dataset.products), run.room_positives, batch_size=config.batch_size,
                    rooms_per_batch=config.rooms_per_batch, positives_per_room=config.positives_per_room,
                    room_text_probability=config.room_text_probability, seed=config.seed)
    schedule_steps = plan.steps_per_epoch * config.epochs
    last_step = min(schedule_steps, config.max_steps) if config.max_steps else schedule_steps

    optimizer, scheduler = _optimiser(model, config, schedule_steps)
    state = TrainerState()
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    checkpoint = output / CHECKPOINT_DIR
    if resume and (checkpoint / "trainer_state.json").is_file():
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, config, average)
        say(f"resuming from {checkpoint} at step {state.step}")
    elif main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_json(output / "train_config.json", config.to_dict())
    steps = range(state.step, last_step)
    # the cache holds what this process's steps and the validation read: a short run caches a short run's rooms
    drawn_rooms = plan.rooms_drawn(steps, rank, world)
    cache = _feature_cache(model, config, dataset.products, [train_rooms[i] for i in drawn_rooms] + val_rooms,
                           main and progress, say)
    if cache is not None:
        state.skipped_images += len(cache.skipped)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    _start_trackers(accelerator, config, output)

    objective = RetrievalObjective.from_config(config, unwrapped, rank=rank, world_size=world)
    loader = _step_batches(config, run, plan, steps, cache, drawn_rooms, unwrapped, rank, world)
    image_stage = cache.image_stage if cache is not None else 0
    seconds_before = state.seconds

    from tqdm.auto import tqdm

    bar = tqdm(total=last_step, initial=state.step, desc="training", unit="step", disable=not (progress and main))
    window_samples, window_start = 0, time.perf_counter()
    for batch in loader:
        step = batch["step"]
        model.train()
        keep_frozen_norms_eval(frozen_norms)
        for tower in locked_towers:  # a fully locked tower computes as pretrained: no dropout
            tower.eval()
        torch.manual_seed(config.seed * 1_000_003 + step * 101 + rank)  # dropout: a function of the step
        state.skipped_images += len(batch["skipped"])
        inputs = _step_inputs(batch, unwrapped, train_rooms, dataset.products, run.room_positives, room_labels,
                              accelerator.device, cache)
        with accelerator.autocast(), unwrapped.image_inputs_from_stage(image_stage):
            if config.grad_cache_chunk:
                losses = _grad_cache_losses(unwrapped, inputs, objective, config.grad_cache_chunk, world)
            else:
                losses = _losses(model, inputs, objective)
        if not _apply_update(accelerator, unwrapped, optimizer, losses, config, average, step,
                             lambda: _describe_batch(batch, train_rooms, dataset.products), say):
            state.skipped_batches += 1
        scheduler.step()
        state.step = step + 1
        window_samples += (len(inputs["products"]) + len(inputs["rooms"])) * world
        bar.update(1)
        if state.step % config.log_every_steps == 0 or state.step == last_step:
            rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
            logged = {**_floats(losses), "samples_per_s": rate, **learning_rates(optimizer, scheduler)}
            bar.set_postfix(loss=f"{logged['loss']:.3f}", samples_s=f"{rate:.1f}")
            accelerator.log(logged, step=state.step)
            window_samples, window_start = 0, time.perf_counter()

        epoch_done = state.step % plan.steps_per_epoch == 0
        if (epoch_done and (state.step // plan.steps_per_epoch) % config.eval_every_epochs == 0) \
                or state.step == last_step:
            state.seconds = seconds_before + time.perf_counter() - started
            with average.applied(unwrapped) if average is not None else nullcontext():
                stop = _evaluate_and_keep_best(unwrapped, state, dataset, train_rooms, val_rooms, train_pairs,
                                               run.scene_categories, output, config, start_state, main, progress,
                                               cache, first_val_row=len(drawn_rooms), log=accelerator.log,
                                               data_summary=run.data_summary)
            if stop and state.step < last_step:
                say(f"stopping early at step {state.step}: no Recall@10 gain in {config.patience} evaluations")
                last_step = state.step
        if main and (state.step % config.checkpoint_every_steps == 0 or epoch_done or state.step == last_step):
            save_checkpoint(checkpoint, unwrapped, optimizer, scheduler, state, config, average)
        accelerator.wait_for_everyone()
        if state.step >= last_step:
            break
    bar.close()
    accelerator.end_training()
    if state.skipped_images:
        say(f"{state.skipped_images} unreadable photos were skipped")
    if config.scene_heads and main and (output / BEST_MODEL_DIR / "hgm_config.json").is_file():
        # after end_training (which closes the process group): the main process alone, the others are done
        _train_scene_heads(output / BEST_MODEL_DIR, train_rooms, val_rooms, extra_scenes, config, progress,
                           say, run.data_summary)
    result = TrainResult(model_dir=output / BEST_MODEL_DIR, best_metrics=state.best_metrics, best_step=state.best_step,
                         steps=state.step, wall_seconds=seconds_before + time.perf_counter() - started,
                         history=state.history, skipped_images=state.skipped_images,
                         skipped_batches=state.skipped_batches, main_process=main)
    if main:
        atomic_json(output / HISTORY_FILE, {k: v for k, v in result.__dict__.items() if k != "model_dir"})
    return result


@dataclass
class _RunData:
    """The dataset of a run, split, with what the steps and the saved model read of it."""

    dataset: Any
    train_rooms: list  # rooms with products, outside the validation split
    val_rooms: list
    room_positives: list[list[int]]  # catalogue rows of each training room's products
    train_pairs: list[tuple[str, str]]
    scene_categories: dict[str, dict[str, int]]  # the training pairs' categories per scene
    data_summary: dict[str, Any]  # for the model card


def _read_run_data(config: TrainConfig, data) -> _RunData:
    dataset = load_dataset(data)
    if not dataset.products or not dataset.rooms or not dataset.pairs:
        raise ValueError(f"{data}: training needs products.jsonl, rooms.jsonl and pairs.csv")
    train_rooms, val_rooms = split_rooms(dataset.rooms, val_fraction=config.val_fraction, seed=config.seed)
    product_index = {p.product_id: i for i, p in enumerate(dataset.products)}
    positives = dataset.positives()
    train_rooms = [r for r in train_rooms if positives.get(r.room_id)]
    train_room_ids = {r.room_id for r in train_rooms}
    train_pairs = [(r, p) for r, p in dataset.pairs if r in train_room_ids]
    # for the model card: the dataset by its folder's name (a local path means nothing on the hub)
    summary = {"name": Path(dataset.root).name, "products": len(dataset.products), "train_rooms": len(train_rooms),
               "train_pairs": len(train_pairs), "val_rooms": len(val_rooms)}
    return _RunData(dataset, train_rooms, val_rooms,
                    room_positives=[[product_index[pid] for pid in positives[r.room_id]] for r in train_rooms],
                    train_pairs=train_pairs,
                    scene_categories=SceneCategoryPrior.count_pairs(train_rooms, dataset.products, train_pairs),
                    data_summary=summary)


def _starting_model(config: TrainConfig, main: bool, say):
    """The model the run starts from, with what it trains unlocked (the image tower's top groups,
    locked by the caller, which keeps its BatchNorms), LoRA and the fixed temperature applied."""
    from ..models.factory import create_model

    with warnings.catch_warnings():
        if not main:  # one warning per run, not one per process
            warnings.simplefilter("ignore", RandomInitWarning)
        model = create_model(config.model, room_views=config.room_views, room_map_size=config.room_map_size)
    lock_text_tower(model.text_tower, config.unlocked_text_layers)
    for head in (model.scene_text_classifier, model.photo_scene_head, model.photo_scene_branch):
        if head is not None:  # the guide's scene heads train after retrieval (guide_heads.py), not in its loss
            head.requires_grad_(False)
    if model.scene_text_tower is not None:
        lock_text_tower(model.scene_text_tower, config.unlocked_text_layers)
    if config.lora_rank:
        adapted = add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
        say(f"LoRA rank {config.lora_rank} on {adapted} linear layers")
    if config.temperature:  # a fixed contrastive temperature: the logit scale is set and locked
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / config.temperature))
        model.logit_scale.requires_grad_(False)
    if config.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _optimiser(model, config: TrainConfig, schedule_steps: int):
    """AdamW over the trainable parameters (`trainable_parameter_groups`) and its warm-up, cosine schedule."""
    optimizer = torch.optim.AdamW(trainable_parameter_groups(model, lr=config.lr, tower_lr=config.tower_lr,
                                                             weight_decay=config.weight_decay))
    return optimizer, warmup_cosine(optimizer, schedule_steps, config.warmup_steps)


def _start_trackers(accelerator, config: TrainConfig, output: Path) -> None:
    """Starts the trackers of `config.report_to` with the resolved config (their files under `output`)."""
    if accelerator.log_with:
        resolved = {**config.to_dict(), "report_to": [str(t) for t in accelerator.log_with]}
        accelerator.init_trackers(PROJECT_NAME, config=flat_config(resolved),
                                  init_kwargs=tracker_init_kwargs(output, run_name=output.resolve().name))


def _step_batches(config: TrainConfig, run: _RunData, plan: StepPlan, steps: range, cache: FeatureCache | None,
                  drawn_rooms: list[int], model, rank: int, world: int):
    """This process's share of each step's batch: cached locked-layer outputs, or photos decoded by workers."""
    if cache is not None:
        return _cached_batches(plan, steps, cache, {room: row for row, room in enumerate(drawn_rooms)}, rank, world)
    return torch.utils.data.DataLoader(
        StepPhotos(plan, run.train_rooms, run.dataset.products, model.image_transform, model.room_views,
                   steps=steps, rank=rank, world_size=world, image_errors=config.image_errors),
        batch_size=None, num_workers=config.num_workers, persistent_workers=False)


def _apply_update(accelerator, model, optimizer, losses: dict[str, torch.Tensor], config: TrainConfig, average,
                  step: int, describe, say) -> bool:
    """Backward (unless GradCache left the gradients), clipping, the optimiser step and the moving
    average; a non-finite loss stops the run, or with `skip_nonfinite` skips the batch. Returns
    whether the step was applied."""
    if not all(torch.isfinite(v).all() for v in losses.values()):
        if not config.skip_nonfinite:
            raise NonFiniteLossError(f"step {step}: non-finite loss {_floats(losses)} on {describe()}; "
                                     "lower the learning rate, use precision 'no', or set skip_nonfinite")
        say(f"step {step}: non-finite loss, batch skipped ({describe()})")
        optimizer.zero_grad(set_to_none=True)
        return False
    if not config.grad_cache_chunk:
        accelerator.backward(losses["loss"])
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    if average is not None:
        average.update(model, step)
    return True


def _train_scene_heads(folder: Path, train_rooms, val_rooms, extra_scenes, config: TrainConfig, progress: bool,
                       say, data_summary: dict | None = None) -> None:
    """Trains the best model's scene heads and saves it in place, with what they measured (in its card too)."""
    from ..models.hgm import load_model

    started = time.perf_counter()
    model = load_model(folder)
    report = train_guide_heads(model, train_rooms, val_rooms, extra_scenes, seed=config.seed,
                               num_workers=config.num_workers, progress=progress,
                               scene_image_size=config.scene_image_size, epochs=config.scene_epochs)
    saved = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))  # the retrieval weights' validation
    model.save_pretrained(folder, training=TrainingRecord(config=config.to_dict(), data=data_summary or {},
                                                          step=saved.get("step"), validation=saved.get("validation"),
                                                          scene_heads=report))
    report["seconds"] = time.perf_counter() - started
    atomic_json(folder / SCENE_REPORT_FILE, report)
    photo, text = report.get("photo", {}), report.get("text", {})
    if photo:
        calibration = photo.get("calibration", {})
        say(f"photo scene head: {photo['n_train']} photos; validation accuracy {photo['val_accuracy']:.4f} on "
            f"{photo['n_val']} photos, ECE {calibration.get('val_ece', float('nan')):.3f} at temperature "
            f"{calibration.get('temperature', float('nan')):.2f}")
    if "photo_scene_set_val" in report:
        scene_set = report["photo_scene_set_val"]
        say(f"photo scene head on the scene set's {scene_set['n_images']} validation photos: accuracy "
            f"{scene_set['accuracy']:.4f}, ECE {scene_set['ece']:.3f}")
    if text:
        say(f"scene-text classifier: {text['n_train']} texts; validation captions accuracy "
            f"{text['start_val_accuracy'] or float('nan'):.4f} untrained -> {text['val_accuracy'] or float('nan'):.4f}")
    say(f"scene heads trained in {report['seconds'] / 60:.1f} min; saved to {folder}")


# -- feature cache --------------------------------------------------------------------------------
def _feature_cache(model, config, products, rooms, progress, say) -> FeatureCache | None:
    """The locked layers' outputs for the given products and rooms, when that pays and fits."""
    stage = cacheable_image_stage(model, freeze_norm_stats=config.freeze_norm_stats) \
        if config.cache_frozen_features else 0
    if not stage:
        return None
    model.eval()

    def floats(side: int) -> int:  # one photo's cached activation
        return model.image_tower.prefix_features(torch.zeros(1, 3, side, side, device=model.device), stage).numel()

    n_photos = len(products) + len(rooms) * model.room_views.n_passes
    estimate = 4 * (floats(model.config.image_tower.image_size) * len(products)
                    + floats(model.room_views.size) * len(rooms) * model.room_views.n_passes)
    if estimate > MAX_CACHE_BYTES:
        say(f"not caching the locked image layers: {estimate / 2**30:.1f} GiB for {n_photos} photos")
        return None
    say(f"caching the locked layers' outputs for {len(products)} product photos and {len(rooms)} rooms "
        f"x {model.room_views.n_passes} tower inputs ({n_photos} photos, each once)")
    started = time.perf_counter()
    cache = build_feature_cache(model, products, rooms, image_stage=stage, num_workers=config.num_workers,
                                image_errors=config.image_errors, progress=progress)
    say(f"cached the locked layers' outputs for {len(products)} products and {len(rooms)} rooms "
        f"({cache.nbytes / 2**20:.0f} MiB, {time.perf_counter() - started:.0f} s)")
    return cache


def _cached_batches(plan: StepPlan, steps: range, cache: FeatureCache, room_rows: dict[int, int], rank: int,
                    world: int):
    """StepPhotos' batches, with cached features in place of pixels (`room_rows`: training room -> cache row)."""
    for step in steps:
        batch = plan.batch(step)
        rooms = batch.room_indices[rank::world]
        reads_text = batch.room_reads_text[rank::world]
        keep = [k for k, r in enumerate(rooms) if cache.room_readable[room_rows[r]]]
        rooms, reads_text = [rooms[k] for k in keep], [reads_text[k] for k in keep]
        products = [p for p in batch.product_indices[rank::world] if cache.product_readable[p]]
        yield {"step": step, "rooms": rooms, "room_reads_text": reads_text,
               "room_cache_rows": [room_rows[r] for r in rooms],
               "room_pixels": cache.room_views[[room_rows[r] for r in rooms]] if rooms else None,
               "products": products, "product_pixels": cache.product_images[products] if products else None,
               "skipped": []}


# -- one step ------------------------------------------------------------------------------------
def _step_inputs(batch, model, rooms, products, room_positives, room_labels, device,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
    room_idx, product_idx = batch["rooms"], batch["products"]
    room_captions = [room_text(rooms[r]) if reads else None for r, reads in zip(room_idx, batch["room_reads_text"])]
    present = torch.tensor([bool(c) for c in room_captions], dtype=torch.bool)
    if cache is not None and room_idx:
        tokens = cache.text_inputs(cache.scene_text, batch["room_cache_rows"], model.scene_tokenizer,
                                   [c or "" for c in room_captions])
    else:
        tokens = model.scene_tokenizer([c or "" for c in room_captions]) if room_idx else None
    product_texts = [product_text(products[p]) for p in product_idx]
    product_tokens = cache.text_inputs(cache.product_text, product_idx, model.tokenizer, product_texts) \
        if cache is not None else model.tokenizer(product_texts)
    return {
        "rooms": room_idx, "products": product_idx,
        "room_pixels": batch["room_pixels"].to(device) if batch["room_pixels"] is not None else None,
        "room_tokens": {k: v.to(device) for k, v in tokens.items()} if tokens is not None else None,
        "room_text_present": present.to(device),
        "room_labels": room_labels[room_idx].to(device) if room_idx else None,
        "room_positive_ids": pad_positive_ids([room_positives[r] for r in room_idx], device=device),
        "product_pixels": batch["product_pixels"].to(device) if batch["product_pixels"] is not None else None,
        "product_tokens": {k: v.to(device) for k, v in product_tokens.items()},
        "product_ids": torch.tensor(product_idx, dtype=torch.long, device=device),
    }


def _losses(model, inputs, objective: RetrievalObjective) -> dict[str, torch.Tensor]:
    out = model(room_pixels=inputs["room_pixels"], room_tokens=inputs["room_tokens"],
                room_text_present=inputs["room_text_present"], product_pixels=inputs["product_pixels"],
                product_tokens=inputs["product_tokens"])
    return objective(StepOutputs.from_model(model, out), inputs)


def _grad_cache_losses(model, inputs, objective: RetrievalObjective, chunk_size: int, world: int
                       ) -> dict[str, torch.Tensor]:
    """The same losses, embedded `chunk_size` samples at a time; gradients are left on the parameters."""
    def embed_rooms(chunk):
        out = model(room_pixels=chunk["pixels"], room_tokens={k: chunk[k] for k in inputs["room_tokens"]},
                    room_text_present=chunk["present"])
        return rooms_packed(model, out), out.scene_logits

    def embed_products(chunk):
        out = model(product_pixels=chunk["pixels"], product_tokens={k: chunk[k] for k in inputs["product_tokens"]})
        return out.product_image_embeds, out.product_text_embeds, out.product_embeds

    terms: dict[str, torch.Tensor] = {}

    def loss_fn(room_outputs, product_outputs):
        computed = objective(StepOutputs(*room_outputs, *product_outputs, log_logit_scale=model.logit_scale), inputs)
        terms.update({k: v.detach() for k, v in computed.items()})
        return computed["loss"]

    rooms = {"pixels": inputs["room_pixels"], "present": inputs["room_text_present"], **inputs["room_tokens"]}
    products = {"pixels": inputs["product_pixels"], **inputs["product_tokens"]}
    grad_cache_step([(embed_rooms, rooms), (embed_products, products)], loss_fn, chunk_size=chunk_size)
    if world > 1:  # the chunks ran outside DDP's hooks: average the gradients as DDP would
        import torch.distributed as dist

        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world
    return terms


# -- evaluation and the best model -----------------------------------------------------------------
def _evaluate_and_keep_best(model, state, dataset, train_rooms, val_rooms, train_pairs, scene_categories, output,
                            config, start_state, main, progress, cache, first_val_row, log=None,
                            data_summary=None) -> bool:
    """Evaluates on the validation rooms, saves a new best model; True when it is time to stop early.
    `log` (accelerator.log) sends the validation metrics to the run's trackers; `data_summary` (what the
    run trained on) goes into the saved model's card."""
    from ..evaluation import evaluate

    was_training = model.training
    if start_state:
        original = {k: v.detach().clone() for k, v in model.state_dict().items() if k in start_state}
        wise_ft(model, start_state, config.wise_alpha)
    if cache is not None:
        positions = range(first_val_row, first_val_row + len(val_rooms))
        result = evaluate_cached(model, cache, dataset.products, val_rooms, positions, dataset.pairs)
    else:
        result = evaluate(model, dataset.products, val_rooms, dataset.pairs, progress=progress and main,
                          num_workers=config.num_workers)
    metrics = {"step": state.step, "seconds": round(state.seconds, 1), **result.metrics}
    state.history.append(metrics)
    if log is not None:
        log(validation_log(result), step=state.step)
    improved = result.metrics["recall@10"] > state.best_metrics.get("recall@10", -1.0)
    if improved:
        state.best_metrics, state.best_step, state.evals_without_gain = dict(result.metrics), state.step, 0
        if main:
            _save_best_model(model, output / BEST_MODEL_DIR, result, train_rooms, train_pairs, scene_categories,
                             val_rooms, config, state, data_summary)
    else:
        state.evals_without_gain += 1
    if start_state:
        model.load_state_dict({**model.state_dict(), **original})
    model.train(was_training)
    if main:
        logger.info("step %d: validation %s", state.step, ", ".join(
            f"{k} {v:.4f}" for k, v in result.metrics.items() if k in ("recall@10", "ndcg@10", "map")))
    return state.evals_without_gain >= config.patience


def _save_best_model(model, folder, result, train_rooms, train_pairs, scene_categories, val_rooms, config,
                     state, data_summary=None) -> None:
    model.eval()
    record = TrainingRecord(config=config.to_dict(), data=data_summary or {}, step=state.step,
                            validation=result.to_dict())
    (merged_copy(model) if config.lora_rank else model).save_pretrained(folder, training=record)
    atomic_json(folder / "metrics.json", {"step": state.step, "seconds": round(state.seconds, 1),
                                          "validation": result.to_dict()})
    SceneCategoryPrior(scene_categories).save(folder / SCENE_CATEGORIES_FILE)
    atomic_json(folder / "train_config.json", config.to_dict())
    lines = ["room_id,product_id"] + [f"{r},{p}" for r, p in train_pairs]
    atomic_text(folder / TRAIN_PAIRS_FILE, "\n".join(lines) + "\n")
    # the training rooms' scenes: what the scene-popularity baseline needs besides the pairs
    atomic_json(folder / TRAIN_ROOM_SCENES_FILE, {"format": 1, "scenes": {r.room_id: r.scene for r in train_rooms}})
    atomic_text(folder / "val_rooms.txt", "\n".join(r.room_id for r in val_rooms) + "\n")


# -- small helpers ----------------------------------------------------------------------------------
def _silent(*args, **kwargs) -> None:
    pass


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


def _describe_batch(batch, rooms, products) -> str:
    room_ids = [rooms[r].room_id for r in batch["rooms"]][:5]
    product_ids = [products[p].product_id for p in batch["products"]][:5]
    return f"rooms {room_ids}, products {product_ids}{' ...' if len(batch['products']) > 5 else ''}"
