"""A catalogue's product vectors, embedded only where its content changed.

A product's vector depends on its photo's bytes and its text (`data.text.product_text`) and on the
model, nothing else; `content_key` digests the first two. `catalog_vectors` reuses the vector of
every product whose key is already known for this model — from the index folder of a previous
build, or from the shards a killed build left — and embeds the rest into resumable shards beside
the folder (one `embed_to_shards` folder per attempt, so a build killed again and again keeps what
each attempt finished). Metadata (price, colour ...) is always taken from the current catalogue, so changing
it costs no embedding. The vectors are the same whichever way they were reached, so the folder
equals a fresh build's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

CONTENT_KEYS_FILE = "content_keys.json"  # in the index folder: product id -> content key of its vector
MAX_SHARD_PRODUCTS = 4096
MIN_SHARDS = 32  # a small catalogue is still cut into this many shards, so a killed build keeps most of its work
_PHOTO_READ_BYTES = 1 << 20


@dataclass
class CatalogVectors:
    """The vectors of a catalogue's products, and how they were reached."""

    ids: list[str]  # products with a vector, in catalogue order
    vectors: np.ndarray  # (N, D) float32 unit vectors, row i for ids[i]
    keys: dict[str, str]  # product id -> content key, for every product with a vector
    n_embedded: int = 0  # products whose vector was computed in this call
    n_reused: int = 0  # products whose vector came from the previous build or a killed build's shards
    # products left out: their photo is unreadable and they have no text (product id, photo, reason)
    left_out: list[tuple[str, str, str]] = field(default_factory=list)
    # products whose photo is unreadable, indexed by their text alone (product id, photo, reason)
    text_only: list[tuple[str, str, str]] = field(default_factory=list)


def content_key(photo: str | Path | None, text: str | None) -> str:
    """SHA-256 of a photo's bytes and a text: equal keys give equal vectors under one model.

    A photo that cannot be read digests as its path and the error, so fixing the file changes the key.
    """
    digest = hashlib.sha256()
    if photo is None:
        digest.update(b"no photo\0")
    else:
        photo_digest = hashlib.sha256()
        try:
            with open(photo, "rb") as f:
                while chunk := f.read(_PHOTO_READ_BYTES):
                    photo_digest.update(chunk)
            digest.update(b"photo\0" + photo_digest.digest())
        except OSError as err:
            digest.update(f"unreadable\0{photo}\0{type(err).__name__}".encode("utf-8"))
    digest.update(b"\0text\0" + (text or "").encode("utf-8"))
    return digest.hexdigest()


def catalog_vectors(model, fingerprint: str, ids: Sequence[str], photos: Sequence[str | Path | None],
                    texts: Sequence[str | None], previous: tuple[list[str], np.ndarray, dict[str, str]] | None,
                    shards_dir: Path, *, batch_size: int, num_workers: int | None, progress: bool) -> CatalogVectors:
    """The vectors of a catalogue (`ids`, `photos`, `texts` aligned), embedding only unknown content.

    Args:
        model: the `HGMModel` whose product vectors these are.
        fingerprint: its `index.model_fingerprint`, which shards of another model never match.
        previous: (ids, vectors, content keys) of a previous build by the same model, or None.
        shards_dir: where the new vectors stream into resumable shards; shards left there by a
            killed build of the same model are reused, whatever catalogue it was building. The
            caller removes the folder once the vectors are saved elsewhere.
    """
    from . import embed_to_shards

    keys = [content_key(photo, text) for photo, text in zip(photos, texts)]
    known: dict[str, np.ndarray] = {}
    if previous is not None:
        previous_ids, previous_vectors, previous_keys = previous
        for row, product_id in enumerate(previous_ids):
            if product_id in previous_keys:
                known[previous_keys[product_id]] = previous_vectors[row]
    if shards_dir.is_dir():
        _harvest_attempts(shards_dir, fingerprint, set(keys), known)
    pending: dict[str, int] = {}  # content key -> position of its first product
    for position, key in enumerate(keys):
        if key not in known:
            pending.setdefault(key, position)
    embedded_skips: dict[str, tuple[str, str]] = {}
    if pending:
        positions = list(pending.values())
        shard_size = max(1, min(MAX_SHARD_PRODUCTS, -(-len(positions) // MIN_SHARDS)))
        logger.info("embedding %d of %d products (the others' photos and texts are unchanged)",
                    len(positions), len(ids))
        attempt = hashlib.sha256("\n".join(pending).encode("utf-8")).hexdigest()[:16]
        shards = embed_to_shards(model, list(pending), [photos[p] for p in positions], shards_dir / attempt,
                                 texts=[texts[p] for p in positions], shard_size=shard_size, batch_size=batch_size,
                                 num_workers=num_workers, progress=progress)
        new_keys, new_vectors = shards.load()
        known.update(zip(new_keys, new_vectors.numpy()))
        embedded_skips = {key: (photo, reason) for key, photo, reason in shards.skipped()}

    result_ids, rows, result_keys, left_out, text_only = [], [], {}, [], []
    for product_id, photo, key in zip(ids, photos, keys):
        problem = embedded_skips.get(key)
        if key in known:
            result_ids.append(product_id)
            rows.append(known[key])
            result_keys[product_id] = key
            if problem is not None:
                text_only.append((product_id, *problem))
        else:
            photo_reason = problem or (str(photo), "not embedded")
            left_out.append((product_id, *photo_reason))
    dim = model.config.embed_dim
    vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), dtype=np.float32)
    n_embedded = sum(1 for key in result_keys.values() if key in pending)
    return CatalogVectors(result_ids, vectors, result_keys, n_embedded=n_embedded,
                          n_reused=len(result_ids) - n_embedded, left_out=left_out, text_only=text_only)


def _harvest_attempts(root: Path, fingerprint: str, wanted: set[str], known: dict[str, np.ndarray]) -> None:
    """Adds the vectors of the finished shards earlier, killed attempts left under `root` (same model only)."""
    from . import MANIFEST_NAME, ShardedEmbeddings

    if (root / MANIFEST_NAME).is_file():  # one shard folder keyed by product id, from an older hgm_mm
        logger.info("%s: shards of an older layout; not reused", root)
        shutil.rmtree(root, ignore_errors=True)
        return
    found = 0
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        try:
            shards = ShardedEmbeddings.open(folder)
        except (FileNotFoundError, ValueError) as err:
            logger.warning("%s: not reused (%s)", folder, err)
            continue
        if shards.manifest.get("model") != fingerprint or shards.manifest.get("kind") != "product":
            continue  # another model's vectors: never mixed in
        for keys, vectors, _ in shards.finished_shards():
            for key, vector in zip(keys, vectors.numpy()):
                if key in wanted and key not in known:
                    known[key] = vector
                    found += 1
    if found:
        logger.info("%s: %d vectors reused from an interrupted build", root, found)


def read_content_keys(path: Path, fingerprint: str) -> dict[str, str]:
    """product id -> content key from an index folder's `content_keys.json`, when `fingerprint`'s
    model wrote it ({} otherwise: every product is embedded again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        saved_model, keys = data["model"], data["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s: damaged; every product is embedded again", path)
        return {}
    if saved_model != fingerprint:
        return {}
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        logger.warning("%s: not a map of product ids to keys; every product is embedded again", path)
        return {}
    return keys
