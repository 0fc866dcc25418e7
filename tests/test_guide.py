"""The whole guide measured: calibration and ranked-list metrics by hand, and `evaluate_guide` end to end."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model
from hgm_mm.data import Room, SceneText
from hgm_mm.evaluation import GuideEvaluation, evaluate_guide, format_guide_report, metrics, scene_metrics
from hgm_mm.evaluation.guide import no_scene_set
from hgm_mm.retrieval.index import ProductIndex, model_fingerprint
from hgm_mm.ranking.matcher import Matcher, SCENE_CONFIDENCE
from hgm_mm.ranking.prior import SceneCategoryPrior
from hgm_mm.ranking.weights import RankingWeights
from hgm_mm.data.scenes import combine_scene_probabilities

N = 40
CATEGORIES = ["sofa", "lamp", "rug", "bathmat"] * (N // 4)
SCENE_COUNTS = {"sofa": 30, "lamp": 28, "rug": 26, "bathmat": 0}  # sofa, lamp, rug fit every scene; bathmats never


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- expected calibration error -----------------------------------------------------------------
def test_ece_by_hand():
    # bin (0.8, 0.9]: accuracy 1/2, confidence 0.9 -> gap 0.4; bin (0.5, 0.6]: accuracy 1, confidence 0.6 -> 0.4
    assert scene_metrics.expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    # apart, each bin has its own gap: 0.5 * 0.05 + 0.5 * 0.15; in one bin the gap is |0.5 - 0.55|
    assert scene_metrics.expected_calibration_error([0.95, 0.15], [True, False]) == pytest.approx(0.1)
    assert scene_metrics.expected_calibration_error([0.95, 0.15], [True, False], n_bins=1) == pytest.approx(0.05)


def test_ece_bins_close_on_their_upper_edge():
    # 0.3 belongs to (0.2, 0.3] with 0.25: accuracy 1/2 against confidence 0.275
    assert scene_metrics.expected_calibration_error([0.3, 0.25], [1, 0]) == pytest.approx(0.225)
    # 0.31 is in the next bin: 0.5 * |1 - 0.31| + 0.5 * |0 - 0.25|
    assert scene_metrics.expected_calibration_error([0.31, 0.25], [1, 0]) == pytest.approx(0.47)


def test_ece_is_zero_when_calibrated():
    assert scene_metrics.expected_calibration_error([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0, abs=1e-12)
    assert scene_metrics.expected_calibration_error([1.0, 0.0], [True, False]) == 0.0  # both ends are in a bin


def test_ece_refuses_bad_input():
    with pytest.raises(ValueError, match="empty"):
        scene_metrics.expected_calibration_error([], [])
    with pytest.raises(ValueError, match="equal length"):
        scene_metrics.expected_calibration_error([0.5, 0.6], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scene_metrics.expected_calibration_error([0.5, 1.2], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scene_metrics.expected_calibration_error([float("nan")], [1])
    with pytest.raises(ValueError, match="0/1"):
        scene_metrics.expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="n_bins"):
        scene_metrics.expected_calibration_error([0.5], [1], n_bins=0)


# -- ranked-list recall and NDCG ----------------------------------------------------------------
def test_ranked_metrics_by_hand():
    ranked, relevant = ["a", "b", "c", "d"], {"b", "d", "x"}  # "x" is relevant but never ranked
    assert metrics.recall_at_k_ranked(ranked, relevant, 3) == pytest.approx(1 / 3)
    assert metrics.recall_at_k_ranked(ranked, relevant, 10) == pytest.approx(2 / 3)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(3 relevant, k) hits at ranks 1-3
    assert metrics.ndcg_at_k_ranked(ranked, relevant, 3) == pytest.approx((1 / math.log2(3)) / ideal)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # hits at ranks 2 and 4
    assert metrics.ndcg_at_k_ranked(ranked, relevant, 10) == pytest.approx(dcg / ideal)
    assert metrics.ndcg_at_k_ranked(ranked, {"b"}, 1) == 0.0  # ideal DCG over min(1, k) = 1 item
    assert metrics.ndcg_at_k_ranked(["b", "a"], {"b"}, 1) == 1.0


def test_ranked_metrics_match_the_score_matrix_versions():
    rng = np.random.default_rng(3)
    n = 30
    for trial in range(5):
        scores = rng.permutation(n).astype(float)  # distinct scores: no ties to break
        relevant = np.zeros(n, dtype=bool)
        relevant[rng.choice(n, size=1 + trial * 3, replace=False)] = True
        ranked = [f"p{j}" for j in np.argsort(-scores)]
        relevant_ids = {f"p{j}" for j in np.flatnonzero(relevant)}
        for k in (1, 5, 10, 50):
            assert metrics.recall_at_k_ranked(ranked, relevant_ids, k) == pytest.approx(
                metrics.recall_at_k(scores[None], relevant[None], k))
            assert metrics.ndcg_at_k_ranked(ranked, relevant_ids, k) == pytest.approx(
                metrics.ndcg_at_k(scores[None], relevant[None], k))


def test_ranked_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="relevant is empty"):
        metrics.recall_at_k_ranked(["a"], set(), 1)
    with pytest.raises(ValueError, match="more than once"):
        metrics.ndcg_at_k_ranked(["a", "b", "a"], {"a"}, 3)
    with pytest.raises(ValueError, match="k must be"):
        metrics.recall_at_k_ranked(["a"], {"a"}, 0)


def test_no_scene_set_takes_the_first_of_each_category():
    category = {"a": "sofa", "b": "sofa", "c": "lamp", "d": None, "e": "rug"}.get
    assert no_scene_set(list("abcde"), category, 2) == ["a", "c"]
    assert no_scene_set(list("abcde"), category, 6) == ["a", "c", "e"]  # products without a category passed over
    assert no_scene_set(list("abcde"), category, 0) == []


# -- evaluate_guide end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def matcher():
    model = tiny_model()
    x = np.random.default_rng(1).standard_normal((N, model.config.embed_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # (N, D)
    metadata = [{"category": c, "title": f"product {i}"} for i, c in enumerate(CATEGORIES)]
    index = ProductIndex.build([f"p{i:02d}" for i in range(N)], x, metadata, model_identity=model_fingerprint(model))
    prior = SceneCategoryPrior.from_counts({scene: dict(SCENE_COUNTS) for scene in model.scene_labels})
    return Matcher(model, index, prior=prior)


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rooms")
    rng = np.random.default_rng(0)
    specs = [("r0", "living_room", "a cosy living room with a sofa"), ("r1", "bedroom", "a calm bedroom"),
             ("r2", "kitchen", ""), ("r3", None, "somewhere to sit")]
    out = []
    for room_id, scene, title in specs:
        path = folder / f"{room_id}.jpg"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
        out.append(Room(room_id, image=path, scene=scene, title=title, attributes={}))
    broken = folder / "r4.jpg"
    broken.write_bytes(b"not an image at all")
    out.append(Room("r4", image=broken, scene="bedroom", title="a bedroom", attributes={}))
    return out


def similarity_only(matcher):
    return RankingWeights(similarity=1, scene_fit=0, profile=0, diversity=0, candidates=matcher.weights.candidates)


def ids(products):
    return [p.product_id for p in products]


@pytest.fixture(scope="module")
def plan(matcher, rooms):
    """Pairs chosen from what the matcher returns, and the numbers they should give."""
    q0 = matcher.encode_query(image=rooms[0].image)
    q1 = matcher.encode_query(image=rooms[1].image)
    set0 = ids(matcher.rank(q0, k=10, set_size=6).product_set)
    assert sorted(matcher.index.metadata(p)["category"] for p in set0) == ["lamp", "rug", "sofa"]
    bathmat = next(f"p{i:02d}" for i, c in enumerate(CATEGORIES) if c == "bathmat")
    # room 0: two of its three set products and a bathmat (never in a set): precision 2/3, coverage 2/3
    pairs0 = [("r0", set0[0]), ("r0", set0[1]), ("r0", bathmat)]
    top3 = ids(matcher.rank(q1, k=3, weights=similarity_only(matcher)).products)
    # room 1: the three most similar products: similarity-only Recall@10 and NDCG@10 are 1
    pairs1 = [("r1", pid) for pid in top3] + [("r1", "not-in-the-index")]
    return {"q": [q0, q1], "set0": set0, "pairs": pairs0 + pairs1,
            "relevant": [{p for _, p in pairs0}, set(top3)]}


@pytest.fixture(scope="module")
def texts():
    return [SceneText("a calm bedroom where I can sleep well", "bedroom"), SceneText("a kitchen to cook in", "kitchen")]


@pytest.fixture(scope="module")
def result(matcher, rooms, plan, texts):
    return evaluate_guide(matcher, rooms, plan["pairs"], texts=texts, progress=False)


def top(probabilities):
    return max(probabilities, key=probabilities.get)


def test_unreadable_photos_are_skipped_and_listed(result):
    assert isinstance(result, GuideEvaluation)
    assert result.n_rooms == 4
    assert [room_id for room_id, _ in result.skipped] == ["r4"]
    assert "not an image" in result.skipped[0][1]


def test_scene_metrics_count_the_rooms_with_a_scene(result, matcher, rooms, texts):
    labels = list(matcher.model.scene_labels)
    assert result.scene_labels == labels
    assert {s: result.scenes[s].n for s in result.scenes} == {"photo": 3, "words": 2, "both": 2, "phrases": 2}
    for source, scenes in result.scenes.items():
        assert scenes.confusion.shape == (len(labels), len(labels))
        assert scenes.confusion.sum() == scenes.n
        assert scenes.accuracy == pytest.approx(np.trace(scenes.confusion) / scenes.n)
    # what the photo, the words and both say, read here from the matcher directly
    photo = [matcher.encode_query(image=room.image).scene_probabilities for room in rooms[:3]]
    words = [matcher.encode_query(text=room.title).scene_probabilities for room in rooms[:2]]
    both = [combine_scene_probabilities(p, w) for p, w in zip(photo, words)]
    for source, readings, truth in (("photo", photo, ["living_room", "bedroom", "kitchen"]),
                                    ("words", words, ["living_room", "bedroom"]),
                                    ("both", both, ["living_room", "bedroom"])):
        correct = [top(p) == t for p, t in zip(readings, truth)]
        confidence = [max(p.values()) for p in readings]
        scenes = result.scenes[source]
        assert scenes.accuracy == pytest.approx(np.mean(correct))
        assert scenes.mean_confidence == pytest.approx(np.mean(confidence))
        assert scenes.ece == pytest.approx(scene_metrics.expected_calibration_error(confidence, correct))
        sure = [c >= SCENE_CONFIDENCE for c in confidence]
        assert scenes.confident_share == pytest.approx(np.mean(sure))
        for t, p in zip(truth, readings):
            assert scenes.confusion[labels.index(t), labels.index(top(p))] >= 1
    assert result.scenes["photo"].chance_accuracy == pytest.approx(1 / 3)  # three rooms, three scenes
    assert result.scenes["phrases"].chance_accuracy == pytest.approx(1 / 2)
    phrase_truth = [labels.index(t.scene) for t in texts]
    assert sorted(np.nonzero(result.scenes["phrases"].confusion)[0].tolist()) == sorted(phrase_truth)


def test_ranking_metrics_against_the_matcher(result, matcher, plan):
    assert result.n_ranked_rooms == 2  # r2 and r3 have no pairs; r1's product outside the index is dropped
    assert result.ranking["similarity_only"].recall == pytest.approx(
        np.mean([metrics.recall_at_k_ranked(ids(matcher.rank(q, k=10, weights=similarity_only(matcher)).products),
                                            rel, 10) for q, rel in zip(plan["q"], plan["relevant"])]))
    guide = [ids(matcher.rank(q, k=10).products) for q in plan["q"]]
    assert result.ranking["guide"].recall == pytest.approx(
        np.mean([metrics.recall_at_k_ranked(r, rel, 10) for r, rel in zip(guide, plan["relevant"])]))
    assert result.ranking["guide"].ndcg == pytest.approx(
        np.mean([metrics.ndcg_at_k_ranked(r, rel, 10) for r, rel in zip(guide, plan["relevant"])]))


def test_ranking_by_hand_on_one_room(matcher, rooms, plan):
    one = evaluate_guide(matcher, rooms[1:2], plan["pairs"], progress=False)
    assert one.n_ranked_rooms == 1
    assert one.ranking["similarity_only"].recall == pytest.approx(1.0)  # its products are the top 3 by similarity
    assert one.ranking["similarity_only"].ndcg == pytest.approx(1.0)
    assert "phrases" not in one.scenes  # no texts given


def test_set_metrics_by_hand_on_one_room(matcher, rooms, plan):
    one = evaluate_guide(matcher, rooms[:1], plan["pairs"], progress=False)
    assert one.n_set_rooms == 1 and one.n_coverage_rooms == 1
    assert one.sets["guide"].precision == pytest.approx(2 / 3)  # 2 of its 3 set products are in the room
    assert one.sets["guide"].category_coverage == pytest.approx(2 / 3)  # sofa/lamp/rug cover 2 of its 3 categories
    assert one.sets["guide"].mean_size == 3
    # the no-scene set: the first product of each category down the similarity ranking, as many as the guide's
    q = plan["q"][0]
    by_similarity = ids(matcher.rank(q, k=matcher.weights.candidates, weights=similarity_only(matcher)).products)
    plain, seen = [], set()
    for pid in by_similarity:
        if matcher.index.metadata(pid)["category"] not in seen:
            seen.add(matcher.index.metadata(pid)["category"])
            plain.append(pid)
    plain = plain[:3]
    assert len(plain) == 3 and len({matcher.index.metadata(p)["category"] for p in plain}) == 3
    relevant = plan["relevant"][0]
    assert one.sets["no_scene"].mean_size == 3
    assert one.sets["no_scene"].precision == pytest.approx(sum(p in relevant for p in plain) / 3)
    room_categories = {matcher.index.metadata(p)["category"] for p in relevant}
    covered = {matcher.index.metadata(p)["category"] for p in plain} & room_categories
    assert one.sets["no_scene"].category_coverage == pytest.approx(len(covered) / 3)


def test_set_means_over_rooms(result, matcher, plan):
    sets = [ids(matcher.rank(q, k=10, set_size=6).product_set) for q in plan["q"]]
    assert result.n_set_rooms == 2
    assert result.sets["guide"].precision == pytest.approx(
        np.mean([sum(p in rel for p in s) / len(s) for s, rel in zip(sets, plan["relevant"])]))
    assert result.sets["guide"].mean_size == pytest.approx(np.mean([len(s) for s in sets]))
    assert result.sets["no_scene"].mean_size == result.sets["guide"].mean_size  # size-matched


def test_to_dict_is_json_and_the_report_prints(result, matcher):
    document = json.loads(json.dumps(result.to_dict()))
    assert document["scene_labels"] == list(matcher.model.scene_labels)
    assert document["scenes"]["photo"]["confusion"] == result.scenes["photo"].confusion.tolist()
    assert document["skipped"][0][0] == "r4"
    assert set(document["ranking"]) == {"guide", "similarity_only"} and set(document["sets"]) == {"guide", "no_scene"}
    report = format_guide_report(result)
    for needle in ("photo", "words", "both", "phrases", "Recall@10", "NDCG@10", "similarity only", "no-scene set",
                   "1 skipped"):
        assert needle in report
    photo_line = next(line for line in report.splitlines() if line.startswith("photo"))
    assert f"{result.scenes['photo'].accuracy:.3f}" in photo_line


def test_inputs_are_checked(matcher, rooms):
    with pytest.raises(ValueError, match="wine_cellar"):
        evaluate_guide(matcher, [Room("x", rooms[0].image, "wine_cellar", "", {})], [], progress=False)
    with pytest.raises(ValueError, match="wine_cellar"):
        evaluate_guide(matcher, rooms[:1], [], texts=[SceneText("a cellar", "wine_cellar")], progress=False)
    with pytest.raises(ValueError, match="could be read"):
        evaluate_guide(matcher, rooms[4:], [], progress=False)
    with pytest.raises(ValueError, match="no rooms"):
        evaluate_guide(matcher, [], [], progress=False)
    with pytest.raises(ValueError, match="k=0"):
        evaluate_guide(matcher, rooms[:1], [], k=0, progress=False)
