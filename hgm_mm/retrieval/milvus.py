"""The catalogue index in Milvus: the `ProductIndex` interface over a collection that replicas share.

    index = MilvusProductIndex.build("milvus-lite:catalogue.db", ids, vectors, metadata,
                                     model_identity=model_fingerprint(model))
    hits = index.search(room_vectors, k=10, filter={"category": ["sofa", "chair"], "price": (None, 800)})
    index = MilvusProductIndex.open("milvus://milvus.internal:19530", model_identity=model)

A store URI names the engine: `milvus-lite:PATH.db` (Milvus Lite, the engine in a local file;
`pip install milvus-lite`), `milvus://HOST:PORT` (Milvus standalone or a cluster over gRPC) or
`milvus+https://HOST:PORT` (the same over TLS). A token, when the server asks for one, comes from
the `MILVUS_TOKEN` environment variable, so it never lands in a URI, a log or a manifest. The
client is `pymilvus.MilvusClient`, whose API is the same for all three.

Decisions, in one place:
  - One row per product: `id` (primary key), `seq` (insertion order, for `ids`), `vector`
    (unit vectors, inner-product metric), `meta` (the metadata as given, returned by searches)
    and `attrs` (the same values as the engine filters them, below), plus `category` (text) and
    `price` (a number) as typed columns with a scalar index.
  - Filters run inside Milvus as a boolean expression, with the meaning `ProductIndex.search`
    gives them. A condition on a string category or a numeric price uses the typed column: a
    JSON path is evaluated row by row (on Milvus Lite some thirty times slower than the indexed
    column, benchmarks/bench_stores.py), and the guide filters by category for every product
    set. Any other condition reads `attrs`, which keeps numbers as numbers (ranges and
    equality), turns strings into "s:value" and booleans into "b:true"/"b:false", because
    Milvus compares JSON `true` equal to `1`, and a `{"in_stock": True}` filter must not match a
    count of 1.
  - The collection carries the hgm_mm format version, the model identity, the kind and
    parameters, and the metadata keys ever added, as collection properties. `open` refuses a
    collection another model built, or one hgm_mm did not create.
  - Kinds: "exact" is Milvus's FLAT index, "hnsw" its HNSW index (`IndexParams.hnsw_m`,
    `ef_construction`; `ef_search` raised to `HNSW_EF_PER_K * k` as in FAISS); "auto" is exact
    up to `IndexParams.exact_max` products and HNSW beyond. "ivfpq" is FAISS's own: for Milvus,
    take "hnsw". Milvus decides itself how a filtered search walks its index.
  - Milvus Lite inserts and searches many times slower than FAISS in the process, whatever the
    kind (benchmarks/bench_stores.py, figures in benchmarks/RESULTS.md): it is for tests,
    notebooks and small catalogues. One process at a time may open its file.
  - Collections are created with Strong consistency: a search sees every finished `add`.
  - `remove` deletes rows; Milvus reclaims their space itself, so there are no tombstones.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..version import __version__
from .checks import (as_unit_matrix, check_identity, check_metadata, check_new_ids, count_rows, identity_name,
                     identity_string, infer_dim)
from .filters import check_filter, is_number, range_bounds, unknown_attribute, wanted_values
from .index import HNSW_EF_PER_K, IndexParams, SearchResult

FORMAT_VERSION = 1  # of the collection's fields and properties
DEFAULT_COLLECTION = "hgm_catalogue"
TOKEN_ENV = "MILVUS_TOKEN"
KINDS = ("auto", "exact", "hnsw")
MAX_ID_LENGTH = 512
MAX_CATEGORY_LENGTH = 1024
TYPED_FIELDS = {"category": "text", "price": "number"}  # attributes with their own indexed column
BATCH_ROWS = 2_000  # rows per insert/upsert call and per page of a scan
CONNECT_TIMEOUT_S = 10.0
_PROPERTY = "hgm_mm.{}"


class MissingCollectionError(LookupError):
    """The store holds no collection of that name."""


@dataclass(frozen=True)
class StoreURI:
    """A parsed store URI: `engine` is "faiss" (an index folder) or "milvus"."""

    uri: str  # as written, for messages
    engine: str
    address: str | None = None  # what MilvusClient is given: a .db path (Milvus Lite) or http(s)://host:port

    @property
    def is_lite(self) -> bool:
        return self.engine == "milvus" and not self.address.startswith(("http://", "https://"))

    @property
    def canonical(self) -> str:
        """The URI with a Milvus Lite path made absolute: what an index folder records."""
        return f"milvus-lite:{self.address}" if self.is_lite else self.uri


def parse_store_uri(uri: str) -> StoreURI:
    """Reads `faiss`, `milvus-lite:PATH.db`, `milvus://HOST:PORT` or `milvus+https://HOST:PORT`.

    A relative Milvus Lite path is made absolute, so an index folder that records it keeps
    working from any directory.

    Raises:
        ValueError: any other form (the message lists the valid ones).
    """
    forms = "faiss (an index folder), milvus-lite:PATH.db, milvus://HOST:PORT or milvus+https://HOST:PORT"
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"store URI {uri!r} is empty; expected {forms}")
    uri = uri.strip()
    if uri == "faiss":
        return StoreURI(uri, "faiss")
    if uri.startswith("milvus-lite:"):
        path = uri[len("milvus-lite:"):]
        if not path.endswith(".db") or path.endswith("/.db"):
            raise ValueError(f"store URI {uri!r}: a Milvus Lite store is a file whose name ends in .db, e.g. "
                             "milvus-lite:catalogue.db")
        return StoreURI(uri, "milvus", os.path.abspath(os.path.expanduser(path)))
    for prefix, scheme in (("milvus://", "http"), ("milvus+https://", "https"), ("milvus+http://", "http")):
        if uri.startswith(prefix):
            host = uri[len(prefix):].rstrip("/")
            if not host or "/" in host or any(c.isspace() for c in host):
                raise ValueError(f"store URI {uri!r}: expected {prefix}HOST:PORT, e.g. {prefix}localhost:19530")
            if ":" not in host.rsplit("]", 1)[-1]:
                host += ":19530"  # Milvus's default port
            return StoreURI(uri, "milvus", f"{scheme}://{host}")
    raise ValueError(f"store URI {uri!r} is not valid; expected {forms}")


def connect(uri: str | StoreURI):
    """A `pymilvus.MilvusClient` for a Milvus store URI.

    Raises:
        ImportError: pymilvus (or milvus-lite, for a local file) is not installed; says what to install.
        ConnectionError: the server cannot be reached; names the URI.
    """
    store = uri if isinstance(uri, StoreURI) else parse_store_uri(uri)
    if store.engine != "milvus":
        raise ValueError(f"store URI {store.uri!r} is not a Milvus store")
    try:
        from pymilvus import MilvusClient
    except ImportError as err:
        raise ImportError(f"store {store.uri!r} needs pymilvus: pip install 'hgm-mm[milvus]'") from err
    if store.is_lite:
        if importlib.util.find_spec("milvus_lite") is None:  # pymilvus starts the engine from this package
            raise ImportError(f"store {store.uri!r} needs Milvus Lite: pip install 'hgm-mm[milvus]'")
        folder = os.path.dirname(store.address)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"store {store.uri!r}: the folder {folder} does not exist; create it or "
                                    "choose another path")
    try:
        return MilvusClient(uri=store.address, token=os.environ.get(TOKEN_ENV, ""), timeout=CONNECT_TIMEOUT_S)
    except Exception as err:  # pymilvus raises its own MilvusException for every connection failure
        fix = ("Milvus Lite lets one process open a file at a time: stop the other process using it (hgm-mm "
               "serve, the app), or serve the catalogue from a Milvus server" if store.is_lite else
               f"check that the server is running and the address is right, and set {TOKEN_ENV} if it needs a token")
        raise ConnectionError(f"cannot reach the Milvus store {store.uri!r} ({_first_line(err)}); {fix}") from err


class MilvusProductIndex:
    """Product vectors with ids and metadata in a Milvus collection, searched by inner product
    with metadata filters applied in the engine; the same methods as `ProductIndex`.

    Create it with `MilvusProductIndex.build(uri, ids, vectors, metadata)` or
    `MilvusProductIndex.create(uri, dim)` and `add`; reopen it with `MilvusProductIndex.open(uri)`.
    See the module docstring for the decisions behind fields and filters.
    """

    def __init__(self, client, collection: str, *, uri: str, dim: int, kind: str, params: IndexParams,
                 model_identity: str | None, attributes: Iterable[str] = ()):
        """Wraps an open collection; use `create`, `build` or `open` instead."""
        self._client = client
        self.collection = collection
        self.uri = uri
        self.dim = dim
        self.requested_kind = kind
        self.kind = "exact" if kind == "auto" else kind
        self.params = params
        self.model_identity = model_identity
        self._attributes = set(attributes)
        self._lite = parse_store_uri(uri).is_lite

    # -- creating and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, dim: int, *, collection: str = DEFAULT_COLLECTION, kind: str = "auto",
               params: IndexParams | None = None, model_identity: Any = None,
               replace: bool = False) -> "MilvusProductIndex":
        """An empty collection.

        Args:
            uri: the store URI (see the module docstring).
            dim: vector dimension (the model's `embed_dim`).
            collection: the collection's name.
            kind: "auto", "exact" or "hnsw".
            params: index parameters; defaults to `IndexParams()`.
            model_identity: a `model_fingerprint` string or the model itself; checked by `open`.
            replace: drop a collection of that name first; without it an existing one is an error.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim={dim!r}; expected a positive int (the model's embed_dim)")
        if kind not in KINDS:
            hint = "; FAISS's ivfpq has no Milvus counterpart here, use hnsw" if kind == "ivfpq" else ""
            raise ValueError(f"kind={kind!r} is not valid for a Milvus store; expected one of {list(KINDS)}{hint}")
        if params is not None and not isinstance(params, IndexParams):
            raise TypeError(f"params must be an IndexParams, got {type(params).__name__}")
        _check_collection_name(collection)
        store = parse_store_uri(uri)
        client = connect(store)
        if client.has_collection(collection):
            if not replace:
                raise ValueError(f"store {uri!r} already holds a collection {collection!r}; open it with "
                                 "MilvusProductIndex.open, choose another name, or pass replace=True")
            client.drop_collection(collection)
        index = cls(client, collection, uri=store.canonical, dim=int(dim), kind=kind,
                    params=params if params is not None else IndexParams(),
                    model_identity=identity_string(model_identity))
        index._create_collection()
        return index

    @classmethod
    def build(cls, uri: str, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, Any]] | None = None,
              *, collection: str = DEFAULT_COLLECTION, kind: str = "auto", params: IndexParams | None = None,
              model_identity: Any = None, replace: bool = True) -> "MilvusProductIndex":
        """A collection over a whole catalogue, replacing one of the same name unless `replace=False`.

        Args: as `ProductIndex.build`, with `uri`, `collection` and `replace` as in `create`.
        """
        params = params if params is not None else IndexParams()
        dim = infer_dim(vectors)
        index = cls.create(uri, dim, collection=collection, kind=kind, params=params,
                           model_identity=model_identity, replace=replace)
        if kind == "auto" and count_rows(vectors) > params.exact_max:
            index._set_vector_index("hnsw")  # before the rows arrive: built once
        index.add(ids, vectors, metadata)
        return index

    @classmethod
    def open(cls, uri: str, *, collection: str = DEFAULT_COLLECTION, model_identity: Any = None
             ) -> "MilvusProductIndex":
        """Opens a collection that `create` or `build` made, checking what it holds.

        Args:
            uri: the store URI.
            collection: the collection's name.
            model_identity: the model that will make the query vectors (a `model_fingerprint`
                string or the model); refused if the collection was built with another model.

        Raises:
            MissingCollectionError: the store has no such collection.
            ValueError: hgm_mm did not make the collection, it is newer than this hgm_mm, or
                another model built it.
            ConnectionError: the server cannot be reached.
        """
        _check_collection_name(collection)
        store = parse_store_uri(uri)
        client = connect(store)
        where = f"collection {collection!r} of store {uri!r}"
        if not client.has_collection(collection):
            raise MissingCollectionError(f"{where} does not exist; build it with: hgm-mm index --store {uri} --collection "
                              f"{collection} ...")
        properties = client.describe_collection(collection).get("properties", {})
        if _PROPERTY.format("format_version") not in properties:
            raise ValueError(f"{where} was not made by hgm_mm (it has no {_PROPERTY.format('format_version')} "
                             "property); choose another collection name")
        try:
            version = int(properties[_PROPERTY.format("format_version")])
            dim, kind = int(properties[_PROPERTY.format("dimension")]), properties[_PROPERTY.format("kind")]
            params = IndexParams.from_dict(json.loads(properties[_PROPERTY.format("params")]),
                                           origin=f"{where}: params")
            saved_identity = properties.get(_PROPERTY.format("model_identity")) or None
            attributes = json.loads(properties.get(_PROPERTY.format("attributes"), "[]"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: its hgm_mm properties are damaged ({err}); build it again") from err
        if version > FORMAT_VERSION:
            raise ValueError(f"{where}: format_version={version}; this hgm_mm {__version__} reads formats up to "
                             f"{FORMAT_VERSION}. Upgrade: pip install -U hgm-mm")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind={kind!r} is not valid; build it again")
        check_identity(saved_identity, identity_string(model_identity), where)
        index = cls(client, collection, uri=store.canonical, dim=dim, kind=kind, params=params,
                    model_identity=saved_identity, attributes=attributes)
        index.kind = _vector_index_kind(client, collection)
        client.load_collection(collection)
        return index

    def _create_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description="hgm_mm catalogue: product vectors and metadata")
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field("seq", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("meta", DataType.JSON)
        schema.add_field("attrs", DataType.JSON)
        schema.add_field("category", DataType.VARCHAR, max_length=MAX_CATEGORY_LENGTH, nullable=True)
        schema.add_field("price", DataType.DOUBLE, nullable=True)
        self._client.create_collection(self.collection, schema=schema, index_params=self._index_params(self.kind),
                                       consistency_level="Strong")
        self._client.alter_collection_properties(self.collection, properties={
            _PROPERTY.format("format_version"): str(FORMAT_VERSION),
            _PROPERTY.format("library_version"): __version__,
            _PROPERTY.format("dimension"): str(self.dim),
            _PROPERTY.format("kind"): self.requested_kind,
            _PROPERTY.format("params"): json.dumps(self.params.to_dict()),
            _PROPERTY.format("model_identity"): self.model_identity or "",
            _PROPERTY.format("attributes"): "[]",
        })

    def _index_params(self, kind: str, *, columns: bool = True):
        """The vector index of `kind`, and with `columns` the scalar indexes of the typed columns."""
        index_params = self._client.prepare_index_params()
        if kind == "hnsw":
            index_params.add_index("vector", index_type="HNSW", metric_type="IP",
                                   params={"M": self.params.hnsw_m, "efConstruction": self.params.ef_construction})
        else:
            index_params.add_index("vector", index_type="FLAT", metric_type="IP")
        for field in TYPED_FIELDS if columns else ():
            index_params.add_index(field, index_type="INVERTED")
        return index_params

    def _set_vector_index(self, kind: str) -> None:
        """Replaces the collection's vector index (exact <-> hnsw); the rows stay."""
        self._client.release_collection(self.collection)
        self._client.drop_index(self.collection, "vector")
        self._client.create_index(self.collection, self._index_params(kind, columns=False))
        self._client.load_collection(self.collection)
        self.kind = kind

    # -- inspection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __contains__(self, product_id: object) -> bool:
        return isinstance(product_id, str) and bool(self._client.get(self.collection, ids=[product_id],
                                                                      output_fields=["id"]))

    def __repr__(self) -> str:
        return (f"MilvusProductIndex(uri={self.uri!r}, collection={self.collection!r}, dim={self.dim}, "
                f"kind={self.kind!r}, count={len(self)}, model={identity_name(self.model_identity)!r})")

    @property
    def n_removed(self) -> int:
        """Always 0: Milvus deletes rows and reclaims their space itself."""
        return 0

    @property
    def ids(self) -> list[str]:
        """Product ids, in insertion order."""
        rows = self._scan(output_fields=["seq"])
        return [row["id"] for row in sorted(rows, key=lambda row: row["seq"])]

    def metadata(self, product_id: str) -> dict[str, Any]:
        """A copy of one product's metadata."""
        return self.metadata_of([product_id])[0]

    def metadata_of(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Copies of the metadata of products, in the order of `ids`, in one round trip.

        Raises:
            KeyError: an id is not in the index.
        """
        return [row["meta"] for row in self._rows(ids, ["meta"])]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored unit vectors of products, in the order of `ids` -> (N, D) float32.

        Raises:
            KeyError: an id is not in the index (names up to five of them).
        """
        rows = self._rows(ids, ["vector"])
        if not rows:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray([row["vector"] for row in rows], dtype=np.float32)

    def attributes(self) -> list[str]:
        """Metadata keys that filters may use: those of every product added so far."""
        return sorted(self._attributes)

    def value_counts(self, key: str) -> Counter:
        """How many products hold each (hashable) value of metadata `key`."""
        return Counter(row["meta"].get(key) for row in self._scan(output_fields=["meta"]))

    def _rows(self, ids: Sequence[str], fields: list[str]) -> list[dict]:
        ids = [ids] if isinstance(ids, str) else list(ids)
        found: dict[str, dict] = {}
        for start in range(0, len(ids), BATCH_ROWS):
            batch = list(dict.fromkeys(ids[start:start + BATCH_ROWS]))
            for row in self._client.get(self.collection, ids=batch, output_fields=fields):
                found[row["id"]] = row
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}")
        return [found[i] for i in ids]

    def _scan(self, *, filter: str = "", output_fields: list[str]) -> list[dict]:
        """Every row matching `filter`, in no particular order."""
        filter = filter or 'id != ""'
        if self._lite:  # Milvus Lite answers a query without a limit whole, but has no iterator timestamps
            return list(self._client.query(self.collection, filter=filter, output_fields=output_fields))
        # a server caps the rows of one query: page through them
        iterator = self._client.query_iterator(self.collection, batch_size=BATCH_ROWS, filter=filter,
                                               output_fields=output_fields)
        rows: list[dict] = []
        try:
            while page := iterator.next():
                rows.extend(page)
        finally:
            iterator.close()
        return rows

    # -- add / remove --------------------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Adds products without rebuilding the index.

        Raises:
            ValueError: as `ProductIndex.add`: wrong shape, NaN or non-unit vectors, duplicate or
                existing ids, metadata that is not JSON.
        """
        ids = check_new_ids(ids, self._existing(ids))
        self._write(ids, vectors, metadata, upsert=False)

    def upsert(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Adds products, replacing the vector and metadata of those already in the index."""
        self._write(check_new_ids(ids, ()), vectors, metadata, upsert=True)

    def _write(self, ids: list[str], vectors: Any, metadata, *, upsert: bool) -> None:
        long = [i for i in ids if len(i.encode("utf-8")) > MAX_ID_LENGTH]
        if long:
            raise ValueError(f"{len(long)} id(s) are longer than {MAX_ID_LENGTH} bytes, e.g. {long[0][:40]!r}...; "
                             "shorten the product ids")
        x = as_unit_matrix(vectors, self.dim, "vectors")  # (N, D)
        if len(x) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(x)} vectors; give one vector per id")
        metas = check_metadata(metadata, ids)
        long = [i for i, meta in zip(ids, metas) if isinstance(meta.get("category"), str)
                and len(meta["category"].encode("utf-8")) > MAX_CATEGORY_LENGTH]
        if long:
            raise ValueError(f"{len(long)} product(s) have a category longer than {MAX_CATEGORY_LENGTH} bytes, e.g. "
                             f"{long[0]!r}; a category is a short name such as 'sofa'")
        if not ids:
            return
        new_keys = {key for meta in metas for key in meta} - self._attributes
        if new_keys:  # recorded first: a filter on a key must never be refused once rows hold it
            self._attributes |= new_keys
            self._client.alter_collection_properties(self.collection, properties={
                _PROPERTY.format("attributes"): json.dumps(sorted(self._attributes))})
        write = self._client.upsert if upsert else self._client.insert
        first = time.time_ns()  # insertion order across processes that share the store
        for start in range(0, len(ids), BATCH_ROWS):
            stop = min(start + BATCH_ROWS, len(ids))
            write(self.collection, [{"id": ids[i], "seq": first + i, "vector": x[i], "meta": metas[i],
                                     "attrs": _filter_values(metas[i]), **_typed_values(metas[i])}
                                    for i in range(start, stop)])
        if self.requested_kind == "auto" and self.kind == "exact" and len(self) > self.params.exact_max:
            self._set_vector_index("hnsw")

    def _existing(self, ids: Sequence[str]) -> set[str]:
        if isinstance(ids, str):
            return set()
        wanted = [i for i in ids if isinstance(i, str) and i]
        found: set[str] = set()
        for start in range(0, len(wanted), BATCH_ROWS):
            rows = self._client.get(self.collection, ids=wanted[start:start + BATCH_ROWS], output_fields=["id"])
            found.update(row["id"] for row in rows)
        return found

    def remove(self, ids: Iterable[str]) -> None:
        """Deletes products.

        Raises:
            KeyError: an id is not in the index (nothing is removed).
        """
        ids = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
        missing = sorted(set(ids) - self._existing(ids), key=ids.index)
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}; nothing was removed")
        for start in range(0, len(ids), BATCH_ROWS):
            self._client.delete(self.collection, ids=ids[start:start + BATCH_ROWS])

    def compact(self) -> None:
        """Asks Milvus to merge segments and drop deleted rows now rather than in its own time."""
        self._client.compact(self.collection)

    def drop(self) -> None:
        """Deletes the collection from the store."""
        self._client.drop_collection(self.collection)

    # -- search --------------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, filter: Mapping[str, Any] | None = None) -> list[SearchResult]:
        """The k products with the highest inner product for each query; `filter` as in
        `ProductIndex.search`, applied by Milvus."""
        hits = self._search_hits(queries, k, filter, ["meta"])
        return [SearchResult([h["id"] for h in row], np.array([h["distance"] for h in row], dtype=np.float32),
                             [h["entity"]["meta"] for h in row]) for row in hits]

    def candidates(self, queries: Any, k: int = 10, filter: Mapping[str, Any] | None = None) -> list[str]:
        """The ids of every query's top k, each once, in order of first appearance, query by query."""
        hits = self._search_hits(queries, k, filter, [])
        return list(dict.fromkeys(h["id"] for row in hits for h in row))

    def select(self, filter: Mapping[str, Any] | None = None) -> tuple[list[str], np.ndarray]:
        """Every product that matches `filter`: ids and (M, D) vectors, in insertion order."""
        expression = self._expression(filter)
        if expression is None:
            return [], np.empty((0, self.dim), dtype=np.float32)
        rows = sorted(self._scan(filter=expression, output_fields=["seq", "vector"]), key=lambda row: row["seq"])
        vectors = np.asarray([row["vector"] for row in rows], dtype=np.float32).reshape(len(rows), self.dim)
        return [row["id"] for row in rows], vectors

    def _search_hits(self, queries: Any, k: int, filter: Mapping[str, Any] | None, fields: list[str]):
        q = as_unit_matrix(queries, self.dim, "queries", allow_1d=True)  # (Q, D)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}; expected a positive int")
        expression = self._expression(filter)
        if expression is None or len(q) == 0:
            return [[] for _ in range(len(q))]
        params = {"metric_type": "IP"}
        if self.kind == "hnsw":
            params["params"] = {"ef": max(self.params.ef_search, HNSW_EF_PER_K * int(k))}
        hits = self._client.search(self.collection, data=list(q), limit=int(k), filter=expression,
                                   output_fields=fields, search_params=params, anns_field="vector")
        return [list(row) for row in hits]

    # -- filters -------------------------------------------------------------------------------
    def _expression(self, filter: Mapping[str, Any] | None) -> str | None:
        """The Milvus boolean expression of `filter`; "" for none, None when it can match nothing."""
        filter = check_filter(filter)
        if filter is None:
            return ""
        unknown = [key for key in filter if key not in self._attributes]
        if unknown:  # another process may have added it since this one opened the collection
            self._refresh_attributes()
        clauses = []
        for key, condition in filter.items():
            if key not in self._attributes:
                raise unknown_attribute(key, self.attributes())
            clause = _condition_expression(key, condition)
            if clause is None:
                return None
            clauses.append(clause)
        return " and ".join(clauses)

    def _refresh_attributes(self) -> None:
        properties = self._client.describe_collection(self.collection).get("properties", {})
        self._attributes |= set(json.loads(properties.get(_PROPERTY.format("attributes"), "[]")))


