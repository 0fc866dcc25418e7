"""Embedding many photos or texts: batched inference, photos decoded in worker processes.

`embed_images` and `embed_texts` embed into memory. `embed_to_shards` embeds a catalogue of any
size into a folder of shards, so memory stays flat in catalogue size, a rerun resumes where a
killed run stopped, and under `accelerate launch` (or torchrun) each process embeds its share:

    result = embed_to_shards(model, ids, photos, "catalogue_vectors", texts=titles)
    ids, vectors = result.load()  # (N, D) unit vectors, in input order

Folder layout (`embed_to_shards`):

    manifest.json            the plan: model fingerprint, inputs digest, shard size, settings;
                             written before the first shard and never changed
    shard-00000.safetensors  "vectors" (rows, D) float32; metadata "ids" and "skipped" (JSON)

A shard file is written under a temporary name and moved into place, so one that exists is
whole; shard k holds input positions [k * shard_size, (k + 1) * shard_size) and process r of W
embeds the shards k with k % W == r.

Speed decisions (benchmarks/bench_embed.py measures them):
  - On a CPU the image tower runs in ONNX Runtime (`engine="auto"` from `ONNX_MIN_PHOTOS`
    photos on; hgm_mm/inference.py) in the main process while worker processes decode (ONNX
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
  - precision "auto" is bf16 autocast on CUDA and fp32 on CPU. On the 2-core AMD EPYC (no
    AVX-512 BF16) bf16 ran about 100x slower than fp32; its vectors (CPU autocast, hgm-lite-en)
    kept cosine mean 0.9986, min 0.989 on 64 IKEA product photos and min 0.997 on 48 rooms.
    Choose "fp32" on a GPU where every vector must stay within 0.99.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from .files import atomic_text, atomic_write, read_versioned_manifest
from .inference import FoldedImageEncoder, OnnxExportError, OnnxImageEncoder, onnxruntime_available
from .model import VIEW_PASS_IMAGES
from .processes import process_share
from .version import __version__

if TYPE_CHECKING:
    import PIL.Image

PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("auto", "torch", "onnxruntime")
# "auto" uses ONNX Runtime from this many photos on; below, its ~1 s export and session start cost
# more than they save (144 IKEA room photos embedded faster with torch)
ONNX_MIN_PHOTOS = 512
ONNX_PREFETCH_PHOTOS = 1024  # decoded photos the workers may hold ahead while the ONNX export runs (~150 MB at 224 px)
logger = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
FORMAT_VERSION = 1  # bump when the folder layout or the meaning of a saved key changes
# Manifest keys that must match for a rerun to resume a folder instead of refusing it.
_PLAN_KEYS = ("model", "kind", "n_items", "shard_size", "inputs_sha256", "precision", "jpeg_draft", "embed_dim")


@dataclass
class EmbeddedImages:
    """Embeddings of the photos that could be read, and what was skipped."""

    embeddings: torch.Tensor  # (N_kept, D) unit vectors on the CPU; (N_kept, V, D) for room views
    kept: list[int]  # input positions of the rows of `embeddings`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (photo, reason)


# -- photo decoding (runs in DataLoader workers) ------------------------------------------------
class PhotoDecoder:
    """A photo path -> model input pixels: `load_image`'s policy, optionally JPEG draft decoding."""

    def __init__(self, transform: Callable, draft_side: int | None = None):
        self.transform = transform
        self.draft_side = draft_side

    def __call__(self, source: str | os.PathLike) -> torch.Tensor:
        image = _open_drafted(source, self.draft_side) if self.draft_side else None
        return self.transform(image if image is not None else load_image(source))


