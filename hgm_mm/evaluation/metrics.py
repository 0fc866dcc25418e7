"""Retrieval metrics over the whole catalogue and over ranked id lists (scene metrics: `scene_metrics`).

Input conventions (retrieval):
    scores:   (Q, N) real array; row q scores every catalogue product for query room q
              (higher = better). NaN is refused with the offending query row named.
    relevant: (Q, N) boolean array; ``relevant[q, j]`` is True when product j appears in
              room q. Build it from per-room index lists with :func:`relevance_matrix`.
              Every query needs at least one relevant product: rows with none are an
              error (drop them first, e.g. ``keep = relevant.any(axis=1)``), because
              recall, NDCG and AP are undefined for them.
    k:        int >= 1. A k larger than N is allowed and behaves as k = N (the top-k
              of a shorter list is the whole list).

Tie rule (pessimistic, deterministic): products are ranked by descending score; among
equal scores every irrelevant product is placed before every relevant one, and relevant
products tied with each other are ordered by ascending catalogue index. A tie therefore
never earns credit: a constant scorer gets the worst possible value of every metric.

Ranks are computed once per query by :func:`relevant_ranks` (sort each row, then locate
the relevant scores with ``searchsorted``), in chunks of queries so that memory stays
bounded; every ranking metric is then a vectorised function of the relevant ranks.

Macro averages: the module-level ranking functions return the mean over queries; the
methods of :class:`RelevantRanks` return the per-query values (for :func:`breakdown`).
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CategoryHitRate",
    "RelevantRanks",
    "average_precision",
    "breakdown",
    "expected_random_average_precision",
    "expected_random_hit_rate_at_k",
    "expected_random_ndcg_at_k",
    "expected_random_recall_at_k",
    "hit_rate_at_k",
    "mean_average_precision",
    "ndcg_at_k",
    "ndcg_at_k_ranked",
    "per_category_hit_rate",
    "random_baseline_report",
    "recall_at_k",
    "recall_at_k_by_category",
    "recall_at_k_ranked",
    "relevance_matrix",
    "relevant_ranks",
    "retrieval_report",
]

# Upper bound on the number of score elements copied at once (one chunk of query rows).
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- validation


def _check_k(k: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    return int(k)


def _row_chunks(n_rows: int, n_cols: int) -> Iterable[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _check_scores(scores) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be a (Q, N) matrix, got shape {scores.shape}; "
            "for a single query pass scores[None, :]"
        )
    if scores.dtype == np.bool_ or not (
        np.issubdtype(scores.dtype, np.integer) or np.issubdtype(scores.dtype, np.floating)
    ):
        raise TypeError(f"scores must be real numbers (integer or float), got dtype {scores.dtype}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must have at least one query and one item, got shape {scores.shape}")
    if np.issubdtype(scores.dtype, np.floating):
        for rows in _row_chunks(*scores.shape):
            bad = np.flatnonzero(np.isnan(scores[rows]).any(axis=1))
            if bad.size:
                raise ValueError(f"scores contain NaN in query row {rows.start + int(bad[0])}")
    return scores


def _check_relevant(relevant, shape: tuple[int, int]) -> np.ndarray:
    relevant = np.asarray(relevant)
    if relevant.dtype != np.bool_:
        raise TypeError(
            f"relevant must be a boolean (Q, N) matrix, got dtype {relevant.dtype}; "
            "build it with relevance_matrix(indices, n_items) or pass array.astype(bool)"
        )
    if relevant.shape != shape:
        raise ValueError(f"relevant has shape {relevant.shape}, scores have shape {shape}; they must match")
    empty = np.flatnonzero(~relevant.any(axis=1))
    if empty.size:
        raise ValueError(
            f"{empty.size} query row(s) have no relevant item (first: {empty[:5].tolist()}); "
            "ranking metrics are undefined for them; drop them first, e.g. keep = relevant.any(axis=1)"
        )
    return relevant


def _check_retrieval_inputs(scores, relevant) -> tuple[np.ndarray, np.ndarray]:
    scores = _check_scores(scores)
    return scores, _check_relevant(relevant, scores.shape)


def _check_categories(product_categories, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (unique category labels, per-item index into them)."""
    cats = np.asarray(product_categories)
    if cats.shape != (n_items,):
        raise ValueError(f"product_categories must have shape ({n_items},) (one per item), got {cats.shape}")
    return np.unique(cats, return_inverse=True)


