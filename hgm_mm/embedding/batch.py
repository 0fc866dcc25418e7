"""Embedding many photos or texts: batched inference, photos decoded in worker processes.

`embed_images` and `embed_texts` embed into memory; `embed_to_shards` (`hgm_mm.embedding.shards`)
streams a catalogue of any size to resumable shards with the same encoders. Photos are decoded
by `hgm_mm.data.loading`.

Speed decisions (benchmarks/bench_embed.py measures them):
  - On a CPU the image tower runs in ONNX Runtime (`engine="auto"` from `ONNX_MIN_PHOTOS`
    photos on; hgm_mm/models/export.py) in the main process while worker processes decode (ONNX
    Runtime is not fork-safe). With the torch engine, each worker process decodes and embeds
    whole batches on one core with a copy of the tower whose BatchNorms are folded into their
    convolutions, channels-last; intra-op threads of one process waited on each other and on
    the machine's other work. On a GPU, workers decode and the main process embeds.
  - Photos are decoded, resized and cropped as uint8; whole batches are then scaled and
    normalised with the arithmetic of ToTensor and Normalize, so the pixels equal
    `model.image_transform`'s exactly and cross to a GPU process four times smaller.
  - `jpeg_draft`: a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's
    `Image.draft`) while both sides stay at least twice what the transform needs, so the resize
    that follows still anti-aliases; large photos skip most of their decoding and resizing.
    Pixels change slightly: on IKEA room photos (1024 px) with hgm-lite-en, the drafted ones
    kept cosine >= 0.997 to the full decode; at 1x headroom the worst fell to 0.974.
  - precision "auto" is bf16 autocast on CUDA and fp32 on CPU: a CPU without bf16 instructions
    runs bf16 many times slower than fp32 (benchmarks/bench_embed.py); its vectors (CPU autocast, hgm-lite-en)
    kept cosine mean 0.9986, min 0.989 on 64 IKEA product photos and min 0.997 on 48 rooms.
    Choose "fp32" on a GPU where every vector must stay within 0.99.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ..data.images import ImageError
from ..data.loading import PhotoDecoder, PhotoFiles, draft_side, normaliser, split_normalisation
from ..models.export import (FoldedImageEncoder, FoldedRoomMapEncoder, OnnxExportError, OnnxImageEncoder,
                             onnxruntime_available)
from ..models.hgm import MAP_PASS_ROOMS, VIEW_PASS_IMAGES

PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("auto", "torch", "onnxruntime")
# "auto" uses ONNX Runtime from this many photos on; below, exporting the tower and starting a
# session cost more than they save (144 IKEA room photos embedded faster with torch)
ONNX_MIN_PHOTOS = 512
ONNX_PREFETCH_PHOTOS = 1024  # decoded photos the workers may hold ahead while the ONNX export runs (~150 MB at 224 px)
logger = logging.getLogger(__name__)


@dataclass
class EmbeddedImages:
    """Embeddings of the photos that could be read, and what was skipped."""

    embeddings: torch.Tensor  # (N_kept, D) unit vectors on the CPU; (N_kept, V, D) for room views
    kept: list[int]  # input positions of the rows of `embeddings`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo, reason)


@dataclass
class _Batch:
    positions: list[int]  # every input position in the batch, in order
    kept: list[int]  # positions whose photo was read
    pixels: torch.Tensor | None  # (len(kept), 3, S, S) or (len(kept), V, 3, S, S)
    skipped: list[tuple[int, str, str]]  # (position, photo, reason)
    vectors: torch.Tensor | None = None  # (len(kept), D) when the worker embedded the photos itself


def _collate(items) -> _Batch:
    kept = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    skipped = [(i, *problem) for i, _, problem in items if problem is not None]
    pixels = torch.stack([p for _, p in kept]) if kept else None
    return _Batch([i for i, _, _ in items], [i for i, _ in kept], pixels, skipped)


class _EmbeddingCollate:
    """Collates a batch in a worker and embeds it there: on a CPU, each worker process runs the
    model on one core, which keeps every core busy without intra-op threads waiting on each other."""

    def __init__(self, finish: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor]):
        self.finish, self.encode = finish, encode

    def __call__(self, items) -> _Batch:
        batch = _collate(items)
        if batch.pixels is not None:
            batch.vectors = self.encode(self.finish(batch.pixels)).clone()  # a normal tensor crosses processes
            batch.pixels = None
        return batch


class _ShardBatches(Sampler):
    """Batches of input positions that never cross a shard boundary, for the given shards."""

    def __init__(self, shards: Sequence[int], shard_size: int, n_items: int, batch_size: int):
        self.shards, self.shard_size, self.n_items, self.batch_size = list(shards), shard_size, n_items, batch_size

    def _bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.n_items, (shard + 1) * self.shard_size)

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            start, stop = self._bounds(shard)
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(stop, first + self.batch_size)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in map(self._bounds, self.shards))


def _photo_loader(model, sources: Sequence, batches: Sampler, *, room_views: bool, jpeg_draft: bool,
                  num_workers: int | None, encode_in_workers: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  prefetch_factor: int = 2) -> tuple[DataLoader, Callable[[torch.Tensor], torch.Tensor]]:
    """A DataLoader of `_Batch`es and the function that turns their pixels into model input.

    With `encode_in_workers` (and workers), each worker also embeds its batches: `_Batch.vectors`.
    """
    transform = model.room_views if room_views else model.image_transform
    split = split_normalisation(transform)
    finish = _identity if split is None else normaliser(split[1], split[2])
    decode = PhotoDecoder(transform if split is None else split[0], draft_side(transform) if jpeg_draft else None)
    workers = default_num_workers() if num_workers is None else num_workers
    collate = _EmbeddingCollate(finish, encode_in_workers) if encode_in_workers and workers > 0 else _collate
    loader = DataLoader(PhotoFiles(sources, decode), batch_sampler=batches, num_workers=workers,
                        collate_fn=collate, pin_memory=model.device.type == "cuda",
                        prefetch_factor=prefetch_factor if workers > 0 else None)
    return loader, finish


def _identity(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


def default_num_workers() -> int:
    """Decoding processes when none are asked for: the CPU count, at most 4 (at least 1)."""
    return max(1, min(4, _cpu_count()))


def _cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def _encoder(model, *, room_views: bool, precision: str, engine: str = "torch", fold_batch_norms: bool = False
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-input pixels -> unit vectors (B, D) or (B, V, D), float32 on the CPU.

    `engine` is resolved already ("torch" or "onnxruntime"; see `resolve_engine`); with "torch",
    `fold_batch_norms` runs the tower's inference copy (`FoldedImageEncoder`) in eval mode.
    """
    dtype = _autocast_dtype(model.device, precision)
    room_map = room_views and model.room_views.kind == "feature_map"  # one pass a room gives all its views
    if engine == "onnxruntime":
        encode_photos = OnnxImageEncoder(model, room_map=room_map)
    elif fold_batch_norms and not model.training:
        encode_photos = FoldedRoomMapEncoder(model) if room_map else FoldedImageEncoder(model)
    else:
        encode_photos = model.encode_room_views if room_map else model.encode_image

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if room_map:  # (R, 1, 3, M, M) -> (R, V, D)
            passes = pixels[:, 0].split(MAP_PASS_ROOMS)
        else:
            photos = pixels.flatten(0, 1) if room_views else pixels  # views run as photos: (R * V, 3, S, S)
            # a batch of rooms holds R * V photos (8 rooms of 55 views: 440): 9 GB in one pass, 2.5 GB in passes of 64
            passes = photos.split(VIEW_PASS_IMAGES) if room_views else (photos,)
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            vectors = torch.cat([encode_photos(chunk.to(model.device, non_blocking=True)).float().cpu()
                                 for chunk in passes])
        if room_map:
            return vectors
        return vectors.view(*pixels.shape[:2], -1) if room_views else vectors

    return run


