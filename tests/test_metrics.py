"""Tests for hgm_mm.evaluation.metrics: hand-computed cases, ties, oracles, random baselines."""
import itertools
import math
import time

import numpy as np
import pytest

from hgm_mm.evaluation import metrics as M
from hgm_mm.evaluation import scene_metrics as S

LOG3 = math.log2(3)
LOG5 = math.log2(5)


# ---------------------------------------------------------------- a hand-computed query
#
# 5 items, relevant {1, 3}, scores [0.9, 0.8, 0.1, 0.3, 0.5].
# Ranking by descending score: item0 (r1), item1 (r2), item4 (r3), item3 (r4), item2 (r5).
# Relevant ranks: item1 -> 2, item3 -> 4.
#   Recall@2 = |{1}| / 2 = 0.5            Recall@3 = 0.5        Recall@4 = 1.0
#   HitRate@1 = 0                         HitRate@2 = 1
#   NDCG@3: DCG = 1/log2(2+1) = 0.63093; IDCG (min(2,3) = 2 ideal) = 1 + 1/log2(3) = 1.63093
#           NDCG@3 = 0.63093 / 1.63093 = 0.386853
#   NDCG@5: DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068 = 1.06161; NDCG@5 = 1.06161 / 1.63093 = 0.650921
#   AP = (P@2 + P@4) / 2 = (1/2 + 2/4) / 2 = 0.5
SCORES_A = np.array([[0.9, 0.8, 0.1, 0.3, 0.5]])
RELEVANT_A = M.relevance_matrix([[1, 3]], 5)


def test_hand_case_single_query():
    ranked = M.relevant_ranks(SCORES_A, RELEVANT_A)
    assert ranked.items.tolist() == [[1, 3]]
    assert ranked.ranks.tolist() == [[2, 4]]
    assert M.recall_at_k(SCORES_A, RELEVANT_A, 2) == pytest.approx(0.5)
    assert M.recall_at_k(SCORES_A, RELEVANT_A, 3) == pytest.approx(0.5)
    assert M.recall_at_k(SCORES_A, RELEVANT_A, 4) == pytest.approx(1.0)
    assert M.hit_rate_at_k(SCORES_A, RELEVANT_A, 1) == 0.0
    assert M.hit_rate_at_k(SCORES_A, RELEVANT_A, 2) == 1.0
    ndcg3 = (1 / LOG3) / (1 + 1 / LOG3)
    assert ndcg3 == pytest.approx(0.386853, abs=1e-6)
    assert M.ndcg_at_k(SCORES_A, RELEVANT_A, 3) == pytest.approx(ndcg3, rel=1e-12)
    ndcg5 = (1 / LOG3 + 1 / LOG5) / (1 + 1 / LOG3)
    assert ndcg5 == pytest.approx(0.650921, abs=1e-6)
    assert M.ndcg_at_k(SCORES_A, RELEVANT_A, 5) == pytest.approx(ndcg5, rel=1e-12)
    assert M.mean_average_precision(SCORES_A, RELEVANT_A) == pytest.approx(0.5)


def test_macro_average_over_queries():
    # Query 0 is case A; query 1: relevant {0}, scores [5, 4, 3, 2, 1] -> item0 at rank 1.
    # Recall@2: (0.5 + 1) / 2 = 0.75; mAP: (0.5 + 1) / 2 = 0.75; HitRate@1: (0 + 1) / 2 = 0.5
    # NDCG@1: query 0 has no relevant item at rank 1 -> 0; query 1 -> 1; mean 0.5
    scores = np.vstack([SCORES_A, [[5.0, 4.0, 3.0, 2.0, 1.0]]])
    relevant = M.relevance_matrix([[1, 3], [0]], 5)
    assert M.recall_at_k(scores, relevant, 2) == pytest.approx(0.75)
    assert M.mean_average_precision(scores, relevant) == pytest.approx(0.75)
    assert M.average_precision(scores, relevant) == pytest.approx([0.5, 1.0])
    assert M.hit_rate_at_k(scores, relevant, 1) == pytest.approx(0.5)
    assert M.ndcg_at_k(scores, relevant, 1) == pytest.approx(0.5)


