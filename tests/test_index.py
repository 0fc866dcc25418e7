"""The catalogue index: the same behaviour on FAISS (`ProductIndex`) and Milvus Lite
(`MilvusProductIndex`): exact equals brute force, approximate recall, filters, add/remove,
reopening; then what only a FAISS folder has (files, tombstones, damage)."""
import json
import warnings

import faiss
import numpy as np
import pytest

import hgm_mm
from hgm_mm.retrieval.index import IndexParams, ProductIndex, SearchResult, model_fingerprint

D = 64
N = 20_000
CATEGORIES = ("sofa", "chair", "table", "lamp", "bed")
APPROX = ("hnsw", "ivfpq")
ALL_KINDS = ("exact", *APPROX)
IVF_PARAMS = dict(nlist=64)  # 20k vectors train 64 lists in well under a second
# (backend, kind): ivfpq is FAISS's own kind
BACKEND_KINDS = [("faiss", "exact"), ("faiss", "hnsw"), ("faiss", "ivfpq"), ("milvus", "exact"), ("milvus", "hnsw")]
BACKEND_APPROX = [(b, k) for b, k in BACKEND_KINDS if k != "exact"]
BACKENDS = ("faiss", "milvus")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # OpenMP spin-waits make FAISS many times slower on a busy 2-core runner; one thread is steady.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


class Backend:
    """Builds and reopens indexes of one engine, so one test body checks both."""

    def __init__(self, name: str, uri: str | None = None):
        self.name, self.uri, self._collections = name, uri, 0

    def build(self, ids, vectors, metadata=None, **options):
        if self.name == "faiss":
            return ProductIndex.build(ids, vectors, metadata, **options)
        from hgm_mm.retrieval.milvus import MilvusProductIndex

        return MilvusProductIndex.build(self.uri, ids, vectors, metadata, collection=self._new_name(), **options)

    def empty(self, dim, **options):
        if self.name == "faiss":
            return ProductIndex(dim, **options)
        from hgm_mm.retrieval.milvus import MilvusProductIndex

        return MilvusProductIndex.create(self.uri, dim, collection=self._new_name(), **options)

    def reopen(self, index, folder, model_identity=None):
        """The index as another process finds it: loaded from its saved folder, or its collection opened."""
        if self.name == "faiss":
            return ProductIndex.load(index.save(folder), model_identity=model_identity)
        from hgm_mm.retrieval.milvus import MilvusProductIndex

        return MilvusProductIndex.open(self.uri, collection=index.collection, model_identity=model_identity)

    def _new_name(self) -> str:
        self._collections += 1
        return f"test_{self._collections}"


@pytest.fixture(scope="module")
def backend(request, tmp_path_factory):
    if request.param == "faiss":
        return Backend("faiss")
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pip install 'hgm-mm[milvus]'")
    pytest.importorskip("milvus_lite", reason="the Milvus backend needs pip install 'hgm-mm[milvus]'")
    return Backend("milvus", f"milvus-lite:{tmp_path_factory.mktemp('milvus') / 'catalogue.db'}")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int, n_clusters: int = 40) -> np.ndarray:
    """Unit vectors (n, D) from a Gaussian mixture with fixed centres (seed picks the draws)."""
    centers = np.random.default_rng(1234).standard_normal((n_clusters, D))  # (C, D)
    rng = np.random.default_rng(seed)
    return unit(centers[rng.integers(0, n_clusters, n)] + 0.8 * rng.standard_normal((n, D)))


def make_metadata(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    metas = []
    for i in range(n):
        meta = {"category": CATEGORIES[i % 5], "price": float(rng.integers(10, 2000))}
        if i % 3 == 0:
            meta["color"] = "white" if i % 2 else "oak"
        if i % 7 == 0:
            meta["in_stock"] = bool(i % 2)
        metas.append(meta)
    return metas


def brute_force(x: np.ndarray, ids: list[str], q: np.ndarray, k: int, allowed: np.ndarray | None = None):
    scores = q @ x.T  # (Q, N)
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row if np.isfinite(s[j])] for row, s in zip(order, scores)], scores


