"""What both product stores (FAISS `ProductIndex`, Milvus `MilvusProductIndex`) check as products and
queries enter: ids, unit vectors, JSON metadata, and the identity of the model that made the vectors."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NORM_TOLERANCE = 1e-2  # |norm - 1| accepted (and renormalised); beyond it vectors are refused


# Model settings added after index folders recorded identities, with the defaults that compute what
# models before them computed: a model at these defaults hashes as it did before the setting existed.
_SETTINGS_ADDED_LATER = {"room_views": "crops", "room_map_size": 640}


def model_fingerprint(model: Any) -> str:
    """A string that changes whenever the vectors a model produces may change.

    SHA-256 over the model's config JSON (sorted keys) and every state-dict tensor (name, dtype,
    shape, raw bytes, in name order), prefixed by the config name so errors can say which model
    is which: "hgm-tiny:sha256:3f2a...". It reads every weight once (a hash over the model's bytes).

    Args:
        model: an `hgm_mm.HGMModel` (anything with `config.to_dict()` and `state_dict()`).
    """
    import torch

    digest = hashlib.sha256()
    config = model.config.to_dict()
    for key, default in _SETTINGS_ADDED_LATER.items():  # at their defaults, older folders keep their identity
        if config.get(key) == default:
            config.pop(key)
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode("utf-8"))
        digest.update(t.view(torch.uint8).numpy())  # raw bytes, no copy
    return f"{config.get('name', 'custom')}:sha256:{digest.hexdigest()}"


# -- products entering a store --------------------------------------------------------------------------
def check_new_ids(ids: Sequence[str], existing) -> list[str]:
    """`ids` as a list of str, refused when one is empty, repeated, or in `existing` (a container)."""
    if isinstance(ids, str):
        raise ValueError(f"ids must be a list of strings; got the string {ids!r}, wrap it: [{ids!r}]")
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise ValueError(f"ids must be non-empty strings; got {bad[:5]!r}")
    ids = [str(i) for i in ids]  # numpy str_ -> str, for JSON
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ValueError(f"{len(dupes)} id(s) appear more than once in this batch, e.g. {dupes[:5]}; "
                         "product ids must be unique")
    already = [i for i in ids if i in existing]
    if already:
        raise ValueError(f"{len(already)} id(s) are already in the index, e.g. {already[:5]}; to replace "
                         "their vectors or metadata, remove(ids) them first, then add")
    return ids


def infer_dim(vectors: Any) -> int:
    shape = getattr(vectors, "shape", None)
    if shape is None:
        shape = np.asarray(vectors).shape
    if len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"vectors have shape {tuple(shape)}; expected (N, D)")
    return int(shape[1])


def count_rows(vectors: Any) -> int:
    return int(getattr(vectors, "shape", np.asarray(vectors).shape)[0])


def as_unit_matrix(x: Any, dim: int, what: str, *, allow_1d: bool = False) -> np.ndarray:
    """(N, D) float32 C-contiguous unit rows, a new array; refuses what cosine search cannot use."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").float().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{what} have dtype {a.dtype}; expected numbers")
    if allow_1d and a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what} have shape {a.shape}; expected (N, {dim}) for this index of dimension {dim}")
    a = a.astype(np.float32)  # (N, D), a copy: the caller's array is never changed
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if len(bad):
        raise ValueError(f"{what} rows {bad[:5].tolist()} hold NaN or inf ({len(bad)} rows); "
                         "check the model's inputs for those products")
    norms = np.linalg.norm(a, axis=1)  # (N,)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if len(bad):
        raise ValueError(f"{what} must be unit vectors (cosine search); rows {bad[:5].tolist()} have norms "
                         f"{np.round(norms[bad[:5]], 4).tolist()}. Use model.encode_* outputs, or normalise: "
                         "v / np.linalg.norm(v, axis=1, keepdims=True)")
    a /= norms[:, None]
    return np.ascontiguousarray(a)


def check_metadata(metadata: Sequence[Mapping[str, Any]] | None, ids: list[str]) -> list[dict]:
    if metadata is None:
        return [{} for _ in ids]
    if isinstance(metadata, Mapping) or not isinstance(metadata, Sequence):
        raise ValueError(f"metadata must be a list of dicts, one per id; got {type(metadata).__name__}")
    if len(metadata) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata dicts; give one dict per id")
    for product_id, meta in zip(ids, metadata):
        if not isinstance(meta, Mapping) or not all(isinstance(key, str) for key in meta):
            raise ValueError(f"metadata of {product_id!r} must be a dict with string keys; got {meta!r}")
    try:
        # A JSON round trip: a deep copy, and the same values a saved and reloaded index holds.
        return json.loads(json.dumps([dict(m) for m in metadata], allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must hold JSON values (str, number, bool, None, lists, dicts) and no "
                         f"NaN: {err}") from err


def identity_string(identity: Any) -> str | None:
    if identity is None or isinstance(identity, str):
        return identity
    if hasattr(identity, "config") and hasattr(identity, "state_dict"):
        return model_fingerprint(identity)
    raise TypeError(f"model_identity must be a model_fingerprint string or a model; got {type(identity).__name__}")


def identity_name(identity: str | None) -> str | None:
    return None if identity is None else identity.rsplit(":sha256:", 1)[0]


def check_identity(saved: str | None, given: str | None, folder: Path) -> None:
    if given is None or saved == given:
        return
    fix = ("Re-index the catalogue with that model: encode the products with it and call "
           "ProductIndex.build(ids, vectors, metadata, model_identity=model_fingerprint(model)), then save")
    if saved is None:
        raise ValueError(f"{folder} was saved without a model identity, so it cannot be checked against model "
                         f"{identity_name(given)!r}. {fix}")
    saved_name, given_name = identity_name(saved), identity_name(given)
    detail = (f"both are named {saved_name!r} but their weights or configs differ ({saved[-64:][:12]} vs "
              f"{given[-64:][:12]})" if saved_name == given_name else "")
    raise ValueError(f"{folder} was built with model {saved_name!r}, but the queries come from model "
                     f"{given_name!r}{': ' + detail if detail else ''}; their vectors are not comparable. {fix}")