def resolve_engine(engine: str, model, precision: str, n_photos: int | None) -> str:
    """The engine that embeds `n_photos` photos (None: an open-ended stream, e.g. a service's
    queries): "torch" or "onnxruntime".

    "auto" picks ONNX Runtime on a CPU in float32 for at least `ONNX_MIN_PHOTOS` photos, when it is
    installed; below that its one-time export (seconds) costs more than it saves.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; expected one of {ENGINES}")
    on_cpu_fp32 = model.device.type == "cpu" and _autocast_dtype(model.device, precision) is None
    if engine == "onnxruntime":
        if not on_cpu_fp32:
            raise ValueError(f"engine='onnxruntime' embeds on a CPU in fp32; the model is on {model.device} "
                             f"with precision={precision!r}: use engine='torch' there")
        if not onnxruntime_available():
            raise ImportError("engine='onnxruntime' needs onnxruntime, onnx and onnxscript: "
                              "pip install onnxruntime onnx onnxscript")
        return engine
    if engine == "auto":
        many = n_photos is None or n_photos >= ONNX_MIN_PHOTOS
        return "onnxruntime" if on_cpu_fp32 and many and onnxruntime_available() else "torch"
    return engine


def photo_encoder(model, *, room_views: bool, precision: str = "auto", engine: str = "auto",
                  n_photos: int | None = None, fold_batch_norms: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-input pixels -> unit vectors, float32 on the CPU: (B, 3, S, S) -> (B, D), or with
    `room_views` (R, V, 3, S, S) -> (R, V, D); what catalogue embedding and `Matcher` queries run.

    `engine` and `n_photos` as in `resolve_engine`; "auto" falls back to torch when the ONNX export
    fails. With torch, `fold_batch_norms` runs the BatchNorm-folded inference copy of the tower (in
    eval mode); `precision` "auto" is bf16 on CUDA, fp32 elsewhere.
    """
    options = {"room_views": room_views, "precision": precision, "fold_batch_norms": fold_batch_norms}
    try:
        return _encoder(model, engine=resolve_engine(engine, model, precision, n_photos), **options)
    except OnnxExportError as err:
        if engine != "auto":
            raise
        warnings.warn(f"{err}; embedding with torch instead", RuntimeWarning, stacklevel=3)
        return _encoder(model, engine="torch", **options)