def allowed_mask(metas: list[dict], predicate) -> np.ndarray:
    return np.array([predicate(m) for m in metas])


@pytest.fixture(scope="module")
def catalogue():
    x = clustered(N, seed=1)
    ids = [f"p{i}" for i in range(N)]
    return ids, x, make_metadata(N), clustered(100, seed=2)


_BUILT: dict = {}


@pytest.fixture()
def indexes(catalogue, backend):
    """Whole-catalogue indexes of `backend`, built once per kind and shared by the tests that only search."""
    ids, x, metas, _ = catalogue

    def of(kind):
        key = (backend.name, kind)
        if key not in _BUILT:
            _BUILT[key] = backend.build(ids, x, metas, kind=kind,
                                        params=IndexParams(**IVF_PARAMS) if kind == "ivfpq" else None)
        return _BUILT[key]
    return of


def recall_at_k(results: list[SearchResult], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(r.ids) & set(t)) / len(t) for r, t in zip(results, truth)]))


# -- exact and approximate search ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_exact_search_equals_brute_force(catalogue, indexes):
    ids, x, _, q = catalogue
    results = indexes("exact").search(q, k=10)
    truth, scores = brute_force(x, ids, q, 10)
    assert [r.ids for r in results] == truth
    for r, row in zip(results, scores):
        np.testing.assert_allclose(r.scores, np.sort(row)[::-1][:10], rtol=1e-5, atol=1e-6)
        assert r.scores.dtype == np.float32 and np.all(np.diff(r.scores) <= 0)


@pytest.mark.parametrize("backend,kind", BACKEND_KINDS, indirect=["backend"])
def test_candidates_are_the_searched_ids_once_each_in_order_of_appearance(catalogue, indexes, kind):
    _, _, _, q = catalogue
    for flt in (None, {"category": "lamp"}):
        expected = list(dict.fromkeys(i for r in indexes(kind).search(q[:8], k=15, filter=flt) for i in r.ids))
        assert indexes(kind).candidates(q[:8], k=15, filter=flt) == expected
    assert indexes(kind).candidates(q[:2], k=5, filter={"category": "no such"}) == []


@pytest.mark.parametrize("backend,kind", BACKEND_KINDS, indirect=["backend"])
def test_select_gives_every_matching_product_with_its_stored_vector(catalogue, backend, kind):
    ids, x, metas, _ = catalogue
    index = backend.build(ids[:3000], x[:3000], metas[:3000], kind=kind,
                          params=IndexParams(nlist=16) if kind == "ivfpq" else None)
    index.remove([ids[5], ids[7]])
    got_ids, got_vectors = index.select({"category": "sofa", "price": (None, 500)})
    wanted = [i for i in range(3000) if i not in (5, 7) and metas[i].get("category") == "sofa"
              and metas[i].get("price") is not None and metas[i]["price"] <= 500]
    assert got_ids == [ids[i] for i in wanted] and wanted
    np.testing.assert_allclose(got_vectors, x[wanted], atol=1e-6)
    assert len(index.select()[0]) == 2998
    assert index.metadata_of([ids[9], ids[8]]) == [metas[9], metas[8]]
    assert index.value_counts("category") == {c: 600 - (c == "sofa") - (c == "table") for c in CATEGORIES}


