"""The catalogue folder `Matcher.load` opens: `build_catalog_index` writes it (`hgm-mm index`), `read_manifest`
and `open_index` read it.

    catalogue/
      matcher.json          what is where, and the ranking weights; written last
      index/                the FAISS `ProductIndex` (absent when the vectors are in a Milvus store)
      model/                a copy of the model that made the vectors
      content_keys.json     what each product's vector was computed from (a rebuild embeds only the rest)
      scene_categories.json the scene-category prior, when given
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_dir, atomic_text, read_versioned_manifest
from ..retrieval.index import ProductIndex, model_fingerprint
from .prior import SCENE_CATEGORIES_FILE, SceneCategoryPrior
from ..processes import ProcessGroup
from .weights import RankingWeights
from ..version import __version__

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the index may live in a Milvus store ("store"); folders with a FAISS index stay 1
MATCHER_FILE = "matcher.json"  # written last: a folder without it is not a finished index
INDEX_DIR = "index"
MODEL_DIR = "model"


@dataclass
class CatalogIndex:
    """What `build_catalog_index` wrote."""

    folder: Path
    n_products: int
    skipped: list[tuple[str, str]]  # (photo, reason): products indexed from their text alone
    # products left out of the index: unreadable photo and no text (product id, photo, reason)
    left_out: list[tuple[str, str, str]] = field(default_factory=list)
    n_embedded: int = 0  # products embedded by this build; the others kept the previous build's vectors
    n_reused: int = 0


def product_metadata(product) -> dict[str, Any]:
    """The metadata a `Product` is indexed with: title, category, image path, and its other attributes."""
    meta: dict[str, Any] = {"title": product.title, "category": product.category, "image": str(product.image)}
    if product.description:
        meta["description"] = product.description
    for key, value in product.attributes.items():
        if key not in meta and isinstance(value, (str, int, float, bool)) and not (
                isinstance(value, float) and not math.isfinite(value)):
            meta[key] = value
    return meta


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """The folder `build_catalog_index` may write: new, empty, or an index folder it wrote before."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir())
                                                            and not (output_dir / MATCHER_FILE).is_file())):
        raise ValueError(f"{output_dir} exists and is not an index folder written by hgm-mm index; choose a new "
                         "or empty folder (it would be replaced)")
    return output_dir


