"""Exact anomaly-detection metrics: image/pixel AUROC, average precision, F1-max and AUPRO.

Every function takes tensors (or arrays) of any shape and float dtype and returns a Python float.
Scores are never rescaled: no sigmoid, no min-max, no clamping, so raw scores such as ``1e6`` or ``-50``
give exactly the same result as any monotone transform of them.

Undefined values are ``math.nan``, never an exception: AUROC, AP and F1-max when only one class is
present; AUPRO when there is no anomalous or no normal pixel. Malformed input raises ``ValueError``:
shape mismatch, empty input, non-finite scores, labels that are not binary.

How the exact curves are computed without an ``argsort`` of all pixels: for binary labels every ROC / PR
quantity at a threshold ``t`` is a count of positive and of negative scores ``>= t``. Sorting the positive
and negative scores separately (a value-only sort, several times faster than an argsort and without an
int64 index array) and locating thresholds with ``searchsorted`` gives those counts at every distinct
score, which is exactly the set of curve points sklearn uses. Scores are compared in their own dtype
(half precision widened to float32), which orders them exactly as float64 would; rates and areas are
computed in float64 from integer counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "BINARY_METRICS",
    "FPR_NORMALIZATIONS",
    "aupro",
    "auroc",
    "average_precision",
    "binary_metrics",
    "f1_max",
    "resolve_aupro_settings",
]

BINARY_METRICS = ("auroc", "average_precision", "f1_max")
FPR_NORMALIZATIONS = ("limit", "max", "minmax")

# Pixels handled per searchsorted call in the thresholded AUPRO: bounds the float64/int64 temporaries.
_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------- input checks
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            # numpy has no bfloat16; float32 holds every half-precision value exactly.
            x = x.float()
        return x.numpy()  # shares memory: nothing below writes into it
    return np.asarray(x)


def scores_array(scores: Any, name: str) -> np.ndarray:
    """Scores (tensor or array-like) as a real numpy array, refused when empty or not finite."""
    array = _to_numpy(scores)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype.kind in "biu":
        array = array.astype(np.float64)
    elif array.dtype.kind != "f":
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def binary_array(labels: Any, name: str) -> np.ndarray:
    """Labels (bool or 0/1, tensor or array-like) as a boolean numpy array."""
    array = _to_numpy(labels)
    if array.dtype == np.bool_:
        return array
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {array.dtype}")
    if not np.logical_or(array == 0, array == 1).all():
        found = np.unique(array[np.logical_and(array != 0, array != 1)])[:5]
        raise ValueError(f"{name} must be binary (bool or 0/1); found values such as {found.tolist()}")
    return array != 0


def _check_pair(scores: np.ndarray, labels: np.ndarray, names: tuple[str, str]) -> None:
    if scores.shape != labels.shape:
        raise ValueError(f"{names[0]} {scores.shape} and {names[1]} {labels.shape} must have the same shape")


def split_sorted(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate, then return the positive and the negative scores, each sorted ascending."""
    score_array = scores_array(scores, "scores")
    label_array = binary_array(labels, "labels")
    _check_pair(score_array, label_array, ("scores", "labels"))
    positives = score_array[label_array]  # boolean indexing copies, so the in-place sorts are safe
    negatives = score_array[~label_array]
    positives.sort()
    negatives.sort()
    return positives, negatives


