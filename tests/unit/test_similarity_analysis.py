"""The §3.1.1 query–key statistics: hand-worked values, per-category grouping, files written."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from anomret.analysis.statistics import SimilarityReport, SimilarityStatistics


def test_statistics_hand_worked_case():
    s_anom = torch.tensor([[0.9, 0.2], [0.6, 0.1]])
    anomalous = torch.tensor([[True, False], [True, False]])
    normal = torch.tensor([[False, True], [False, False]])  # 0.1 is a boundary cell: in neither group
    statistics = SimilarityStatistics()
    statistics.update(s_anom, anomalous, normal)
    values = statistics.values()
    assert values["A_qA_k"] == pytest.approx(0.75)  # (0.9 + 0.6) / 2
    assert values["N_qA_k"] == pytest.approx(0.2)
    assert values["A_qN_k"] == pytest.approx(0.25) and values["N_qN_k"] == pytest.approx(0.8)
    assert (statistics.anomalous_count, statistics.normal_count) == (2, 1)


def test_statistics_match_a_literal_loop_and_empty_groups_are_nan():
    gen = torch.Generator().manual_seed(0)
    s_anom = torch.rand(3, 4, 4, generator=gen)
    labels = torch.randint(0, 3, (3, 4, 4), generator=gen)  # 0 normal, 1 anomalous, 2 boundary
    statistics = SimilarityStatistics()
    statistics.update(s_anom, labels == 1, labels == 0)
    anomalous = [float(v) for v, lab in zip(s_anom.flatten(), labels.flatten(), strict=True) if lab == 1]
    normal = [float(v) for v, lab in zip(s_anom.flatten(), labels.flatten(), strict=True) if lab == 0]
    assert statistics.values()["A_qA_k"] == pytest.approx(sum(anomalous) / len(anomalous))
    assert statistics.values()["N_qA_k"] == pytest.approx(sum(normal) / len(normal))
    assert math.isnan(SimilarityStatistics().values()["A_qA_k"])
    with pytest.raises(ValueError, match="both anomalous and normal"):
        statistics.update(s_anom, labels >= 0, labels >= 0)


def test_report_groups_by_category_and_writes_table_and_plot(tmp_path):
    report = SimilarityReport("toy")
    s_anom = torch.tensor([[[0.8, 0.1]], [[0.4, 0.3]]])  # two images, 1×2 grids
    anomalous = torch.tensor([[[True, False]], [[True, False]]])
    report.add("TF", ["a", "b"], s_anom, anomalous, ~anomalous)
    report.add("FT", ["a", "b"], s_anom * 0 + 0.5, anomalous, ~anomalous)
    paths = report.write(tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["setting"], r["category"]) for r in rows] == [
        ("TF", "a"),
        ("TF", "b"),
        ("TF", "all"),
        ("FT", "a"),
        ("FT", "b"),
        ("FT", "all"),
    ]
    overall = rows[2]
    assert float(overall["A_qA_k"]) == pytest.approx(0.6) and float(overall["N_qA_k"]) == pytest.approx(0.2)
    assert float(overall["margin_A"]) == pytest.approx(0.4)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| TF | all | 0.6000 | 0.2000 |" in paths["md"].read_text()