@pytest.mark.parametrize("backend,kind", BACKEND_APPROX, indirect=["backend"])
def test_approximate_recall_on_clustered_data(catalogue, indexes, kind):
    ids, x, _, q = catalogue
    truth, _ = brute_force(x, ids, q, 10)
    assert recall_at_k(indexes(kind).search(q, k=10), truth) >= 0.95


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_hnsw_recall_on_uniform_random_vectors(backend):
    # Uniform random vectors are the hard case for a graph index (no structure to exploit).
    rng = np.random.default_rng(7)
    x, q = unit(rng.standard_normal((N, D))), unit(rng.standard_normal((100, D)))
    ids = [str(i) for i in range(N)]
    truth, _ = brute_force(x, ids, q, 10)
    assert recall_at_k(backend.build(ids, x, kind="hnsw").search(q, k=10), truth) >= 0.95


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_auto_kind_switches_at_threshold(backend):
    x = clustered(61, seed=3)
    ids = [f"p{i}" for i in range(61)]
    params = IndexParams(exact_max=50)
    assert backend.build(ids[:50], x[:50], params=params).kind == "exact"
    assert backend.build(ids, x, params=params).kind == "hnsw"
    assert backend.build(ids, x, kind="exact", params=params).kind == "exact"  # an explicit kind stays

    growing = backend.empty(D, params=params)
    growing.add(ids[:40], x[:40])
    growing.remove(["p0"])
    assert growing.kind == "exact"
    growing.add(ids[40:], x[40:])  # 60 live products > 50: converted once, nothing lost
    assert growing.kind == "hnsw" and growing.requested_kind == "auto" and len(growing) == 60
    assert sorted(growing.ids) == sorted(ids[1:])
    assert growing.search(x[5], k=1)[0].ids == ["p5"]
    assert "p0" not in {i for r in growing.search(x[:3], k=60) for i in r.ids}


# -- filters ------------------------------------------------------------------------------------
FILTERS = [
    ({"category": "sofa"}, lambda m: m["category"] == "sofa"),
    ({"category": ["sofa", "chair"]}, lambda m: m["category"] in ("sofa", "chair")),
    ({"price": (100, 500)}, lambda m: 100 <= m["price"] <= 500),
    ({"price": (None, 50)}, lambda m: m["price"] <= 50),
    ({"price": (1950, None)}, lambda m: m["price"] >= 1950),
    ({"color": "white", "category": "lamp"}, lambda m: m.get("color") == "white" and m["category"] == "lamp"),
    ({"in_stock": True}, lambda m: m.get("in_stock") is True),
    ({"price": list(range(100, 130))}, lambda m: 100 <= m["price"] < 130),  # many values: the table path
]


# FAISS: filter_exact_max=0 forces the filtered approximate path; exact search has a single path.
# Milvus walks its own index under a filter, so only its exact kind promises recall 1.
@pytest.mark.parametrize("backend,kind,filter_exact_max", [
    ("faiss", "exact", 20_000), *[("faiss", k, m) for k in APPROX for m in (20_000, 0)],
    ("milvus", "exact", 20_000), ("milvus", "hnsw", 0)], indirect=["backend"])
@pytest.mark.parametrize("flt,predicate", FILTERS, ids=[str(f[0]) for f in FILTERS])
def test_filters_match_brute_force(catalogue, indexes, kind, filter_exact_max, flt, predicate):
    ids, x, metas, q = catalogue
    allowed = allowed_mask(metas, predicate)
    index = indexes(kind)
    index.params.filter_exact_max = filter_exact_max
    try:
        results = index.search(q[:30], k=10, filter=flt)
    finally:
        index.params.filter_exact_max = IndexParams().filter_exact_max
    truth, _ = brute_force(x, ids, q[:30], 10, allowed)
    assert all(len(r) == min(10, int(allowed.sum())) for r in results)
    assert all(predicate(meta) for r in results for meta in r.metadata)
    assert all(metas[int(i[1:])] == meta for r in results for i, meta in zip(r.ids, r.metadata))
    expected_recall = 1.0 if kind == "exact" or filter_exact_max else 0.95
    assert recall_at_k(results, truth) >= expected_recall


@pytest.mark.parametrize("backend,kind", BACKEND_KINDS, indirect=["backend"])
def test_selective_filter_still_returns_k(catalogue, indexes, kind):
    """15 products match: k=10 gives 10, k=50 gives all 15, on the approximate path too."""
    ids, x, metas, q = catalogue
    index = indexes(kind)
    index.params.filter_exact_max = 0
    try:
        for k in (10, 50):
            flt = {"price": (1990, 1990)}
            allowed = allowed_mask(metas, lambda m: m["price"] == 1990)
            assert 10 < allowed.sum() < 50
            results = index.search(q[:20], k=k, filter=flt)
            truth, _ = brute_force(x, ids, q[:20], k, allowed)
            assert [r.ids for r in results] == truth
    finally:
        index.params.filter_exact_max = IndexParams().filter_exact_max