def build_catalog_index(model, products: Sequence | str | os.PathLike, output_dir: str | os.PathLike, *,
                        prior: SceneCategoryPrior | None = None, weights: RankingWeights | None = None,
                        kind: str = "auto", store: str = "faiss", collection: str | None = None,
                        batch_size: int = 32, num_workers: int | None = None, progress: bool = True) -> CatalogIndex:
    """Embeds a catalogue and writes a folder that `Matcher.load` opens on its own.

    The folder holds `index/` (the `ProductIndex`, tied to the model's fingerprint), `model/` (a
    copy of the model), `content_keys.json` (what each product's vector was computed from),
    `scene_categories.json` (the prior, when given) and `matcher.json` (what is where, and the
    ranking weights), written last. The whole folder is written beside its place and swapped in,
    so an interrupted build leaves the previous one intact.

    Under `accelerate launch` (an initialised torch.distributed group) every process embeds its
    share of the new products' shards; process 0 alone reads the previous build, writes the
    index or store and the folder, and the others wait for it and return the same summary.

    With a Milvus `store` the vectors and metadata go to its collection instead of `index/`, and
    `matcher.json` names the store. The collection is updated in place: every product is
    upserted, then products no longer in the catalogue are deleted, so replicas reading it always
    see a whole catalogue. A collection that another model built is refused rather than
    overwritten, since replicas may still query it with that model.

    Rebuilding a folder of the same model embeds only the products whose photo bytes or text
    changed or that are new (`hgm_mm.embedding.catalog_vectors`); removed products are dropped, and
    metadata is always the catalogue's. A killed build resumes from its finished shards. A
    product whose photo cannot be read is indexed by its text; one with no text either is left
    out and listed in `CatalogIndex.left_out`.

    Args:
        model: the `HGMModel` whose vectors the index holds.
        products: `Product` records, or the path of a products.jsonl.
        output_dir: the folder to write; an existing folder is replaced only if it is a matcher folder.
        prior: P(category | scene) from training pairs, or None.
        weights: ranking weights to store; default `RankingWeights()`.
        kind: the index kind ("auto", "exact", "hnsw", "ivfpq"; "ivfpq" is FAISS only).
        store: "faiss" (the index inside the folder) or a Milvus store URI
            ("milvus-lite:PATH.db", "milvus://HOST:PORT"; see `hgm_mm.retrieval.milvus`).
        collection: the Milvus collection (default `retrieval.milvus.DEFAULT_COLLECTION`).
        batch_size, num_workers, progress: of the catalogue embedding.
    """
    from ..embedding.catalog_vectors import CONTENT_KEYS_FILE, catalog_vectors
    from ..data import read_products
    from ..data.text import product_text

    output_dir = check_output_dir(output_dir)
    if isinstance(products, (str, os.PathLike)):
        products = read_products(products)
    products = list(products)
    if not products:
        raise ValueError("the catalogue is empty; give at least one product")
    weights = weights if weights is not None else RankingWeights()
    model.eval()
    fingerprint = model_fingerprint(model)
    group = ProcessGroup()
    # the store is reached, and its collection checked, before any embedding (by one process:
    # Milvus Lite serves one process at a time)
    stored = group.first(lambda: _open_store_for_build(store, collection, kind, model, fingerprint))
    # new vectors stream into resumable shards beside the output: a killed build picks up where it stopped
    shards_dir = output_dir.parent / f".{output_dir.name}.vectors"
    previous = group.first_shared(lambda: _previous_vectors(output_dir, fingerprint),
                                  output_dir.parent / f".{output_dir.name}.previous.safetensors")
    found = catalog_vectors(model, fingerprint, [p.product_id for p in products], [p.image for p in products],
                            [product_text(p) for p in products], previous, shards_dir, batch_size=batch_size,
                            num_workers=num_workers, progress=progress)
    summary = CatalogIndex(output_dir, len(found.ids), [(photo, reason) for _, photo, reason in found.text_only],
                           left_out=found.left_out, n_embedded=found.n_embedded, n_reused=found.n_reused)
    if group.rank != 0:
        group.barrier()  # process 0 writes the index and the folder
        return summary
    if not found.ids:
        first = found.left_out[0]
        raise ValueError(f"none of the {len(products)} products could be indexed: no readable photo and no text "
                         f"(first: {first[0]}, {first[1]}: {first[2]})")
    by_id = {p.product_id: p for p in products}
    metadata = [product_metadata(by_id[i]) for i in found.ids]
    if stored is None:
        index = ProductIndex.build(found.ids, found.vectors, metadata, kind=kind, model_identity=fingerprint)
    else:
        index = stored
        _keep_unchanged_keys(output_dir, fingerprint, found.keys)  # before the collection changes
        stale = set(index.ids) - set(found.ids)
        index.upsert(found.ids, found.vectors, metadata)
        if stale:
            index.remove(stale)

    def write(folder: Path) -> None:
        if stored is None:
            index.save(folder / INDEX_DIR)
        model.save_pretrained(folder / MODEL_DIR)
        atomic_text(folder / CONTENT_KEYS_FILE, json.dumps({"model": fingerprint, "keys": found.keys}))
        if prior is not None:
            prior.save(folder / SCENE_CATEGORIES_FILE)
        manifest = {"format": "hgm_mm.Matcher", "format_version": 1 if stored is None else FORMAT_VERSION,
                    "library_version": __version__, "model": MODEL_DIR,
                    "index": INDEX_DIR if stored is None else None,
                    "store": None if stored is None else {"uri": stored.uri, "collection": stored.collection},
                    "scene_categories": SCENE_CATEGORIES_FILE if prior is not None else None,
                    "weights": weights.to_dict(), "n_products": len(found.ids)}
        atomic_text(folder / MATCHER_FILE, json.dumps(manifest, indent=2))

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(output_dir, write)
    shutil.rmtree(shards_dir, ignore_errors=True)  # only now: a kill before the swap keeps the new vectors
    group.barrier()
    return summary


