import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.measure import label, regionprops
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from anomret.metrics.functional import aupro, auroc, average_precision, binary_metrics, f1_max

# ------------------------------------------------------------------------- independent references


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """MVTec AUPRO by definition: one full pass over the pixels per distinct threshold."""
    regions = []
    for image, mask in enumerate(masks):
        labelled = label(mask, connectivity=2)
        regions += [(image, labelled == r) for r in range(1, labelled.max() + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[image][region].mean() for image, region in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def official_thresholded_aupro(
    maps: np.ndarray, masks: np.ndarray, limit: float, steps: int, normalization: str
) -> float:
    """The loop of the official MRAD/AnomalyCLIP/RAD evaluation code (one pass per threshold)."""
    low, high = maps.min(), maps.max()
    fprs, pros = [], []
    for threshold in np.arange(low, high, (high - low) / steps):
        binary = maps > threshold
        region_pros = []
        for prediction, mask in zip(binary, masks, strict=True):
            for region in regionprops(label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                region_pros.append(prediction[rows, cols].sum() / region.area)
        fprs.append(np.logical_and(~masks, binary).sum() / (~masks).sum())
        pros.append(np.mean(region_pros))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    fprs, pros = fprs[keep], pros[keep]
    if normalization == "minmax":
        fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    elif normalization == "max":
        fprs = fprs / fprs.max()
    else:
        fprs = fprs / limit
    return auc(fprs, pros)


def random_maps_masks(seed: int, n: int = 5, size: int = 16, levels: int | None = None):
    """Blobby masks (several irregular regions, some images normal) and maps correlated with them."""
    rng = np.random.default_rng(seed)
    field = np.stack([gaussian_filter(rng.random((size, size)), 1.2) for _ in range(n)])
    masks = field > np.quantile(field, 0.85)
    masks[: n // 3] = False  # normal images count in the FPR denominator
    maps = 0.6 * masks + rng.random(masks.shape)
    if levels is not None:
        maps = np.round(maps * levels) / levels  # heavy ties
    return maps, masks


# ----------------------------------------------------------------------------- AUROC / AP / F1-max


def test_hand_worked_tiny_case():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    # 3 of the 4 (positive, negative) pairs are ordered correctly.
    assert auroc(scores, labels) == pytest.approx(0.75, abs=1e-15)
    # Thresholds 0.8 -> (P 1, R 1/2), 0.35 -> (P 2/3, R 1): AP = 1/2 * 1 + 1/2 * 2/3.
    assert average_precision(scores, labels) == pytest.approx(5 / 6, abs=1e-15)
    # F1 at 0.8 = 2/3, at 0.4 = 1/2, at 0.35 = 4/5, at 0.1 = 2/3.
    assert f1_max(scores, labels) == pytest.approx(0.8, abs=1e-15)
    # A tie between a positive and a negative counts one half: (0.5 + 1 + 2) / 4.
    tied = torch.tensor([0.5, 0.5, 0.2, 0.9])
    assert auroc(tied, torch.tensor([1, 0, 0, 1])) == pytest.approx(0.875, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 12])
def test_binary_metrics_match_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    labels = rng.random(n) < rng.uniform(0.05, 0.7)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if levels is not None:
        scores = np.round(scores * levels / 3)  # few distinct values: heavy ties across both classes
    scores = scores * 1e6 - 50  # far outside [0, 1]: a sigmoid or clamp would destroy the ordering
    got = binary_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), rel=1e-12, abs=1e-15)
    assert got["average_precision"] == pytest.approx(average_precision_score(labels, scores), rel=1e-12)
    assert got["f1_max"] == pytest.approx(sklearn_f1_max(scores, labels), rel=1e-12)


def test_invariant_to_monotone_transforms_and_label_dtypes():
    rng = np.random.default_rng(7)
    raw = rng.integers(-20, 20, size=500).astype(np.float64)
    labels = rng.random(500) < 0.3 + 0.02 * (raw > 0)
    transformed = 1e6 * raw**3 - 50  # strictly increasing and exact on these integers
    for fn in (auroc, average_precision, f1_max):
        expected = fn(torch.from_numpy(raw), torch.from_numpy(labels))
        assert fn(torch.from_numpy(transformed), torch.from_numpy(labels)) == expected
        assert fn(torch.from_numpy(raw).float(), torch.from_numpy(labels).int()) == expected
        assert fn(torch.from_numpy(raw).half(), torch.from_numpy(labels).double()) == expected
        assert fn(torch.from_numpy(raw).view(25, 20), torch.from_numpy(labels).view(25, 20)) == expected
    # Reversing the order flips AUROC around 1/2.
    assert auroc(torch.from_numpy(-raw), torch.from_numpy(labels)) == pytest.approx(
        1 - auroc(torch.from_numpy(raw), torch.from_numpy(labels)), abs=1e-15
    )


def test_large_scores_keep_exact_order():
    # Differences far below 1 on top of 1e6: exact in float64, lost by any squashing or float32 cast.
    scores = torch.tensor([1e6, 1e6 + 1e-4, 1e6 + 2e-4, 1e6 + 3e-4], dtype=torch.float64)
    labels = torch.tensor([False, False, True, True])
    assert auroc(scores, labels) == 1.0
    assert average_precision(scores, labels) == 1.0
    assert f1_max(scores, labels) == 1.0


@pytest.mark.parametrize("fn", [auroc, average_precision, f1_max])
def test_single_class_is_nan(fn):
    assert math.isnan(fn(torch.rand(10), torch.zeros(10)))
    assert math.isnan(fn(torch.rand(10), torch.ones(10, dtype=torch.bool)))


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (torch.rand(4), torch.tensor([0, 1, 0]), "same shape"),
        (torch.rand(0), torch.zeros(0), "empty"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "NaN or infinite"),
        (torch.tensor([0.1, float("inf")]), torch.tensor([0, 1]), "NaN or infinite"),
        (torch.tensor([0.1, 0.2]), torch.tensor([0, 2]), "binary"),
        (torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.5]), "binary"),
    ],
)
def test_malformed_input_raises(scores, labels, message):
    for fn in (auroc, average_precision, f1_max):
        with pytest.raises(ValueError, match=message):
            fn(scores, labels)
    if scores.numel() and scores.shape == labels.shape:
        with pytest.raises(ValueError, match=message):
            aupro(scores.view(1, 1, -1), labels.view(1, 1, -1))


