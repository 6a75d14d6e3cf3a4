"""The sweep report: fake multirun trees in, table rows, CSV/markdown/PNG files and MRAD's Table 1 out."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from anomret.metrics.evaluator import METRIC_KEYS
from anomret.metrics.results import EvaluationResult
from anomret.report import main
from anomret.reporting.sweep import PAPER_DATASETS, ReportError, collect, paper_table

NAN = math.nan


def _values(base: float, step: float = 0.01, **overrides: float) -> dict[str, float]:
    """Every metric ``base + i * step`` (i = its position in METRIC_KEYS), some replaced."""
    values = {key: base + i * step for i, key in enumerate(METRIC_KEYS)}
    values.update(overrides)
    return values


def _job(
    root: Path,
    name: str,
    overrides: list[str],
    categories: dict[str, dict[str, float]] | None,
    method: str = "mrad_tf",
    dataset: str = "mvtec",
) -> Path:
    """A job directory as Hydra and anomret.train leave it; ``categories=None``: the job did not finish."""
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if categories is not None:
        counts = {c: {"n_images": 10, "n_anomalous": 5} for c in categories}
        settings = {"run": {"method": method, "dataset": dataset}}
        EvaluationResult(categories, counts, METRIC_KEYS, settings).write_json(path / "results.json")
    return path


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """A 2×2 multirun over retrieval_weight × top_k_ratio; categories a, b with hand-picked values."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    number = 0
    for weight in ("0.5", "1.0"):
        for top_k in ("0.01", "0.1"):
            a = 0.5 + 0.1 * float(weight) + float(top_k)
            _job(
                sweep,
                str(number),
                [
                    "+experiment=demo",
                    f"model.score.retrieval_weight={weight}",
                    f"model.score.top_k_ratio={top_k}",
                    "logger=none",
                ],
                {"a": _values(a), "b": _values(a - 0.2)},
            )
            number += 1
    return sweep


def _expected_mean(weight: float, top_k: float, metric: str) -> float:
    a = 0.5 + 0.1 * weight + top_k + 0.01 * METRIC_KEYS.index(metric)
    return (a + (a - 0.2)) / 2


def test_one_row_per_job_with_the_swept_keys_method_dataset_and_means(grid):
    report = collect([grid])
    assert report.swept == [
        "model.score.retrieval_weight",
        "model.score.top_k_ratio",
    ]  # constant keys left out
    assert report.columns == [
        "job",
        "model.score.retrieval_weight",
        "model.score.top_k_ratio",
        "method",
        "dataset",
    ]
    rows = report.rows()
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    assert [(r["model.score.retrieval_weight"], r["model.score.top_k_ratio"]) for r in rows] == [
        ("0.5", "0.01"),
        ("0.5", "0.1"),
        ("1.0", "0.01"),
        ("1.0", "0.1"),
    ]
    for row in rows:
        assert (row["method"], row["dataset"]) == ("mrad_tf", "mvtec")
        weight, top_k = float(row["model.score.retrieval_weight"]), float(row["model.score.top_k_ratio"])
        for metric in METRIC_KEYS:
            assert row[metric] == pytest.approx(_expected_mean(weight, top_k, metric), abs=1e-12)
    assert not report.missing


def test_per_category_rows_then_the_job_mean(grid):
    rows = collect([grid]).rows(per_category=True)
    assert len(rows) == 4 * 3
    assert [row["category"] for row in rows[:3]] == ["a", "b", "mean"]
    assert rows[0]["image_auroc"] == pytest.approx(0.5 + 0.05 + 0.01)
    assert rows[1]["image_auroc"] == pytest.approx(0.5 + 0.05 + 0.01 - 0.2)
    assert rows[2]["image_auroc"] == pytest.approx(_expected_mean(0.5, 0.01, "image_auroc"))