def _open_store_for_build(store: str, collection: str | None, kind: str, model, fingerprint: str):
    """The Milvus collection `build_catalog_index` writes (created when new), or None for a FAISS folder."""
    from ..retrieval.milvus import DEFAULT_COLLECTION, MilvusProductIndex, MissingCollectionError, parse_store_uri

    target = parse_store_uri(store)
    if target.engine == "faiss":
        if collection is not None:
            raise ValueError("a collection names a table of a Milvus store; with the FAISS index inside the folder, "
                             "leave it out or give a Milvus store")
        return None
    collection = collection or DEFAULT_COLLECTION
    try:
        existing = MilvusProductIndex.open(store, collection=collection)
    except MissingCollectionError:
        return MilvusProductIndex.create(store, model.config.embed_dim, collection=collection, kind=kind,
                                         model_identity=fingerprint)
    if existing.model_identity != fingerprint:
        def name(identity):
            return "an unknown model" if identity is None else \
                f"model {identity.rsplit(':sha256:', 1)[0]!r} ({identity[-64:][:12]})"
        raise ValueError(f"collection {collection!r} of store {store!r} holds the vectors of {name(existing.model_identity)}, "
                         f"not of the {name(fingerprint)} being indexed. Replicas may still query it with its own "
                         "model, so it is not overwritten: index into another collection (--collection NAME) and "
                         "point the service at the new folder")
    return existing


def _previous_vectors(folder: Path, fingerprint: str) -> tuple[list[str], np.ndarray, dict[str, str]] | None:
    """(ids, vectors, content keys) of the index a previous build of the same model wrote into
    `folder`, wherever its manifest says the vectors are (its FAISS index or a Milvus collection,
    whichever store the new build writes to), or None."""
    from ..embedding.catalog_vectors import CONTENT_KEYS_FILE, read_content_keys

    if not (folder / MATCHER_FILE).is_file() or not (folder / CONTENT_KEYS_FILE).is_file():
        return None
    try:
        index = open_index(folder, read_manifest(folder), fingerprint)
    except (OSError, LookupError, ValueError) as err:  # another model's index, or a damaged one: embed everything
        logger.info("%s: its vectors are not reused (%s)", folder, str(err).splitlines()[0])
        return None
    keys = read_content_keys(folder / CONTENT_KEYS_FILE, fingerprint)
    ids = [i for i in index.ids if i in keys]
    return ids, index.vectors(ids), keys


def _keep_unchanged_keys(folder: Path, fingerprint: str, keys: Mapping[str, str]) -> None:
    """Drops from `folder`'s content keys every product whose vector is about to change in its
    store, so a build killed halfway never pairs an old key with a new vector."""
    from ..embedding.catalog_vectors import CONTENT_KEYS_FILE, read_content_keys

    path = folder / CONTENT_KEYS_FILE
    if path.is_file():
        previous = read_content_keys(path, fingerprint)
        unchanged = {i: key for i, key in previous.items() if keys.get(i) == key}
        atomic_text(path, json.dumps({"model": fingerprint, "keys": unchanged}))


def open_index(folder: Path, manifest: Mapping[str, Any], model):
    """The index a matcher folder names (`manifest`, from `read_manifest`): its FAISS folder, or its Milvus
    collection, checked against `model` (a model or its fingerprint)."""
    store = manifest.get("store")
    if store is None:
        return ProductIndex.load(folder / manifest["index"], model_identity=model)
    from ..retrieval.milvus import MilvusProductIndex

    return MilvusProductIndex.open(store["uri"], collection=store["collection"], model_identity=model)


def read_manifest(folder: Path) -> dict[str, Any]:
    """`folder`'s matcher.json, checked: its format, where the model, index or store and prior are, the weights."""
    path = folder / MATCHER_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; build one with: hgm-mm index --model M --catalog "
                                "products.jsonl --output DIR")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MATCHER_FILE}: it is not a finished index folder; build one "
                                "with: hgm-mm index --model M --catalog products.jsonl --output DIR")
    manifest = read_versioned_manifest(path, reads_up_to=FORMAT_VERSION, fix="build the index again")
    store = manifest.get("store")
    if store is not None and not (isinstance(store, dict) and isinstance(store.get("uri"), str)
                                  and isinstance(store.get("collection"), str)):
        raise ValueError(f"{path}: store={store!r}; expected {{\"uri\": ..., \"collection\": ...}}. Build the "
                         "index again")
    for key in ("model",) if store is not None else ("model", "index"):
        value = manifest.get(key)
        if not isinstance(value, str) or Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"{path}: {key}={value!r}; expected a folder name inside {folder}. Build the index again")
    scene = manifest.get("scene_categories")
    if scene is not None and (not isinstance(scene, str) or Path(scene).is_absolute() or ".." in Path(scene).parts):
        raise ValueError(f"{path}: scene_categories={scene!r}; expected a file name inside {folder}")
    if not isinstance(manifest.get("weights"), dict):
        raise ValueError(f"{path}: 'weights' must be a JSON object of RankingWeights; build the index again")
    return manifest