# -- in memory ---------------------------------------------------------------------------------
def embed_images(model, sources: Sequence[str | os.PathLike], *, batch_size: int = 32,
                 num_workers: int | None = None, on_error: str = "skip", desc: str = "photos",
                 progress: bool = True, room_views: bool = False, precision: str = "fp32",
                 jpeg_draft: bool = False, engine: str = "torch") -> EmbeddedImages:
    """Embeds photo files with `model.encode_image`, decoding them in worker processes.

    Args:
        sources: photo paths.
        room_views: embed each photo as a room, one vector per view: embeddings (N, V, D).
        batch_size: photos per forward pass.
        num_workers: decoding processes; default `default_num_workers()`; 0 decodes in this process.
        on_error: "skip" leaves unreadable photos out and lists them; "raise" stops at the first.
        desc: label of the progress bar.
        progress: show a progress bar.
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 on CPU).
        jpeg_draft: decode large JPEGs at a reduced DCT scale (see the module docstring); off by
            default so that vectors equal `encode_image` on `load_image`'s pixels.
        engine: "torch" (`encode_image` itself, the default), "onnxruntime" (CPU, fp32; vectors
            within 1e-4 of torch's) or "auto" (see `resolve_engine`).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    _check_positive(batch_size=batch_size)
    n_photos = len(sources) * (model.room_views.n_passes if room_views else 1)
    encode = photo_encoder(model, room_views=room_views, precision=precision, engine=engine, n_photos=n_photos,
                           fold_batch_norms=False)
    batches = _ShardBatches([0], max(1, len(sources)), len(sources), batch_size)
    loader, finish = _photo_loader(model, sources, batches, room_views=room_views, jpeg_draft=jpeg_draft,
                                   num_workers=num_workers)
    from tqdm.auto import tqdm

    chunks, kept, skipped = [], [], []
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            if batch.skipped and on_error == "raise":
                _, source, reason = batch.skipped[0]
                raise ImageError(source, reason)
            skipped.extend((source, reason) for _, source, reason in batch.skipped)
            if batch.pixels is not None:
                chunks.append(encode(finish(batch.pixels)))
                kept.extend(batch.kept)
            bar.update(len(batch.positions))
    empty_shape = (0, model.room_views.n_views, model.config.embed_dim) if room_views else (0, model.config.embed_dim)
    embeddings = torch.cat(chunks) if chunks else torch.empty(empty_shape)  # a normal tensor, not an inference one
    return EmbeddedImages(embeddings, kept, skipped)


def embed_texts(model, texts: Sequence[str], *, batch_size: int = 64, scene: bool = False) -> torch.Tensor:
    """Embeds texts in batches with `encode_text` (or `encode_scene_text` when `scene`) -> (N, D)."""
    encode = model.encode_scene_text if scene else model.encode_text
    chunks = [encode(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive integer")
