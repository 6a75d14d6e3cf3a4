"""Per-image records: gathered like the metrics (each image once, in dataset order) and image_scores.csv."""

from __future__ import annotations

import csv

import pytest
import torch

from anomret.metrics.evaluator import CategoryEvaluator
from anomret.metrics.gathered import GatheredEvaluation
from anomret.metrics.results import EvaluationResult, ImageScore, read_image_scores

CATEGORIES = ["a", "a", "a", "a", "b", "b", "b", "b"]
LABELS = [0, 1, 0, 1, 0, 0, 1, 1]
SCORES = [0.1, 0.9, 0.4, 0.35, 0.2, 0.6, 0.7, 0.8]


def _batch(evaluation: GatheredEvaluation, rows: list[int], paths: bool = True) -> None:
    maps = torch.zeros(len(rows), 4, 4)
    evaluation.update(
        torch.tensor(rows),
        [CATEGORIES[i] for i in rows],
        torch.tensor([SCORES[i] for i in rows]),
        torch.tensor([LABELS[i] for i in rows]),
        maps,
        torch.zeros(len(rows), 4, 4),
        image_paths=[f"/data/{CATEGORIES[i]}/{i}.png" for i in rows] if paths else None,
    )


def test_images_are_recorded_once_each_in_dataset_order_as_shares_gathered_across_ranks_are():
    evaluation = GatheredEvaluation(CategoryEvaluator(metrics=["image_auroc"]))
    # Two ranks' strided shares, the second padded with row 0 again (as DistributedSampler does).
    shares = [[[6, 4], [2, 0]], [[1, 3], [7, 5], [0]]]
    batches = []
    for share in shares:
        for rows in share:
            _batch(evaluation, rows)
            batches.append(evaluation._batches.pop())
    result = evaluation._evaluate(batches)
    assert [image.image for image in result.images] == [f"/data/{CATEGORIES[i]}/{i}.png" for i in range(8)]
    assert [image.label for image in result.images] == LABELS
    assert [image.score for image in result.images] == pytest.approx(SCORES)
    assert [image.category for image in result.images] == CATEGORIES
    # The metrics come from the very same rows.
    assert result.per_category["a"]["image_auroc"] == pytest.approx(0.75)
    assert result.per_category["b"]["image_auroc"] == pytest.approx(1.0)


def test_without_image_paths_the_records_keep_an_empty_path():
    evaluation = GatheredEvaluation(CategoryEvaluator(metrics=["image_auroc"]))
    _batch(evaluation, [0, 1, 2, 3], paths=False)
    result = evaluation.compute()
    assert [image.image for image in result.images] == ["", "", "", ""]


def test_image_scores_csv_round_trip_at_full_precision(tmp_path):
    images = [ImageScore("a", "/d/a/0.png", 0, 0.1 + 1e-12), ImageScore("b, c", '/d/"b"/1.png', 1, 1 / 3)]
    result = EvaluationResult({}, {}, ("image_auroc",), images=images)
    path = result.write_image_scores(tmp_path / "image_scores.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["image_scores.csv"]  # no temporary file left behind
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["category", "image", "label", "score"]
    assert rows[1] == ["a", "/d/a/0.png", "0", repr(0.1 + 1e-12)]
    assert read_image_scores(path) == images
    assert EvaluationResult.from_dict(result.to_dict()).images == []  # results.json stays per category


def test_a_malformed_image_scores_file_names_the_missing_column(tmp_path):
    path = tmp_path / "image_scores.csv"
    path.write_text("category,image,score\na,x.png,0.5\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\]"):
        read_image_scores(path)