@pytest.mark.parametrize("backend,kind", BACKEND_KINDS, indirect=["backend"])
def test_filter_errors_and_empty_matches(catalogue, indexes, kind):
    _, _, _, q = catalogue
    index = indexes(kind)
    with pytest.raises(ValueError, match=r"unknown attribute 'colour'.*known attributes: \['category', 'color'"):
        index.search(q[:2], filter={"colour": "white"})
    for nothing in ({"category": "spaceship"}, {"price": (1e9, None)}, {"category": []},
                    {"category": "sofa", "color": "purple"}):
        results = index.search(q[:2], k=10, filter=nothing)
        assert [len(r) for r in results] == [0, 0] and results[0].scores.shape == (0,)
    with pytest.raises(ValueError, match="range min 500 > max 100"):
        index.search(q[:1], filter={"price": (500, 100)})
    with pytest.raises(ValueError, match="not a JSON scalar"):
        index.search(q[:1], filter={"category": {"a": 1}})
    with pytest.raises(TypeError, match="filter must be a dict"):
        index.search(q[:1], filter=[("category", "sofa")])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bool_filter_does_not_match_numbers(backend):
    x = clustered(4, seed=4)
    index = backend.build(["a", "b", "c", "d"], x, [{"flag": True}, {"flag": 1}, {"flag": "1"}, {"flag": "b:true"}])
    assert index.search(x[0], k=4, filter={"flag": True})[0].ids == ["a"]
    assert index.search(x[0], k=4, filter={"flag": 1})[0].ids == ["b"]
    assert index.search(x[0], k=4, filter={"flag": "1"})[0].ids == ["c"]
    assert index.search(x[0], k=4, filter={"flag": "b:true"})[0].ids == ["d"]
    assert index.search(x[0], k=4, filter={"flag": (0, 5)})[0].ids == ["b"]  # a range holds numbers alone


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_category_and_price_of_any_json_type_filter_by_their_values(backend):
    """Milvus keeps string categories and numeric prices in typed columns; other types still match."""
    x = clustered(4, seed=6)
    index = backend.build(list("abcd"), x, [{"category": "sofa", "price": 5}, {"category": 5, "price": "cheap"},
                                             {"category": True, "price": 5.0}, {"category": "bed", "price": True}])
    def found(flt):
        return sorted(index.search(x[0], k=4, filter=flt)[0].ids)
    assert found({"category": ["sofa", 5]}) == ["a", "b"]
    assert found({"category": True}) == ["c"]
    assert found({"price": (0, 10)}) == ["a", "c"]
    assert found({"price": "cheap"}) == ["b"]
    assert found({"price": 5}) == ["a", "c"]
    assert found({"category": ["bed", "sofa"], "price": (None, 5)}) == ["a"]


