"""Scene recognition training on `images.jsonl` sets (scene-labelled photos, e.g. Places365 rooms).

Two heads can be trained, one for each of the model's scene readers (`hgm_mm.models.scene_heads`):

- "photo" (the default of `train_scenes`): `photo_scene_head`, a linear head on the image tower's
  L2-normalised pooled features of the whole photo, optionally averaged with the mirror image at
  inference. With `branch_stages` the head reads the photo through its own copy of the tower's
  top stages, tuned with it on the photos and random crops of them. The tower and projection
  stay locked, so room and product vectors do not change. On Places365 rooms it is the more
  accurate (docs/training.md): room tiles dilute the scene, and the 1,280 tower features keep
  more of it than the 384-d projected room vector.
- "room": `scene_head` on the room vector, the normalised mean of the photo's view embeddings
  (`model.room_views`) through the room fusion. Validation scores the mean of all the views, as
  `model.predict_scene` does; training may read the whole-photo view alone (`train_views="whole"`),
  at 1/V of the cost of caching all V views.

Either way validation computes exactly what `model.predict_scene` and
`hgm_mm.evaluation.evaluate_scenes` compute, so the accuracy measured during training is the
accuracy users get. On a CPU the towers are the cost, so everything below the trainable layers
runs once per photo: the outputs of the locked image layers for every training view of every
photo (and of its mirror image, the augmentation, when asked) are cached, and the epochs run the
trainable layers alone on that cache.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import ImageError
from ..data.records import SceneImage, read_scene_images
from ..models.calibration import fit_temperature
from ..evaluation import scene_metrics
from ..data.loading import PhotoDecoder, PhotoFiles
from ..models.export import folded_copy, locked_outputs
from ..models.preprocess import RoomViews
from ..models.towers import TimmImageTower
from .config import SceneTrainConfig
from .freezing import keep_frozen_norms_eval, lock_image_tower
from .optim import adamw, warmup_cosine




@dataclass
class SceneTrainResult:
    """What `train_scenes` did and measured."""

    history: list[dict[str, float]]  # one row per epoch: epoch, loss, train_accuracy (+ val_accuracy, val_macro_f1)
    val_accuracy: float | None  # after the last epoch, as `evaluate_scenes` computes it; None without val photos
    val_macro_f1: float | None
    n_train: int  # readable training photos
    n_val: int  # readable validation photos
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable photos (path, reason)
    trained_parameters: list[str] = field(default_factory=list)  # names of the parameters training changed
    cache_seconds: float = 0.0  # running the locked layers over every photo once
    train_seconds: float = 0.0  # the epochs on the cache, validation included
    # with validation photos: the fitted temperature, ECE before and after (config.photo_scene_temperature)
    calibration: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"calibration": self.calibration, "history": self.history, "val_accuracy": self.val_accuracy, "val_macro_f1": self.val_macro_f1,
                "n_train": self.n_train, "n_val": self.n_val, "skipped": [list(s) for s in self.skipped],
                "trained_parameters": self.trained_parameters, "cache_seconds": self.cache_seconds,
                "train_seconds": self.train_seconds}



def train_scenes(model, train_images: Sequence[SceneImage] | str | os.PathLike, *,
                 val_images: Sequence[SceneImage] | str | os.PathLike | None = None,
                 config: SceneTrainConfig | None = None, repeats: Sequence[int] | None = None,
                 num_workers: int | None = None, progress: bool = True, **settings) -> SceneTrainResult:
    """Trains a scene head of the model on scene-labelled photos, in place.

        train_scenes(model, "places365-rooms/images.jsonl", val_images=val)       # the measured recipe
        train_scenes(model, photos, config=SceneTrainConfig(branch_stages=0, random_crops=0))
        train_scenes(model, photos, epochs=10)                                   # the recipe, one setting changed

    Args:
        model: an `HGMModel`; its `scene_labels` must cover every label of the photos.
        train_images: `SceneImage` rows, or the path of an `images.jsonl` file.
        val_images: photos measured after every epoch (the same as `evaluate_scenes` on them), and
            calibrated on (`config.calibrate`).
        config: how to train (`SceneTrainConfig`; default: the measured recipe).
        repeats: how many times each epoch draws each training photo (one int per photo; default
            once each), to weigh one source of photos against another without caching it twice.
        num_workers: photo-decoding processes (default: up to 2).
        progress: show progress bars.
        settings: `SceneTrainConfig` fields that replace `config`'s, by name.

    Returns:
        The per-epoch history, the final validation accuracy and what was skipped.

    Raises:
        ValueError: an argument is out of range, a label is not among the model's scene labels,
            no photo is readable, or the tower cannot be split for `unlocked_image_groups`. The
            model is then left as it was.
    """
    config = SceneTrainConfig.from_dict({**(config or SceneTrainConfig()).to_dict(), **settings},
                                        origin="train_scenes").resolved()
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers={num_workers!r}; expected None or an int >= 0")
    photo = config.scene_source == "photo"
    train_images = _scene_images(train_images, "train_images")
    if repeats is not None:
        repeats = list(repeats)
        if len(repeats) != len(train_images) or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                                     for r in repeats):
            raise ValueError(f"repeats: expected one int >= 1 per training photo ({len(train_images)}); got "
                             f"{len(repeats)} values")
    val_images = _scene_images(val_images, "val_images") if val_images is not None else []
    _check_labels(model, train_images, "train_images")
    _check_labels(model, val_images, "val_images")
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    previous_head = (model.config, model.scene_reader, model.photo_scene_head, model.photo_scene_branch)
    try:
        # the head trained here becomes the one predict_scene reads, uncalibrated until fitted below
        if photo:
            model.use_photo_scene_head(image_size=config.scene_image_size, flip_average=config.flip_average,
                                       branch_stages=config.branch_stages)
        else:
            model.use_room_scene_head()
        reader = model.scene_reader
        stage, locked_norms = _lock(model, reader, config.projection_lr > 0, config.unlocked_image_groups)
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        started = time.perf_counter()
        skipped: list[tuple[str, str]] = []
        if photo:  # one view per photo: the whole photo, as `scene_transform` gives it
            train_transform = val_transform = _OneView(model.scene_transform)
            val_mirror = model.config.scene_flip_average
            if config.random_crops:
                train_transform = _RandomCrops(model.scene_transform, config.random_crops, config.crop_scale,
                                               config.seed)
        else:
            # views pooled from one feature map cost one pass, the same as the whole photo alone
            train_transform = model.room_views if config.train_views == "all" or model.room_views.kind == "feature_map" \
                else RoomViews(model.config.image_tower, (1,))
            val_transform, val_mirror = model.room_views, False
        cache_options = {"skipped": skipped, "image_errors": config.image_errors, "num_workers": num_workers,
                         "progress": progress}
        # activations inside the tower are large: training keeps them in half precision, validation exact
        train_features, train_kept = _cache_views(model, train_images, stage, train_transform, mirror=config.mirror,
                                                  dtype=torch.float32 if stage is None else torch.float16,
                                                  desc="caching training photos", **cache_options)
        val_features, val_kept = (None, [])
        if val_images:
            val_features, val_kept = _cache_views(model, val_images, stage, val_transform, mirror=val_mirror,
                                                  dtype=torch.float32, desc="caching validation photos",
                                                  **cache_options)
        cache_seconds = time.perf_counter() - started

        label_index = {label: i for i, label in enumerate(model.scene_labels)}
        train_labels = torch.tensor([label_index[train_images[i].scene] for i in train_kept])
        if repeats is not None:  # rows of the cache drawn several times per epoch
            drawn = torch.repeat_interleave(torch.arange(len(train_kept)), torch.tensor([repeats[i] for i in train_kept]))
            train_features, train_labels = train_features[drawn], train_labels[drawn]
        val_truth = [val_images[i].scene for i in val_kept]
        started = time.perf_counter()
        history = _fit(model, reader, stage, locked_norms, train_features, train_labels, val_features, val_truth,
                       config, progress)
        train_seconds = time.perf_counter() - started
        calibration = _calibrate(model, reader, val_features, stage, config.batch_size,
                                 torch.tensor([label_index[t] for t in val_truth])) \
            if val_features is not None and config.calibrate else {}
    except BaseException:
        model.config, model.scene_reader, model.photo_scene_head, model.photo_scene_branch = previous_head
        raise
    finally:
        for name, p in model.named_parameters():
            p.requires_grad = requires_grad.get(name, True)
        model.eval()
    last = history[-1]
    return SceneTrainResult(
        history=history, val_accuracy=last.get("val_accuracy"), val_macro_f1=last.get("val_macro_f1"),
        n_train=len(train_kept), n_val=len(val_kept), skipped=skipped, trained_parameters=trained,
        cache_seconds=cache_seconds, train_seconds=train_seconds, calibration=calibration)


def _calibrate(model, reader, val_features, stage, batch_size: int, truth: torch.Tensor) -> dict[str, float]:
    """Fits the head's temperature on the validation photos (`model.config.photo_scene_temperature`);
    returns it with the expected calibration error before and after."""
    logits = _val_logits(model, reader, val_features, stage, batch_size)
    before = _ece(logits, truth)
    model.config.photo_scene_temperature = fit_temperature(logits, truth)
    return {"temperature": model.config.photo_scene_temperature, "val_ece_before": before,
            "val_ece": _ece(logits / model.config.photo_scene_temperature, truth)}


def _ece(logits: torch.Tensor, truth: torch.Tensor) -> float:
    probabilities = logits.softmax(dim=-1)
    confidence, predicted = probabilities.max(dim=-1)
    return scene_metrics.expected_calibration_error(confidence.numpy(), (predicted == truth).numpy())


# -- inputs ----------------------------------------------------------------------------------------
def _scene_images(images, name: str) -> list[SceneImage]:
    """SceneImage rows, or the path of an images.jsonl file (read and validated)."""
    if isinstance(images, (str, os.PathLike)):
        return read_scene_images(Path(images))
    if not isinstance(images, Sequence):
        raise TypeError(f"{name} is {type(images).__name__}; expected a sequence of SceneImage or the path "
                        "of an images.jsonl file")
    images = list(images)
    if not images:
        raise ValueError(f"{name} is empty; give at least one labelled photo")
    for i, item in enumerate(images):
        if not isinstance(item, SceneImage):
            raise TypeError(f"{name}[{i}] is {type(item).__name__}; expected hgm_mm.data.SceneImage "
                            "(read them with hgm_mm.data.read_scene_images)")
    return images


def _check_labels(model, images: Sequence[SceneImage], name: str) -> None:
    unknown = sorted({item.scene for item in images} - set(model.scene_labels))
    if unknown:
        raise ValueError(f"{name}: scene label(s) {unknown} are not among the model's scene labels "
                         f"{list(model.scene_labels)}; create the model with scene_labels=[...] that include them")


# -- locking and caching ---------------------------------------------------------------------------
def _lock(model, reader, train_projection: bool, unlocked_image_groups: int) -> tuple[int | None, list]:
    """Leaves only what scene training changes trainable: the reader's head and branch, and for
    the room vector the projection and tower groups asked for.

    Returns:
        (stage, locked_norms): cached features enter image-tower stage `stage`, or are the pooled
        tower outputs when `stage` is None; the BatchNorms to keep in eval mode.
    """
    for p in model.parameters():
        p.requires_grad = False
    for p in reader.head(model).parameters():
        p.requires_grad = True
    branch = reader.branch(model)
    if branch is not None:
        norms = [m for m in branch.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for p in branch.parameters():
            p.requires_grad = True
        for norm in norms:  # statistics and affine kept, as locked towers keep theirs
            for p in norm.parameters():
                p.requires_grad = False
        return len(model.image_tower.feature_stages()) - len(branch), norms
    if train_projection:
        for p in model.image_proj.parameters():
            p.requires_grad = True
    tower = model.image_tower
    if unlocked_image_groups == 0:
        # views pooled from one feature map need that map: cache the input of the tower's last stage
        return (tower.locked_prefix() if model.room_views.kind == "feature_map" else None), []
    if not isinstance(tower, TimmImageTower) or not tower.feature_stages():
        raise ValueError(f"unlocked_image_groups={unlocked_image_groups} needs a timm image tower whose stages "
                         f"hgm_mm knows (EfficientNet or ResNet families); this model's is "
                         f"{type(tower).__name__}: use unlocked_image_groups=0")
    locked_norms = lock_image_tower(tower, unlocked_image_groups, freeze_norm_stats=True)
    stage = tower.locked_prefix()
    if stage == 0:
        raise ValueError(f"unlocked_image_groups={unlocked_image_groups} unlocks the whole image tower; "
                         "leave at least its first group locked")
    return stage, locked_norms


class _OneView:
    """A photo -> `transform(photo)` (3, S, S) as a single view (1, 3, S, S)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image).unsqueeze(0)


