"""Per-category evaluation results: the mean over categories, JSON/CSV files and a rich table.

``results.json`` schema::

    {"metrics": [key, ...],
     "categories": {category: {key: value | null, ..., "n_images": int, "n_anomalous": int}},
     "mean": {key: value | null},
     "settings": {...}}

Values are raw fractions in [0, 1], unrounded; ``null`` marks a metric that is undefined for a category
(e.g. pixel metrics of an image-only dataset).
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

__all__ = ["METRIC_LABELS", "EvaluationResult"]

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


def _write_atomic(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    # A killed run never leaves a truncated results file (see anomret.files).
    with atomic_open(path, "w", newline="") as handle:
        write(handle)
    return Path(path)


@dataclass
class EvaluationResult:
    """Metrics of every category, with image counts and the settings they were computed with.

    Attributes:
        per_category: category -> metric key -> value in [0, 1] (NaN when undefined).
        counts: category -> ``{"n_images", "n_anomalous"}``.
        metrics: the metric keys that were computed, in canonical order.
        settings: how they were computed, e.g. ``{"aupro": {"fpr_limit": 0.3, ...}}``.
    """

    per_category: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    metrics: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

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
            return "" if _is_nan(value) else repr(float(value))

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

    # ------------------------------------------------------------------------------------------ rich
    def rich_table(self, title: str | None = None) -> Table:
        """Per-category table in percent with one decimal (as the papers), bold mean row."""

        def percent(value: float | None) -> str:
            return "–" if _is_nan(value) else f"{100 * value:.1f}"

        table = Table(title=title, caption=self._caption())
        table.add_column("category", no_wrap=True)
        for key in self.metrics:
            table.add_column(METRIC_LABELS.get(key, key), justify="right")
        table.add_column("images (anomalous)", justify="right")
        for category, values in self.per_category.items():
            counts = self.counts.get(category, {})
            table.add_row(
                category,
                *(percent(values.get(k)) for k in self.metrics),
                f"{counts.get('n_images', 0)} ({counts.get('n_anomalous', 0)})",
            )
        mean = self.mean
        table.add_section()
        table.add_row("mean", *(percent(mean[k]) for k in self.metrics), "", style="bold")
        return table

    def _caption(self) -> str | None:
        settings = self.settings.get("aupro")
        if "pixel_aupro" not in self.metrics or not isinstance(settings, dict):
            return None
        limit = settings.get("fpr_limit")
        if settings.get("num_thresholds") is None:
            return f"AUPRO: exact, FPR ≤ {limit}"
        # The official-code variant: its FPR normalisation changes the value, so it is named.
        return f"AUPRO: {settings['num_thresholds']} thresholds, FPR < {limit}, {settings.get('fpr_normalization')}"
