"""Evaluation results: per-category metrics, per-image scores, their files and a console table.

``results.json`` schema::

    {"metrics": [key, ...],
     "categories": {category: {key: value | null, ..., "n_images": int, "n_anomalous": int}},
     "mean": {key: value | null},
     "settings": {...}}

Values are raw fractions in [0, 1], unrounded; ``null`` marks a metric that is undefined for a category
(e.g. pixel metrics of an image-only dataset).

``image_scores.csv`` holds one row per test image, in dataset order: ``category,image,label,score``
(the image's path, its 0/1 label and its image score at full precision). Curves, score histograms and
thresholds are drawn from it.

Nothing here imports torch: the report reads these files without loading the models.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from anomret.files import atomic_open
from anomret.tables import Column, Row, fitted_table

__all__ = [
    "IMAGE_SCORE_COLUMNS",
    "METRIC_KEYS",
    "METRIC_LABELS",
    "THRESHOLDED_KEYS",
    "EvaluationResult",
    "ImageScore",
    "read_image_scores",
    "retrieval_note",
    "write_image_scores",
]

# Column headers of the rich table, in the papers' short names.
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "pixel_aupro": "AUPRO",
    # At the saved thresholds (anomret.decisions): precision, recall, F1 of the decisions.
    "image_precision": "I-Prec@t",
    "image_recall": "I-Rec@t",
    "image_f1": "I-F1@t",
    "pixel_precision": "P-Prec@t",
    "pixel_recall": "P-Rec@t",
    "pixel_f1": "P-F1@t",
}
# The threshold-free metrics in canonical order, the order the evaluator computes them in.
METRIC_KEYS = tuple(key for key in METRIC_LABELS if not key.endswith(("_precision", "_recall", "_f1")))
# The metrics of decisions at a saved threshold, computed when the run has thresholds.
THRESHOLDED_KEYS = tuple(key for key in METRIC_LABELS if key not in METRIC_KEYS)
IMAGE_SCORE_COLUMNS = ("category", "image", "label", "score")
_COUNT_KEYS = ("n_images", "n_anomalous")


def _is_nan(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _jsonable(value: Any) -> Any:
    """Plain JSON types with NaN/inf as ``None`` (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float) or hasattr(value, "__float__"):
        number = float(value)
        return number if math.isfinite(number) else None
    return str(value)


def _write_atomic(path: str | os.PathLike[str], write: Callable[[Any], None], binary: bool = False) -> Path:
    # A killed run never leaves a truncated results file (see anomret.files).
    with atomic_open(path, "wb") if binary else atomic_open(path, "w", newline="") as handle:
        write(handle)
    return Path(path)


@dataclass(frozen=True)
class ImageScore:
    """One test image: its category, path, 0/1 label and image score."""

    category: str
    image: str
    label: int
    score: float


def write_image_scores(path: str | os.PathLike[str], images: list[ImageScore]) -> Path:
    """``image_scores.csv``: one row per image in the given order, scores at full precision; atomic."""

    def write(handle: Any) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(IMAGE_SCORE_COLUMNS)
        for image in images:
            writer.writerow([image.category, image.image, int(image.label), repr(float(image.score))])

    return _write_atomic(path, write)


def read_image_scores(path: str | os.PathLike[str]) -> list[ImageScore]:
    """Inverse of :func:`write_image_scores`.

    Raises:
        ValueError: the file lacks a column or holds a value that is not a number.
    """
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in IMAGE_SCORE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}; expected {list(IMAGE_SCORE_COLUMNS)}")
        return [
            ImageScore(row["category"], row["image"], int(row["label"]), float(row["score"]))
            for row in reader
        ]


def retrieval_note(settings: dict[str, Any]) -> str | None:
    """The K and ρ a retrieval run used, saying so when K was capped at the memory size (few-shot runs)."""
    retrieval = settings.get("retrieval")
    if not isinstance(retrieval, dict) or retrieval.get("k") is None:
        return None
    k, used = retrieval["k"], retrieval.get("k_used")
    if used is not None and used != k:
        text = f"K = {used} (retrieval.k={k} capped at the memory's {retrieval.get('memory_images', used)} images)"
    else:
        text = f"K = {k}"
    if retrieval.get("rho") is not None:
        text += f", ρ = {retrieval['rho']}"
    return text