def test_unknown_binary_metric_raises():
    with pytest.raises(ValueError, match="valid"):
        binary_metrics(torch.rand(4), torch.tensor([0, 1, 0, 1]), ["auroc", "iou"])


# ------------------------------------------------------------------------------------ exact AUPRO


def test_aupro_hand_worked():
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[1:3, 1:3] = True  # one 2x2 region, 12 normal pixels
    perfect = masks.float()
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-15)
    assert aupro(1 - perfect, masks) == pytest.approx(0.0, abs=1e-15)

    # Normals: one at 0.95, eleven tied at 0.5; region: two at 0.9, two at 0.5 (tied with the normals).
    # Curve: (0,0) -> (1/12, 0) -> (1/12, 1/2) -> (1, 1). At FPR 0.3 the last segment is at
    # PRO = 1/2 + 1/2 * (13/60) / (11/12) = 34/55, so the area is 13/60 * (1/2 + 34/55) / 2 = 1599/13200,
    # divided by 0.3: 533/1320.
    maps = torch.full((4, 4), 0.5)
    maps[0, 0] = 0.95
    maps[1, 1] = maps[1, 2] = 0.9
    assert aupro(maps, masks) == pytest.approx(533 / 1320, abs=1e-14)
    # Same curve up to 1/12, then flat at PRO 1 when the low region pixels (0.1) beat the normals (0.0).
    maps = torch.zeros(4, 4)
    maps[0, 0] = 0.95
    maps[1, 1] = maps[1, 2] = 0.9
    maps[2, 1] = maps[2, 2] = 0.1
    assert aupro(maps, masks) == pytest.approx(13 / 18, abs=1e-14)


