"""The matcher: each ranking term moves the order, diversity, product sets, reasons, filters, folders, threads."""
import json
import threading

import numpy as np
import torch
import pytest
from PIL import Image

import hgm_mm
from conftest import tiny_model
from hgm_mm.data import Product, Room
from hgm_mm.retrieval.index import ProductIndex, model_fingerprint
from hgm_mm.ranking.catalog import build_catalog_index
from hgm_mm.ranking.matcher import diverse_order, Matcher, MatchResult
from hgm_mm.ranking.prior import SceneCategoryPrior
from hgm_mm.ranking.weights import RankingWeights
from hgm_mm.ranking.profile import UserProfile

N = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("room") / "room.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def vectors(model):
    x = np.random.default_rng(1).standard_normal((N, model.config.embed_dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (N, D)


def ids_of(n: int = N) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


def make_index(model, vectors, categories, prices=None) -> ProductIndex:
    metadata = [{"category": c, "title": f"product {i}"} for i, c in enumerate(categories)]
    if prices is not None:
        for meta, price in zip(metadata, prices):
            meta["price"] = price
    return ProductIndex.build(ids_of(len(vectors)), vectors, metadata, model_identity=model_fingerprint(model))


def uniform_prior(model, counts: dict[str, int]) -> SceneCategoryPrior:
    """The same category counts in every scene, so the scene prediction does not matter."""
    return SceneCategoryPrior.from_counts({scene: dict(counts) for scene in model.scene_labels})


def order(result: MatchResult) -> list[str]:
    return [p.product_id for p in result.products]


SIMILARITY_ONLY = RankingWeights(scene_fit=0.0, profile=0.0, diversity=0.0)


# -- each term moves the order ----------------------------------------------------------------
def test_scene_fit_moves_products_of_fitting_categories_up(model, vectors, photo):
    plain = Matcher(model, make_index(model, vectors, ["a"] * N))
    query = plain.encode_query(photo)
    by_similarity = order(plain.rank(query, k=N, weights=SIMILARITY_ONLY))
    assert sorted(by_similarity) == ids_of()  # every product is a candidate and comes back
    top5 = set(by_similarity[:5])
    categories = ["b" if pid in top5 else "a" for pid in ids_of()]  # the most similar ones in a misfit category
    matcher = Matcher(model, make_index(model, vectors, categories), prior=uniform_prior(model, {"a": 100, "b": 1}))
    assert order(matcher.rank(query, k=N, weights=SIMILARITY_ONLY)) == by_similarity
    # scene_fit is about -0.85 for "b", +0.06 for "a"; at weight 3 the gap passes any similarity gap (at most 2)
    fitted = matcher.rank(query, k=N, weights=RankingWeights(scene_fit=3.0, profile=0.0, diversity=0.0))
    assert not top5 & set(order(fitted)[:5])
    assert set(order(fitted)[-5:]) == top5
    assert all(p.reasons["scene_fit"] < 0 for p in fitted.products if p.product_id in top5)


def test_profile_moves_what_the_user_likes_up(model, vectors, photo):
    matcher = Matcher(model, make_index(model, vectors, ["a"] * N))
    query = matcher.encode_query(photo)
    last = order(matcher.rank(query, k=N, weights=SIMILARITY_ONLY))[-1]
    profile = UserProfile("u1", vector=matcher.index.vectors([last])[0])
    unweighted = matcher.rank(query, k=N, profile=profile, weights=SIMILARITY_ONLY)
    assert order(unweighted)[-1] == last  # weight 0: the profile changes nothing
    weighted = matcher.rank(query, k=N, profile=profile, weights=RankingWeights(profile=5.0, scene_fit=0, diversity=0))
    assert order(weighted)[0] == last
    assert weighted.products[0].reasons["profile"] == pytest.approx(5.0, abs=1e-4)


def test_diversity_removes_near_duplicates(model, vectors, photo):
    probe = Matcher(model, make_index(model, vectors, ["a"] * N))
    room = probe.encode_query(photo).room_vector
    near = room + 0.02 * np.random.default_rng(2).standard_normal(room.shape).astype(np.float32)
    with_twins = np.concatenate([vectors[:N - 2], room[None], (near / np.linalg.norm(near))[None]])  # p38, p39
    matcher = Matcher(model, make_index(model, with_twins, ["a"] * N))
    query = matcher.encode_query(photo)
    plain = matcher.rank(query, k=10, weights=SIMILARITY_ONLY)
    assert set(order(plain)[:2]) == {"p38", "p39"}  # the twins lead on similarity alone
    diverse = matcher.rank(query, k=10, weights=RankingWeights(diversity=1.0, scene_fit=0, profile=0))
    assert order(diverse)[0] in {"p38", "p39"} and not {"p38", "p39"} <= set(order(diverse)[:5])
    assert len(set(order(diverse))) == 10
    assert all(p.reasons["diversity"] <= 0 for p in diverse.products)
    assert diverse.products[0].reasons["diversity"] == 0.0 and any(p.reasons["diversity"] < 0 for p in diverse.products)


def test_diverse_order_by_hand():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    picks, penalties = diverse_order(np.array([1.0, 0.95, 0.5]), vectors, diversity=0.6, k=3)
    assert picks == [0, 2, 1]  # 0.95 - 0.6 * 1 < 0.5 - 0.6 * 0
    assert penalties.tolist() == pytest.approx([0.0, 0.0, -0.6])
    picks, _ = diverse_order(np.array([1.0, 0.95, 0.5]), vectors, diversity=0.0, k=2)
    assert picks == [0, 1]


# -- reasons, sets, filters -------------------------------------------------------------------
CATEGORIES = ["sofa", "lamp", "rug", "bathmat"] * (N // 4)
SCENE_COUNTS = {"sofa": 30, "lamp": 28, "rug": 26, "bathmat": 0}  # rug: 27 / 88 > its 1 / 4 share


def test_reasons_sum_to_the_score_and_json_is_ready(model, vectors, photo):
    matcher = Matcher(model, make_index(model, vectors, CATEGORIES), prior=uniform_prior(model, SCENE_COUNTS))
    result = matcher.match(photo, text="a calm living room", k=5,
                           profile=UserProfile("u", category_affinity={"lamp": 1.0}))
    assert len(result.products) == 5
    assert result.scene == next(iter(result.scene_probabilities))
    assert set(result.scene_probabilities) == set(model.scene_labels)
    assert sum(result.scene_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    for product in result.products + result.product_set:
        assert set(product.reasons) == {"similarity", "scene_fit", "profile", "diversity"}
        assert product.score == pytest.approx(sum(product.reasons.values()), abs=1e-6)
        assert product.metadata["category"] in SCENE_COUNTS
    assert [p.score for p in result.products] == sorted((p.score for p in result.products), reverse=True)
    document = json.loads(json.dumps(result.to_dict()))
    assert document["products"][0]["product_id"] == result.products[0].product_id


# candidates 1: set categories missing from the candidates are searched; score_whole_max 0: every
# category is too large to be scored whole, and gives its best candidate (with 100 hits per query
# vector every product is a candidate, so that is its best product)
@pytest.mark.parametrize("candidates, score_whole_max", [(100, 2000), (1, 2000), (100, 0)])
def test_product_set_has_the_best_product_of_each_fitting_category(model, vectors, photo, candidates,
                                                                    score_whole_max, monkeypatch):
    monkeypatch.setattr(hgm_mm.ranking.matcher, "SET_SCORE_WHOLE_MAX", score_whole_max)
    index = make_index(model, vectors, CATEGORIES)
    matcher = Matcher(model, index, prior=uniform_prior(model, SCENE_COUNTS),
                      weights=RankingWeights(candidates=candidates))
    query = matcher.encode_query(photo)
    result = matcher.rank(query, k=3)
    categories = [p.metadata["category"] for p in result.product_set]
    assert sorted(categories) == ["lamp", "rug", "sofa"]  # the fitting categories; bathmats never belong
    assert [p.score for p in result.product_set] == sorted((p.score for p in result.product_set), reverse=True)
    for product in result.product_set:  # each says why, with its category's share of the scene's products
        category = product.metadata["category"]
        share = matcher.prior.mixture(query.scene_probabilities)[category]
        assert category in product.why.lower() and f"{share:.0%}" in product.why
    full = Matcher(model, index, prior=matcher.prior).rank(query, k=N, weights=RankingWeights(diversity=0.0))
    for product in result.product_set:  # the best of its category over the whole catalogue
        best = next(p for p in full.products if p.metadata["category"] == product.metadata["category"])
        assert product.product_id == best.product_id
        assert product.score == pytest.approx(best.score, abs=1e-5)


def test_a_large_set_category_with_no_candidate_is_searched_near_the_room(model, vectors, photo, monkeypatch):
    """Every category too large to score whole; "lamp" holds only products no query vector found,
    so its set item comes from a search of lamps near the room vector (all 20 or fewer of them)."""
    monkeypatch.setattr(hgm_mm.ranking.matcher, "SET_SCORE_WHOLE_MAX", 0)
    plain = Matcher(model, make_index(model, vectors, ["sofa"] * N))
    query = plain.encode_query(photo)
    search_vectors = np.concatenate([query.room_vector[None, :], query.view_embeds[0].numpy()])
    found = set(plain.index.candidates(search_vectors, k=1))
    lamps = [pid for pid in ids_of() if pid not in found][:10]  # at most SET_CANDIDATES (20): all searched
    categories = ["lamp" if pid in lamps else "sofa" for pid in ids_of()]
    assert lamps
    index = make_index(model, vectors, categories)
    prior = uniform_prior(model, {"sofa": 10, "lamp": 10})
    result = Matcher(model, index, prior=prior, weights=RankingWeights(candidates=1)).rank(query, k=3)
    full = Matcher(model, index, prior=prior).rank(query, k=N, weights=RankingWeights(diversity=0.0))
    lamp = next(p for p in result.product_set if p.metadata["category"] == "lamp")
    best_lamp = next(p for p in full.products if p.metadata["category"] == "lamp")
    assert lamp.product_id == best_lamp.product_id and lamp.product_id not in found
    assert lamp.score == pytest.approx(best_lamp.score, abs=1e-5)


def test_the_guide_says_when_it_is_not_sure_of_the_scene(model, vectors, photo):
    from hgm_mm.ranking.matcher import SCENE_CONFIDENCE

    matcher = Matcher(model, make_index(model, vectors, CATEGORIES), prior=uniform_prior(model, SCENE_COUNTS))
    encoded = matcher.encode_query(photo)
    labels = list(model.scene_labels)
    sure = {label: (0.9 if label == "bedroom" else 0.1 / (len(labels) - 1)) for label in labels}
    unsure = {label: (0.4 if label == "bedroom" else 0.6 / (len(labels) - 1)) for label in labels}
    for probabilities, confident in ((sure, True), (unsure, False)):
        query = matcher.query_from_embeddings(encoded.view_embeds, scene_probabilities=probabilities)
        result = matcher.rank(query, k=5)
        assert result.scene == "bedroom" and result.scene_confident is confident
        assert (result.scene_probabilities["bedroom"] >= SCENE_CONFIDENCE) is confident
        assert result.to_dict()["scene_confident"] is confident
        place = "bedrooms" if confident else "rooms like this one"
        assert all(place in p.why for p in result.product_set) and result.product_set
        assert all(p.why.startswith("Matches your photo") for p in result.products)


def test_without_a_prior_sets_follow_the_top_products(model, vectors, photo):
    matcher = Matcher(model, make_index(model, vectors, CATEGORIES))
    result = matcher.match(photo, k=N)
    assert all(p.reasons["scene_fit"] == 0.0 for p in result.products)
    top_categories = list(dict.fromkeys(p.metadata["category"] for p in
                                        matcher.rank(matcher.encode_query(photo), k=N,
                                                     weights=RankingWeights(diversity=0.0)).products))
    assert [p.metadata["category"] for p in result.product_set] == top_categories


def test_filters_pass_through_to_the_index(model, vectors, photo):
    prices = [float(10 * i) for i in range(N)]
    matcher = Matcher(model, make_index(model, vectors, CATEGORIES, prices), prior=uniform_prior(model, SCENE_COUNTS))
    lamps = matcher.match(photo, k=5, filter={"category": "lamp"})
    assert len(lamps.products) == 5 and {p.metadata["category"] for p in lamps.products} == {"lamp"}
    assert [p.metadata["category"] for p in lamps.product_set] == ["lamp"]
    cheap = matcher.match(photo, k=N, filter={"price": (None, 95.0)})
    assert len(cheap.products) == 10 and all(p.metadata["price"] <= 95 for p in cheap.products + cheap.product_set)
    assert matcher.match(photo, k=3, filter={"category": "piano"}).products == []
    with pytest.raises(ValueError, match="unknown attribute 'brand'"):
        matcher.match(photo, filter={"brand": "x"})


def test_inputs_are_checked(model, vectors, photo, tmp_path):
    matcher = Matcher(model, make_index(model, vectors, CATEGORIES))
    with pytest.raises(ValueError, match="give a room photo, words, or both"):
        matcher.match()
    with pytest.raises(ValueError, match="file not found"):
        matcher.match(str(tmp_path / "absent.jpg"))
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(ValueError, match="notes.jpg"):
        matcher.match(str(tmp_path / "notes.jpg"))
    with pytest.raises(ValueError, match="k=0"):
        matcher.match(photo, k=0)
    words_only = matcher.match(text="a bright kitchen", k=3)
    assert len(words_only.products) == 3


def test_an_index_of_another_model_is_refused(model, vectors):
    other = tiny_model()  # same config, other random weights
    index = ProductIndex.build(ids_of(), vectors, model_identity=model_fingerprint(other))
    with pytest.raises(ValueError, match="not comparable"):
        Matcher(model, index)
    with pytest.raises(ValueError, match="holds 8-d vectors"):
        Matcher(model, ProductIndex.build(["a"], np.eye(8, dtype=np.float32)[:1]))


def test_concurrent_matches_agree_with_sequential_ones(model, vectors, photo):
    matcher = Matcher(model, make_index(model, vectors, CATEGORIES), prior=uniform_prior(model, SCENE_COUNTS))
    texts = [None, "a sunny bedroom", "dark wood", None, "white kitchen", "kids"]
    expected = [matcher.match(photo, text=t, k=5).to_dict() for t in texts]
    results, errors = [None] * len(texts), []

    def run(i):
        try:
            results[i] = matcher.match(photo, text=texts[i], k=5).to_dict()
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected):
        assert [p["product_id"] for p in got["products"]] == [p["product_id"] for p in want["products"]]
        assert got["scene_probabilities"] == pytest.approx(want["scene_probabilities"], abs=1e-5)


# -- the prior --------------------------------------------------------------------------------
def test_scene_category_prior_by_hand(tmp_path):
    prior = SceneCategoryPrior.from_counts({"bedroom": {"bed": 3, "lamp": 1}, "kitchen": {"fixture": 2}})
    assert prior.categories == ["bed", "fixture", "lamp"]
    assert prior.probability("bedroom", "bed") == pytest.approx(4 / 7)  # (3 + 1) / (4 + 3)
    assert prior.probability("bedroom", "fixture") == pytest.approx(1 / 7)
    assert prior.probability("garage", "bed") == pytest.approx(4 / 9)  # unseen scene: pooled (3 + 1) / (6 + 3)
    mixed = prior.mixture({"bedroom": 0.5, "kitchen": 0.5})
    assert mixed["fixture"] == pytest.approx(0.5 * 1 / 7 + 0.5 * 3 / 5)
    assert sum(mixed.values()) == pytest.approx(1.0)
    again = SceneCategoryPrior.load(prior.save(tmp_path / "scene_categories.json"))
    assert again.counts == prior.counts and again.alpha == prior.alpha


def test_scene_category_prior_from_pairs_and_bad_files(tmp_path):
    rooms = [Room("r1", tmp_path / "r1.jpg", "bedroom", ""), Room("r2", tmp_path / "r2.jpg", None, "")]
    products = [Product("p1", tmp_path / "p1.jpg", "", "bed", ""), Product("p2", tmp_path / "p2.jpg", "", None, ""),
                Product("p3", tmp_path / "p3.jpg", "", "lamp", "")]
    prior = SceneCategoryPrior.from_pairs(rooms, products, [("r1", "p1"), ("r1", "p2"), ("r1", "p3"), ("r2", "p1")])
    assert prior.counts == {"bedroom": {"bed": 1.0, "lamp": 1.0}}  # no scene or no category: not counted
    with pytest.raises(ValueError, match="no pair joins"):
        SceneCategoryPrior.from_pairs(rooms, products, [("r2", "p1")])
    bad = tmp_path / "bad.json"
    for text, words in (("{", "not valid JSON"), ('{"format": 1, "counts": {"bedroom": {"bed": -1}}}', "non-negative"),
                        ('{"format": 9, "counts": {}}', "newer"), ('{"counts": {}, "x": 1}', "unknown key")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            SceneCategoryPrior.load(bad)


def test_ranking_weights_are_validated():
    assert RankingWeights.from_dict(RankingWeights(scene_fit=0.3).to_dict()) == RankingWeights(scene_fit=0.3)
    with pytest.raises(ValueError, match="diversity=-1"):
        RankingWeights(diversity=-1)
    with pytest.raises(ValueError, match="candidates"):
        RankingWeights(candidates=0)
    with pytest.raises(ValueError, match="unknown key"):
        RankingWeights.from_dict({"novelty": 1.0})


# -- the folder -------------------------------------------------------------------------------
def test_build_catalog_index_then_load_matches_alone(model, photo, tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i, (colour, category) in enumerate([((200, 40, 40), "sofa"), ((40, 200, 40), "lamp"),
                                            ((40, 40, 200), "rug"), ((120, 120, 120), "sofa")]):
        Image.new("RGB", (48, 48), colour).save(tmp_path / "img" / f"p{i}.jpg")
        lines.append(json.dumps({"product_id": f"p{i}", "image": f"img/p{i}.jpg", "title": f"product {i}",
                                 "category": category, "price": 100 + i, "color": "Grey"}))
    (tmp_path / "products.jsonl").write_text("\n".join(lines))
    prior = uniform_prior(model, {"sofa": 5, "lamp": 3, "rug": 1})
    built = build_catalog_index(model, tmp_path / "products.jsonl", tmp_path / "catalogue", prior=prior,
                                weights=RankingWeights(diversity=0.2), progress=False, num_workers=0)
    assert built.n_products == 4 and built.skipped == []
    loaded = Matcher.load(built.folder)
    assert loaded.weights == RankingWeights(diversity=0.2) and loaded.prior.counts == prior.counts
    assert model_fingerprint(loaded.model) == model_fingerprint(model)
    meta = loaded.index.metadata("p1")
    assert (meta["category"], meta["price"], meta["title"]) == ("lamp", 101, "product 1")
    assert meta["image"] == str((tmp_path / "img" / "p1.jpg").resolve())
    result = loaded.match(photo, k=4)
    direct = Matcher(model, loaded.index, prior=prior, weights=RankingWeights(diversity=0.2)).match(photo, k=4)
    assert result.to_dict() == direct.to_dict()
    with pytest.raises(ValueError, match="built with model"):
        Matcher.load(built.folder, model=tiny_model())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not an index folder"):
        build_catalog_index(model, tmp_path / "products.jsonl", tmp_path / "mine", progress=False, num_workers=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="holds no matcher.json"):
        Matcher.load(tmp_path / "mine")


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_index_vectors_reads_stored_vectors_by_id(kind):
    from hgm_mm.retrieval.index import IndexParams

    x = np.random.default_rng(3).standard_normal((1200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = ProductIndex.build(ids_of(1200), x, kind=kind, params=IndexParams(nlist=16))
    index.remove([ids_of(1200)[7]])
    wanted = [ids_of(1200)[i] for i in (1199, 3, 500)]
    np.testing.assert_allclose(index.vectors(wanted), x[[1199, 3, 500]], atol=1e-6)
    assert index.vectors([]).shape == (0, 16)
    with pytest.raises(KeyError, match="not in the index"):
        index.vectors([ids_of(1200)[7]])  # removed


@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "auto"])
def test_query_views_equal_the_models_own_room_views(model, vectors, photo, engine):
    """Whatever runs the tower for queries (folded copy, ONNX Runtime), the vectors stay the model's."""
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    matcher = Matcher(model, make_index(model, vectors, ["sofa"] * N), engine=engine).warm_up()
    assert matcher._view_encoder is not None
    assert matcher.engine in ("torch", "onnxruntime") and (engine == "auto" or matcher.engine == engine)
    query = matcher.encode_query(photo)
    with torch.no_grad():
        expected = model.encode_room_views(photo)  # (1, V, D)
    assert query.view_embeds.shape == expected.shape
    assert torch.allclose(query.view_embeds, expected, rtol=0, atol=1e-4)
    again = matcher.encode_query(photo)  # the encoder built at the first photo is reused
    assert torch.allclose(again.view_embeds, query.view_embeds, rtol=0, atol=1e-6)


def test_photo_scenes_from_encoded_views_equal_a_fresh_read(model, photo):
    """A room-vector scene reader given the query's encoded views reads the same scenes as from the photo."""
    assert model.photo_scene_head is None  # the reader pools the room vector
    with torch.no_grad():
        views = model.encode_room_views(photo)
        fresh = model.photo_scene_log_probs([photo])
        reused = model.photo_scene_log_probs([photo], views)
    assert torch.allclose(fresh, reused, rtol=0, atol=1e-5)


def test_a_photo_scene_head_decides_the_query_scene(vectors, photo):
    """A model whose scenes come from its photo scene head (`train_scenes`) is read that way when matching."""
    model = tiny_model()
    model.use_photo_scene_head(flip_average=False)
    with torch.no_grad():
        model.photo_scene_head.weight.normal_(0, 5.0)  # far from uniform, so the source of the scene shows
    matcher = Matcher(model, make_index(model, vectors, ["sofa"] * N))
    query = matcher.encode_query(photo, text="a bright kitchen")
    expected = model.predict_scene([photo], ["a bright kitchen"])[0]
    assert list(query.scene_probabilities) == list(expected)
    assert np.allclose(list(query.scene_probabilities.values()), list(expected.values()), atol=1e-5)
    with torch.no_grad():
        room_head = model.scene_head(model.encode_room([photo], ["a bright kitchen"])).softmax(dim=-1)[0]
    assert not np.allclose(sorted(query.scene_probabilities.values()), sorted(room_head.tolist()), atol=1e-3)