class _Versions:
    """A photo -> its views (1, V, 3, S, S), or with `mirror` those and the mirror image's (2, V, 3, S, S).

    The mirror views are the views flipped left to right, exactly what `model.photo_scene_logits`
    computes for `scene_flip_average`; for room tiles only their order differs from the tiles of
    the mirrored photo, and the room vector is their mean.
    """

    def __init__(self, views, mirror: bool):
        self.views = views
        self.mirror = mirror

    def __call__(self, image):
        views = self.views(image)  # (V, 3, S, S)
        return torch.stack([views, views.flip(-1)] if self.mirror else [views])


class _RandomCrops:
    """A photo's path -> (2 + n, 1, 3, S, S): the whole photo, its mirror image and `n` random crops
    (each mirrored with probability 1/2), each through `transform` (the whole-photo transform).

    The crops depend on `seed` and the path alone, so the cache is the same in any worker and run.
    """

    def __init__(self, transform, n: int, min_scale: float, seed: int):
        self.transform, self.n, self.min_scale, self.seed = transform, n, min_scale, seed

    def __call__(self, source) -> torch.Tensor:
        import random

        from ..data.images import load_image

        image = load_image(source)
        rng = random.Random(f"{self.seed}:{source}")
        whole = self.transform(image)
        versions = [whole, whole.flip(-1)]
        for _ in range(self.n):
            crop = self.transform(image.crop(_crop_box(image.size, self.min_scale, rng)))
            versions.append(crop.flip(-1) if rng.random() < 0.5 else crop)
        return torch.stack(versions).unsqueeze(1)


