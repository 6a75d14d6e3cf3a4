import logging
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomret.metrics import functional
from anomret.metrics.classes import AUPRO, AUROC, AveragePrecision, F1Max
from anomret.metrics.evaluator import METRIC_KEYS, CategoryEvaluator


def make_category(seed: int, n: int = 12, size: int = 10, n_normal: int = 4):
    """Image scores, labels, maps and masks of one category; the first ``n_normal`` images are normal."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n_normal, n):
        r, c = torch.randint(0, size - 3, (2,), generator=gen).tolist()
        masks[i, r : r + 3, c : c + 2] = True
        masks[i, (r + 5) % size, (c + 4) % size] = True  # a second, one-pixel region
    maps = torch.rand(n, size, size, generator=gen) + 0.5 * masks
    labels = masks.flatten(1).any(1)
    scores = maps.flatten(1).amax(1) + 0.3 * torch.randn(n, generator=gen)
    return scores, labels, maps, masks


# -------------------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    ("cls", "fn"),
    [(AUROC, functional.auroc), (AveragePrecision, functional.average_precision), (F1Max, functional.f1_max)],
)
def test_binary_metric_classes_equal_one_shot_functional(cls, fn):
    gen = torch.Generator().manual_seed(0)
    preds = torch.randn(7, 30, generator=gen) * 40  # raw scores, far outside [0, 1]
    target = torch.rand(7, 30, generator=gen) < 0.3
    metric = cls()
    for i in range(7):
        metric.update(preds[i].view(5, 6), target[i].view(5, 6).int())
    assert metric.compute().item() == fn(preds, target)
    metric.reset()
    metric.update(preds[:2], target[:2])
    assert metric.compute().item() == fn(preds[:2], target[:2])


def test_auroc_class_matches_sklearn_on_raw_scores():
    # torchmetrics' own binary metrics would apply a sigmoid to these batches (values outside [0, 1]).
    rng = np.random.default_rng(1)
    preds = rng.normal(size=400) * 100
    target = rng.random(400) < 0.4
    metric, ap = AUROC(), AveragePrecision()
    for chunk in np.array_split(np.arange(400), 9):
        metric.update(torch.from_numpy(preds[chunk]), torch.from_numpy(target[chunk]))
        ap.update(torch.from_numpy(preds[chunk]), torch.from_numpy(target[chunk]))
    assert metric.compute().item() == pytest.approx(
        roc_auc_score(target, preds.astype(np.float32)), rel=1e-12
    )
    assert ap.compute().item() == pytest.approx(
        average_precision_score(target, preds.astype(np.float32)), rel=1e-12
    )


def test_aupro_class_equals_functional_and_states_are_compact():
    _, _, maps, masks = make_category(2)
    for settings in ({}, {"num_thresholds": 200}, {"num_thresholds": 50, "fpr_normalization": "max"}):
        metric = AUPRO(**settings)
        for i in range(0, 12, 5):
            metric.update(maps[i : i + 5].double(), masks[i : i + 5].float())
        assert metric.maps[0].dtype == torch.float32 and metric.masks[0].dtype == torch.bool
        assert metric.compute().item() == pytest.approx(functional.aupro(maps, masks, **settings), abs=1e-15)


def test_class_states_do_not_alias_caller_tensors():
    preds, target = torch.tensor([0.1, 0.9, 0.4, 0.2]), torch.tensor([False, True, True, False])
    metric = AUROC()
    metric.update(preds, target)
    preds.neg_()  # the caller reuses its buffer
    assert metric.compute().item() == 1.0


def test_classes_reject_bad_input():
    with pytest.raises(ValueError, match="binary"):
        AUROC().update(torch.rand(4), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        F1Max().update(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        AveragePrecision().update(torch.rand(4), torch.zeros(5))
    metric = AUPRO()
    metric.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="earlier batches"):
        metric.update(torch.rand(2, 8, 9), torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match="fpr_normalization"):
        AUPRO(fpr_normalization="softmax")


# ------------------------------------------------------------------------------------ evaluator


def expected_values(scores, labels, maps, masks, **aupro_settings) -> dict[str, float]:
    return {
        "image_auroc": functional.auroc(scores, labels),
        "image_ap": functional.average_precision(scores, labels),
        "image_f1max": functional.f1_max(scores, labels),
        "pixel_auroc": functional.auroc(maps, masks),
        "pixel_ap": functional.average_precision(maps, masks),
        "pixel_f1max": functional.f1_max(maps, masks),
        "pixel_aupro": functional.aupro(maps, masks, **aupro_settings),
    }


def interleaved_batches(data: dict[str, tuple], batch_size: int, seed: int = 0):
    """Shuffle the images of all categories together and cut them into mixed-category batches."""
    rows = [(name, i) for name, (scores, *_) in data.items() for i in range(len(scores))]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[i] for i in order]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield (
            [name for name, _ in chunk],
            *(torch.stack([data[name][k][i] for name, i in chunk]) for k in range(4)),
        )


def test_evaluator_per_category_values_and_unweighted_mean(caplog):
    data = {
        "bottle": make_category(0, n=12),
        "cable": make_category(1, n=20, n_normal=3),
        "zip": make_category(3),
    }
    evaluator = CategoryEvaluator()
    for names, scores, labels, maps, masks in interleaved_batches(data, batch_size=7):
        evaluator.update(names, scores, labels, maps, masks.unsqueeze(1).float())
    with caplog.at_level(logging.DEBUG, logger="anomret.metrics.evaluator"):
        result = evaluator.compute()
    assert "computed in" in caplog.text

    assert set(result.per_category) == set(data)
    assert result.metrics == METRIC_KEYS
    for name, (scores, labels, maps, masks) in data.items():
        expected = expected_values(scores, labels, maps, masks)
        assert result.per_category[name] == pytest.approx(expected, abs=1e-15)
        assert result.counts[name] == {"n_images": len(scores), "n_anomalous": int(labels.sum())}
    for key in METRIC_KEYS:
        # Unweighted: the 20-image category counts as much as the 12-image ones.
        values = [result.per_category[name][key] for name in data]
        assert result.mean[key] == pytest.approx(sum(values) / 3, abs=1e-15)
    assert result.settings["aupro"] == {
        "fpr_limit": 0.3,
        "num_thresholds": None,
        "fpr_normalization": "limit",
    }
    # compute() is repeatable (the concatenated chunks are reused).
    assert evaluator.compute().per_category == result.per_category


def test_evaluator_subset_thresholded_aupro_and_reset():
    scores, labels, maps, masks = make_category(4)
    evaluator = CategoryEvaluator(metrics=["pixel_aupro", "image_auroc"], aupro_num_thresholds=200)
    evaluator.update("screw", scores, labels, maps, masks)
    result = evaluator.compute()
    assert result.metrics == ("image_auroc", "pixel_aupro")  # canonical order
    assert result.per_category["screw"] == pytest.approx(
        {
            "image_auroc": functional.auroc(scores, labels),
            "pixel_aupro": functional.aupro(maps, masks, num_thresholds=200, fpr_normalization="minmax"),
        },
        abs=1e-15,
    )
    assert result.settings["aupro"]["fpr_normalization"] == "minmax"
    evaluator.reset()
    assert evaluator.compute().per_category == {}


def test_evaluator_image_only_and_nan_handling():
    evaluator = CategoryEvaluator()
    scores_a, labels_a, _, _ = make_category(5)
    evaluator.update(["brain"] * 12, scores_a, labels_a)  # image-only dataset: no maps
    scores_b, labels_b, maps_b, masks_b = make_category(6)
    evaluator.update(["all_normal"] * 4, scores_b[:4], labels_b[:4], maps_b[:4], masks_b[:4])
    evaluator.update(["pixels"] * 12, scores_b, labels_b, maps_b, masks_b)
    result = evaluator.compute()

    brain = result.per_category["brain"]
    assert brain["image_auroc"] == functional.auroc(scores_a, labels_a)
    assert all(math.isnan(brain[key]) for key in METRIC_KEYS if key.startswith("pixel_"))
    # A category with only normal images: every metric is undefined.
    assert all(math.isnan(v) for v in result.per_category["all_normal"].values())
    # The mean skips undefined categories: pixel metrics come from "pixels" alone.
    assert result.mean["pixel_auroc"] == functional.auroc(maps_b, masks_b)
    assert result.mean["image_auroc"] == pytest.approx(
        (brain["image_auroc"] + functional.auroc(scores_b, labels_b)) / 2
    )

    only_normal = CategoryEvaluator(metrics=["image_auroc"])
    only_normal.update("x", torch.rand(3), torch.zeros(3))
    assert math.isnan(only_normal.compute().mean["image_auroc"])


def test_evaluator_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="valid metrics"):
        CategoryEvaluator(metrics=["image_auroc", "pixel_iou"])
    with pytest.raises(ValueError, match="fpr_limit"):
        CategoryEvaluator(aupro_fpr_limit=1.5)
    evaluator = CategoryEvaluator()
    with pytest.raises(ValueError, match="batch sizes"):
        evaluator.update(["a", "b"], torch.rand(3), torch.zeros(3))
    with pytest.raises(ValueError, match="together"):
        evaluator.update("a", torch.rand(2), torch.zeros(2), maps=torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="B, H, W"):
        evaluator.update("a", torch.rand(2), torch.zeros(2), torch.rand(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="binary"):
        evaluator.update("a", torch.rand(2), torch.tensor([0, 3]))
    evaluator.update("a", torch.rand(2), torch.zeros(2))
    with pytest.raises(ValueError, match="some batches"):
        evaluator.update("a", torch.rand(2), torch.zeros(2), torch.rand(2, 4, 4), torch.zeros(2, 4, 4))


def test_evaluator_does_not_keep_maps_for_image_metrics_only():
    evaluator = CategoryEvaluator(metrics=["image_auroc", "image_ap"])
    scores, labels, maps, masks = make_category(7)
    evaluator.update("a", scores, labels, maps, masks)
    assert evaluator._data["a"].maps == []
    assert evaluator.compute().per_category["a"]["image_ap"] == functional.average_precision(scores, labels)


def test_evaluator_owns_its_data():
    # A caller that reuses its buffers (or passes views of a larger tensor) must not change the results.
    scores, labels, maps, masks = make_category(8)
    expected = expected_values(scores, labels, maps, masks)
    evaluator = CategoryEvaluator()
    buffers = [t.clone() for t in (scores, labels, maps, masks)]
    evaluator.update("a", *buffers)
    for buffer in buffers:
        buffer.zero_()
    assert evaluator.compute().per_category["a"] == pytest.approx(expected, abs=1e-15)


def test_evaluator_keeps_float64_image_scores_across_mixed_batches():
    # Differences below float32 resolution must survive storage and concatenation.
    scores = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12, 1.0 + 3e-12], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    evaluator = CategoryEvaluator(metrics=["image_auroc"])
    evaluator.update("a", scores[:1].float(), labels[:1])
    evaluator.update("a", scores[1:], labels[1:])
    assert evaluator.compute().per_category["a"]["image_auroc"] == 1.0