def _key(value) -> Hashable:
    """A numpy scalar as the plain Python value, for dictionary keys."""
    return value.item() if isinstance(value, np.generic) else value


def relevance_matrix(indices: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """Builds the boolean relevance matrix from one list of relevant item indices per query.

    Args:
        indices: for each query, the catalogue indices of its relevant items (duplicates
            are harmless).
        n_items: catalogue size N.

    Returns:
        (Q, N) boolean matrix, True where the item is relevant to the query.
    """
    n_items = int(n_items)
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    out = np.zeros((len(indices), n_items), dtype=bool)
    for q, idx in enumerate(indices):
        idx = np.asarray(idx)
        if idx.size == 0:
            continue
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices of query {q} must be integers, got dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= n_items:
            raise ValueError(f"indices of query {q} must lie in [0, {n_items}), got {idx.min()}..{idx.max()}")
        out[q, idx] = True
    return out


# ------------------------------------------------------------------------------- ranks


def _discounts(length: int) -> np.ndarray:
    """Cumulative DCG discounts: out[m] = sum_{i=1..m} 1/log2(i+1); out[0] = 0."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, length + 2)))])


@dataclass(frozen=True)
class RelevantRanks:
    """1-based ranks of every relevant item of every query, under the pessimistic tie rule.

    Rows are padded to the largest number of relevant items R; padding has item -1 and
    rank 0. Methods return one value per query (shape (Q,)); average them for the macro
    mean or pass them to :func:`breakdown`.
    """

    items: np.ndarray  # (Q, R) int64 catalogue index of each relevant item, ascending; -1 = padding
    ranks: np.ndarray  # (Q, R) int64 rank of that item in the full ranking (1 = best); 0 = padding
    n_relevant: np.ndarray  # (Q,) int64 number of relevant items of each query (>= 1)
    n_items: int  # catalogue size N

    @property
    def valid(self) -> np.ndarray:
        """(Q, R) boolean mask of the non-padding entries."""
        return self.items >= 0

    def _in_top(self, k: int) -> np.ndarray:
        return self.valid & (self.ranks <= _check_k(k))  # (Q, R)

    def recall_at_k(self, k: int) -> np.ndarray:
        """|relevant ∩ top-k| / |relevant| per query."""
        return self._in_top(k).sum(axis=1) / self.n_relevant

    def hit_rate_at_k(self, k: int) -> np.ndarray:
        """1.0 where at least one relevant item is in the top k, else 0.0, per query."""
        return self._in_top(k).any(axis=1).astype(np.float64)

    def ndcg_at_k(self, k: int) -> np.ndarray:
        """Binary-gain NDCG@k per query.

        DCG@k = sum over relevant items at rank i <= k of 1/log2(i+1); the ideal DCG puts
        min(|relevant|, k) relevant items at ranks 1, 2, ...
        """
        k = _check_k(k)
        in_top = self._in_top(k)
        gains = np.where(in_top, 1.0 / np.log2(np.maximum(self.ranks, 1) + 1.0), 0.0)  # (Q, R)
        ideal = _discounts(int(min(k, self.n_relevant.max())))[np.minimum(self.n_relevant, k)]  # (Q,)
        return gains.sum(axis=1) / ideal

    def average_precision(self) -> np.ndarray:
        """Full-ranking AP per query: the mean, over all relevant items, of the precision
        at the rank of that item."""
        big = np.iinfo(np.int64).max
        ordered = np.sort(np.where(self.valid, self.ranks, big), axis=1)  # (Q, R) ascending
        found = np.arange(1, ordered.shape[1] + 1)  # (R,) relevant items seen up to that rank
        precision = np.where(ordered != big, found / ordered, 0.0)  # (Q, R)
        return precision.sum(axis=1) / self.n_relevant


def relevant_ranks(scores, relevant) -> RelevantRanks:
    """Ranks the whole catalogue for every query and returns the ranks of the relevant items.

    The rank of relevant item j under the pessimistic tie rule is
    ``#{all i: s_i >= s_j} - #{relevant i > j: s_i == s_j}``: every item scoring at least
    as high counts, except the relevant items tied with j that come after it by index.

    Args:
        scores: (Q, N) scores, higher is better.
        relevant: (Q, N) boolean relevance.

    Returns:
        The relevant items' ranks; memory O(Q * R) plus one chunk of sorted rows.
    """
    scores, relevant = _check_retrieval_inputs(scores, relevant)
    n_queries, n_items = scores.shape
    n_relevant = relevant.sum(axis=1).astype(np.int64)  # (Q,)
    width = int(n_relevant.max())
    rows, cols = np.nonzero(relevant)  # row-major, so cols ascend within each row
    starts = np.concatenate([[0], np.cumsum(n_relevant)[:-1]])  # (Q,)
    slots = np.arange(rows.size) - starts[rows]
    items = np.full((n_queries, width), -1, dtype=np.int64)  # (Q, R)
    items[rows, slots] = cols
    ranks = np.zeros((n_queries, width), dtype=np.int64)  # (Q, R)
    for chunk in _row_chunks(n_queries, n_items):
        ordered = np.sort(scores[chunk], axis=1)  # (C, N) ascending
        for offset, q in enumerate(range(chunk.start, chunk.stop)):
            r = n_relevant[q]
            s = scores[q, items[q, :r]]  # (r,) in item order
            at_least = n_items - np.searchsorted(ordered[offset], s, side="left")
            by_score = np.argsort(s, kind="stable")  # ties stay in item order
            s_sorted = s[by_score]
            later_ties = np.empty(r, dtype=np.int64)
            later_ties[by_score] = np.searchsorted(s_sorted, s_sorted, side="right") - 1 - np.arange(r)
            ranks[q, :r] = at_least - later_ties
    return RelevantRanks(items=items, ranks=ranks, n_relevant=n_relevant, n_items=n_items)


# ----------------------------------------------------------------- ranking metrics (mean)


def recall_at_k(scores, relevant, k: int) -> float:
    """Mean over queries of |relevant ∩ top-k| / |relevant|."""
    return float(relevant_ranks(scores, relevant).recall_at_k(k).mean())


def hit_rate_at_k(scores, relevant, k: int) -> float:
    """Fraction of queries with at least one relevant item in the top k."""
    return float(relevant_ranks(scores, relevant).hit_rate_at_k(k).mean())


def ndcg_at_k(scores, relevant, k: int) -> float:
    """Mean binary-gain NDCG@k (see :meth:`RelevantRanks.ndcg_at_k`)."""
    return float(relevant_ranks(scores, relevant).ndcg_at_k(k).mean())


def average_precision(scores, relevant) -> np.ndarray:
    """Full-ranking average precision of each query, shape (Q,)."""
    return relevant_ranks(scores, relevant).average_precision()


def mean_average_precision(scores, relevant) -> float:
    """Mean over queries of the full-ranking average precision."""
    return float(average_precision(scores, relevant).mean())


def retrieval_report(scores, relevant, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """The headline retrieval numbers, from one ranking pass.

    Returns:
        ``recall@k``, ``ndcg@k`` and ``hit_rate@k`` for every k in ``ks``, and ``map``;
        all macro-averaged over queries.
    """
    ranked = relevant_ranks(scores, relevant)
    report: dict[str, float] = {}
    for k in ks:
        report[f"recall@{k}"] = float(ranked.recall_at_k(k).mean())
        report[f"ndcg@{k}"] = float(ranked.ndcg_at_k(k).mean())
        report[f"hit_rate@{k}"] = float(ranked.hit_rate_at_k(k).mean())
    report["map"] = float(ranked.average_precision().mean())
    return report


# ---------------------------------------------------------------------- breakdowns


def breakdown(values_per_query, groups) -> dict[Hashable, float]:
    """Mean of a per-query metric within each group (e.g. scene type).

    Args:
        values_per_query: (Q,) per-query values, e.g. ``relevant_ranks(s, r).recall_at_k(10)``.
        groups: (Q,) group label of each query.

    Returns:
        {group: mean of its queries' values}, groups in sorted order.
    """
    values = np.asarray(values_per_query, dtype=np.float64)
    groups = np.asarray(groups)
    if values.ndim != 1 or groups.shape != values.shape:
        raise ValueError(
            f"values_per_query and groups must be 1-D of equal length, got {values.shape} and {groups.shape}"
        )
    if np.isnan(values).any():
        raise ValueError(f"values_per_query contains NaN at position {int(np.flatnonzero(np.isnan(values))[0])}")
    labels, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=labels.size)
    counts = np.bincount(inverse, minlength=labels.size)
    return {_key(g): float(s / c) for g, s, c in zip(labels, sums, counts)}


def recall_at_k_by_category(scores, relevant, product_categories, k: int) -> dict[Hashable, float]:
    """Recall@k restricted to the relevant items of each product category.

    The ranking is the full-catalogue ranking (unlike :func:`per_category_hit_rate`). For
    category c and query q with R_qc = {relevant items of q in category c} non-empty,
    recall_qc = |R_qc ∩ top-k(q)| / |R_qc|. The value for c is the mean of recall_qc over
    the queries with R_qc non-empty; categories no query has are omitted.

    Args:
        scores: (Q, N) scores.
        relevant: (Q, N) boolean relevance.
        product_categories: (N,) category label of each catalogue item.
        k: cut-off.

    Returns:
        {category: mean restricted recall}, categories in sorted order.
    """
    k = _check_k(k)
    ranked = relevant_ranks(scores, relevant)
    labels, item_cat = _check_categories(product_categories, ranked.n_items)
    valid = ranked.valid
    cat_of = np.where(valid, item_cat[np.maximum(ranked.items, 0)], -1)  # (Q, R)
    in_top = valid & (ranked.ranks <= k)  # (Q, R)
    out: dict[Hashable, float] = {}
    for c, label in enumerate(labels):
        in_c = cat_of == c  # (Q, R)
        n_c = in_c.sum(axis=1)  # (Q,)
        has = n_c > 0
        if has.any():
            out[_key(label)] = float(((in_c & in_top).sum(axis=1)[has] / n_c[has]).mean())
    return out


@dataclass(frozen=True)
class CategoryHitRate:
    """Result of :func:`per_category_hit_rate`."""

    overall: float  # mean hit over all (query, category) pairs
    per_category: dict  # {category: mean hit over the queries having that category}
    support: dict  # {category: number of queries having that category}


def per_category_hit_rate(scores, relevant, product_categories, k: int) -> CategoryHitRate:
    """Per-category top-k hit rate, as the IKEA dataset's authors measured retrieval.

    For each query q and each category c among q's relevant items, only the catalogue
    items of category c are ranked (pessimistic tie rule); the pair (q, c) is a hit when
    one of q's relevant items of category c is in that restricted top k, i.e. when fewer
    than k irrelevant items of category c score at least as high as q's best relevant
    item of c. A k at least the category's size is always a hit.

    Args:
        scores: (Q, N) scores.
        relevant: (Q, N) boolean relevance.
        product_categories: (N,) category label of each catalogue item.
        k: cut-off within the category.

    Returns:
        The overall mean over (query, category) pairs, and per-category means and counts.
    """
    k = _check_k(k)
    scores, relevant = _check_retrieval_inputs(scores, relevant)
    labels, item_cat = _check_categories(product_categories, scores.shape[1])
    hits = np.zeros(labels.size, dtype=np.int64)
    support = np.zeros(labels.size, dtype=np.int64)
    columns = [np.flatnonzero(item_cat == c) for c in range(labels.size)]
    for chunk in _row_chunks(*scores.shape):
        for c, cols in enumerate(columns):
            rel = relevant[chunk][:, cols]  # (C, N_c)
            has = rel.any(axis=1)
            if not has.any():
                continue
            rel = rel[has]  # (C', N_c)
            s = scores[chunk][np.ix_(has, cols)]  # (C', N_c)
            best = np.where(rel, s, -np.inf).max(axis=1)  # (C',)
            above = np.count_nonzero((s >= best[:, None]) & ~rel, axis=1)  # (C',)
            hits[c] += int(np.count_nonzero(above < k))
            support[c] += int(has.sum())
    present = support > 0
    return CategoryHitRate(
        overall=float(hits.sum() / support.sum()),
        per_category={_key(lab): float(h / n) for lab, h, n, p in zip(labels, hits, support, present) if p},
        support={_key(lab): int(n) for lab, n, p in zip(labels, support, present) if p},
    )


# ------------------------------------------------------------ random-ranking expectations


def _check_random_args(n_items: int, n_relevant: int) -> tuple[int, int]:
    n, r = int(n_items), int(n_relevant)
    if n < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if not 1 <= r <= n:
        raise ValueError(f"n_relevant must lie in [1, n_items={n}], got {n_relevant}")
    return n, r


def expected_random_recall_at_k(n_items: int, n_relevant: int, k: int) -> float:
    """E[Recall@k] under a uniformly random ranking: min(k, n) / n."""
    n, _ = _check_random_args(n_items, n_relevant)
    return min(_check_k(k), n) / n


def expected_random_hit_rate_at_k(n_items: int, n_relevant: int, k: int) -> float:
    """E[HitRate@k] under a uniformly random ranking: 1 - C(n-r, k) / C(n, k).

    Evaluated as 1 - prod_{i<r} (n-k-i)/(n-i), using C(n-r, k)/C(n, k) = C(n-k, r)/C(n, r).
    """
    n, r = _check_random_args(n_items, n_relevant)
    k = min(_check_k(k), n)
    if k > n - r:
        return 1.0
    i = np.arange(r)
    return float(1.0 - np.prod((n - k - i) / (n - i)))


def expected_random_ndcg_at_k(n_items: int, n_relevant: int, k: int) -> float:
    """E[NDCG@k] under a uniformly random ranking.

    Each rank holds a relevant item with probability r/n and the ideal DCG is fixed, so
    E[NDCG@k] = (r/n) * sum_{i<=k} 1/log2(i+1) / sum_{i<=min(r,k)} 1/log2(i+1).
    """
    n, r = _check_random_args(n_items, n_relevant)
    k = min(_check_k(k), n)
    cumulative = _discounts(k)
    return float((r / n) * cumulative[k] / cumulative[min(r, k)])


def expected_random_average_precision(n_items: int, n_relevant: int) -> float:
    """E[AP] under a uniformly random ranking.

    AP = (1/r) sum_i rel_i * (sum_{t<=i} rel_t) / i. With P(rel_i) = r/n and
    P(rel_i rel_t) = r(r-1)/(n(n-1)) for t != i,
    E[AP] = (1/n) * sum_i (1/i) * (1 + (i-1)(r-1)/(n-1))
          = (1/n) * (H_n + (r-1)/(n-1) * (n - H_n)),   H_n = sum_{i<=n} 1/i.
    """
    n, r = _check_random_args(n_items, n_relevant)
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    pair_term = 0.0 if r == 1 else (r - 1) / (n - 1) * (n - harmonic)
    return (harmonic + pair_term) / n


def random_baseline_report(relevant, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """Exact expectation of :func:`retrieval_report` under uniformly random rankings.

    Each query's expectation uses its own number of relevant items; the macro mean of the
    expectations is the expectation of the macro mean.
    """
    relevant = np.asarray(relevant)
    if relevant.ndim != 2:
        raise ValueError(f"relevant must be a (Q, N) matrix, got shape {relevant.shape}")
    relevant = _check_relevant(relevant, relevant.shape)
    n = relevant.shape[1]
    counts, n_queries = np.unique(relevant.sum(axis=1), return_counts=True)
    weights = n_queries / n_queries.sum()

    def mean_of(fn) -> float:
        return float(sum(w * fn(int(r)) for r, w in zip(counts, weights)))

    report: dict[str, float] = {}
    for k in ks:
        report[f"recall@{k}"] = mean_of(lambda r: expected_random_recall_at_k(n, r, k))
        report[f"ndcg@{k}"] = mean_of(lambda r: expected_random_ndcg_at_k(n, r, k))
        report[f"hit_rate@{k}"] = mean_of(lambda r: expected_random_hit_rate_at_k(n, r, k))
    report["map"] = mean_of(lambda r: expected_random_average_precision(n, r))
    return report


# ------------------------------------------------------------------ ranked id lists


def _check_ranked(ranked: Sequence[Hashable], relevant: Iterable[Hashable]) -> tuple[list, set]:
    ranked = list(ranked)
    seen: set = set()
    for item in ranked:
        if item in seen:
            raise ValueError(f"ranked holds {item!r} more than once; a ranking lists each item once")
        seen.add(item)
    relevant = set(relevant)
    if not relevant:
        raise ValueError("relevant is empty; recall and NDCG are undefined for a query with no relevant item")
    return ranked, relevant


def recall_at_k_ranked(ranked: Sequence[Hashable], relevant: Iterable[Hashable], k: int) -> float:
    """Recall@k of one ranked list of ids: |relevant ∩ ranked[:k]| / |relevant|.

    The list-of-ids counterpart of :meth:`RelevantRanks.recall_at_k`, for rankings that come as
    ids (e.g. ``Matcher.rank``) rather than a score for every catalogue item. A list shorter
    than k is its own top k; relevant items missing from the list count as misses.

    Args:
        ranked: item ids, best first, each at most once.
        relevant: the query's relevant ids (non-empty).
        k: cut-off, an integer >= 1.
    """
    k = _check_k(k)
    ranked, relevant = _check_ranked(ranked, relevant)
    return sum(item in relevant for item in ranked[:k]) / len(relevant)


def ndcg_at_k_ranked(ranked: Sequence[Hashable], relevant: Iterable[Hashable], k: int) -> float:
    """Binary-gain NDCG@k of one ranked list of ids, as :meth:`RelevantRanks.ndcg_at_k` defines it.

    DCG@k = sum over relevant items at rank i <= k of 1/log2(i+1); the ideal DCG puts
    min(|relevant|, k) relevant items at ranks 1, 2, ... (relevant items missing from the list
    still count in the ideal, so a short list cannot score 1 by leaving them out).

    Args:
        ranked: item ids, best first, each at most once.
        relevant: the query's relevant ids (non-empty).
        k: cut-off, an integer >= 1.
    """
    k = _check_k(k)
    ranked, relevant = _check_ranked(ranked, relevant)
    dcg = sum(1.0 / np.log2(rank + 1.0) for rank, item in enumerate(ranked[:k], start=1) if item in relevant)
    return float(dcg / _discounts(min(len(relevant), k))[-1])


_SCENE_METRICS = ("scene_accuracy", "confusion_matrix", "macro_f1", "expected_calibration_error")


def __getattr__(name: str):
    if name in _SCENE_METRICS:  # their home is scene_metrics; still reachable from here
        import warnings

        from . import scene_metrics

        warnings.warn(f"hgm_mm.evaluation.metrics.{name} has moved to hgm_mm.evaluation.scene_metrics",
                      DeprecationWarning, stacklevel=2)
        return getattr(scene_metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
