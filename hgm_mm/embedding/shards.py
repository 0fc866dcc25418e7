"""`embed_to_shards` embeds a catalogue of any size into a folder of shards, so memory stays flat in catalogue size, a rerun resumes where a
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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..files import atomic_text, atomic_write, read_versioned_manifest
from ..processes import process_share
from ..version import __version__
from ..data.images import ImageError
from .batch import (ONNX_PREFETCH_PHOTOS, _Batch, _ShardBatches, _autocast_dtype, _check_positive, _cpu_count, _encoder,
                    _photo_loader, default_num_workers, photo_encoder, resolve_engine)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
FORMAT_VERSION = 1  # bump when the folder layout or the meaning of a saved key changes
# Manifest keys that must match for a rerun to resume a folder instead of refusing it.
_PLAN_KEYS = ("model", "kind", "n_items", "shard_size", "inputs_sha256", "precision", "jpeg_draft", "embed_dim")


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
    from ..retrieval.index import model_fingerprint

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