def _condition_expression(key: str, condition: Any) -> str | None:
    """One filter condition as a Milvus expression; None when it can match nothing."""
    field = f"attrs[{json.dumps(key, ensure_ascii=False)}]"
    typed = TYPED_FIELDS.get(key)
    if isinstance(condition, tuple):
        low, high = range_bounds(key, condition)
        if typed == "number":  # the column holds exactly the product's numeric values
            field = key
        if low is None and high is None:  # any number
            return f"({field} >= {-np.finfo(np.float64).max!r})"
        parts = ([f"{field} >= {float(low)!r}"] if low is not None else []) + \
                ([f"{field} <= {float(high)!r}"] if high is not None else [])
        return "(" + " and ".join(parts) + ")"
    on_column, on_attrs = [], []
    for value in wanted_values(key, condition):
        if (typed == "text" and isinstance(value, str)) or (typed == "number" and is_number(value)):
            on_column.append(_literal(value))
        else:
            on_attrs.append(_literal(_filter_value(value)))
    # Milvus's `in` takes only columns, not JSON paths: there, a disjunction of equalities
    clauses = [f"{key} in [{', '.join(dict.fromkeys(on_column))}]"] if on_column else []
    clauses += [f"{field} == {literal}" for literal in dict.fromkeys(on_attrs)]
    return "(" + " or ".join(clauses) + ")" if clauses else None