# -- add / remove -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,kind", BACKEND_KINDS, indirect=["backend"])
def test_add_and_remove_without_rebuild(catalogue, backend, kind):
    ids, x, metas, q = catalogue
    params = IndexParams(**IVF_PARAMS)
    index = backend.build(ids[:10_000], x[:10_000], metas[:10_000], kind=kind, params=params)
    faiss_index = getattr(index, "_index", None)
    index.add(ids[10_000:], x[10_000:], metas[10_000:])
    assert getattr(index, "_index", None) is faiss_index and len(index) == N  # same FAISS object: no rebuild
    assert index.search(x[15_000], k=1)[0].ids == [ids[15_000]]
    assert index.metadata(ids[15_000]) == metas[15_000]

    gone = [ids[15_000], ids[3], ids[12_345]]
    index.remove(gone)
    assert getattr(index, "_index", None) is faiss_index and len(index) == N - 3 and gone[0] not in index
    assert index.n_removed == (3 if backend.name == "faiss" and kind != "exact" else 0)
    found = {i for r in index.search(x[[15_000, 3, 12_345]], k=20) for i in r.ids}
    found |= {i for r in index.search(x[[15_000, 3]], k=20, filter={"category": ["sofa", "lamp"]}) for i in r.ids}
    assert not found & set(gone)
    kept = [15_001, 4, 0, N - 1]  # stored rows shift in an exact index when earlier ones are removed
    assert np.allclose(index.vectors([ids[i] for i in kept]), x[kept], atol=1e-6)
    live = np.ones(N, dtype=bool)
    live[[15_000, 3, 12_345]] = False
    truth, _ = brute_force(x, ids, q[:20], 10, live)
    assert recall_at_k(index.search(q[:20], k=10), truth) >= (1.0 if kind == "exact" else 0.95)

    with pytest.raises(ValueError, match="already in the index.*remove"):
        index.add([ids[0]], x[:1])
    with pytest.raises(KeyError, match="not in the index"):
        index.remove([ids[15_000]])
    with pytest.raises(KeyError, match="not in the index"):
        index.vectors([ids[15_000]])
    index.add([ids[15_000]], x[15_000:15_001], [{"category": "sofa", "price": 1.0}])  # re-add after removal
    assert index.search(x[15_000], k=1, filter={"category": "sofa"})[0].ids == [ids[15_000]]
    assert index.metadata(ids[15_000])["price"] == 1.0
    assert np.allclose(index.vectors([ids[15_000], ids[4]]), x[[15_000, 4]], atol=1e-6)

    index.compact()  # FAISS: rebuilt from the live products, no tombstones; both: same answers
    assert index.n_removed == 0 and len(index) == N - 2
    live[15_000] = True
    truth, _ = brute_force(x, ids, q[:20], 10, live)
    assert recall_at_k(index.search(q[:20], k=10), truth) >= (1.0 if kind == "exact" else 0.95)


# -- reopening ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,kind", BACKEND_KINDS, indirect=["backend"])
def test_reopened_index_gives_the_same_answers(catalogue, backend, kind, tmp_path):
    ids, x, metas, q = catalogue
    index = backend.build(ids, x, metas, kind=kind, params=IndexParams(ef_search=100, **IVF_PARAMS),
                          model_identity="hgm-tiny:sha256:abc")
    index.remove([ids[0], ids[1]])
    loaded = backend.reopen(index, tmp_path / "idx")
    assert (loaded.kind, loaded.dim, len(loaded), loaded.params) == (kind, D, N - 2, index.params)
    assert loaded.ids == index.ids == ids[2:] and loaded.model_identity == index.model_identity
    for flt in (None, {"category": ["sofa", "bed"], "price": (None, 900)}):
        a, b = index.search(q, k=10, filter=flt), loaded.search(q, k=10, filter=flt)
        assert [r.ids for r in a] == [r.ids for r in b]
        assert all(np.allclose(r.scores, s.scores, atol=1e-6) and r.metadata == s.metadata for r, s in zip(a, b))
    loaded.add(["new"], x[:1], [{"category": "sofa"}])  # a reopened index keeps working
    assert loaded.search(x[0], k=1)[0].ids == ["new"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_writes_the_folder_and_its_manifest(catalogue, kind, tmp_path):
    ids, x, metas, q = catalogue
    index = ProductIndex.build(ids, x, metas, kind=kind, params=IndexParams(**IVF_PARAMS),
                               model_identity="hgm-tiny:sha256:abc")
    index.remove([ids[0], ids[1]])
    folder = index.save(tmp_path / "idx")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.json", "index.faiss", "manifest.json", "metadata.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["kind"], manifest["dimension"], manifest["count"]) == (kind, D, N - 2)
    assert manifest["model_identity"] == "hgm-tiny:sha256:abc" and manifest["format_version"] == 1
    loaded = ProductIndex.load(folder)
    a, b = index.search(q, k=10), loaded.search(q, k=10)
    assert all(r.ids == s.ids and np.array_equal(r.scores, s.scores) for r, s in zip(a, b))  # bit for bit


def test_save_overwrites_atomically(catalogue, tmp_path):
    ids, x, metas, _ = catalogue
    ProductIndex.build(ids[:100], x[:100], metas[:100]).save(tmp_path)
    ProductIndex.build(ids[:50], x[:50], metas[:50]).save(tmp_path)
    assert len(ProductIndex.load(tmp_path)) == 50
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- model identity -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hgm_mm.RandomInitWarning)
        first, second = hgm_mm.create_model("hgm-tiny"), hgm_mm.create_model("hgm-tiny")
    folder = first.save_pretrained(tmp_path_factory.mktemp("model"))
    return first, second, hgm_mm.load_model(folder)