def test_ndcg_ideal_uses_min_of_relevant_and_k():
    # 4 items, relevant {0, 1, 2}, scores put them at ranks 1, 2, 3. NDCG@2: DCG = IDCG over
    # min(3, 2) = 2 positions = 1 + 1/log2(3) -> NDCG@2 = 1 exactly (not DCG / IDCG over 3).
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])
    relevant = M.relevance_matrix([[0, 1, 2]], 4)
    assert M.ndcg_at_k(scores, relevant, 2) == pytest.approx(1.0)
    # Recall@2 = 2/3, not 1: recall is over all relevant items.
    assert M.recall_at_k(scores, relevant, 2) == pytest.approx(2 / 3)


def test_k_larger_than_catalogue_behaves_as_n():
    for fn in (M.recall_at_k, M.hit_rate_at_k, M.ndcg_at_k):
        assert fn(SCORES_A, RELEVANT_A, 100) == pytest.approx(fn(SCORES_A, RELEVANT_A, 5))
    assert M.recall_at_k(SCORES_A, RELEVANT_A, 100) == 1.0


def test_retrieval_report_keys_and_values():
    report = M.retrieval_report(SCORES_A, RELEVANT_A, ks=(2, 3))
    assert set(report) == {"recall@2", "ndcg@2", "hit_rate@2", "recall@3", "ndcg@3", "hit_rate@3", "map"}
    assert report["recall@2"] == pytest.approx(0.5)
    assert report["ndcg@3"] == pytest.approx((1 / LOG3) / (1 + 1 / LOG3))
    assert report["hit_rate@2"] == 1.0
    assert report["map"] == pytest.approx(0.5)
    assert set(M.retrieval_report(SCORES_A, RELEVANT_A)) >= {"recall@10", "recall@50", "ndcg@10", "hit_rate@10", "map"}


def test_relevance_matrix_converter():
    rel = M.relevance_matrix([[0, 2, 2], [], [3]], 4)
    assert rel.dtype == bool
    assert rel.tolist() == [[True, False, True, False], [False] * 4, [False, False, False, True]]


# ------------------------------------------------------------------------------- ties


def test_ties_are_pessimistic_against_relevant_items():
    # Scores [1, 1, 1, 0], relevant {1}: irrelevant items 0 and 2 tie with item 1 and are
    # placed before it -> rank 3 (stable-by-index would give rank 2).
    # HitRate@2 = 0, HitRate@3 = 1, AP = 1/3.
    scores = np.array([[1.0, 1.0, 1.0, 0.0]])
    relevant = M.relevance_matrix([[1]], 4)
    assert M.relevant_ranks(scores, relevant).ranks.tolist() == [[3]]
    assert M.hit_rate_at_k(scores, relevant, 2) == 0.0
    assert M.hit_rate_at_k(scores, relevant, 3) == 1.0
    assert M.mean_average_precision(scores, relevant) == pytest.approx(1 / 3)


def test_constant_scorer_gets_worst_value():
    # All scores 0, relevant {0, 2} of 5: the 3 irrelevant items come first -> ranks 4, 5.
    # Recall@3 = 0; AP = (1/4 + 2/5) / 2 = 0.325.
    scores = np.zeros((1, 5))
    relevant = M.relevance_matrix([[0, 2]], 5)
    assert M.relevant_ranks(scores, relevant).ranks.tolist() == [[4, 5]]
    assert M.recall_at_k(scores, relevant, 3) == 0.0
    assert M.mean_average_precision(scores, relevant) == pytest.approx(0.325)


