"""The decisions of a test pass, per image: ``predictions.csv`` beside ``results.json``, written from the
per-image scores the evaluation gathered (under DDP: every process's share, each image once, in dataset
order)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomret.decisions.record import Thresholds
from anomret.files import atomic_open
from anomret.metrics.results import ImageScore


def decision_columns(thresholds: Thresholds, score: float) -> dict[str, Any]:
    """The columns every per-image output gives beside a score: label, threshold, normalised score."""
    row: dict[str, Any] = {"label": thresholds.label(score), "threshold": thresholds.image}
    if thresholds.normalize:
        row["normalized_score"] = thresholds.normalized_score(score)
    return row


def write_evaluation_decisions(
    path: str | Path, images: Sequence[ImageScore], thresholds: Thresholds
) -> Path:
    """``predictions.csv`` of a test pass: per image (in dataset order, each once, as the evaluation gathered
    them) its path, category, true label, score and the decision at ``thresholds``; atomic."""
    rows = [
        {
            "image_path": image.image,
            "category": image.category,
            "true_label": image.label,
            "image_score": image.score,
            **decision_columns(thresholds, image.score),
        }
        for image in images
    ]
    path = Path(path)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["image_path"])
        writer.writeheader()
        writer.writerows(rows)
    return path