def _open_drafted(source: str | os.PathLike, min_side: int) -> PIL.Image.Image | None:
    """A JPEG decoded at the smallest DCT scale whose both sides stay >= `min_side`, as RGB.

    Returns None for anything but a plain, healthy JPEG within `DEFAULT_MAX_PIXELS`: the caller
    then uses `load_image`, which decodes it in full or raises its `ImageError`.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if img.format != "JPEG" or width * height > DEFAULT_MAX_PIXELS:
                    return None
                img.draft(None, (min_side, min_side))  # keeps the mode; sets the DCT scale
                img.load()
                img = ImageOps.exif_transpose(img)  # a copy, independent of the file
    except Exception:  # any failure is reported by load_image, with its message
        return None
    if img.mode == "RGB":
        return img
    return img.convert("RGB") if img.mode in ("L", "CMYK") else None  # load_image's policy for JPEG modes


DRAFT_HEADROOM = 2  # a drafted photo keeps both sides >= this many times what the transform needs


def _draft_side(transform: Callable) -> int | None:
    """The smallest image side a JPEG draft may leave for `transform`, or None when unknown."""
    from torchvision import transforms as T

    from .preprocess import RoomViews

    if isinstance(transform, RoomViews):
        return DRAFT_HEADROOM * max(transform.grids) * transform.size  # tiles of the finest grid cover S x S
    if isinstance(transform, T.Compose) and transform.transforms:
        first = transform.transforms[0]
        if type(first) is T.Resize and first.max_size is None:
            size = first.size if isinstance(first.size, int) else (first.size[0] if len(first.size) == 1 else None)
            return DRAFT_HEADROOM * size if size else None
    return None


def _split_normalisation(transform: Callable) -> tuple[Callable, list[float], list[float]] | None:
    """Compose([..., ToTensor(), Normalize(mean, std)]) -> (the PIL steps ending in uint8, mean, std)."""
    from torchvision import transforms as T

    if not isinstance(transform, T.Compose) or len(transform.transforms) < 2:
        return None
    *head, to_tensor, normalize = transform.transforms
    if type(to_tensor) is not T.ToTensor or type(normalize) is not T.Normalize:
        return None
    return T.Compose([*head, T.PILToTensor()]), list(normalize.mean), list(normalize.std)


def _normaliser(mean: list[float], std: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import functional as TF

    def normalise(pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) uint8 -> float
        return TF.normalize(pixels.to(torch.float32).div(255), mean, std)  # ToTensor's then Normalize's arithmetic

    return normalise


class PhotoFiles(Dataset):
    """Photo files read in DataLoader workers: item i -> (i, decode(photo) or None, (photo, reason) or None).

    An unreadable photo is reported, not raised, so one bad file never stops a long pass.
    """

    def __init__(self, sources: Sequence[str | os.PathLike | None], decode: Callable):
        self.sources = sources
        self.decode = decode

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        source = self.sources[i]
        if source is None:  # an item without a photo: neither pixels nor a problem
            return i, None, None
        try:
            return i, self.decode(source), None
        except ImageError as err:
            return i, None, (err.source, err.problem)


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
    split = _split_normalisation(transform)
    finish = _identity if split is None else _normaliser(split[1], split[2])
    decode = PhotoDecoder(transform if split is None else split[0], _draft_side(transform) if jpeg_draft else None)
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
    if engine == "onnxruntime":
        encode_photos = OnnxImageEncoder(model)
    elif fold_batch_norms and not model.training:
        encode_photos = FoldedImageEncoder(model)
    else:
        encode_photos = model.encode_image

    def run(pixels: torch.Tensor) -> torch.Tensor:
        photos = pixels.flatten(0, 1) if room_views else pixels  # views run as photos: (R * V, 3, S, S)
        # a batch of rooms holds R * V photos (8 rooms of 55 views: 440): 9 GB in one pass, 2.5 GB in passes of 64
        passes = photos.split(VIEW_PASS_IMAGES) if room_views else (photos,)
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            vectors = torch.cat([encode_photos(chunk.to(model.device, non_blocking=True)).float().cpu()
                                 for chunk in passes])
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
    n_photos = len(sources) * (model.room_views.n_views if room_views else 1)
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


# -- streamed to shards --------------------------------------------------------------------------
@dataclass
class ShardedEmbeddings:
    """A folder written by `embed_to_shards`: its plan, and its shards read one at a time.

    Attributes:
        folder: the folder.
        manifest: the plan (`manifest.json`): model fingerprint, kind ("photo" vectors or
            "product" vectors of photo fused with text), n_items, shard_size, n_shards, settings.
    """

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "ShardedEmbeddings":
        """Reads the manifest of an embedding folder (shards are read on demand).

        Raises:
            FileNotFoundError: the folder has no manifest.
            ValueError: the manifest is damaged or from a newer hgm_mm.
        """
        folder = Path(folder)
        manifest = _read_manifest(folder / MANIFEST_NAME)
        if manifest is None:
            raise FileNotFoundError(f"{folder} holds no {MANIFEST_NAME}: it is not an embedding folder; "
                                    "write one with hgm_mm.embedding.embed_to_shards")
        return cls(folder, manifest)

    @property
    def n_shards(self) -> int:
        return self.manifest["n_shards"]

    def shard_path(self, shard: int) -> Path:
        return self.folder / SHARD_PATTERN.format(shard)

    def missing_shards(self) -> list[int]:
        """Shards not written yet (by any process)."""
        return [k for k in range(self.n_shards) if not self.shard_path(k).is_file()]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def iter_shards(self) -> Iterator[tuple[list[str], torch.Tensor, list[tuple[str, str, str]]]]:
        """Yields each shard in order as (ids, vectors (rows, D), skipped [(id, photo, reason)]).

        Raises:
            ValueError: a shard is missing or damaged (the message names it and the fix).
        """
        self._check_complete()
        for k in range(self.n_shards):
            yield self._read_shard(k)

    def finished_shards(self) -> Iterator[tuple[list[str], torch.Tensor, list[tuple[str, str, str]]]]:
        """Yields the shards written so far, as `iter_shards` does, in a folder that may be
        unfinished; a damaged shard is left out with a warning."""
        for k in range(self.n_shards):
            if self.shard_path(k).is_file():
                try:
                    yield self._read_shard(k)
                except ValueError as err:
                    logger.warning("%s", err)

    def load(self) -> tuple[list[str], torch.Tensor]:
        """All ids and vectors (N_rows, D), in input order; holds the whole catalogue in memory."""
        ids, chunks = [], []
        for shard_ids, vectors, _ in self.iter_shards():
            ids.extend(shard_ids)
            chunks.append(vectors)
        return ids, torch.cat(chunks) if chunks else torch.empty(0, self.manifest["embed_dim"])

    def skipped(self) -> list[tuple[str, str, str]]:
        """(id, photo, reason) of every photo that could not be read, in input order."""
        return [item for _, _, skipped in self.iter_shards() for item in skipped]

    def _check_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            names = ", ".join(SHARD_PATTERN.format(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{self.folder}: {len(missing)} of {self.n_shards} shards are not written yet "
                             f"({names}); rerun embed_to_shards with the same arguments to finish them")

    def _read_shard(self, shard: int) -> tuple[list[str], torch.Tensor, list[tuple[str, str, str]]]:
        from safetensors import SafetensorError, safe_open

        path = self.shard_path(shard)
        fix = "delete the file and rerun embed_to_shards with the same arguments to embed it again"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                vectors = f.get_tensor("vectors")  # (rows, D)
            ids, skipped = json.loads(meta["ids"]), [tuple(s) for s in json.loads(meta["skipped"])]
            shard_number = int(meta["shard"])
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: damaged shard ({type(err).__name__}: {err}); {fix}") from None
        if shard_number != shard or vectors.dim() != 2 or vectors.shape != (len(ids), self.manifest["embed_dim"]):
            raise ValueError(f"{path}: holds shard {shard_number} with vectors {tuple(vectors.shape)} for "
                             f"{len(ids)} ids; expected shard {shard} of dimension {self.manifest['embed_dim']}; {fix}")
        # shards written before these digests were recorded carry neither
        if "plan_sha256" in meta and meta["plan_sha256"] != plan_digest(self.manifest):
            raise ValueError(f"{path}: was written for another embedding plan (another model, catalogue or "
                             f"settings) than {self.folder / MANIFEST_NAME}; {fix}")
        if "vectors_sha256" in meta and meta["vectors_sha256"] != _vectors_digest(ids, vectors):
            raise ValueError(f"{path}: its ids and vectors do not match the digest written with them; {fix}")
        return ids, vectors, skipped


def embed_to_shards(model, ids: Sequence[str], photos: Sequence[str | os.PathLike | None],
                    output: str | os.PathLike, *, texts: Sequence[str | None] | None = None,
                    shard_size: int = 4096, batch_size: int | None = None, num_workers: int | None = None,
                    precision: str = "auto", jpeg_draft: bool = True, engine: str = "auto",
                    on_error: str = "skip", progress: bool = True, rank: int | None = None,
                    world_size: int | None = None) -> ShardedEmbeddings:
    """Embeds a catalogue of any size into a folder of shards; a rerun resumes it.

    Photos are decoded in worker processes and embedded in batches; each finished shard is
    written atomically and dropped from memory. A rerun with the same model, inputs and settings
    skips the shards already written; anything else is refused rather than mixed in. Under
    `accelerate launch` or torchrun, create the process group first (`accelerate.Accelerator()`),
    move the model to its device and call this on every process: process r embeds shards
    k % world_size == r, and every process returns once all shards are written.

    Args:
        model: an `HGMModel` in eval mode, on the device to embed with.
        ids: one unique, non-empty id per item (product ids).
        photos: one photo path per item; None for an item without a photo.
        output: the folder (created if needed).
        texts: product texts, one per item (None or "" for none): then each vector is the
            product vector, photo fused with text (`model.product_vector`), and an item whose
            photo is unreadable keeps its text. Without texts, vectors are photo vectors and an
            unreadable photo gives no row.
        shard_size: items per shard; a killed run loses at most one shard per process.
        batch_size: photos per forward pass; default 8 on a CPU (larger batches ran slower there,
            their activations outgrow the cache) and 64 on a GPU.
        num_workers: worker processes per embedding process (default: one per core on a CPU,
            `default_num_workers()` on a GPU). They decode; with the torch engine on a CPU each
            also embeds its batches on one core. 0 does everything in this process.
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16".
        jpeg_draft: decode large JPEGs at a reduced DCT scale (see the module docstring).
        engine: what runs the image tower: "auto" (ONNX Runtime on a CPU in fp32 from
            `ONNX_MIN_PHOTOS` photos on, when installed; else torch), "torch" (a BatchNorm-folded
            copy of the tower on a CPU) or "onnxruntime". The engines agree within 1e-4 on every
            vector component, so a folder may be resumed with another engine.
        on_error: "skip" records unreadable photos in their shard (`ShardedEmbeddings.skipped`);
            "raise" stops at the first with `ImageError` (shards already written are kept).
        progress: show a progress bar (on process 0).
        rank, world_size: this process's share; default: from the initialised torch.distributed
            process group, else one process.

    Returns:
        The folder's `ShardedEmbeddings`; `load()` gives ids and vectors in input order.

    Raises:
        ValueError: inputs of different lengths, an empty or duplicate id, a bad setting, or an
            output folder holding another model's or another catalogue's embeddings.
        ImageError: with on_error="raise", the first unreadable photo.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    resolve_engine(engine, model, precision, 0)  # a bad engine fails before any folder is made
    if batch_size is None:
        batch_size = 8 if model.device.type == "cpu" else 64
    _check_positive(shard_size=shard_size, batch_size=batch_size)
    _check_inputs(ids, photos, texts)
    rank, world_size, barrier = process_share(rank, world_size)
    from .index import model_fingerprint

    output = Path(output)
    n_items = len(ids)
    plan = {
        "format_version": FORMAT_VERSION, "library_version": __version__, "model": model_fingerprint(model),
        "kind": "photo" if texts is None else "product", "n_items": n_items, "shard_size": shard_size,
        "n_shards": -(-n_items // shard_size), "inputs_sha256": _inputs_digest(ids, photos, texts),
        "precision": "fp32" if _autocast_dtype(model.device, precision) is None else "bf16",
        "jpeg_draft": jpeg_draft, "embed_dim": model.config.embed_dim,
    }
    existing = _read_manifest(output / MANIFEST_NAME)
    if existing is not None:  # every process checks before any waits, so a refusal never hangs the others
        _check_same_plan(output, existing, plan)
    owner = rank == 0 or barrier is None
    if owner and existing is None:
        output.mkdir(parents=True, exist_ok=True)
        atomic_text(output / MANIFEST_NAME, json.dumps(plan, indent=2))
    if rank == 0 and (world_size == 1 or barrier is not None):
        # temporary files left by a killed run; no process is writing yet
        for stale in [*output.glob(".shard-*.tmp"), *output.glob(f".{MANIFEST_NAME}.*.tmp")]:
            stale.unlink(missing_ok=True)
    if barrier is not None:
        barrier()

    result = ShardedEmbeddings(output, plan)
    share = [k for k in range(rank, plan["n_shards"], world_size)]
    pending = [k for k in share if not result.shard_path(k).is_file()]
    if pending:
        _embed_shards(model, ids, photos, texts, result, pending, share, batch_size=batch_size,
                      num_workers=num_workers, precision=precision, jpeg_draft=jpeg_draft, engine=engine,
                      on_error=on_error, progress=progress and rank == 0)
    if barrier is not None:
        barrier()
    return result


def _embed_shards(model, ids, photos, texts, result: ShardedEmbeddings, pending: list[int], share: list[int], *,
                  batch_size, num_workers, precision, jpeg_draft, engine, on_error, progress) -> None:
    shard_size, n_items = result.manifest["shard_size"], result.manifest["n_items"]

    def shard_length(k: int) -> int:
        return min(n_items, (k + 1) * shard_size) - k * shard_size

    n_photos = sum(photos[i] is not None for k in pending
                   for i in range(k * shard_size, k * shard_size + shard_length(k)))
    on_cpu = model.device.type == "cpu"
    if num_workers is None:
        num_workers = _cpu_count() if on_cpu else default_num_workers()
    batches = _ShardBatches(pending, shard_size, n_items, batch_size)
    options = {"room_views": False, "jpeg_draft": jpeg_draft, "num_workers": num_workers}
    if on_cpu and resolve_engine(engine, model, precision, n_photos) == "onnxruntime":
        # The workers only decode. They start before the encoder is built, so they decode ahead
        # (up to ONNX_PREFETCH_PHOTOS) while the ONNX export keeps the main process busy, and
        # they are forked before this process starts ONNX Runtime.
        prefetch = max(2, ONNX_PREFETCH_PHOTOS // (batch_size * max(1, num_workers)))
        loader, finish = _photo_loader(model, photos, batches, prefetch_factor=prefetch, **options)
        batch_iterator = iter(loader)
        encode = photo_encoder(model, room_views=False, precision=precision, engine=engine,
                               n_photos=n_photos, fold_batch_norms=True)
    else:
        encode = _encoder(model, room_views=False, precision=precision, fold_batch_norms=True)
        loader, finish = _photo_loader(model, photos, batches, encode_in_workers=encode if on_cpu else None,
                                       **options)
        batch_iterator = iter(loader)
    from tqdm.auto import tqdm

    total = sum(map(shard_length, share))
    done_before = total - sum(map(shard_length, pending))
    rows, row_ids, skipped, seen, current = [], [], [], 0, None
    with tqdm(total=total, initial=done_before, desc="embedding", unit="img", disable=not progress) as bar:
        for batch in batch_iterator:
            shard = batch.positions[0] // shard_size
            if current is None:
                current = shard
            if batch.skipped and on_error == "raise":
                _, source, reason = batch.skipped[0]
                raise ImageError(source, reason)
            photo_vectors = batch.vectors if batch.pixels is None else encode(finish(batch.pixels))
            keep, vectors = _batch_vectors(model, batch, photo_vectors, texts, precision)
            rows.append(vectors)
            row_ids.extend(ids[i] for i in keep)
            skipped.extend((ids[i], source, reason) for i, source, reason in batch.skipped)
            seen += len(batch.positions)
            bar.update(len(batch.positions))
            if seen == shard_length(current):
                _write_shard(result.shard_path(current), current, row_ids, torch.cat(rows), skipped,
                             plan_digest(result.manifest))
                rows, row_ids, skipped, seen, current = [], [], [], 0, None


def _batch_vectors(model, batch: _Batch, photo_vectors: torch.Tensor | None, texts, precision: str
                   ) -> tuple[list[int], torch.Tensor]:
    """(positions with a row, their vectors (rows, D)): photo vectors, or photo fused with text."""
    dim = model.config.embed_dim
    if texts is None:
        return batch.kept, photo_vectors if photo_vectors is not None else torch.empty(0, dim)
    batch_texts = [texts[i] or "" for i in batch.positions]
    kept = set(batch.kept)
    has_photo = torch.tensor([i in kept for i in batch.positions], dtype=torch.bool)
    has_text = torch.tensor([bool(t) for t in batch_texts], dtype=torch.bool)
    keep = has_photo | has_text
    image_embeds = torch.zeros(len(batch.positions), dim)
    if photo_vectors is not None:
        image_embeds[has_photo] = photo_vectors
    text_embeds = torch.zeros(len(batch.positions), dim)
    dtype = _autocast_dtype(model.device, precision)
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
        if bool(has_text.any()):
            text_embeds[has_text] = model.encode_text([t for t in batch_texts if t]).float().cpu()
        device = model.device
        fused = model.product_vector(image_embeds[keep].to(device), text_embeds[keep].to(device),
                                     image_present=has_photo[keep].to(device),
                                     text_present=has_text[keep].to(device)).float().cpu()  # (rows, D)
    return [p for p, k in zip(batch.positions, keep.tolist()) if k], fused.clone()


def plan_digest(manifest: dict) -> str:
    """SHA-256 of an embedding folder's plan (model, inputs, settings): every shard records it."""
    plan = {key: manifest.get(key) for key in _PLAN_KEYS}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()


def _vectors_digest(ids: list[str], vectors: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(ids, ensure_ascii=False).encode("utf-8"))
    digest.update(vectors.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_shard(path: Path, shard: int, ids: list[str], vectors: torch.Tensor,
                 skipped: list[tuple[str, str, str]], plan: str) -> None:
    from safetensors.torch import save_file

    tensors = {"vectors": vectors.to(torch.float32).contiguous()}  # (rows, D)
    # the plan ties the shard to its folder's manifest, the digest its ids to its vectors
    metadata = {"shard": str(shard), "ids": json.dumps(ids, ensure_ascii=False),
                "skipped": json.dumps(skipped, ensure_ascii=False), "plan_sha256": plan,
                "vectors_sha256": _vectors_digest(ids, tensors["vectors"])}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive integer")


def _check_inputs(ids: Sequence[str], photos: Sequence, texts: Sequence | None) -> None:
    if len(photos) != len(ids) or (texts is not None and len(texts) != len(ids)):
        counts = f"{len(ids)} ids, {len(photos)} photos" + (f", {len(texts)} texts" if texts is not None else "")
        raise ValueError(f"{counts}: give one photo (or None) and one text (or None) per id")
    seen: set[str] = set()
    for position, item in enumerate(ids):
        if not isinstance(item, str) or not item:
            raise ValueError(f"id at position {position} is {item!r}; ids must be non-empty strings")
        if item in seen:
            raise ValueError(f"id {item!r} occurs twice (again at position {position}); ids must be unique")
        seen.add(item)
    if texts is None and any(photo is None for photo in photos):
        raise ValueError("an item has no photo and no texts are given: give texts, or leave such items out")


def _inputs_digest(ids: Sequence[str], photos: Sequence, texts: Sequence | None) -> str:
    digest = hashlib.sha256()
    for i, item in enumerate(ids):
        text = texts[i] if texts is not None else None
        digest.update(json.dumps([item, None if photos[i] is None else str(photos[i]), text],
                                 ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return read_versioned_manifest(path, reads_up_to=FORMAT_VERSION, required=("n_shards", *_PLAN_KEYS),
                                   fix="the folder is damaged, delete it and embed again")


def _check_same_plan(folder: Path, existing: dict, plan: dict) -> None:
    differing = [key for key in _PLAN_KEYS if existing.get(key) != plan[key]]
    if differing:
        details = "; ".join(f"{key}: folder has {existing.get(key)!r}, this run {plan[key]!r}" for key in differing)
        raise ValueError(f"{folder} holds embeddings made differently ({details}); resume only with the same "
                         "model, inputs and settings, or choose another output folder")