def test_csv_and_markdown_files(grid, tmp_path):
    out = tmp_path / "out"
    assert main([str(grid), "--out", str(out), "--per-category"]) == 0

    rows = list(csv.DictReader((out / "report.csv").open()))
    header = ["job", "model.score.retrieval_weight", "model.score.top_k_ratio", "method", "dataset"]
    assert list(rows[0]) == [*header, *METRIC_KEYS, "status"]
    assert len(rows) == 4 and {row["status"] for row in rows} == {"finished"}
    assert float(rows[3]["pixel_aupro"]) == pytest.approx(_expected_mean(1.0, 0.1, "pixel_aupro"), abs=1e-12)

    per_category = list(csv.DictReader((out / "report_per_category.csv").open()))
    assert [row["category"] for row in per_category[:3]] == ["a", "b", "mean"] and len(per_category) == 12

    markdown = (out / "report.md").read_text().splitlines()
    assert markdown[0] == (
        "| job | model.score.retrieval_weight | model.score.top_k_ratio | method | dataset | "
        "I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | P-F1max | AUPRO |"
    )
    # Job 0: means 0.46 + 0.01·i -> percent with one decimal.
    assert (
        markdown[2] == "| 0 | 0.5 | 0.01 | mrad_tf | mvtec | 46.0 | 47.0 | 48.0 | 49.0 | 50.0 | 51.0 | 52.0 |"
    )
    assert (out / "report_per_category.md").is_file()


def test_default_output_is_the_directory_itself(grid, capsys):
    assert main([str(grid), "--no-plots"]) == 0
    assert (grid / "report.csv").is_file() and (grid / "report.md").is_file()
    assert not (grid / "plots").exists()
    printed = capsys.readouterr().out
    assert "4 job(s)" in printed and "I-AUROC" in printed


def test_one_png_per_swept_key_with_a_panel_per_changing_metric(grid, tmp_path):
    report = collect([grid])
    written = report.plot(tmp_path / "plots")
    assert list(written) == ["model.score.retrieval_weight", "model.score.top_k_ratio"]
    assert written["model.score.top_k_ratio"] == tmp_path / "plots" / "metrics_vs_model.score.top_k_ratio.png"
    for key, path in written.items():
        assert report.changing_metrics(key) == list(METRIC_KEYS)  # every metric moves with both keys here
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(path) as image:
            assert image.size[0] > 400 and image.size[1] > 300


def test_metrics_a_swept_key_does_not_change_are_not_plotted(tmp_path):
    # Pixel metrics do not depend on the image-score weight: flat lines, left out of the plot.
    sweep = tmp_path / "sweep"
    for number, weight in enumerate(["0.5", "0.7", "1.0"]):
        values = _values(0.8, image_auroc=0.6 + 0.1 * number, image_ap=0.5 + 0.1 * number)
        _job(sweep, str(number), [f"model.score.retrieval_weight={weight}"], {"a": values, "b": values})
    report = collect([sweep])
    assert report.changing_metrics("model.score.retrieval_weight") == ["image_auroc", "image_ap"]
    assert not report.changes("model.score.retrieval_weight", "pixel_auroc")
    assert list(report.plot(tmp_path / "plots")) == ["model.score.retrieval_weight"]


def test_two_swept_keys_give_one_line_per_value_of_the_other(grid):
    report = collect([grid])
    lines = report.series("model.score.retrieval_weight", "image_auroc")
    assert sorted(lines) == ["model.score.top_k_ratio=0.01", "model.score.top_k_ratio=0.1"]
    points = lines["model.score.top_k_ratio=0.1"]
    assert [x for x, _ in points] == [0.5, 1.0]  # numeric axis, sorted
    assert [y for _, y in points] == pytest.approx(
        [_expected_mean(0.5, 0.1, "image_auroc"), _expected_mean(1.0, 0.1, "image_auroc")]
    )


def test_non_numeric_values_are_categorical_and_all_undefined_metrics_are_not_plotted(tmp_path):
    sweep = tmp_path / "sweep"
    for number, aux in enumerate(["visa", "mvtec", "btad"]):
        values = _values(0.6 + 0.1 * number, pixel_aupro=NAN)
        _job(sweep, str(number), [f"aux_dataset={aux}"], {"a": values})
    report = collect([sweep])
    assert report.swept == ["aux_dataset"]
    lines = report.series("aux_dataset", "image_auroc")
    assert list(lines) == [""]
    # Categories in sorted order: btad 0, mvtec 1, visa 2.
    assert lines[""] == [(0.0, pytest.approx(0.8)), (1.0, pytest.approx(0.7)), (2.0, pytest.approx(0.6))]
    assert report.changing_metrics("aux_dataset") == list(
        METRIC_KEYS[:-1]
    )  # pixel_aupro undefined everywhere
    assert set(report.plot(tmp_path / "plots")) == {"aux_dataset"}