def _crop_box(size: tuple[int, int], min_scale: float, rng) -> tuple[int, int, int, int]:
    """A random box of `min_scale`..1 of the area and aspect 3/4..4/3 inside (W, H), as
    torchvision's `RandomResizedCrop.get_params` draws it; the whole photo when no draw fits."""
    width, height = size
    for _ in range(10):
        area = width * height * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return 0, 0, width, height


@torch.no_grad()
def _cache_views(model, images: Sequence[SceneImage], stage: int | None, views, *, mirror: bool, dtype: torch.dtype,
                 skipped: list, image_errors: str, num_workers: int, progress: bool, desc: str
                 ) -> tuple[torch.Tensor, list[int]]:
    """Locked-layer outputs of every view of every readable photo.

    `views` is a photo -> (V, 3, S, S), or `_RandomCrops`, which reads each photo into its versions.
    The layers run through the tower's folded inference copy (`models.export.folded_copy`), which
    computes what the tower computes, to float rounding, faster.

    Returns:
        (features, kept): features (N', A, V, ...) with A versions of each photo (1; 2 with `mirror`:
        the photo, its mirror image; 2 + n for n random crops), and the input positions of its rows.
    """
    from tqdm.auto import tqdm

    decode = views if isinstance(views, _RandomCrops) else PhotoDecoder(_Versions(views, mirror))
    loader = DataLoader(PhotoFiles([item.image for item in images], decode), batch_size=4,
                        num_workers=num_workers, collate_fn=list)
    tower = None  # the folded copy, made for the photos' side when the first batch arrives
    chunks, kept = [], []
    model.eval()
    with tqdm(total=len(images), desc=desc, unit="photo", disable=not progress) as bar:
        for items in loader:
            for _, _, problem in items:
                if problem is not None:
                    if image_errors == "raise":
                        raise ImageError(*problem)
                    skipped.append(problem)
            readable = [(i, pixels) for i, pixels, _ in items if pixels is not None]
            if readable:
                pixels = torch.stack([p for _, p in readable]).to(model.device)  # (B, A, V, 3, S, S)
                flat = pixels.flatten(0, 2)  # (B * A * V, 3, S, S)
                if tower is None:
                    tower = folded_copy(model.image_tower, flat.shape[-1], model.device, prefix_stage=stage or 0)
                features = locked_outputs(tower, flat, stage)
                chunks.append(features.to("cpu", dtype).view(*pixels.shape[:3], *features.shape[1:]))
                kept.extend(i for i, _ in readable)
            bar.update(len(items))
    if not kept:
        raise ValueError(f"{desc}: none of the {len(images)} photos could be read (first: {skipped[0][0]}: "
                         f"{skipped[0][1]})")
    return torch.cat(chunks), kept


