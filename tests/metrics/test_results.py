import csv
import json
import math

import pytest
from rich.console import Console

from anomret.metrics.results import EvaluationResult

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


@pytest.fixture
def result() -> EvaluationResult:
    return EvaluationResult(
        per_category={
            "bottle": {"image_auroc": 0.98765, "pixel_auroc": 0.9, "pixel_aupro": 0.812345678901234},
            "brain": {"image_auroc": 0.5, "pixel_auroc": math.nan, "pixel_aupro": math.nan},
            "cable": {"image_auroc": 0.75, "pixel_auroc": 0.8, "pixel_aupro": math.nan},
        },
        counts={
            "bottle": {"n_images": 83, "n_anomalous": 63},
            "brain": {"n_images": 10, "n_anomalous": 5},
            "cable": {"n_images": 150, "n_anomalous": 92},
        },
        metrics=METRICS,
        settings={"aupro": {"fpr_limit": 0.3, "num_thresholds": None, "fpr_normalization": "limit"}},
    )


def test_mean_is_unweighted_and_skips_nan(result):
    mean = result.mean
    assert mean["image_auroc"] == pytest.approx((0.98765 + 0.5 + 0.75) / 3, abs=1e-15)
    assert mean["pixel_auroc"] == pytest.approx(0.85, abs=1e-15)
    assert mean["pixel_aupro"] == 0.812345678901234
    result.per_category["bottle"]["pixel_aupro"] = math.nan
    assert math.isnan(result.mean["pixel_aupro"])


def test_json_schema_and_round_trip(result, tmp_path):
    path = result.write_json(tmp_path / "out" / "results.json")
    assert path == tmp_path / "out" / "results.json"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert set(data) == {"metrics", "categories", "mean", "settings"}
    assert data["metrics"] == list(METRICS)
    assert data["categories"]["brain"] == {
        "image_auroc": 0.5,
        "pixel_auroc": None,
        "pixel_aupro": None,
        "n_images": 10,
        "n_anomalous": 5,
    }
    assert data["categories"]["bottle"]["pixel_aupro"] == 0.812345678901234  # unrounded
    assert data["mean"]["pixel_auroc"] == pytest.approx(0.85)
    assert data["settings"]["aupro"]["num_thresholds"] is None

    loaded = EvaluationResult.read_json(path)
    assert loaded.metrics == result.metrics
    assert loaded.counts == result.counts
    assert loaded.settings == result.settings
    for name, values in result.per_category.items():
        for key, value in values.items():
            assert loaded.per_category[name][key] == value or (
                math.isnan(value) and math.isnan(loaded.per_category[name][key])
            )


def test_csv_content(result, tmp_path):
    path = result.write_csv(tmp_path / "results.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["category", *METRICS, "n_images", "n_anomalous"]
    assert rows[1] == ["bottle", "0.98765", "0.9", "0.812345678901234", "83", "63"]
    assert rows[2] == ["brain", "0.5", "", "", "10", "5"]
    assert rows[3][0] == "cable"
    assert rows[4][0] == "mean" and len(rows) == 5
    assert float(rows[4][1]) == result.mean["image_auroc"]  # full precision
    assert rows[4][2:4] == [repr(result.mean["pixel_auroc"]), "0.812345678901234"]


def test_rich_table_shows_percent_with_one_decimal(result):
    console = Console(record=True, width=160)
    console.print(result.rich_table(title="MVTec AD"))
    text = console.export_text()
    assert "MVTec AD" in text and "I-AUROC" in text and "AUPRO" in text
    bottle = next(line for line in text.splitlines() if "bottle" in line)
    assert "98.8" in bottle and "90.0" in bottle and "81.2" in bottle and "83 (63)" in bottle
    brain = next(line for line in text.splitlines() if "brain" in line)
    assert brain.count("–") == 2 and "50.0" in brain
    mean = next(line for line in text.splitlines() if "mean" in line)
    assert f"{100 * result.mean['image_auroc']:.1f}" in mean and "85.0" in mean and "81.2" in mean
    assert "exact, FPR ≤ 0.3" in text


def test_rich_table_mean_row_is_bold(result):
    table = result.rich_table()
    assert table.rows[-1].style == "bold"
    assert table.rows[-1].end_section is False and table.rows[-2].end_section is True


def test_rich_table_names_the_thresholded_aupro_variant(result):
    result.settings["aupro"] = {"fpr_limit": 0.3, "num_thresholds": 200, "fpr_normalization": "minmax"}
    console = Console(record=True, width=200)
    console.print(result.rich_table())
    assert "200 thresholds, FPR < 0.3, minmax" in console.export_text()