def test_jobs_sort_by_number_and_several_run_directories_are_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    for number in (10, 2, 1):
        _job(sweep, str(number), [f"seed={number}"], {"a": _values(0.5)})
    assert [row["job"] for row in collect([sweep]).rows()] == ["1", "2", "10"]

    runs = tmp_path / "runs"
    first = _job(runs / "exp_a" / "train", "t1", ["+experiment=mrad_tf_mvtec"], {"a": _values(0.5)})
    second = _job(
        runs / "exp_b" / "train", "t2", ["+experiment=mrad_tf_visa"], {"a": _values(0.6)}, dataset="visa"
    )
    report = collect([first, second])
    assert report.swept == ["experiment"]
    assert [(r["job"], r["experiment"], r["dataset"]) for r in report.rows()] == [
        ("exp_a/train/t1", "mrad_tf_mvtec", "mvtec"),
        ("exp_b/train/t2", "mrad_tf_visa", "visa"),
    ]
    assert main([str(first), str(second), "--no-plots"]) == 0
    assert (runs / "report.csv").is_file()  # several directories: their common parent


def test_a_job_without_results_is_listed_as_missing(grid, tmp_path, capsys):
    _job(
        grid,
        "4",
        ["+experiment=demo", "model.score.retrieval_weight=2.0", "model.score.top_k_ratio=0.1"],
        None,
    )
    report = collect([grid])
    assert [job.name for job in report.jobs] == ["0", "1", "2", "3"]
    assert [job.name for job in report.missing] == ["4"]

    out = tmp_path / "out"
    assert main([str(grid), "--out", str(out), "--no-plots"]) == 0
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert rows[-1]["job"] == "4" and rows[-1]["status"] == "missing" and rows[-1]["image_auroc"] == ""
    assert rows[-1]["model.score.retrieval_weight"] == "2.0"
    markdown = (out / "report.md").read_text()
    assert (
        "Missing (1 job(s)" in markdown
        and "- 4: experiment=demo model.score.retrieval_weight=2.0" in markdown
    )
    assert "1 job(s) have no results.json" in capsys.readouterr().out


