"""Threshold and decision math against independent computations: scikit-learn's precision-recall curve,
numpy's quantiles, and cases worked by hand (ties included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve, precision_score, recall_score

from anomret.metrics.thresholds import (
    allowed_false_positives,
    decide,
    f1_optimal_threshold,
    fpr_threshold,
    normalize,
    precision_recall_f1,
)


def _sklearn_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(thresholds[int(np.argmax(f1[:-1]))])  # the last point has no threshold


@pytest.mark.parametrize("seed", range(8))
def test_f1_optimal_threshold_is_the_argmax_of_sklearns_curve(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.7)
    labels[0] = True
    scores = rng.normal(size=n).astype(np.float32) + labels * rng.uniform(0, 2)
    assert f1_optimal_threshold(scores, labels) == _sklearn_f1_threshold(scores, labels)


def test_f1_optimal_threshold_by_hand_with_ties():
    # Scores 0.1 .. 0.9; positives at 0.4 (tied with a negative), 0.8 and 0.9.
    scores = np.array([0.1, 0.2, 0.4, 0.4, 0.5, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    # t = 0.9: TP 1 FP 0 -> F1 2/4; t = 0.8: TP 2 FP 0 -> 4/5; t = 0.4: TP 3 FP 2 -> 6/8.
    assert f1_optimal_threshold(scores, labels) == 0.8
    # A lower threshold wins when its extra true positives outweigh a false positive.
    more_scores = np.array([0.2, 0.5, 0.6, 0.9])
    more_labels = np.array([1, 0, 1, 1])
    # t = 0.9: 2/(1+0+3) = 0.5; t = 0.6: 4/(2+0+3) = 0.8; t = 0.2: 6/(3+1+3) = 6/7 > 0.8.
    assert f1_optimal_threshold(more_scores, more_labels) == 0.2
    exact_tie = np.array([1.0, 2.0, 3.0, 4.0])
    exact_more_labels = np.array([1, 0, 0, 1])
    # t = 4: 2/(1+0+2) = 2/3; t = 1: 4/(2+2+2) = 2/3: equal, the lower threshold is kept.
    assert f1_optimal_threshold(exact_tie, exact_more_labels) == 1.0


def test_f1_optimal_threshold_needs_anomalous_scores():
    with pytest.raises(ValueError, match="anomalous"):
        f1_optimal_threshold([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        f1_optimal_threshold([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        f1_optimal_threshold([0.1, 0.2], [0, 2])


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_fpr_threshold_is_just_above_numpys_inverted_cdf_quantile(target, n):
    scores = np.random.default_rng(n).normal(size=n).astype(np.float32)
    threshold = fpr_threshold(scores, target)
    quantile = np.quantile(scores, 1 - target, method="inverted_cdf")
    assert threshold == float(np.nextafter(quantile, np.float32(np.inf)))
    flagged = int(decide(scores, threshold).sum())
    assert flagged <= target * n
    # The lowest such threshold: the highest score below it would be flagged at once.
    below = scores[scores < threshold].max()
    assert int(decide(scores, float(below)).sum()) > target * n


def test_fpr_threshold_by_hand_with_ties():
    scores = np.array([1.0, 2.0, 2.0, 2.0, 3.0], dtype=np.float32)
    # 20 %: one of five may be flagged; 3.0 can be, the 2.0s cannot (three of them).
    assert fpr_threshold(scores, 0.2) == float(np.nextafter(np.float32(2.0), np.float32(np.inf)))
    assert decide(scores, fpr_threshold(scores, 0.2)).tolist() == [False, False, False, False, True]
    # 80 %: four may be flagged: all but the 1.0.
    assert decide(scores, fpr_threshold(scores, 0.8)).tolist() == [False, True, True, True, True]
    # 0 %: above the highest score.
    assert not decide(scores, fpr_threshold(scores, 0.0)).any()
    # The product 0.29 * 100 is 28.999999999999996 in floats: still 29 images may be flagged.
    assert allowed_false_positives(0.29, 100) == 29
    assert fpr_threshold(np.arange(100, dtype=np.float64), 0.29) == float(np.nextafter(70.0, np.inf))


def test_fpr_threshold_refuses_bad_rates_and_scores():
    for rate in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            fpr_threshold([1.0], rate)
    with pytest.raises(ValueError, match="empty"):
        fpr_threshold([], 0.1)


def test_thresholds_of_float32_scores_decide_alike_in_float32_and_float64():
    scores = np.random.default_rng(0).normal(size=500).astype(np.float32)
    threshold = fpr_threshold(scores, 0.1)
    assert np.float32(threshold) == threshold  # representable in float32
    assert ((scores >= np.float32(threshold)) == decide(scores, threshold)).all()


def test_normalize_puts_the_threshold_at_one_half():
    values = np.array([0.0, 0.2, 0.3, 0.5, 1.0])
    normalized = normalize(values, threshold=0.3, low=0.0, high=1.0)
    assert normalized.tolist() == pytest.approx([0.2, 0.4, 0.5, 0.7, 1.0])
    assert (normalize(values, 0.3, 0.0, 1.0) >= 0.5).tolist() == decide(values, 0.3).tolist()
    assert normalize([5.0, -5.0], 0.0, 0.0, 1.0).tolist() == [1.0, 0.0]  # clipped
    assert normalize([1.0], 1.0, 2.0, 2.0).tolist() == [0.5]  # degenerate range


def test_precision_recall_f1_equal_sklearn_including_empty_cases():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.random(30) < 0.4
        predicted = rng.random(30) < 0.3
        ours = precision_recall_f1(predicted, labels)
        assert ours["precision"] == pytest.approx(precision_score(labels, predicted, zero_division=np.nan))
        assert ours["recall"] == pytest.approx(recall_score(labels, predicted, zero_division=np.nan))
        assert ours["f1"] == pytest.approx(f1_score(labels, predicted, zero_division=np.nan))
    nothing_flagged = precision_recall_f1([0, 0], [1, 0])
    assert math.isnan(nothing_flagged["precision"]) and nothing_flagged["recall"] == 0.0
    assert nothing_flagged["f1"] == 0.0
    no_anomalies = precision_recall_f1([1, 0], [0, 0])
    assert no_anomalies["precision"] == 0.0 and math.isnan(no_anomalies["recall"])
    assert all(math.isnan(v) for v in precision_recall_f1([0, 0], [0, 0]).values())