def test_model_fingerprint(two_models):
    first, second, reloaded = two_models
    fingerprint = model_fingerprint(first)
    assert fingerprint.startswith("hgm-tiny:sha256:") and len(fingerprint) == len("hgm-tiny:sha256:") + 64
    assert model_fingerprint(reloaded) == fingerprint  # stable across save_pretrained / load_model
    assert model_fingerprint(first) == fingerprint  # deterministic
    assert model_fingerprint(second) != fingerprint  # other random weights


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_reopening_refuses_another_model(catalogue, backend, two_models, tmp_path):
    first, second, reloaded = two_models
    ids, x, metas, _ = catalogue
    index = backend.build(ids[:100], x[:100], metas[:100], model_identity=first)
    assert len(backend.reopen(index, tmp_path / "a", model_identity=reloaded)) == 100
    assert len(backend.reopen(index, tmp_path / "b", model_identity=model_fingerprint(first))) == 100
    with pytest.raises(ValueError, match=r"built with model 'hgm-tiny'.*both are named 'hgm-tiny' but their "
                                         r"weights or configs differ.*Re-index the catalogue with that model"):
        backend.reopen(index, tmp_path / "c", model_identity=second)
    with pytest.raises(ValueError, match=r"built with model 'hgm-tiny', but the queries come from model "
                                         r"'hgm-lite-en'.*Re-index"):
        backend.reopen(index, tmp_path / "d", model_identity="hgm-lite-en:sha256:" + "0" * 64)

    anonymous = backend.build(ids[:100], x[:100])
    with pytest.raises(ValueError, match="saved without a model identity"):
        backend.reopen(anonymous, tmp_path / "anonymous", model_identity=first)