def test_aupro_uses_8_connectivity():
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 2, 3] = True  # diagonal contact only
    maps = np.linspace(0.1, 0.5, 25).reshape(1, 5, 5)
    maps[0, 1, 1], maps[0, 2, 2], maps[0, 2, 3] = 1.0, 0.0, 0.0
    # 8-connected: one region of 3 pixels, PRO = 1/3 all the way. 4-connected it would be two regions,
    # PRO = (1 + 0) / 2.
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(1 / 3, abs=1e-14)
    assert len(regionprops(label(masks[0], connectivity=1))) == 2  # the case does tell them apart


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 6])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_exact_matches_brute_force(seed, levels, limit):
    maps, masks = random_maps_masks(seed, levels=levels)
    got = aupro(torch.from_numpy(maps).float(), torch.from_numpy(masks), fpr_limit=limit)
    expected = brute_force_aupro(maps.astype(np.float32), masks, limit)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_aupro_exact_with_few_normal_pixels_and_2d_input():
    # 4 normal pixels: the FPR limit falls inside a single normal step, so interpolation does the work.
    rng = np.random.default_rng(3)
    masks = np.ones((1, 4, 4), dtype=bool)
    masks[0, 0, :] = False
    masks[0, 2, :] = False
    masks[0, 0, 0] = masks[0, 3, 3] = True  # leaves 6 normal pixels, 3 regions (8-connected)
    maps = rng.random((1, 4, 4))
    expected = brute_force_aupro(maps, masks, 0.3)
    assert aupro(torch.from_numpy(maps[0]), torch.from_numpy(masks[0])) == pytest.approx(expected, rel=1e-12)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, rel=1e-12)


def test_aupro_undefined_and_invalid():
    maps = torch.rand(2, 8, 8)
    assert math.isnan(aupro(maps, torch.zeros(2, 8, 8)))
    assert math.isnan(aupro(maps, torch.ones(2, 8, 8)))
    assert math.isnan(aupro(maps, torch.zeros(2, 8, 8), num_thresholds=200))
    with pytest.raises(ValueError, match="N, H, W"):
        aupro(torch.rand(2, 2, 4, 4), torch.ones(2, 2, 4, 4))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, maps > 0.5, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_normalization"):
        aupro(maps, maps > 0.5, fpr_normalization="sigmoid")
    with pytest.raises(ValueError, match="num_thresholds"):
        aupro(maps, maps > 0.5, num_thresholds=0)


def test_aupro_never_rescales():
    maps, masks = random_maps_masks(11, levels=None)
    base = aupro(torch.from_numpy(maps), torch.from_numpy(masks))
    assert aupro(torch.from_numpy(maps * 1e6 - 50), torch.from_numpy(masks)) == pytest.approx(base, rel=1e-12)


# ------------------------------------------------------------------------------- thresholded AUPRO


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("normalization", ["minmax", "max", "limit"])
@pytest.mark.parametrize("steps", [200, 37])
def test_aupro_thresholded_matches_official_loop(seed, normalization, steps):
    maps, masks = random_maps_masks(seed, n=4, size=14, levels=20 if seed == 2 else None)
    if seed == 1:
        maps = maps.astype(np.float32)  # thresholds then come from float32 min, max and step
    got = aupro(
        torch.from_numpy(maps), torch.from_numpy(masks), num_thresholds=steps, fpr_normalization=normalization
    )
    expected = official_thresholded_aupro(maps, masks, 0.3, steps, normalization)
    assert got > 0
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_aupro_thresholded_default_normalization_is_minmax():
    maps, masks = random_maps_masks(5)
    maps_t, masks_t = torch.from_numpy(maps), torch.from_numpy(masks)
    default = aupro(maps_t, masks_t, num_thresholds=200)
    assert default == aupro(maps_t, masks_t, num_thresholds=200, fpr_normalization="minmax")
    assert default != aupro(maps_t, masks_t, num_thresholds=200, fpr_normalization="limit")
    # A perfect map has FPR 0 at every threshold: 0/0 FPRs, NaN as in the official code.
    assert math.isnan(aupro(masks_t.float(), masks_t, num_thresholds=200))
