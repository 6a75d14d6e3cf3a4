"""Console tables fit an 80-column pipe without breaking a word; best values are marked as shown."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from anomret.metrics.evaluator import METRIC_KEYS
from anomret.metrics.results import METRIC_KEYS as RESULT_METRIC_KEYS
from anomret.metrics.results import EvaluationResult
from anomret.reporting.page import best_cells
from anomret.reporting.sweep import Job, SweepReport, _short_keys
from anomret.tables import Column, Layout, Row, fitted_table, plan_layout, table_width

MVTEC = [
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
]  # fmt: skip


def _result(categories: list[str], settings: dict | None = None) -> EvaluationResult:
    per_category = {c: {m: 0.5 + 0.03 * i for i, m in enumerate(METRIC_KEYS)} for c in categories}
    counts = {c: {"n_images": 160, "n_anomalous": 119} for c in categories}
    return EvaluationResult(per_category, counts, METRIC_KEYS, settings or {})


def _piped_console(monkeypatch: pytest.MonkeyPatch, columns: int = 80) -> Console:
    # What a pipe gets: not a terminal, the width from COLUMNS.
    monkeypatch.setenv("COLUMNS", str(columns))
    console = Console(file=io.StringIO(), record=True)
    assert not console.is_terminal and console.width == columns
    return console


def _lines(console: Console) -> list[str]:
    return console.export_text(clear=False).splitlines()


def test_metric_keys_of_the_results_module_are_the_evaluators():
    assert RESULT_METRIC_KEYS == METRIC_KEYS


def test_per_category_table_fits_80_columns_with_whole_names(monkeypatch):
    console = _piped_console(monkeypatch)
    result = _result(MVTEC, {"aupro": {"fpr_limit": 0.3, "num_thresholds": None}})
    console.print(result.rich_table(title="mvtec: MVTec AD (mrad_tf)", width=console.width))
    lines = _lines(console)
    assert max(len(line) for line in lines) <= 80
    for category in MVTEC:  # every name whole, on its own row
        assert sum(line.split()[:1] == [category] for line in lines) == 1
    assert any(line.split()[:1] == ["mean"] for line in lines)
    assert "160 (119)" in console.export_text()


def test_a_name_too_long_for_the_console_is_cut_with_an_ellipsis_never_wrapped(monkeypatch):
    console = _piped_console(monkeypatch)
    long_name = "a_very_long_category_name_from_a_custom_dataset_folder"
    console.print(_result(["bottle", long_name]).rich_table(width=console.width))
    lines = _lines(console)
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line.startswith("a_very")]
    assert len(rows) == 1 and "…" in rows[0]  # one line, shortened: no second line holding the rest
    assert not any(line.lstrip().startswith("name") or "_folder" in line for line in lines)


def test_wide_console_keeps_the_boxed_table_with_full_headers(monkeypatch):
    console = _piped_console(monkeypatch, columns=160)
    console.print(_result(["bottle"]).rich_table(width=console.width))
    text = console.export_text()
    assert "images (anomalous)" in text and "┃" in text


def test_caption_shows_a_k_capped_at_the_memory_size(monkeypatch):
    settings = {"retrieval": {"k": 8, "k_used": 6, "rho": 1, "memory_images": 6}}
    console = _piped_console(monkeypatch)
    console.print(_result(["wood"], settings).rich_table(width=console.width))
    text = " ".join(console.export_text().split())
    assert "K = 6 (retrieval.k=8 capped at the memory's 6 images), ρ = 1" in text


def test_sweep_table_fits_80_columns(monkeypatch):
    jobs = [
        Job(
            path=Path(f"/sweep/{n}"),
            name=str(n),
            overrides={
                "retrieval.k": str(k),
                "retrieval.rho": str(rho),
                "model.score.retrieval_weight": "0.7",
            },
            result=_result(MVTEC[:3], {"run": {"method": "rad", "dataset": "synthetic_a"}}),
        )
        for n, (k, rho) in enumerate([(4, 0), (4, 1), (8, 0), (8, 1)])
    ]
    report = SweepReport(jobs, swept=["retrieval.k", "retrieval.rho"])
    for per_category in (False, True):
        console = _piped_console(monkeypatch)
        console.print(report.rich_table(per_category, title="4 job(s)", width=console.width))
        lines = _lines(console)
        assert max(len(line) for line in lines) <= 80, "\n".join(lines)
        text = console.export_text()
        assert "method: rad" in text and "dataset: synthetic_a" in text  # constant columns in the caption
        if per_category:
            assert all(any(f" {c} " in line for line in lines) for c in MVTEC[:3])


def test_layouts_are_tried_in_order_until_one_fits():
    columns = [Column("category", shrinkable=True), Column("a long header", short="a long\nheader")]
    rows = [Row(["transistor", "1.0"])]
    assert plan_layout(columns, rows, None) == Layout()
    boxed = table_width(columns, rows, Layout())
    assert boxed == 10 + 13 + 3 * 2 + 1
    assert plan_layout(columns, rows, boxed) == Layout()
    assert plan_layout(columns, rows, boxed - 1) == Layout(boxed=False)  # 10 + 2 + 13 = 25
    assert plan_layout(columns, rows, 18) == Layout(boxed=False, short_headers=True)  # 10 + 2 + 6
    assert plan_layout(columns, rows, 17) == Layout(boxed=False, short_headers=True, separator=1)
    cut = plan_layout(columns, rows, 12)
    assert cut.max_widths == {0: 5} and table_width(columns, rows, cut) == 12


def test_constant_columns_move_to_the_caption():
    columns = [Column("job"), Column("method", movable=True), Column("value", numeric=True)]
    rows = [Row(["0", "rad", "1.0"]), Row(["1", "rad", "2.0"])]
    layout = plan_layout(columns, rows, 10)
    assert layout.moved == (1,)
    table = fitted_table(columns, rows, width=10)
    assert [c.header for c in table.columns] == ["job", "value"] and table.caption == "method: rad"


def test_short_keys_are_the_shortest_unambiguous_tails():
    keys = ["retrieval.k", "model.k", "retrieval.rho", "model.score.retrieval_weight"]
    assert _short_keys(keys) == {
        "retrieval.k": "retrieval.k",
        "model.k": "model.k",
        "retrieval.rho": "rho",
        "model.score.retrieval_weight": "retrieval_weight",
    }


def test_best_cells_compare_the_values_as_shown_and_skip_undefined():
    columns = [
        [0.9, 0.95, 0.9501, 0.5],  # 95.0 twice: both marked
        [math.nan, 0.2, None, 0.1],
        [0.7, math.nan, math.nan, math.nan],  # one defined value: nothing to compare
        [0.3, 0.3, 0.3, 0.3],  # all equal: all marked
    ]
    assert best_cells(columns) == [{1, 2}, {1}, set(), {0, 1, 2, 3}]
