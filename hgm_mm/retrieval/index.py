"""The catalogue index: product vectors, ids and metadata on FAISS, searched by room vectors.

    with torch.no_grad():
        vectors = model.encode_product(photos, titles)  # (N, D) unit norm
    index = ProductIndex.build(ids, vectors, metadata, model_identity=model_fingerprint(model))
    hits = index.search(room_vectors, k=10, filter={"category": ["sofa", "chair"], "price": (None, 800)})
    index.save("catalogue_index")
    index = ProductIndex.load("catalogue_index", model_identity=model_fingerprint(model))

Decisions, in one place (figures from benchmarks/bench_index.py, D=384, 2 CPU cores):
  - Vectors are unit norm and scores are inner products (= cosine). Vectors within
    `checks.NORM_TOLERANCE` of unit norm are renormalised silently (fp16 towers land there); anything
    further is refused, since it means the vectors did not come from `model.encode_*`.
  - Kinds: "exact" (IndexIDMap2 over IndexFlatIP), "hnsw" (IndexHNSWFlat, inner product) and
    "ivfpq" (IVF with 4-bit fast-scan PQ and an exact re-ranking stage, IndexRefineFlat; it keeps
    the exact vectors for re-ranking, so it saves build time, not memory). "auto" (the default)
    is exact up to `IndexParams.exact_max` products and HNSW beyond: both approximate kinds
    reach recall@10 >= 0.99 at sub-millisecond latency, and HNSW needs no training, so it also
    serves catalogues that change a lot after the first build; "ivfpq" built 4-7x faster at 1M. An auto
    index that grows past the threshold through `add` is converted to HNSW once (a rebuild).
  - Products are labelled inside FAISS by int64 labels that are never reused. The exact index
    removes for real (`remove_ids`); HNSW cannot remove and IVF-PQ's refine stage cannot either,
    so removed products of those kinds stay in the graph as tombstones that the search selector
    excludes. `compact()` rebuilds without them.
  - Filters are a boolean mask over labels. A filtered search over at most
    `IndexParams.filter_exact_max` products is done exactly, as one matrix product over the
    selected stored vectors (fast and exact, for every kind); above that, the mask becomes an
    `IDSelectorBitmap` applied during the FAISS search, HNSW's efSearch (up to `max_ef_search`)
    and IVF's nprobe (up to nlist) are raised in inverse proportion to the filter's selectivity,
    and any query that still finds fewer than k products is redone exactly, so k results come
    back whenever k exist.
  - Adding an id that is already in the index is an error: `remove` it first. Silent overwrite
    would hide duplicate rows in a catalogue export.
  - Saved as a folder: the FAISS index file, ids and metadata as JSON (never pickle), and a
    manifest naming the format version, dimension, kind, count, file sizes and the identity of
    the model that made the vectors. Every file is written to a temporary name and moved into
    place, the manifest last.

Searches may run concurrently; `add`, `remove` and `compact` must not overlap anything else.
FAISS uses OpenMP: on a busy machine, `faiss.omp_set_num_threads(1)` keeps single-query latency
steady (OpenMP threads that wait for busy cores slow exact search down many times over).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..files import atomic_write, check_file_digest, file_sha256, read_json_object, read_versioned_manifest
from ..json_config import JsonConfig
from ..version import __version__
from .checks import (as_unit_matrix, check_identity, check_metadata, check_new_ids, count_rows, identity_name,
                     identity_string, infer_dim)
from .checks import model_fingerprint as model_fingerprint
from .filters import MetadataColumn, check_filter, unknown_attribute

FORMAT_VERSION = 1  # bump when the folder layout or the meaning of a saved key changes
KINDS = ("auto", "exact", "hnsw", "ivfpq")
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"

# benchmarks/bench_index.py measures the choice (figures in benchmarks/RESULTS.md): exact search
# time grows with the catalogue, HNSW's stays near constant at recall@10 >= 0.999; up to this size
# exact search answers a query in about the time the rest of a match takes, and needs no graph.
DEFAULT_EXACT_MAX = 100_000
HNSW_EF_PER_K = 4  # HNSW's efSearch is at least this many times k


@dataclass
class IndexParams(JsonConfig):
    """Index parameters; the search-time ones (`ef_search`, `nprobe`, `k_factor`) may be changed
    on a built index through `index.params`."""

    exact_max: int = DEFAULT_EXACT_MAX  # kind="auto": exact up to this many products, HNSW beyond
    hnsw_m: int = 32  # HNSW graph degree (memory: ~2 * M * 4 bytes per product on top of the vectors)
    ef_construction: int = 100  # HNSW build beam width: higher builds slower, searches more accurately
    ef_search: int = 128  # HNSW search beam width (raised to 4k, and for selective filters)
    max_ef_search: int = 1024  # cap on the raised efSearch of filtered HNSW searches
    nlist: int | None = None  # IVF lists; None: sqrt(N) at training
    nprobe: int = 64  # IVF lists scanned per query (the matcher asks for k=100 per query vector: over 1M
    # IKEA-like vectors its top-10 agreed with exact search 0.988 at 64 against 0.975 at 32, bench_match)
    pq_m: int | None = None  # 4-bit PQ sub-quantisers (must divide D); None: D // 2, 2 dimensions each
    k_factor: int = 16  # IVF-PQ: candidates re-ranked exactly = k * k_factor
    filter_exact_max: int = 20_000  # a filtered search over at most this many products is exact

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("nlist", "pq_m"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if f.name == "exact_max" else 1):
                raise ValueError(f"IndexParams.{f.name}={value!r}; expected a positive int"
                                 + (" or None" if f.name in ("nlist", "pq_m") else ""))



@dataclass
class SearchResult:
    """The products found for one query, best first."""

    ids: list[str]
    scores: np.ndarray  # (k',) float32 inner products (cosine), descending; k' <= k
    metadata: list[dict[str, Any]] = field(default_factory=list)  # copies, one per id

    def __len__(self) -> int:
        return len(self.ids)


class ProductIndex:
    """Product vectors with ids and metadata, searched by inner product with metadata filters.

    Build one with `ProductIndex.build(ids, vectors, metadata)` or start empty with
    `ProductIndex(dim)` and `add`; reopen a saved one with `ProductIndex.load(folder)`.
    See the module docstring for the decisions behind kinds, removal and filtering.
    """

    def __init__(self, dim: int, *, kind: str = "auto", params: IndexParams | None = None,
                 model_identity: Any = None):
        """An empty index.

        Args:
            dim: vector dimension (the model's `embed_dim`).
            kind: "auto", "exact", "hnsw" or "ivfpq".
            params: index parameters; defaults to `IndexParams()`.
            model_identity: the model that makes the vectors: a `model_fingerprint` string or the
                model itself; saved in the manifest and checked by `load`.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim={dim!r}; expected a positive int (the model's embed_dim)")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not valid; expected one of {list(KINDS)}")
        if params is not None and not isinstance(params, IndexParams):
            raise TypeError(f"params must be an IndexParams, got {type(params).__name__}")
        self.dim = int(dim)
        self.requested_kind = kind
        self.params = params if params is not None else IndexParams()
        self.model_identity = identity_string(model_identity)
        self.kind = "exact" if kind == "auto" else kind  # an empty auto index starts exact
        self._index: faiss.Index | None = None  # ivfpq is created when its first vectors arrive (training)
        if self.kind != "ivfpq":
            self._index = self._new_faiss_index(self.kind, 0)
        self._clear_products()

    def _clear_products(self) -> None:
        self._ids: list[str | None] = []  # label -> product id, None once removed
        self._meta: list[dict | None] = []  # label -> metadata, None once removed
        self._label_of: dict[str, int] = {}  # product id -> label
        self._live = np.zeros(0, dtype=bool)  # (L,) label -> still in the catalogue
        self._key_counts: Counter = Counter()  # metadata key -> live products that have it
        self._columns: dict[str, MetadataColumn] = {}  # filter columns, built on first use

    @classmethod
    def build(cls, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, Any]] | None = None, *,
              kind: str = "auto", params: IndexParams | None = None, model_identity: Any = None) -> "ProductIndex":
        """An index over a whole catalogue; kind "auto" picks exact or HNSW from its size.

        Args:
            ids: N unique product ids.
            vectors: (N, D) unit vectors (numpy array or torch tensor).
            metadata: N dicts of JSON values (category, price, any attribute), or None.
            kind, params, model_identity: as in `ProductIndex(...)`.
        """
        params = params if params is not None else IndexParams()
        dim = infer_dim(vectors)
        index = cls(dim, kind=kind, params=params, model_identity=model_identity)
        if kind == "auto" and count_rows(vectors) > params.exact_max:
            index.kind, index._index = "hnsw", index._new_faiss_index("hnsw", 0)  # build HNSW directly
        index.add(ids, vectors, metadata)
        return index

    # -- inspection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._label_of

    def __repr__(self) -> str:
        return (f"ProductIndex(dim={self.dim}, kind={self.kind!r}, count={len(self)}, "
                f"removed_pending={self.n_removed}, model={identity_name(self.model_identity)!r})")

    @property
    def ids(self) -> list[str]:
        """Live product ids, in insertion order."""
        return [i for i in self._ids if i is not None]

    @property
    def n_removed(self) -> int:
        """Removed products still held as tombstones (hnsw, ivfpq); `compact()` drops them."""
        return 0 if self.kind == "exact" else len(self._ids) - len(self)

    def metadata(self, product_id: str) -> dict[str, Any]:
        """A copy of one product's metadata."""
        if product_id not in self._label_of:
            raise KeyError(f"product {product_id!r} is not in the index")
        return dict(self._meta[self._label_of[product_id]])

    def metadata_of(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Copies of the metadata of products, in the order of `ids`.

        Raises:
            KeyError: an id is not in the index.
        """
        return [self.metadata(product_id) for product_id in ids]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored unit vectors of products, in the order of `ids` -> (N, D) float32.

        Raises:
            KeyError: an id is not in the index (names up to five of them).
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [i for i in ids if i not in self._label_of]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}")
        if not ids:
            return np.empty((0, self.dim), dtype=np.float32)
        labels = np.fromiter((self._label_of[i] for i in ids), dtype=np.int64, count=len(ids))
        matrix, rows = self._stored_rows(labels)
        return matrix[rows]  # a copy: fancy indexing

    def attributes(self) -> list[str]:
        """Metadata keys that filters may use (those held by at least one product)."""
        return sorted(k for k, n in self._key_counts.items() if n > 0)

    def value_counts(self, key: str) -> Counter:
        """How many live products hold each (hashable) value of metadata `key`; None counts those without it."""
        return Counter(meta.get(key) for meta in self._meta if meta is not None)

    # -- add / remove --------------------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Adds products without rebuilding the index.

        Args:
            ids: N new product ids; an id already in the index is an error (`remove` it first).
            vectors: (N, D) unit vectors.
            metadata: N dicts of JSON values, or None for no metadata.

        Raises:
            ValueError: wrong shape, NaN or non-unit vectors, duplicate or existing ids,
                metadata that is not JSON, or too few vectors to train a new "ivfpq" index.
        """
        ids = check_new_ids(ids, self._label_of)
        x = as_unit_matrix(vectors, self.dim, "vectors")  # (N, D)
        if len(x) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(x)} vectors; give one vector per id")
        metas = check_metadata(metadata, ids)
        if not ids:
            return
        if self._index is None:  # ivfpq: trained on its first vectors
            self._index = self._new_faiss_index(self.kind, len(x), train=x)
        first = len(self._ids)
        labels = np.arange(first, first + len(ids), dtype=np.int64)  # (N,)
        if self.kind == "exact":
            self._index.add_with_ids(x, labels)
        else:
            self._index.add(x)  # approximate kinds never remove, so a label is the storage position
        self._ids.extend(ids)
        self._meta.extend(metas)
        self._label_of.update(zip(ids, labels.tolist()))
        self._live = np.concatenate([self._live, np.ones(len(ids), dtype=bool)])
        for meta in metas:
            self._key_counts.update(meta.keys())
        for key, column in self._columns.items():
            column.extend(key, metas)
        if self.requested_kind == "auto" and self.kind == "exact" and len(self) > self.params.exact_max:
            self._rebuild("hnsw")

    def remove(self, ids: Iterable[str]) -> None:
        """Removes products without rebuilding: for real from an exact index, as tombstones from
        hnsw/ivfpq (excluded from every search; `compact()` reclaims their memory).

        Raises:
            KeyError: an id is not in the index (nothing is removed).
        """
        ids = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
        missing = [i for i in ids if i not in self._label_of]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}; nothing was removed")
        labels = np.array([self._label_of[i] for i in ids], dtype=np.int64)  # (R,)
        if not len(labels):
            return
        if self.kind == "exact":
            removed = self._index.remove_ids(labels)
            if removed != len(labels):
                raise RuntimeError(f"FAISS removed {removed} of {len(labels)} vectors; the index is inconsistent")
        self._live[labels] = False
        for product_id, label in zip(ids, labels.tolist()):
            self._key_counts.subtract(self._meta[label].keys())
            self._ids[label] = self._meta[label] = None
            del self._label_of[product_id]

    def compact(self) -> None:
        """Rebuilds the index from its live products, dropping tombstones and relabelling."""
        self._rebuild(self.kind)

    # -- search --------------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, filter: Mapping[str, Any] | None = None) -> list[SearchResult]:
        """The k products with the highest inner product for each query.

        Args:
            queries: (Q, D) unit vectors (a single (D,) vector counts as Q=1).
            k: products per query; fewer come back only when fewer match the filter.
            filter: metadata conditions, all of which must hold:
                `{"category": "sofa"}` equality; `{"category": ["sofa", "chair"]}` any of;
                `{"price": (min, max)}` inclusive numeric range, either bound None. Products
                without the attribute never match. A filter that matches nothing gives empty
                results.

        Raises:
            ValueError: bad queries or k, or a filter naming an attribute no product has.
        """
        scores, labels = self._search_labels(queries, k, filter)
        return [self._result(s, l) for s, l in zip(scores, labels)]

    def candidates(self, queries: Any, k: int = 10, filter: Mapping[str, Any] | None = None) -> list[str]:
        """The ids of every query's top k (as `search` finds them), each once, in order of first
        appearance, query by query: the pool a re-ranker scores, gathered without copying metadata."""
        _, labels = self._search_labels(queries, k, filter)
        flat = labels[labels >= 0]  # (Q * k,) query by query, best first
        _, first = np.unique(flat, return_index=True)
        return [self._ids[label] for label in flat[np.sort(first)].tolist()]

    def select(self, filter: Mapping[str, Any] | None = None) -> tuple[list[str], np.ndarray]:
        """Every live product that matches `filter` (as in `search`): ids and (M, D) vectors, in
        label order; for scoring a whole category exactly."""
        mask = self._filter_mask(filter)
        labels = np.flatnonzero(self._live if mask is None else mask)
        matrix, rows = self._stored_rows(labels)
        return [self._ids[label] for label in labels.tolist()], matrix[rows]

    def _search_labels(self, queries: Any, k: int, filter: Mapping[str, Any] | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k') scores and labels (-1 where fewer than k' were found), k' = min(k, products allowed)."""
        q = as_unit_matrix(queries, self.dim, "queries", allow_1d=True)  # (Q, D)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}; expected a positive int")
        mask = self._filter_mask(filter)  # (L,) bool, or None: every live product
        n_allowed = len(self) if mask is None else int(np.count_nonzero(mask))
        if n_allowed == 0 or len(q) == 0:
            return np.zeros((len(q), 0), dtype=np.float32), np.zeros((len(q), 0), dtype=np.int64)
        k = min(int(k), n_allowed)
        if mask is None and self.n_removed:
            mask = self._live  # tombstones are filtered like any other condition
        if mask is not None and n_allowed <= self.params.filter_exact_max:
            scores, labels = self._selected_search(q, k, mask)
        elif self.kind == "exact":
            scores, labels = self._exact_search(self._index, q, k, mask)
        else:
            scores, labels = self._approximate_search(q, k, mask, n_allowed / max(len(self._ids), 1))
            short = (labels < 0).any(axis=1)  # (Q,) queries the approximate search left short of k
            if short.any():
                scores[short], labels[short] = self._exact_search(self._flat_storage(), q[short], k, mask)
        return scores, labels

    def _selected_search(self, q: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the labels of `mask` alone: one matrix product over the selected
        rows. FAISS's selector path visits every stored vector and skips the BLAS kernel, which
        made a 56-query search over 5k of 100k products 4-5x slower."""
        labels = np.flatnonzero(mask)  # (M,)
        matrix, rows = self._stored_rows(labels)
        scores = q @ matrix[rows].T  # (Q, M)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(labels) else \
            np.broadcast_to(np.arange(len(labels)), (len(q), len(labels)))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return (np.take_along_axis(top_scores, order, axis=1).astype(np.float32),
                labels[np.take_along_axis(top, order, axis=1)])

    def _stored_rows(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the stored vectors as an (n, D) view of FAISS's memory, the row of each label).

        The view is valid until the next `add`, `remove` or `compact`."""
        flat = faiss.downcast_index(self._index.index) if self.kind == "exact" else self._flat_storage()
        matrix = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * self.dim).reshape(flat.ntotal, self.dim)
        if self.kind != "exact":
            return matrix, labels  # row i = label i
        # the exact index compacts on removal and keeps the labels' order: the rows are sorted by label
        row_labels = faiss.vector_to_array(self._index.id_map)
        return matrix, np.searchsorted(row_labels, labels)

    def _exact_search(self, index: faiss.Index, q: np.ndarray, k: int, mask: np.ndarray | None):
        if mask is None:
            return index.search(q, k)
        selector, _bitmap = _bitmap_selector(mask)  # _bitmap must outlive the search
        return index.search(q, k, params=faiss.SearchParameters(sel=selector))

    def _approximate_search(self, q: np.ndarray, k: int, mask: np.ndarray | None, selectivity: float):
        selector, _bitmap = _bitmap_selector(mask) if mask is not None else (None, None)
        p = self.params
        if self.kind == "hnsw":
            # A filter hides part of the graph from the result set; widen the beam in proportion
            # so the same number of admissible candidates is seen.
            # A beam of about k finds the true top k poorly: for the matcher's k=100 on 100k
            # IKEA-like vectors (bench_match), efSearch 128 -> 400 lifted recall@100 from 0.67 to
            # 0.88 and the matcher's top-10 agreement with exact search from 0.93-0.95 to 0.97.
            ef = max(p.ef_search, HNSW_EF_PER_K * k)
            if selector is not None:
                ef = max(ef, min(math.ceil(ef / selectivity), p.max_ef_search))
            params = faiss.SearchParametersHNSW(efSearch=ef)
            if selector is not None:
                params.sel = selector
            return self._index.search(q, k, params=params)
        nprobe = p.nprobe if selector is None else math.ceil(p.nprobe / selectivity)  # same reasoning as efSearch
        base_params = faiss.SearchParametersIVF(nprobe=min(nprobe, self._nlist()))
        if selector is not None:
            base_params.sel = selector  # IndexRefine hands the base index its own parameters
        params = faiss.IndexRefineSearchParameters(k_factor=p.k_factor, base_index_params=base_params)
        return self._index.search(q, k, params=params)

    def _result(self, scores: np.ndarray, labels: np.ndarray) -> SearchResult:
        keep = labels >= 0
        ids = [self._ids[label] for label in labels[keep].tolist()]
        metas = [dict(self._meta[label]) for label in labels[keep].tolist()]
        return SearchResult(ids, scores[keep].astype(np.float32, copy=True), metas)

    # -- filters -------------------------------------------------------------------------------
    def _filter_mask(self, filter: Mapping[str, Any] | None) -> np.ndarray | None:
        filter = check_filter(filter)
        if filter is None:
            return None
        mask = self._live.copy()  # (L,)
        for key, condition in filter.items():
            if self._key_counts.get(key, 0) <= 0:
                raise unknown_attribute(key, self.attributes())
            if key not in self._columns:
                self._columns[key] = MetadataColumn.build(key, self._meta)
            mask &= self._columns[key].match(key, condition)
        return mask

    # -- faiss plumbing ------------------------------------------------------------------------
    def _new_faiss_index(self, kind: str, n: int, train: np.ndarray | None = None) -> faiss.Index:
        p = self.params
        if kind == "exact":
            return faiss.index_factory(self.dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            index = faiss.index_factory(self.dim, f"HNSW{p.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.ef_construction
            index.hnsw.efSearch = p.ef_search
            return index
        nlist = p.nlist or max(16, int(math.sqrt(n)))  # ~sqrt(N) lists keeps k-means training to seconds
        pq_m = p.pq_m or (self.dim // 2 if self.dim % 2 == 0 else self.dim)
        if self.dim % pq_m:
            raise ValueError(f"IndexParams.pq_m={pq_m} must divide the dimension {self.dim}")
        needed = max(39 * nlist, 1000)  # k-means wants >= 39 training points per list
        if train is None or len(train) < needed:
            raise ValueError(f"kind='ivfpq' with nlist={nlist} trains on the first vectors added and needs at "
                             f"least {needed}; got {0 if train is None else len(train)}. Add more products "
                             "at once, lower IndexParams.nlist, or use kind='exact' or 'hnsw'")
        # 4-bit fast-scan PQ: trains and scans fast (8-bit PQ trained many times slower for no
        # recall gain once the exact re-ranking stage is added).
        index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{pq_m}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
        sample = min(len(train), max(64 * nlist, 20_000))  # enough for k-means; more only slows training
        rows = np.random.default_rng(0).choice(len(train), sample, replace=False) if sample < len(train) else None
        index.train(train if rows is None else train[np.sort(rows)])
        return index

    def _flat_storage(self) -> faiss.IndexFlat:
        """The exact vectors of an approximate index, row i = label i."""
        if self.kind == "hnsw":
            return faiss.downcast_index(self._index.storage)
        return faiss.downcast_index(self._index.refine_index)

    def _nlist(self) -> int:
        return faiss.extract_index_ivf(self._index).nlist

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels (n,), vectors (n, D)) of the live products, in label order."""
        if self._index is None or self._index.ntotal == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        if self.kind == "exact":
            vectors = self._index.index.reconstruct_n(0, self._index.ntotal)  # (n, D) storage order
            labels = faiss.vector_to_array(self._index.id_map)  # (n,) label of each storage row
            order = np.argsort(labels, kind="stable")
            return labels[order], vectors[order]
        labels = np.flatnonzero(self._live)
        return labels, self._flat_storage().reconstruct_n(0, len(self._ids))[labels]

    def _rebuild(self, kind: str) -> None:
        labels, vectors = self._live_vectors()
        ids = [self._ids[label] for label in labels.tolist()]
        metas = [self._meta[label] for label in labels.tolist()]
        self._index = self._new_faiss_index(kind, len(ids), train=vectors) if kind != "ivfpq" or ids else None
        self.kind = kind
        self._clear_products()
        if ids:
            self.add(ids, vectors, metas)

    # -- save / load ---------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Writes the index to `folder`: index.faiss, ids.json, metadata.json, manifest.json.

        Each file goes to a temporary name and is moved into place, the manifest last; the
        manifest records every file's size and SHA-256, so `load` refuses a folder mixed by an
        interrupted save or a file swapped in from another index.
        """
        if self._index is None:
            raise ValueError("an empty 'ivfpq' index has nothing to save; add products first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / INDEX_FILE, lambda p: faiss.write_index(self._index, str(p)))
        atomic_write(folder / IDS_FILE, lambda p: _write_json(p, {"ids": self._ids}))
        atomic_write(folder / METADATA_FILE, lambda p: _write_json(p, {"metadata": self._meta}))
        manifest = {
            "format": "hgm_mm.ProductIndex",
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "faiss_version": faiss.__version__,
            "dimension": self.dim,
            "kind": self.kind,
            "requested_kind": self.requested_kind,
            "count": len(self),
            "labels": len(self._ids),
            "metric": "inner_product",
            "params": self.params.to_dict(),
            "model_identity": self.model_identity,
            "files": {name: (folder / name).stat().st_size for name in (INDEX_FILE, IDS_FILE, METADATA_FILE)},
            "sha256": {name: file_sha256(folder / name) for name in (INDEX_FILE, IDS_FILE, METADATA_FILE)},
        }
        atomic_write(folder / MANIFEST_FILE, lambda p: _write_json(p, manifest, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, model_identity: Any = None) -> "ProductIndex":
        """Opens a folder written by `save`, checking it whole before trusting it.

        Args:
            folder: the saved index folder.
            model_identity: the model that will make the query vectors (a `model_fingerprint`
                string or the model); refused if the index was built with another model.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            ValueError: another model built the index, or a file is corrupt or inconsistent
                with the manifest (the message names the file).
        """
        folder = Path(folder)
        manifest_path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; expected a ProductIndex saved with index.save()")
        manifest = read_versioned_manifest(manifest_path, reads_up_to=FORMAT_VERSION,
                                           fix="the index folder is incomplete or damaged; save the index again",
                                           required=("dimension", "kind", "count", "labels", "files",
                                                     "model_identity", "params"))
        try:
            dim, kind, count, n_labels = (manifest["dimension"], manifest["kind"], manifest["count"],
                                          manifest["labels"])
            sizes, saved_identity = manifest["files"], manifest["model_identity"]
            digests = manifest.get("sha256", {})
            if not isinstance(digests, dict):
                raise TypeError("sha256")
            params = IndexParams.from_dict(manifest["params"], origin=f"{manifest_path}: params")
        except (KeyError, TypeError) as err:
            raise ValueError(f"{manifest_path}: missing or malformed key {err}; the folder is damaged, "
                             "save the index again") from err
        if kind not in KINDS[1:] or not all(isinstance(v, int) and v >= 0 for v in (dim, count, n_labels)):
            raise ValueError(f"{manifest_path}: kind={kind!r}, dimension={dim!r}, count={count!r}, "
                             f"labels={n_labels!r} are not valid; the folder is damaged")
        check_identity(saved_identity, identity_string(model_identity), folder)
        for name in (INDEX_FILE, IDS_FILE, METADATA_FILE):
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; the index folder is incomplete, save the index again")
            if not isinstance(sizes, dict) or sizes.get(name) != path.stat().st_size:
                raise ValueError(f"{path}: size {path.stat().st_size} bytes differs from the manifest's "
                                 f"{sizes.get(name) if isinstance(sizes, dict) else None}; the file was changed "
                                 "or an interrupted save mixed two versions. Save the index again")
            # folders saved before digests were recorded carry sizes alone
            check_file_digest(path, digests.get(name), "Save or build the index again")

        ids = read_json_object(folder / IDS_FILE, fix="the file is damaged, save the index again").get("ids")
        metas = read_json_object(folder / METADATA_FILE, fix="the file is damaged, save the index again").get("metadata")
        _check_saved_products(folder, ids, metas, count, n_labels)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as err:
            raise ValueError(f"{folder / INDEX_FILE}: FAISS cannot read it ({str(err).strip().splitlines()[0]}); "
                             "the file is corrupt, save the index again") from err
        # read_index already returns the concrete class; downcasting again would drop ownership.
        _check_saved_index(folder / INDEX_FILE, index, kind, dim, ids, count, n_labels)

        loaded = cls(dim, kind=kind, params=params, model_identity=saved_identity)
        loaded.requested_kind = manifest.get("requested_kind", kind)
        loaded._index = index
        loaded._ids, loaded._meta = ids, metas
        loaded._label_of = {i: label for label, i in enumerate(ids) if i is not None}
        loaded._live = np.array([i is not None for i in ids], dtype=bool)
        for meta in metas:
            if meta is not None:
                loaded._key_counts.update(meta.keys())
        return loaded


def _bitmap_selector(mask: np.ndarray) -> tuple[faiss.IDSelectorBitmap, np.ndarray]:
    """A FAISS selector over labels from a boolean mask; keep the returned bitmap alive."""
    bitmap = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3 is label i, as FAISS reads it
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)), bitmap


def _check_saved_products(folder: Path, ids: Any, metas: Any, count: int, n_labels: int) -> None:
    ids_path, meta_path = folder / IDS_FILE, folder / METADATA_FILE
    if not isinstance(ids, list) or not all(i is None or isinstance(i, str) for i in ids):
        raise ValueError(f"{ids_path}: expected {{\"ids\": [string or null, ...]}}; the file is damaged")
    if len(ids) != n_labels:
        raise ValueError(f"{ids_path}: {len(ids)} entries but the manifest says {n_labels}; save the index again")
    live = [i for i in ids if i is not None]
    if len(live) != count:
        raise ValueError(f"{ids_path}: {len(live)} products but the manifest counts {count}; save the index again")
    if len(set(live)) != len(live):
        dupes = [i for i, n in Counter(live).items() if n > 1]
        raise ValueError(f"{ids_path}: duplicate ids {dupes[:5]}; the file is damaged")
    if not isinstance(metas, list) or len(metas) != len(ids):
        raise ValueError(f"{meta_path}: expected {{\"metadata\": [...]}} with {len(ids)} entries, one per "
                         f"label in {IDS_FILE}; save the index again")
    for product_id, meta in zip(ids, metas):
        if (product_id is None) != (meta is None) or (meta is not None and not isinstance(meta, dict)):
            raise ValueError(f"{meta_path}: entry for {product_id!r} is {meta!r}; expected a dict for each "
                             "product and null for each removed one. Save the index again")


def _check_saved_index(path: Path, index: faiss.Index, kind: str, dim: int, ids: list, count: int,
                       n_labels: int) -> None:
    expected_type = {"exact": faiss.IndexIDMap2, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexRefineFlat}[kind]
    if not isinstance(index, expected_type) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path}: holds a {type(index).__name__} (metric {index.metric_type}) but the manifest "
                         f"says kind {kind!r} (inner product); save the index again")
    if index.d != dim:
        raise ValueError(f"{path}: dimension {index.d} but the manifest says {dim}; save the index again")
    if kind == "exact":
        labels = faiss.vector_to_array(index.id_map)
        expected = {label for label, i in enumerate(ids) if i is not None}
        if index.ntotal != count or set(labels.tolist()) != expected:
            raise ValueError(f"{path}: holds {index.ntotal} vectors whose labels do not match the {count} "
                             f"products of {IDS_FILE}; save the index again")
    elif index.ntotal != n_labels:
        raise ValueError(f"{path}: holds {index.ntotal} vectors but {IDS_FILE} lists {n_labels} labels; "
                         "save the index again")


# -- files -------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent, allow_nan=False), encoding="utf-8")