@dataclass
class EvaluationResult:
    """Metrics of every category, with image counts and the settings they were computed with.

    Attributes:
        per_category: category -> metric key -> value in [0, 1] (NaN when undefined).
        counts: category -> ``{"n_images", "n_anomalous"}``.
        metrics: the metric keys that were computed, in canonical order.
        settings: how they were computed, e.g. ``{"aupro": {"fpr_limit": 0.3, ...}}``.
        images: every test image's score, in dataset order (``image_scores.csv``; not in ``results.json``).
    """

    per_category: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    metrics: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    images: list[ImageScore] = field(default_factory=list)

    @property
    def mean(self) -> dict[str, float]:
        """Unweighted mean over categories of the unrounded values, as the papers report it.

        Categories where a metric is NaN are left out of that metric's mean; NaN if all are.
        """
        means = {}
        for key in self.metrics:
            values = [v[key] for v in self.per_category.values() if not _is_nan(v.get(key))]
            means[key] = math.fsum(values) / len(values) if values else math.nan
        return means

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` content: JSON types only, NaN as ``None``."""
        categories = {}
        for category, values in self.per_category.items():
            row: dict[str, Any] = {key: values.get(key, math.nan) for key in self.metrics}
            row.update({key: int(self.counts.get(category, {}).get(key, 0)) for key in _COUNT_KEYS})
            categories[category] = row
        return _jsonable(
            {
                "metrics": list(self.metrics),
                "categories": categories,
                "mean": self.mean,
                "settings": self.settings,
            }
        )

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically; returns the path."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        return _write_atomic(path, lambda handle: handle.write(text + "\n"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict` (``None`` becomes NaN)."""
        metrics = tuple(data["metrics"])
        per_category, counts = {}, {}
        for category, row in data["categories"].items():
            per_category[category] = {
                key: math.nan if row.get(key) is None else float(row[key]) for key in metrics
            }
            counts[category] = {key: int(row[key]) for key in _COUNT_KEYS}
        return cls(per_category, counts, metrics, dict(data.get("settings") or {}))

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> EvaluationResult:
        """Load a ``results.json`` written by :meth:`write_json`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    # ------------------------------------------------------------------------------------------- CSV
    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """One row per category, then a ``mean`` row; raw fractions at full precision, NaN as empty."""

        def cell(value: float | None) -> str:
            return "" if value is None or _is_nan(value) else repr(float(value))

        def write(handle: Any) -> None:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["category", *self.metrics, *_COUNT_KEYS])
            for category, values in self.per_category.items():
                counts = self.counts.get(category, {})
                writer.writerow(
                    [
                        category,
                        *(cell(values.get(k)) for k in self.metrics),
                        *(counts.get(k, "") for k in _COUNT_KEYS),
                    ]
                )
            mean = self.mean
            writer.writerow(["mean", *(cell(mean[k]) for k in self.metrics), "", ""])

        return _write_atomic(path, write)

    def write_image_scores(self, path: str | os.PathLike[str]) -> Path:
        """``image_scores.csv`` of :attr:`images` (see the module docstring); atomic."""
        return write_image_scores(path, self.images)

    # ------------------------------------------------------------------------------------------ rich
    def rich_table(self, title: str | None = None, width: int | None = None) -> Table:
        """Per-category table in percent with one decimal (as the papers), bold mean row.

        ``width``: the console's width; the table is made to fit it (see :mod:`anomret.tables`).
        """

        def percent(value: float | None) -> str:
            return "–" if value is None or _is_nan(value) else f"{100 * value:.1f}"

        columns = [
            Column("category", shrinkable=True),
            *(Column(METRIC_LABELS.get(key, key), numeric=True) for key in self.metrics),
            Column("images (anomalous)", short="images\n(anom.)", numeric=True),
        ]
        rows = []
        for category, values in self.per_category.items():
            counts = self.counts.get(category, {})
            count = f"{counts.get('n_images', 0)} ({counts.get('n_anomalous', 0)})"
            rows.append(Row([category, *(percent(values.get(k)) for k in self.metrics), count]))
        mean = self.mean
        rows.append(
            Row(["mean", *(percent(mean[k]) for k in self.metrics), ""], style="bold", rule_above=True)
        )
        return fitted_table(columns, rows, width=width, title=title, caption=self._caption())

    def _caption(self) -> str | None:
        notes = [self.aupro_note(), retrieval_note(self.settings)]
        return "\n".join(note for note in notes if note) or None

    def aupro_note(self) -> str | None:
        """Which AUPRO the result holds, when it holds one."""
        settings = self.settings.get("aupro")
        if "pixel_aupro" not in self.metrics or not isinstance(settings, dict):
            return None
        limit = settings.get("fpr_limit")
        if settings.get("num_thresholds") is None:
            return f"AUPRO: exact, FPR ≤ {limit}"
        # The official-code variant: its FPR normalisation changes the value, so it is named.
        return f"AUPRO: {settings['num_thresholds']} thresholds, FPR < {limit}, {settings.get('fpr_normalization')}"
