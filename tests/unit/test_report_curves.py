"""Image-level curves and thresholds of the report page, against scikit-learn and anomret's metrics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_curve

from anomret.metrics.functional import f1_max
from anomret.reporting.curves import (
    F1_MAX_LABEL,
    SAVED_LABEL,
    Threshold,
    f1_max_threshold,
    image_thresholds,
    outcome,
    pr_points,
    roc_points,
)
from anomret.reporting.page import GalleryItem, gallery_order


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    return [
        (rng.random(60) + labels * 0.3, labels),  # continuous scores
        (np.round(rng.random(60) * 4) / 4, labels),  # many ties
        (np.array([0.2, 0.8, 0.8, 0.5]), np.array([0, 1, 0, 1])),
        (np.array([0.3, 0.1, 0.9]), np.array([1, 1, 1])),  # no normal image
    ]


@pytest.mark.parametrize("case", range(4))
def test_roc_points_equal_scikit_learns(case):
    scores, labels = _cases()[case]
    fpr, tpr, thresholds = roc_points(scores, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that FPR is undefined without normal images
        expected = roc_curve(labels, scores, drop_intermediate=False)
    for ours, theirs in zip((fpr, tpr, thresholds), expected, strict=True):
        np.testing.assert_allclose(ours, theirs)


@pytest.mark.parametrize("case", range(3))
def test_pr_points_equal_scikit_learns(case):
    scores, labels = _cases()[case]
    for ours, theirs in zip(pr_points(scores, labels), precision_recall_curve(labels, scores), strict=True):
        np.testing.assert_allclose(ours, theirs)


@pytest.mark.parametrize("case", range(3))
def test_f1_max_threshold_reaches_the_f1_max_metric(case):
    scores, labels = _cases()[case]
    threshold, best = f1_max_threshold(scores, labels)
    predicted = scores >= threshold
    true_positives = (predicted & (labels == 1)).sum()
    f1_at_threshold = 2 * true_positives / (predicted.sum() + labels.sum())
    assert f1_at_threshold == pytest.approx(best)
    assert best == pytest.approx(float(f1_max(torch.tensor(scores), torch.tensor(labels))))


def test_f1_max_threshold_is_undefined_without_anomalous_images():
    threshold, best = f1_max_threshold([0.1, 0.2], [0, 0])
    assert math.isnan(threshold) and math.isnan(best)


def test_a_saved_threshold_is_used_else_the_f1_max_threshold_of_each_category():
    scores = {"a": ([0.1, 0.9, 0.4, 0.35], [0, 1, 0, 1]), "b": ([0.2, 0.6, 0.7, 0.8], [0, 0, 1, 1])}
    chosen = image_thresholds({}, scores)
    assert chosen["a"] == Threshold(0.35, F1_MAX_LABEL) and chosen["b"] == Threshold(0.7, F1_MAX_LABEL)
    assert F1_MAX_LABEL == "F1-max threshold on these test scores"

    everywhere = image_thresholds({"thresholds": {"image": 0.5}}, scores)
    assert {c: (t.value, t.source) for c, t in everywhere.items()} == {
        "a": (0.5, SAVED_LABEL),
        "b": (0.5, SAVED_LABEL),
    }
    per_category = image_thresholds({"thresholds": {"image": {"a": 0.3}}}, scores)
    assert per_category["a"] == Threshold(0.3, SAVED_LABEL) and per_category["b"].source == F1_MAX_LABEL
    assert image_thresholds({"thresholds": {"image": None}}, scores) == chosen


def test_outcomes_at_a_threshold_count_equal_scores_as_anomalous():
    assert outcome(0.5, 0, 0.5) == "FP" and outcome(0.49, 0, 0.5) == "TN"
    assert outcome(0.5, 1, 0.5) == "TP" and outcome(0.49, 1, 0.5) == "FN"
    assert outcome(0.9, 0, math.nan) == "TN"  # no threshold: nothing is predicted anomalous


def test_gallery_shows_false_positives_then_false_negatives_then_the_rest_by_score():
    items = [
        GalleryItem("a", "tp_high.png", 1, 0.9, ""),
        GalleryItem("a", "fn_low.png", 1, 0.1, ""),
        GalleryItem("a", "fn_near.png", 1, 0.4, ""),
        GalleryItem("a", "tn.png", 0, 0.2, ""),
        GalleryItem("a", "fp_near.png", 0, 0.55, ""),
        GalleryItem("a", "fp_high.png", 0, 0.8, ""),
        GalleryItem("a", "tp_low.png", 1, 0.6, ""),
    ]
    ordered = gallery_order(items, Threshold(0.5, F1_MAX_LABEL))
    assert [(verdict, item.image) for verdict, item in ordered] == [
        ("FP", "fp_high.png"),
        ("FP", "fp_near.png"),
        ("FN", "fn_low.png"),
        ("FN", "fn_near.png"),
        ("TP", "tp_high.png"),
        ("TP", "tp_low.png"),
        ("TN", "tn.png"),
    ]