# -- training ----------------------------------------------------------------------------------------
@torch.no_grad()
def _val_logits(model, reader, features: torch.Tensor, stage: int | None, batch_size: int) -> torch.Tensor:
    """Uncalibrated scene logits (N, S) of cached validation photos (N, A, V, ...), as
    `model.scene_logits` reads them before the temperature."""
    model.eval()
    return torch.cat([reader.logits_from_cached_versions(model, features[start:start + batch_size], stage).float().cpu()
                      for start in range(0, len(features), batch_size)])


def _predict(model, reader, features: torch.Tensor, stage: int | None, batch_size: int) -> list[str]:
    logits = _val_logits(model, reader, features, stage, batch_size)
    return [model.scene_labels[i] for i in logits.argmax(dim=1).tolist()]


def _fit(model, reader, stage, locked_norms, train_features, train_labels, val_features, val_truth,
         config: SceneTrainConfig, progress: bool) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    groups = [(reader.head(model), config.lr)]
    if config.projection_lr > 0:
        groups.append((model.image_proj, config.projection_lr))
    if reader.branch(model) is not None:
        groups.append((reader.branch(model), config.tower_lr))
    elif stage is not None:
        groups.append((model.image_tower, config.tower_lr))
    optimizer = adamw(groups, config.weight_decay)
    total_steps = config.epochs * math.ceil(len(train_features) / config.batch_size)
    schedule = warmup_cosine(optimizer, total_steps, total_steps // 20, decay_from="start")
    generator = torch.Generator().manual_seed(config.seed)
    n_augmentations = train_features.shape[1]
    rows = torch.arange(len(train_features))
    history = []
    bar = tqdm(range(config.epochs), desc="scene training", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        keep_frozen_norms_eval(locked_norms)
        order = torch.randperm(len(train_features), generator=generator)
        drawn = torch.randint(n_augmentations, (len(train_features),), generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            features = train_features[rows[batch], drawn[batch]]  # (B, V, ...)
            labels = train_labels[batch].to(model.device)
            logits = reader.logits_from_cache(model, features, stage)  # (B, S)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"scene training: non-finite loss at epoch {epoch + 1}, step "
                                         f"{start // config.batch_size + 1}; lower lr (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach().item() * len(batch)
            correct += int((logits.argmax(dim=1) == labels).sum())
        row = {"epoch": epoch + 1, "loss": loss_sum / len(order), "train_accuracy": correct / len(order)}
        if val_features is not None:
            predicted = _predict(model, reader, val_features, stage, config.batch_size)
            row["val_accuracy"] = scene_metrics.scene_accuracy(val_truth, predicted)
            row["val_macro_f1"] = scene_metrics.macro_f1(val_truth, predicted)
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
    bar.close()
    model.eval()
    return history
