"""Thresholds from scores, and the decisions they make: pure numpy, no model, no config.

One rule everywhere (anomalib's): a score **at or above** its threshold is anomalous. Every threshold here
is a value of the scores' own floating type (a calibration score, or the next representable value above
one), so the same threshold decides alike whether scores are compared in float32 or float64.

- :func:`f1_optimal_threshold`: from labelled scores, the threshold of the highest F1 (anomalib's adaptive
  threshold; equal to the argmax of scikit-learn's ``precision_recall_curve``). Ties go to the lowest such
  threshold, as ``argmax`` over sklearn's ascending thresholds does.
- :func:`fpr_threshold`: from normal scores only, the lowest threshold that flags at most ``target_fpr`` of
  them: with ``n`` scores, ``k = floor(target_fpr · n)`` may lie at or above it. That is the next value
  above numpy's ``quantile(scores, 1 − target_fpr, method="inverted_cdf")``. With ``k = 0`` (fewer than
  ``1 / target_fpr`` scores) it lies just above the highest normal score.
- :func:`normalize`: anomalib's min-max normalisation, ``(x − t) / (max − min) + 0.5`` clipped to
  ``[0, 1]``, which puts the threshold at 0.5.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from anomret.metrics.functional import binary_array, scores_array, split_sorted

__all__ = [
    "decide",
    "f1_optimal_threshold",
    "fpr_threshold",
    "normalize",
    "precision_recall_f1",
]


def _labels(values: Any, size: int) -> np.ndarray:
    array = binary_array(values, "labels").reshape(-1)
    if array.size != size:
        raise ValueError(f"{array.size} labels for {size} scores")
    return array


def f1_optimal_threshold(scores: Any, labels: Any) -> float:
    """The threshold (a score value) whose decisions ``score >= t`` have the highest F1 on these labels.

    Raises:
        ValueError: no anomalous label (F1 is undefined), or malformed input.
    """
    positives, negatives = split_sorted(np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1))
    if positives.size == 0:
        raise ValueError(
            "an F1-optimal threshold needs anomalous calibration images (or pixels); these have none"
        )
    # F1 can only be highest at a positive score: between two of them, a lower threshold adds false
    # positives only. At each distinct positive value t: TP = #positives >= t, FP = #negatives >= t.
    starts = np.flatnonzero(np.concatenate(([True], positives[1:] != positives[:-1])))
    values = positives[starts]
    tp = positives.size - starts
    fp = negatives.size - np.searchsorted(negatives, values, side="left")
    f1 = 2.0 * tp / (tp + fp + positives.size)  # 2PR / (P + R) with integer counts
    return float(values[int(np.argmax(f1))])  # the first maximum: the lowest threshold


def allowed_false_positives(target_fpr: float, n: int) -> int:
    """``floor(target_fpr · n)``, robust to the float error of products such as ``0.29 · 100``."""
    return math.floor(round(float(target_fpr) * n, 9))


def fpr_threshold(normal_scores: Any, target_fpr: float) -> float:
    """The lowest threshold at or above which at most ``target_fpr`` of ``normal_scores`` lie.

    Raises:
        ValueError: ``target_fpr`` outside ``[0, 1)``, or malformed input.
    """
    if isinstance(target_fpr, bool) or not 0.0 <= float(target_fpr) < 1.0:
        raise ValueError(f"a target false-positive rate must be in [0, 1), got {target_fpr!r}")
    array = scores_array(normal_scores, "normal scores").reshape(-1)
    n = array.size
    k = allowed_false_positives(target_fpr, n)
    # The (n - k)-th smallest score must fall below the threshold; the next value above it is the lowest
    # threshold that leaves at most k scores at or above it.
    highest_below = np.partition(array, n - k - 1)[n - k - 1]
    return float(np.nextafter(highest_below, np.array(np.inf, dtype=array.dtype)))


def decide(scores: Any, threshold: float) -> np.ndarray:
    """``scores >= threshold`` (anomalous): in the scores' own float32 when the threshold is a float32
    value (every threshold fitted here on float32 scores is), else in float64."""
    array = np.asarray(scores)
    if array.dtype == np.float32 and float(np.float32(threshold)) == float(threshold):
        return array >= np.float32(threshold)
    return array.astype(np.float64, copy=False) >= float(threshold)


def normalize(values: Any, threshold: float, low: float, high: float) -> np.ndarray:
    """anomalib's normalisation: ``(values − threshold) / (high − low) + 0.5``, clipped to ``[0, 1]``.

    ``low`` and ``high`` are the calibration scores' range; a degenerate range scales by 1.
    """
    span = float(high) - float(low)
    span = span if span > 0 else 1.0
    shifted = (np.asarray(values, dtype=np.float64) - float(threshold)) / span + 0.5
    return np.clip(shifted, 0.0, 1.0)


def precision_recall_f1(predicted: Any, labels: Any) -> dict[str, float]:
    """Precision, recall and F1 of binary decisions; NaN where a ratio has nothing to count (no image
    flagged, no anomalous image), as scikit-learn's ``zero_division=np.nan``."""
    flagged = np.asarray(predicted).reshape(-1).astype(bool)
    truth = _labels(labels, flagged.size)
    tp = int(np.count_nonzero(flagged & truth))
    fp = int(np.count_nonzero(flagged & ~truth))
    fn = int(np.count_nonzero(~flagged & truth))
    return {
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan,
    }