def test_a_directory_without_results_names_itself_and_the_train_command(tmp_path, capsys):
    empty = tmp_path / "sweep"
    _job(empty, "0", ["seed=1"], None)  # started, never finished
    with pytest.raises(ReportError, match=r"no results\.json anywhere in .*sweep.*python -m anomret\.train"):
        collect([empty])
    assert main([str(empty)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: no results.json anywhere in") and str(empty) in error


def test_a_path_that_is_not_a_directory(tmp_path):
    with pytest.raises(ReportError, match=r"nowhere is not a directory"):
        collect([tmp_path / "nowhere"])


def test_mixed_methods_are_refused_unless_allowed(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, "0", ["model=mrad_tf"], {"a": _values(0.5)}, method="mrad_tf")
    _job(sweep, "1", ["model=rad"], {"a": _values(0.6)}, method="rad")
    with pytest.raises(ReportError, match=r"2 different methods:\n  mrad_tf: 0\n  rad: 1\n.*--allow-mixed"):
        collect([sweep])
    assert main([str(sweep), "--no-plots"]) == 1
    assert "--allow-mixed" in capsys.readouterr().err
    report = collect([sweep], allow_mixed=True)
    assert [row["method"] for row in report.rows()] == ["mrad_tf", "rad"]


def test_a_corrupt_results_file_is_named(tmp_path):
    job = _job(tmp_path / "sweep", "0", ["seed=1"], None)
    (job / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"sweep/0/results\.json is not a results file written by anomret"):
        collect([tmp_path / "sweep"])


# ------------------------------------------------------------------------------------------ --paper
def _cross_dataset_sweep(root: Path) -> Path:
    """Targets in shuffled order; image-only HeadCT, pixel-only ISIC, and a dataset the paper lacks."""
    sweep = root / "sweep"
    targets = {
        "headct": _values(0.90, pixel_auroc=NAN, pixel_aupro=NAN, pixel_ap=NAN, pixel_f1max=NAN),
        "visa": _values(0.80),
        "isic": _values(0.70, image_auroc=0.99, image_ap=0.99),  # not in the paper's image table
        "mvtec": _values(0.60),
        "synthetic_a": _values(0.10),
    }
    for number, (dataset, values) in enumerate(targets.items()):
        _job(sweep, str(number), [f"dataset={dataset}"], {"x": values, "y": values}, dataset=dataset)
    return sweep


def test_paper_layout_rows_in_the_papers_order_and_its_average(tmp_path):
    table = paper_table(collect([_cross_dataset_sweep(tmp_path)]))
    assert [(row.group, row.label) for row in table.rows] == [
        ("Industrial", "MVTec-AD"),
        ("Industrial", "VisA"),
        ("Medical", "ISIC"),
        ("Medical", "HeadCT"),
        ("Other (not in the paper)", "synthetic_a"),
    ]
    # image_auroc is metric 0, image_ap 1, pixel_auroc 3, pixel_aupro 6 (base + 0.01·i).
    # Image level: MVTec, VisA, HeadCT (ISIC is not in Table 1(b), synthetic_a not in the paper).
    assert table.average["image_auroc"] == pytest.approx((0.60 + 0.80 + 0.90) / 3)
    assert table.average["image_ap"] == pytest.approx((0.61 + 0.81 + 0.91) / 3)
    # Pixel level: MVTec, VisA, ISIC (HeadCT has no masks).
    assert table.average["pixel_auroc"] == pytest.approx((0.63 + 0.83 + 0.73) / 3)
    assert table.average["pixel_aupro"] == pytest.approx((0.66 + 0.86 + 0.76) / 3)
    assert table.counts == {
        "image_auroc": (3, 11),
        "image_ap": (3, 11),
        "pixel_auroc": (3, 13),
        "pixel_aupro": (3, 13),
    }


def test_paper_files_in_percent_with_one_decimal(tmp_path, capsys):
    sweep = _cross_dataset_sweep(tmp_path)
    assert main([str(sweep), "--paper", "--no-plots"]) == 0
    rows = list(csv.reader((sweep / "paper_table1.csv").open()))
    assert rows[0] == ["group", "dataset", "I-AUROC", "I-AP", "P-AUROC", "AUPRO", "job"]
    assert rows[1] == ["Industrial", "MVTec-AD", "60.0", "61.0", "63.0", "66.0", "3"]
    assert rows[4] == ["Medical", "HeadCT", "90.0", "91.0", "–", "–", "0"]
    assert rows[-1] == ["", "Average", "76.7", "77.7", "73.0", "76.0", ""]
    markdown = (sweep / "paper_table1.md").read_text()
    assert "| MVTec-AD | 60.0 | 61.0 | 63.0 | 66.0 |" in markdown
    assert "| **Average** | **76.7** | **77.7** | **73.0** | **76.0** |" in markdown
    assert markdown.index("*Industrial*") < markdown.index("*Medical*")
    assert "MRAD Table 1 layout" in capsys.readouterr().out


def test_paper_layout_refuses_two_jobs_on_one_dataset(grid):
    with pytest.raises(
        ReportError, match=r"--paper needs one job per dataset.*jobs 0 and 1 both evaluate 'mvtec'"
    ):
        paper_table(collect([grid]))


def test_paper_datasets_are_the_16_of_table_1_with_anomrets_dataset_names():
    names = {path.stem for path in (Path(__file__).parents[2] / "conf" / "dataset").glob("*.yaml")}
    assert len(PAPER_DATASETS) == 16 and {d.name for d in PAPER_DATASETS} <= names
    assert sum(d.image for d in PAPER_DATASETS) == 11 and sum(d.pixel for d in PAPER_DATASETS) == 13
    groups = [d.group for d in PAPER_DATASETS]
    assert groups == sorted(groups, key=["Industrial", "Medical"].index)
