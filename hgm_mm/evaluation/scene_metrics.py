"""Scene metrics: accuracy, the confusion matrix and macro-F1 of predicted scenes, and the expected
calibration error of their probabilities."""
from __future__ import annotations

import numpy as np

__all__ = ["confusion_matrix", "expected_calibration_error", "macro_f1", "scene_accuracy"]


def _check_labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("y_true and y_pred are empty")
    return y_true, y_pred


def _encode(values: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels.tolist())}  # tolist: plain Python keys
    uniq, inverse = np.unique(values, return_inverse=True)
    unknown = [u for u in uniq.tolist() if u not in index]
    if unknown:
        raise ValueError(f"{name} contains labels not in labels: {unknown[:5]}")
    return np.array([index[u] for u in uniq.tolist()], dtype=np.int64)[inverse]


def scene_accuracy(y_true, y_pred) -> float:
    """Fraction of rooms whose predicted scene equals the true scene."""
    y_true, y_pred = _check_labels(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true, y_pred, labels) -> np.ndarray:
    """Counts of (true, predicted) label pairs.

    Args:
        y_true: (Q,) true labels.
        y_pred: (Q,) predicted labels.
        labels: the L distinct labels, in the order of the rows and columns. A label in
            y_true or y_pred that is missing here is an error.

    Returns:
        (L, L) int64 matrix; entry [i, j] counts rooms of true label i predicted as j.
    """
    y_true, y_pred = _check_labels(y_true, y_pred)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    if np.unique(labels).size != labels.size:
        raise ValueError(f"labels must be distinct, got {labels.tolist()}")
    t = _encode(y_true, labels, "y_true")
    p = _encode(y_pred, labels, "y_pred")
    size = labels.size
    return np.bincount(t * size + p, minlength=size * size).reshape(size, size)


def macro_f1(y_true, y_pred, labels=None) -> float:
    """Unweighted mean of the per-class F1 = 2TP / (2TP + FP + FN).

    Classes absent from both y_true and y_pred are excluded from the mean (their F1 is
    0/0); a class with true rooms but no predictions, or predictions but no true rooms,
    has F1 = 0.

    Args:
        y_true: (Q,) true labels.
        y_pred: (Q,) predicted labels.
        labels: the classes to consider; by default those in y_true or y_pred.
    """
    y_true, y_pred = _check_labels(y_true, y_pred)
    if labels is None:
        labels = np.unique(np.concatenate([y_true, y_pred]))
    cm = confusion_matrix(y_true, y_pred, labels)  # (L, L)
    tp = np.diag(cm)
    denominator = cm.sum(axis=0) + cm.sum(axis=1)  # 2TP + FP + FN
    present = denominator > 0
    return float(np.mean(2.0 * tp[present] / denominator[present]))


# ------------------------------------------------------------------------ calibration


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """Expected calibration error of top-class confidences, over equal-width bins.

    The interval [0, 1] is cut into ``n_bins`` bins (i/n, (i+1)/n] (a confidence of exactly 0
    falls in the first). For the predictions B_b in bin b,
    ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|; empty bins add nothing.
    0 means that, bin by bin, predictions made with confidence p are right a share p of the time.

    Args:
        confidences: (N,) probability given to each predicted class, in [0, 1].
        correct: (N,) whether each prediction was right (booleans, or 0/1).
        n_bins: number of bins, an integer >= 1.

    Returns:
        The ECE, in [0, 1].
    """
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct)
    if confidences.ndim != 1 or correct.shape != confidences.shape:
        raise ValueError(f"confidences and correct must be 1-D of equal length, got {confidences.shape} "
                         f"and {correct.shape}")
    if confidences.size == 0:
        raise ValueError("confidences and correct are empty; calibration needs at least one prediction")
    if not np.all((confidences >= 0) & (confidences <= 1)):  # also refuses NaN
        bad = int(np.flatnonzero(~((confidences >= 0) & (confidences <= 1)))[0])
        raise ValueError(f"confidences must lie in [0, 1]; position {bad} is {confidences[bad]!r}")
    if correct.dtype != np.bool_:
        if not np.isin(correct, (0, 1)).all():
            raise ValueError("correct must hold booleans or 0/1")
        correct = correct.astype(bool)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    # side="left" on the inner edges puts a confidence equal to an edge in the bin it closes
    bins = np.searchsorted(edges[1:-1], confidences, side="left")  # (N,) in [0, n_bins)
    confidence_sum = np.bincount(bins, weights=confidences, minlength=n_bins)  # (B,)
    correct_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)  # (B,)
    return float(np.abs(correct_sum - confidence_sum).sum() / confidences.size)
