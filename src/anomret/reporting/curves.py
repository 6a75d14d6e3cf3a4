"""Image-level curves and thresholds from per-image scores (numpy only).

An image is predicted anomalous when its score is at or above the threshold, as scikit-learn's curves
count it. :func:`roc_points` and :func:`pr_points` return exactly what ``sklearn.metrics.roc_curve``
(``drop_intermediate=False``) and ``precision_recall_curve`` return, without importing scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "F1_MAX_LABEL",
    "SAVED_LABEL",
    "Outcome",
    "Threshold",
    "f1_max_threshold",
    "image_thresholds",
    "outcome",
    "pr_points",
    "roc_points",
    "saved_image_threshold",
]

F1_MAX_LABEL = "F1-max threshold on these test scores"
SAVED_LABEL = "saved image threshold"


def _counts(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct score, highest score first, and those scores."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(labels).reshape(-1).astype(bool)
    if values.shape != truth.shape:
        raise ValueError(f"{values.size} scores but {truth.size} labels")
    order = np.argsort(-values, kind="mergesort")
    values, truth = values[order], truth[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]
    true_positives = np.cumsum(truth)[last_of_each]
    false_positives = last_of_each + 1 - true_positives
    return true_positives.astype(np.float64), false_positives.astype(np.float64), values[last_of_each]


def roc_points(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, starting at ``(0, 0)`` with threshold ``inf``.

    A rate whose denominator is zero (no normal or no anomalous image) is NaN.
    """
    tps, fps, thresholds = _counts(scores, labels)
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_points(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)``: thresholds increasing, then the final point ``(1, 0)``.

    Without anomalous images recall is 1 at every threshold (as scikit-learn sets it).
    """
    tps, fps, thresholds = _counts(scores, labels)
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def f1_max_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """``(threshold, F1)``: the threshold among the scores with the highest F1 (the higher one on ties).

    NaN for both when there is no anomalous image (F1 is undefined).
    """
    if not np.asarray(labels).astype(bool).any():
        return math.nan, math.nan
    precision, recall, thresholds = pr_points(scores, labels)
    precision, recall = precision[:-1], recall[:-1]
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # last maximum: the highest threshold
    return float(thresholds[best]), float(f1[best])


@dataclass(frozen=True)
class Threshold:
    """An image threshold and where it comes from (:data:`SAVED_LABEL` or :data:`F1_MAX_LABEL`)."""

    value: float
    source: str

    @property
    def saved(self) -> bool:
        return self.source == SAVED_LABEL


def saved_image_threshold(settings: Mapping[str, Any], category: str) -> float | None:
    """The image threshold ``results.json`` records (``settings.thresholds.image``): one number for
    every category, or a number per category; ``None`` when there is none for ``category``."""
    thresholds = settings.get("thresholds")
    saved = thresholds.get("image") if isinstance(thresholds, Mapping) else None
    if isinstance(saved, Mapping):
        saved = saved.get(category)
    if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not math.isfinite(saved):
        return None
    return float(saved)


def image_thresholds(
    settings: Mapping[str, Any], scores: Mapping[str, tuple[Sequence[float], Sequence[int]]]
) -> dict[str, Threshold]:
    """Per category: the saved image threshold when there is one, else the F1-max threshold of the
    category's own test scores (``scores``: category -> (scores, labels))."""
    chosen = {}
    for category, (values, labels) in scores.items():
        saved = saved_image_threshold(settings, category)
        if saved is not None:
            chosen[category] = Threshold(saved, SAVED_LABEL)
        else:
            chosen[category] = Threshold(f1_max_threshold(values, labels)[0], F1_MAX_LABEL)
    return chosen


Outcome = str  # "FP", "FN", "TP" or "TN"


def outcome(score: float, label: int, threshold: float) -> Outcome:
    """How an image fares at ``threshold``: anomalous when ``score >= threshold``."""
    predicted = not math.isnan(threshold) and score >= threshold
    if label:
        return "TP" if predicted else "FN"
    return "FP" if predicted else "TN"