def test_relevant_items_tied_with_each_other_ordered_by_index():
    # Scores [2, 1, 1, 1, 0], relevant {1, 3}; irrelevant item 2 ties at 1 and goes first.
    # Order: item0 (r1), item2 (r2), item1 (r3), item3 (r4), item4 (r5).
    # AP = (1/3 + 2/4) / 2 = 0.416667.
    scores = np.array([[2.0, 1.0, 1.0, 1.0, 0.0]])
    relevant = M.relevance_matrix([[1, 3]], 5)
    assert M.relevant_ranks(scores, relevant).ranks.tolist() == [[3, 4]]
    assert M.mean_average_precision(scores, relevant) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_infinite_scores_are_ordered():
    # [inf, -inf, 0], relevant {1} -> rank 3; relevant {0} -> rank 1.
    scores = np.array([[np.inf, -np.inf, 0.0], [np.inf, -np.inf, 0.0]])
    relevant = M.relevance_matrix([[1], [0]], 3)
    assert M.relevant_ranks(scores, relevant).ranks[:, 0].tolist() == [3, 1]


def _oracle_ranks(scores_row, relevant_row):
    """Independent reference: sort all items by (-score, relevant, index)."""
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], bool(relevant_row[j]), j))
    rank = {j: i + 1 for i, j in enumerate(order)}
    return [rank[j] for j in range(len(scores_row)) if relevant_row[j]]


def _oracle_metrics(ranks, k, n):
    ranks = sorted(ranks)
    r = len(ranks)
    top = [x for x in ranks if x <= min(k, n)]
    dcg = sum(1 / math.log2(x + 1) for x in top)
    idcg = sum(1 / math.log2(i + 1) for i in range(1, min(r, k) + 1))
    ap = sum((m + 1) / x for m, x in enumerate(ranks)) / r
    return len(top) / r, float(bool(top)), dcg / idcg, ap


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_matches_oracle_with_heavy_ties(dtype):
    rng = np.random.default_rng(0)
    q, n, k = 40, 30, 7
    scores = rng.integers(0, 5, size=(q, n)).astype(dtype)  # many ties
    relevant = rng.random((q, n)) < 0.2
    relevant[np.arange(q), rng.integers(0, n, q)] = True
    ranked = M.relevant_ranks(scores, relevant)
    expected = np.zeros((q, 4))
    for i in range(q):
        oracle = _oracle_ranks(scores[i].tolist(), relevant[i])
        got = ranked.ranks[i, : ranked.n_relevant[i]].tolist()
        assert got == oracle, f"row {i}"
        expected[i] = _oracle_metrics(oracle, k, n)
    assert ranked.recall_at_k(k) == pytest.approx(expected[:, 0])
    assert ranked.hit_rate_at_k(k) == pytest.approx(expected[:, 1])
    assert ranked.ndcg_at_k(k) == pytest.approx(expected[:, 2])
    assert ranked.average_precision() == pytest.approx(expected[:, 3])


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(25, 40)).astype(float)
    relevant = rng.random((25, 40)) < 0.15
    relevant[:, 0] = True
    cats = rng.integers(0, 4, 40)
    whole = M.relevant_ranks(scores, relevant)
    whole_cat = M.per_category_hit_rate(scores, relevant, cats, 3)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 50)  # one query row per chunk
    chunked = M.relevant_ranks(scores, relevant)
    np.testing.assert_array_equal(whole.ranks, chunked.ranks)
    assert M.per_category_hit_rate(scores, relevant, cats, 3) == whole_cat