def _filter_value(value: Any) -> Any:
    """A metadata value as `attrs` holds it: numbers as numbers, strings, booleans and null tagged."""
    if isinstance(value, bool):
        return "b:true" if value else "b:false"
    if is_number(value):
        return value
    if isinstance(value, str):
        return "s:" + value
    if value is None:
        return "n:"
    return "x:"  # a list or an object: the key exists, but no equality or range condition holds


def _filter_values(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _filter_value(value) for key, value in meta.items()}


def _typed_values(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The typed columns of a product: its category if a string, its price if a number, else null."""
    category, price = meta.get("category"), meta.get("price")
    return {"category": category if isinstance(category, str) else None,
            "price": float(price) if is_number(price) else None}


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _vector_index_kind(client, collection: str) -> str:
    described = client.describe_index(collection, "vector")
    return "hnsw" if str(described.get("index_type", "")).upper() == "HNSW" else "exact"


def _check_collection_name(name: str) -> None:
    if not isinstance(name, str) or not name or not (name[0].isalpha() or name[0] == "_") or \
            not all(c.isalnum() or c == "_" for c in name) or len(name) > 255 or not name.isascii():
        raise ValueError(f"collection name {name!r} is not valid: Milvus takes letters, digits and underscores, "
                         "starting with a letter or underscore (e.g. hgm_catalogue)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