# -- damaged folders ----------------------------------------------------------------------------
@pytest.fixture()
def saved(catalogue, tmp_path):
    ids, x, metas, _ = catalogue
    return ProductIndex.build(ids[:200], x[:200], metas[:200]).save(tmp_path / "idx")


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["manifest.json", "index.faiss", "ids.json", "metadata.json"])
def test_missing_file_is_refused(saved, name):
    (saved / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        ProductIndex.load(saved)


def test_damaged_files_are_refused(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ProductIndex.load(tmp_path / "nowhere")

    original = (saved / "manifest.json").read_text()
    (saved / "manifest.json").write_text(original[:-5])
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        ProductIndex.load(saved)
    (saved / "manifest.json").write_text(original)

    _edit_manifest(saved, count=199)
    with pytest.raises(ValueError, match=r"ids\.json: 200 products but the manifest counts 199"):
        ProductIndex.load(saved)
    _edit_manifest(saved, count=200, dimension=D + 1)
    with pytest.raises(ValueError, match=rf"index\.faiss: dimension {D} but the manifest says {D + 1}"):
        ProductIndex.load(saved)
    _edit_manifest(saved, dimension=D, format_version=99)
    with pytest.raises(ValueError, match="format_version=99.*Upgrade"):
        ProductIndex.load(saved)
    (saved / "manifest.json").write_text(original)

    index_bytes = (saved / "index.faiss").read_bytes()
    (saved / "index.faiss").write_bytes(index_bytes[:-100])  # truncated: an interrupted copy
    with pytest.raises(ValueError, match=r"index\.faiss: size .* differs from the manifest"):
        ProductIndex.load(saved)
    (saved / "index.faiss").write_bytes(b"\0" * len(index_bytes))  # same size, garbage
    with pytest.raises(ValueError, match=r"index\.faiss: its content .* is not the file its manifest recorded"):
        ProductIndex.load(saved)
    digests = json.loads((saved / "manifest.json").read_text())["sha256"]
    _edit_manifest(saved, sha256={})  # a folder saved before digests: FAISS itself refuses the garbage
    with pytest.raises(ValueError, match=r"index\.faiss: FAISS cannot read it"):
        ProductIndex.load(saved)
    (saved / "index.faiss").write_bytes(index_bytes)

    metadata = (saved / "metadata.json").read_text()
    broken = metadata[:-3] + "   "  # same size, not JSON
    (saved / "metadata.json").write_text(broken)
    with pytest.raises(ValueError, match=r"metadata\.json: not valid JSON"):
        ProductIndex.load(saved)
    (saved / "metadata.json").write_text(metadata)
    _edit_manifest(saved, sha256=digests)
    assert len(ProductIndex.load(saved)) == 200  # restored: loads again


def test_files_swapped_in_from_elsewhere_are_refused_by_content(catalogue, saved, tmp_path):
    """Same sizes, same dimension: only the digests tell these folders apart."""
    ids, x, metas, _ = catalogue
    ids_doc = json.loads((saved / "ids.json").read_text())
    ids_doc["ids"][0], ids_doc["ids"][1] = ids_doc["ids"][1], ids_doc["ids"][0]  # two products swap vectors
    original_ids = (saved / "ids.json").read_text()
    (saved / "ids.json").write_text(json.dumps(ids_doc, ensure_ascii=False))
    assert len((saved / "ids.json").read_text()) == len(original_ids)
    with pytest.raises(ValueError, match=r"ids\.json: its content .* replaced or changed"):
        ProductIndex.load(saved)
    (saved / "ids.json").write_text(original_ids)

    other_vectors = np.random.default_rng(7).standard_normal((200, D)).astype(np.float32)  # another model's
    other_vectors /= np.linalg.norm(other_vectors, axis=1, keepdims=True)
    other = ProductIndex.build(ids[:200], other_vectors, metas[:200]).save(tmp_path / "other")
    assert (other / "index.faiss").stat().st_size == (saved / "index.faiss").stat().st_size
    (saved / "index.faiss").write_bytes((other / "index.faiss").read_bytes())
    with pytest.raises(ValueError, match=r"idx/index\.faiss: its content .* replaced or changed"):
        ProductIndex.load(saved)


# -- input validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_input_validation(backend):
    x = clustered(10, seed=5)
    ids = [f"p{i}" for i in range(10)]
    index = backend.empty(D, kind="exact")
    with pytest.raises(ValueError, match=rf"shape \(10, 32\); expected \(N, {D}\)"):
        index.add(ids, x[:, :32])
    nan = x.copy()
    nan[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[4\] hold NaN"):
        index.add(ids, nan)
    with pytest.raises(ValueError, match=r"unit vectors.*rows \[2\].*normalise"):
        index.add(ids, x * np.where(np.arange(10) == 2, 3.0, 1.0)[:, None])
    with pytest.raises(ValueError, match=r"appear more than once.*\['p1'\]"):
        index.add(["p1", "p1"], x[:2])
    with pytest.raises(ValueError, match="2 ids but 3 vectors"):
        index.add(ids[:2], x[:3])
    with pytest.raises(ValueError, match="JSON values"):
        index.add(ids[:1], x[:1], [{"price": float("nan")}])
    with pytest.raises(ValueError, match="wrap it"):
        index.add("p1", x[:1])
    assert len(index) == 0  # nothing half-added

    import torch

    index.add(ids, torch.from_numpy(x * 1.001))  # within tolerance: renormalised; tensors accepted
    assert len(index) == 10 and index.search(x[3], k=1)[0].scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=rf"queries have shape \(1, 8\); expected \(N, {D}\)"):
        index.search(np.ones((1, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="k=0"):
        index.search(x[:1], k=0)
    assert [len(r) for r in index.search(x[:2], k=100)] == [10, 10]  # k larger than the catalogue
    with pytest.raises(ValueError, match="kind='annoy'"):
        backend.empty(D, kind="annoy")
    with pytest.raises(ValueError, match="IndexParams.ef_search=0"):
        IndexParams(ef_search=0)
    with pytest.raises(ValueError, match="needs at least" if backend.name == "faiss" else "use hnsw"):
        backend.build(ids, x, kind="ivfpq")
