"""Calibrated runs end to end: which images set the thresholds, what results.json and predictions.csv
report at them, and the calibrations that are refused."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from anomret.contracts import Purpose, check_config
from anomret.data.synthetic import SyntheticSpec, generate_domain
from anomret.decisions.calibration import CalibrationError, held_out_images
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.metrics.thresholds import f1_optimal_threshold
from anomret.pipeline import run


def test_holdout_calibration_reports_the_metrics_of_its_decisions(compose_config, tmp_path):
    cfg = compose_config(["+experiment=demo", "calibration=normal_holdout", "logger=none"])
    result = run(cfg, fit=True)
    out = tmp_path / "run"
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert json.loads((out / "artifacts.json").read_text())["thresholds"] == str(out / "thresholds.json")
    assert thresholds["calibration"]["images"] == "holdout" and thresholds["calibration"]["n_anomalous"] == 0
    held_out = held_out_images(cfg)
    assert thresholds["calibration"]["n_images"] == len(held_out) == 6  # 20 % of 10 per category
    assert thresholds["achieved"]["image_fpr"] <= 0.01 and thresholds["achieved"]["pixel_fpr"] <= 0.01
    assert (
        json.loads((out / "results.json").read_text())["settings"]["thresholds"]["image"]
        == thresholds["image"]
    )

    # The thresholded metrics are those of the per-image decisions, computed independently here.
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == sum(count["n_images"] for count in result.counts.values())
    for category in result.per_category:
        mine = [row for row in rows if row["category"] == category]
        truth = [int(row["true_label"]) for row in mine]
        flagged = [row["label"] == "anomalous" for row in mine]
        assert flagged == [float(row["image_score"]) >= thresholds["image"] for row in mine]
        values = result.per_category[category]
        for key, metric in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            expected = metric(truth, flagged, zero_division=np.nan)
            got = values[f"image_{key}"]
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected), (
                category,
                key,
            )
        assert 0 <= values["pixel_recall"] <= 1
    # The threshold-free metrics do not move.
    plain = run(
        compose_config(["+experiment=demo", "logger=none", f"paths.output_dir={tmp_path / 'plain'}"]),
        fit=True,
    )
    assert plain.mean["image_auroc"] == result.mean["image_auroc"] and "image_f1" not in plain.metrics


def test_labelled_calibration_is_f1_optimal_on_a_validation_dataset(compose_config, tmp_path, data_dir):
    # Another seed of the same domain: the same categories, other images (a validation set).
    validation = generate_domain(tmp_path / "validation", "synthetic_a", SyntheticSpec(seed=1))
    cfg = compose_config(
        [
            "+experiment=demo",
            "calibration=labelled",
            f"calibration.dataset.root={validation}",
            "calibration.dataset.name=synthetic_a",
            "calibration.normalize=true",
            "logger=none",
        ],
        "eval",
    )
    bank = tmp_path / "bank.safetensors"
    run(compose_config(["+experiment=demo", f"memory.path={bank}", "logger=none"]), fit=True)
    cfg.memory.path = str(bank)
    run(cfg, fit=False)
    out = tmp_path / "run"
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["method"] == "f1" and thresholds["calibration"]["n_anomalous"] == 24
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert all(0.0 <= float(row["normalized_score"]) <= 1.0 for row in rows)
    assert all((float(row["normalized_score"]) >= 0.5) == (row["label"] == "anomalous") for row in rows)
    # F1-optimal on the validation images themselves: scoring them through predict gives the same threshold.
    predicted = compose_config(
        [
            "+experiment=demo",
            f"memory.path={bank}",
            f"input={validation}",
            f"paths.output_dir={tmp_path / 'p'}",
        ],
        "predict",
    )
    from anomret.pipeline import predict

    scores = {
        row["image_path"]: float(row["image_score"]) for row in csv.DictReader(predict(predicted).open())
    }
    meta = json.loads((validation / "meta.json").read_text())["test"]
    labelled = [(scores[str(validation / r["img_path"])], r["anomaly"]) for c in meta.values() for r in c]
    assert thresholds["image"] == pytest.approx(
        f1_optimal_threshold(
            np.array([s for s, _ in labelled], np.float32), np.array([a for _, a in labelled])
        ),
        abs=1e-6,
    )


def test_rad_memory_leaves_the_held_out_images_out_and_a_full_memory_is_refused(compose_config, tmp_path):
    bank = tmp_path / "bank.safetensors"
    cfg = compose_config(["+experiment=demo_rad", "calibration=normal_holdout", f"memory.path={bank}"])
    run(cfg, fit=True)
    in_memory = {row[0] for row in NormalMemoryBank.load(bank).metadata["images"]}
    held_out = {str(sample.image_path) for sample in held_out_images(cfg)}
    assert len(held_out) == 6 and not held_out & in_memory and len(in_memory) == 24

    full = tmp_path / "full.safetensors"
    run(
        compose_config(["+experiment=demo_rad", f"memory.path={full}", f"paths.output_dir={tmp_path / 'f'}"]),
        fit=True,
    )
    refused = compose_config(
        ["+experiment=demo_rad", "calibration=normal_holdout", f"memory.path={full}"], "eval"
    )
    with pytest.raises(CalibrationError, match="in the memory bank"):
        run(refused, fit=False)


def test_calibrations_that_cannot_be_honest_are_refused_before_any_compute(compose_config, tmp_path):
    reported = compose_config(
        ["+experiment=demo", "calibration=labelled", "calibration.dataset.root=${dataset.root}"]
    )
    with pytest.raises(CalibrationError, match="oracle"):
        check_config(reported, Purpose.TRAIN)
    with pytest.raises(CalibrationError, match="labelled anomalous images"):
        check_config(
            compose_config(["+experiment=demo", "calibration=normal_holdout", "calibration.method=f1"]),
            Purpose.TRAIN,
        )
    with pytest.raises(CalibrationError, match=r"calibration\.target_fpr"):
        check_config(
            compose_config(["+experiment=demo", "calibration=normal_holdout", "calibration.target_fpr=1.5"]),
            Purpose.TRAIN,
        )
    # A folder of test images is caught by its paths.
    folder = compose_config(
        [
            "+experiment=demo",
            "calibration=normal_folder",
            "calibration.folder=${dataset.root}/pill/test/good",
            "logger=none",
        ]
    )
    with pytest.raises(CalibrationError, match="test images this run reports"):
        run(folder, fit=True)