# ------------------------------------------------------------------------------ AUROC / AP / F1-max
def _auroc_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    # The trapezoidal ROC area with ties (sklearn's roc_auc_score) equals the Mann-Whitney statistic with
    # tied pairs counted 1/2: for each positive, #negatives below it plus half the #negatives equal to it.
    below = np.searchsorted(negatives, positives, side="left")
    below_or_equal = np.searchsorted(negatives, positives, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return twice_u / (2 * positives.size * negatives.size)  # int / int: correctly rounded


def _positive_operating_points(
    positives: np.ndarray, negatives: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP counts at each distinct positive score used as threshold (``score >= t``).

    Returns ``(n_tied, tp, fp)``: how many positives share each distinct value, and the counts. Only these
    thresholds matter for AP (recall changes only there) and for F1-max (between two of them, lowering the
    threshold adds false positives only, so F1 can only drop).
    """
    starts = np.flatnonzero(np.concatenate(([True], positives[1:] != positives[:-1])))
    values = positives[starts]
    n_tied = np.diff(np.append(starts, positives.size))
    tp = positives.size - starts
    fp = negatives.size - np.searchsorted(negatives, values, side="left")
    return n_tied, tp, fp


def _average_precision_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    # Step-wise AP (sklearn): sum over thresholds of (recall increase) x precision. Recall increases only at
    # positive values, by (#positives tied there) / P.
    n_tied, tp, fp = _positive_operating_points(positives, negatives)
    precision = tp / (tp + fp)
    return float(np.sum(n_tied * precision) / positives.size)


def _f1_max_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    # 2PR / (P + R) simplifies to 2 TP / (TP + FP + #positives), which is 0 (not 0/0) when TP = 0.
    _, tp, fp = _positive_operating_points(positives, negatives)
    return float(np.max(2.0 * tp / (tp + fp + positives.size)))


_BINARY_IMPLS = {
    "auroc": _auroc_sorted,
    "average_precision": _average_precision_sorted,
    "f1_max": _f1_max_sorted,
}


def binary_metrics(scores: Any, labels: Any, metrics: Sequence[str] = BINARY_METRICS) -> dict[str, float]:
    """Several threshold-free binary metrics from one sort of the scores.

    Args:
        scores: anomaly scores, any shape (flattened), any real dtype; higher means more anomalous.
        labels: binary ground truth of the same shape (bool, int or float 0/1).
        metrics: subset of ``("auroc", "average_precision", "f1_max")``.

    Returns:
        ``{name: value}``; every value is NaN when only one class is present.
    """
    unknown = [m for m in metrics if m not in _BINARY_IMPLS]
    if unknown:
        raise ValueError(f"unknown binary metric(s) {unknown}; valid: {list(BINARY_METRICS)}")
    positives, negatives = split_sorted(scores, labels)
    if positives.size == 0 or negatives.size == 0:
        return {m: math.nan for m in metrics}
    return {m: _BINARY_IMPLS[m](positives, negatives) for m in metrics}


def auroc(scores: Any, labels: Any) -> float:
    """Exact area under the ROC curve; equals ``sklearn.metrics.roc_auc_score`` (ties included).

    Returns NaN when only one class is present.
    """
    return binary_metrics(scores, labels, ("auroc",))["auroc"]


def average_precision(scores: Any, labels: Any) -> float:
    """Step-wise average precision; equals ``sklearn.metrics.average_precision_score``.

    Returns NaN when only one class is present.
    """
    return binary_metrics(scores, labels, ("average_precision",))["average_precision"]


def f1_max(scores: Any, labels: Any) -> float:
    """Maximum F1 over the exact precision-recall curve (every distinct score is a threshold).

    F1 is taken as 0 where precision + recall = 0. Returns NaN when only one class is present.
    """
    return binary_metrics(scores, labels, ("f1_max",))["f1_max"]


# --------------------------------------------------------------------------------------------- AUPRO
def resolve_aupro_settings(
    fpr_limit: float = 0.3, num_thresholds: int | None = None, fpr_normalization: str | None = None
) -> dict[str, Any]:
    """Validate AUPRO settings and fill in the default FPR normalisation of the chosen variant.

    Returns:
        ``{"fpr_limit", "num_thresholds", "fpr_normalization"}`` with the normalisation resolved:
        ``"limit"`` for the exact curve, ``"minmax"`` (official MRAD/AnomalyCLIP code) when thresholded.
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None:
        if isinstance(num_thresholds, bool) or int(num_thresholds) != num_thresholds or num_thresholds < 1:
            raise ValueError(f"num_thresholds must be a positive integer or None, got {num_thresholds!r}")
        num_thresholds = int(num_thresholds)
    if fpr_normalization is None:
        fpr_normalization = "limit" if num_thresholds is None else "minmax"
    if fpr_normalization not in FPR_NORMALIZATIONS:
        raise ValueError(
            f"fpr_normalization must be one of {list(FPR_NORMALIZATIONS)}, got {fpr_normalization!r}"
        )
    return {"fpr_limit": fpr_limit, "num_thresholds": num_thresholds, "fpr_normalization": fpr_normalization}


def _maps_masks_arrays(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    map_array = scores_array(maps, "maps")
    mask_array = binary_array(masks, "masks")
    _check_pair(map_array, mask_array, ("maps", "masks"))
    if map_array.ndim == 2:
        map_array, mask_array = map_array[None], mask_array[None]
    elif map_array.ndim != 3:
        raise ValueError(f"maps and masks must be [N, H, W] or [H, W], got shape {map_array.shape}")
    return map_array, mask_array


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected regions of each mask image separately.

    Returns:
        ``(ids, sizes)``: a 0-based region id for every anomalous pixel (in ``masks[masks]`` order, unique
        across images) and the pixel count of each region.
    """
    structure = np.ones((3, 3), dtype=bool)
    ids, offset = [], 0
    # One image at a time keeps the int32 label image small (labelling the whole stack at once would
    # allocate 4 bytes per pixel of the category); images without anomalous pixels are skipped.
    for index in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        labels, n_regions = ndimage.label(masks[index], structure=structure)
        ids.append(labels[masks[index]].astype(np.int64) + (offset - 1))
        offset += n_regions
    region_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return region_ids, np.bincount(region_ids, minlength=offset)


def _first_count_reaching(fpr_limit: float, n_normal: int) -> int:
    """Smallest k with k / n_normal >= fpr_limit, evaluated in floating point like the FPRs themselves."""
    k = min(max(math.ceil(fpr_limit * n_normal), 1), n_normal)
    while k < n_normal and k / n_normal < fpr_limit:
        k += 1
    while k > 1 and (k - 1) / n_normal >= fpr_limit:
        k -= 1
    return k


def _aupro_exact(
    maps: np.ndarray, masks: np.ndarray, ids: np.ndarray, sizes: np.ndarray, fpr_limit: float
) -> float:
    """Trapezoidal area under the exact PRO curve up to ``fpr_limit``, divided by the limit.

    The curve, with thresholds ``t`` at every distinct score (pixels ``>= t`` predicted anomalous), is
    FPR(t) = #normal >= t / n_normal against PRO(t) = sum of the PRO steps of anomalous pixels >= t, where
    a pixel's step is 1 / (its region's size * number of regions). Consecutive thresholds with no normal
    pixel between them only move PRO (vertical, no area); a distinct normal value v with c tied normal
    pixels is the segment from (F, PRO(> v)) to (F + c / n_normal, PRO(>= v)), of area
    c / n_normal * (PRO(> v) + PRO(>= v)) / 2. Summing that per normal pixel instead of per value, and
    swapping the two sums, gives for all normal pixels above the limit segment

        area = 1 / (2 n_normal) * sum over anomalous a of step(a) * (#{normal < a} + #{normal <= a}),

    counted among those normal pixels. So no pixel-wise argsort is needed: a linear-time partition finds
    the normal value whose segment crosses the limit, then only the normals above it are sorted (for the
    searchsorted counts), and that one segment is cut at the limit by linear interpolation.
    """
    anomalous = maps[masks]
    order = np.argsort(anomalous)
    anomalous = anomalous[order]
    steps = 1.0 / (sizes[ids[order]].astype(np.float64) * sizes.size)
    del order

    normal = maps[~masks]  # a copy: partitioned in place below
    n_normal = normal.size
    # The crossing segment belongs to the k-th largest normal value: FPR(>= it) reaches the limit, while
    # the (k - 1) larger normal pixels stay below it.
    k = _first_count_reaching(fpr_limit, n_normal)
    normal.partition(n_normal - k)
    crossing = normal[n_normal - k]
    upper = normal[n_normal - k + 1 :]  # every value here is >= crossing
    above = upper[upper > crossing]
    n_tied = int(np.count_nonzero(normal == crossing))
    del normal, upper
    above.sort()

    # Twice the number of normal pixels (above the crossing value) scoring below each anomalous pixel, ties
    # counted once: #{normal < a} + #{normal <= a}.
    twice_below = np.searchsorted(above, anomalous, side="left")
    twice_below += np.searchsorted(above, anomalous, side="right")
    area = float(np.dot(steps, twice_below)) / (2.0 * n_normal)

    pro_before = float(steps[np.searchsorted(anomalous, crossing, side="right") :].sum())  # PRO(> crossing)
    pro_after = float(steps[np.searchsorted(anomalous, crossing, side="left") :].sum())  # PRO(>= crossing)
    fpr_before = above.size / n_normal
    fpr_after = (above.size + n_tied) / n_normal
    width = fpr_limit - fpr_before
    pro_at_limit = pro_before + (pro_after - pro_before) * width / (fpr_after - fpr_before)
    area += width * (pro_before + pro_at_limit) / 2.0
    # The integrated FPRs span [0, fpr_limit] exactly, so "limit", "max" and "minmax" all divide by it.
    return area / fpr_limit


def _aupro_thresholded(
    maps: np.ndarray,
    masks: np.ndarray,
    ids: np.ndarray,
    sizes: np.ndarray,
    fpr_limit: float,
    num_thresholds: int,
    normalization: str,
) -> float:
    low, high = maps.min(), maps.max()
    if high <= low:
        return math.nan  # a constant map has no threshold range
    # As the official code: min, max and step are scalars of the maps' dtype (so the step of float32 maps
    # is rounded to float32), arange excludes the max and may yield num_thresholds + 1 values by rounding.
    thresholds = np.arange(low, high, (high - low) / num_thresholds)
    n_bins = thresholds.size + 1
    # A pixel is predicted anomalous at threshold j (score > thresholds[j]) iff j < its bin, where the bin
    # is the number of thresholds strictly below the score. Histograms over bins then give every threshold.
    region_bins = ids * n_bins + np.searchsorted(thresholds, maps[masks], side="left")
    region_hist = np.bincount(region_bins, minlength=sizes.size * n_bins).reshape(sizes.size, n_bins)
    true_positives = np.cumsum(region_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    pro = (true_positives / sizes[:, None]).mean(axis=0)

    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    normal_hist = np.zeros(n_bins, dtype=np.int64)
    for start in range(0, flat_maps.size, _CHUNK):
        chunk = flat_maps[start : start + _CHUNK][~flat_masks[start : start + _CHUNK]]
        normal_hist += np.bincount(np.searchsorted(thresholds, chunk, side="left"), minlength=n_bins)
    n_normal = int(normal_hist.sum())
    fpr = np.cumsum(normal_hist[::-1])[::-1][1:] / n_normal

    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2:
        return math.nan  # sklearn's auc needs two points; the official code fails here
    if normalization == "minmax":
        span, offset = fpr.max() - fpr.min(), fpr.min()
    elif normalization == "max":
        span, offset = fpr.max(), 0.0
    else:
        span, offset = fpr_limit, 0.0
    if span <= 0:
        return math.nan  # 0/0 FPRs, as in the official code
    fpr = (fpr - offset) / span
    # Points are in threshold order, so FPR decreases; sklearn's auc flips the sign of such a curve.
    return float(-np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)


def aupro(
    maps: Any,
    masks: Any,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
    fpr_normalization: str | None = None,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Regions are the 8-connected components of each mask image. FPR is pooled over all normal pixels of
    all images (normal images included); PRO is the mean over all regions of all images of the fraction of
    the region predicted anomalous.

    Args:
        maps: anomaly maps ``[N, H, W]`` or ``[H, W]``, any real dtype.
        masks: binary ground-truth masks of the same shape.
        fpr_limit: upper FPR integration limit, in (0, 1].
        num_thresholds: ``None`` (default) for the exact MVTec AUPRO: every distinct score is a threshold
            (``score >= t``), the curve is interpolated exactly at ``fpr_limit`` and the area divided by it,
            so a perfect map scores 1. An integer ``K`` gives the variant of the official MRAD/AnomalyCLIP
            (and RAD) code: thresholds ``arange(min, max, (max - min) / K)`` over all maps, ``score > t``,
            only points with ``FPR < fpr_limit`` kept, FPRs normalised, trapezoid area.
        fpr_normalization: how the thresholded variant rescales the kept FPRs: ``"minmax"`` (its default;
            MRAD/AnomalyCLIP), ``"max"`` (RAD/cflow code) or ``"limit"``. For the exact curve all three
            equal division by ``fpr_limit`` (its default).

    Returns:
        The normalised area. NaN when there is no anomalous or no normal pixel; for the thresholded
        variant also when the maps are constant, fewer than two points are kept, or the FPR normaliser
        is 0 (e.g. a perfect map with ``"minmax"``, where the official code yields NaN as well).
    """
    settings = resolve_aupro_settings(fpr_limit, num_thresholds, fpr_normalization)
    map_array, mask_array = _maps_masks_arrays(maps, masks)
    ids, sizes = _region_ids(mask_array)
    if sizes.size == 0 or ids.size == mask_array.size:
        return math.nan
    if settings["num_thresholds"] is None:
        return _aupro_exact(map_array, mask_array, ids, sizes, settings["fpr_limit"])
    return _aupro_thresholded(
        map_array,
        mask_array,
        ids,
        sizes,
        settings["fpr_limit"],
        settings["num_thresholds"],
        settings["fpr_normalization"],
    )