def test_fast_on_paper_scale():
    # 144 rooms x 2,187 products, ~13 relevant each: the whole report in well under a second.
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((144, 2187)).astype(np.float32)
    relevant = np.zeros((144, 2187), dtype=bool)
    for q in range(144):
        relevant[q, rng.choice(2187, 13, replace=False)] = True
    start = time.perf_counter()
    M.retrieval_report(scores, relevant)
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------ per-category metrics
#
# 6 items with categories [sofa, sofa, sofa, lamp, lamp, table].
# Query 0: scores [0.9, 0.5, 0.7, 0.2, 0.8, 0.1], relevant {1 (sofa), 3 (lamp)}.
#   sofas ranked alone: item0 .9, item2 .7, item1 .5 -> relevant sofa at rank 3.
#   lamps ranked alone: item4 .8, item3 .2        -> relevant lamp at rank 2.
# Query 1: scores [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], relevant {2 (sofa), 5 (table)}.
#   sofas: item2 .3 is the best sofa -> rank 1;  table: item5 is the only table -> rank 1.
# k = 1: pairs (q0,sofa) miss, (q0,lamp) miss, (q1,sofa) hit, (q1,table) hit.
#   overall 2/4 = 0.5; sofa 1/2, lamp 0/1, table 1/1.
# k = 2: (q0,lamp) becomes a hit -> overall 3/4 = 0.75; sofa 1/2, lamp 1, table 1.
#   (The mean of the per-category values would be 0.8333: overall is over pairs.)
CATS = np.array(["sofa", "sofa", "sofa", "lamp", "lamp", "table"])
SCORES_C = np.array([[0.9, 0.5, 0.7, 0.2, 0.8, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
RELEVANT_C = M.relevance_matrix([[1, 3], [2, 5]], 6)


def test_per_category_hit_rate_hand_case():
    at1 = M.per_category_hit_rate(SCORES_C, RELEVANT_C, CATS, 1)
    assert at1.overall == pytest.approx(0.5)
    assert at1.per_category == {"lamp": 0.0, "sofa": 0.5, "table": 1.0}
    assert at1.support == {"lamp": 1, "sofa": 2, "table": 1}
    at2 = M.per_category_hit_rate(SCORES_C, RELEVANT_C, CATS, 2)
    assert at2.overall == pytest.approx(0.75)
    assert at2.per_category == {"lamp": 1.0, "sofa": 0.5, "table": 1.0}
    # Full-catalogue ranking of query 0: item0, item4, item2, item1, item3 -> no hit at 2.
    assert M.relevant_ranks(SCORES_C, RELEVANT_C).hit_rate_at_k(2).tolist() == [0.0, 1.0]


def test_per_category_hit_rate_ties_are_pessimistic():
    # Two sofas tied at 0.5, relevant item 1: the irrelevant tied sofa goes first -> miss at k=1.
    scores = np.array([[0.5, 0.5]])
    relevant = M.relevance_matrix([[1]], 2)
    assert M.per_category_hit_rate(scores, relevant, ["sofa", "sofa"], 1).overall == 0.0
    assert M.per_category_hit_rate(scores, relevant, ["sofa", "sofa"], 2).overall == 1.0


def test_recall_at_k_by_category_hand_case():
    # Same catalogue; relevant: query 0 {1, 2, 3}, query 1 {2, 5}; full-catalogue rankings:
    #   q0: item0 r1, item4 r2, item2 r3, item1 r4, item3 r5
    #   q1: item5 r1, item4 r2, item3 r3, item2 r4, ...
    # k = 3: q0 sofa {1, 2} -> {2} in top 3 -> 1/2; q0 lamp {3} -> 0
    #        q1 sofa {2} -> 0;  q1 table {5} -> 1
    # sofa (0.5 + 0) / 2 = 0.25; lamp 0.0; table 1.0
    relevant = M.relevance_matrix([[1, 2, 3], [2, 5]], 6)
    got = M.recall_at_k_by_category(SCORES_C, relevant, CATS, 3)
    assert got == pytest.approx({"lamp": 0.0, "sofa": 0.25, "table": 1.0})


def test_breakdown_by_group():
    # bed: (1 + 0.5) / 2 = 0.75; living: (0 + 0.25) / 2 = 0.125
    got = M.breakdown([1.0, 0.0, 0.5, 0.25], ["bed", "living", "bed", "living"])
    assert got == {"bed": 0.75, "living": 0.125}
    assert all(type(key) is str for key in got)


# --------------------------------------------------------------- scene classification
#
# y_true = [a, a, a, b, b, c], y_pred = [a, a, b, b, c, c]
# confusion (rows true, cols predicted, order a b c):
#   a: [2, 1, 0]    b: [0, 1, 1]    c: [0, 0, 1]
# F1 = 2TP / (2TP + FP + FN):  a: 4/(4+0+1) = 0.8;  b: 2/(2+1+1) = 0.5;  c: 2/(2+1+0) = 2/3
# macro-F1 = (0.8 + 0.5 + 0.6667) / 3 = 0.655556; accuracy = 4/6.
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_confusion_matrix_hand_case():
    cm = S.confusion_matrix(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # Label order is respected.
    assert S.confusion_matrix(Y_TRUE, Y_PRED, ["c", "b", "a"]).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]


def test_macro_f1_and_accuracy_hand_case():
    assert S.scene_accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert S.macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class absent from both y_true and y_pred is excluded, not averaged in as 0.
    assert S.macro_f1(Y_TRUE, Y_PRED, labels=["a", "b", "c", "d"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_class_never_predicted_counts_zero():
    # y_true [a, a, b], y_pred [a, a, a]: a: TP 2, FP 1 -> 4/5; b never predicted -> 0.
    assert S.macro_f1(["a", "a", "b"], ["a", "a", "a"]) == pytest.approx(0.4)
    assert S.macro_f1([0, 1, 2], [0, 1, 2]) == 1.0


# --------------------------------------------------------------- random-ranking baselines


def _all_permutation_metrics(n, r, k):
    """Exact expectations by enumerating every ranking of n items with items 0..r-1 relevant."""
    perms = np.array(list(itertools.permutations(range(n))), dtype=float)  # (n!, n) scores
    relevant = np.zeros(perms.shape, dtype=bool)
    relevant[:, :r] = True
    ranked = M.relevant_ranks(perms, relevant)
    return (
        ranked.recall_at_k(k).mean(),
        ranked.hit_rate_at_k(k).mean(),
        ranked.ndcg_at_k(k).mean(),
        ranked.average_precision().mean(),
    )


@pytest.mark.parametrize("n,r,k", [(6, 2, 3), (6, 1, 2), (5, 3, 4), (6, 6, 2), (7, 3, 1)])
def test_random_expectations_exact_by_enumeration(n, r, k):
    recall, hit, ndcg, ap = _all_permutation_metrics(n, r, k)
    assert M.expected_random_recall_at_k(n, r, k) == pytest.approx(recall, abs=1e-12)
    assert M.expected_random_hit_rate_at_k(n, r, k) == pytest.approx(hit, abs=1e-12)
    assert M.expected_random_ndcg_at_k(n, r, k) == pytest.approx(ndcg, abs=1e-12)
    assert M.expected_random_average_precision(n, r) == pytest.approx(ap, abs=1e-12)


def test_random_expectations_monte_carlo():
    n, r, k, trials = 60, 7, 10, 40_000
    rng = np.random.default_rng(3)
    scores = rng.random((trials, n))  # continuous: no ties
    relevant = np.zeros((trials, n), dtype=bool)
    relevant[:, :r] = True
    ranked = M.relevant_ranks(scores, relevant)
    cases = {
        "recall": (ranked.recall_at_k(k), M.expected_random_recall_at_k(n, r, k)),
        "hit": (ranked.hit_rate_at_k(k), M.expected_random_hit_rate_at_k(n, r, k)),
        "ndcg": (ranked.ndcg_at_k(k), M.expected_random_ndcg_at_k(n, r, k)),
        "ap": (ranked.average_precision(), M.expected_random_average_precision(n, r)),
    }
    for name, (samples, expected) in cases.items():
        stderr = samples.std() / math.sqrt(trials)
        assert abs(samples.mean() - expected) < 5 * stderr, name


def test_random_expectations_closed_forms():
    n, r, k = 2187, 13, 10
    assert M.expected_random_recall_at_k(n, r, k) == pytest.approx(10 / 2187)
    assert M.expected_random_hit_rate_at_k(n, r, k) == pytest.approx(1 - math.comb(n - r, k) / math.comb(n, k))
    harmonic = sum(1 / i for i in range(1, n + 1))
    assert M.expected_random_average_precision(n, 1) == pytest.approx(harmonic / n)  # E[1/rank]
    assert M.expected_random_average_precision(n, n) == pytest.approx(1.0)
    assert M.expected_random_hit_rate_at_k(10, 4, 7) == 1.0  # k > n - r: a hit is certain
    assert M.expected_random_recall_at_k(5, 2, 100) == 1.0


def test_random_baseline_report_averages_per_query_expectations():
    relevant = M.relevance_matrix([[0], [1, 2], [3, 4, 5]], 50)
    report = M.random_baseline_report(relevant, ks=(10,))
    assert report["map"] == pytest.approx(np.mean([M.expected_random_average_precision(50, r) for r in (1, 2, 3)]))
    assert report["hit_rate@10"] == pytest.approx(
        np.mean([M.expected_random_hit_rate_at_k(50, r, 10) for r in (1, 2, 3)])
    )
    assert report["recall@10"] == pytest.approx(0.2)
    assert set(report) == set(M.retrieval_report(np.zeros((3, 50)), relevant, ks=(10,)))


# ------------------------------------------------------------------------ invalid input


def test_nan_score_names_the_query_row():
    scores = np.zeros((3, 4))
    scores[2, 1] = np.nan
    relevant = np.ones((3, 4), dtype=bool)
    with pytest.raises(ValueError, match="query row 2"):
        M.recall_at_k(scores, relevant, 1)
    with pytest.raises(ValueError, match="query row 2"):
        M.per_category_hit_rate(scores, relevant, [0, 0, 1, 1], 1)


def test_query_without_relevant_items_is_an_error():
    relevant = M.relevance_matrix([[1], []], 3)
    with pytest.raises(ValueError, match=r"no relevant item \(first: \[1\]\)"):
        M.mean_average_precision(np.zeros((2, 3)), relevant)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, None])
def test_invalid_k(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        M.recall_at_k(SCORES_A, RELEVANT_A, k)


def test_invalid_shapes_and_types():
    with pytest.raises(ValueError, match=r"scores\[None, :\]"):
        M.recall_at_k(SCORES_A[0], RELEVANT_A[0], 1)
    with pytest.raises(ValueError, match="must match"):
        M.recall_at_k(SCORES_A, np.ones((1, 4), dtype=bool), 1)
    with pytest.raises(TypeError, match="relevance_matrix"):
        M.recall_at_k(SCORES_A, RELEVANT_A.astype(int), 1)
    with pytest.raises(TypeError, match="real numbers"):
        M.recall_at_k(SCORES_A.astype(str), RELEVANT_A, 1)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        M.per_category_hit_rate(SCORES_A, RELEVANT_A, ["a", "b"], 1)
    with pytest.raises(ValueError, match="must lie in"):
        M.relevance_matrix([[5]], 5)
    with pytest.raises(ValueError, match="equal length"):
        M.breakdown([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="n_relevant"):
        M.expected_random_average_precision(5, 6)
    with pytest.raises(ValueError, match="n_relevant"):
        M.expected_random_hit_rate_at_k(5, 0, 1)


def test_invalid_classification_inputs():
    with pytest.raises(ValueError, match=r"not in labels: \['c'\]"):
        S.confusion_matrix(["a", "c"], ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        S.confusion_matrix(["a"], ["a"], ["a", "a"])
    with pytest.raises(ValueError, match="equal length"):
        S.scene_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        S.macro_f1([], [])


def test_the_scene_metrics_are_still_reachable_from_metrics_with_a_warning():
    for name in S.__all__:
        with pytest.warns(DeprecationWarning, match="scene_metrics"):
            assert getattr(M, name) is getattr(S, name)
    with pytest.raises(AttributeError):
        M.no_such_metric
