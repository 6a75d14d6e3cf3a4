"""Per-category evaluation results as the metrics produce them.

The result type and its files live in :mod:`anomret.reporting.results`, which the report reads without
importing torch; they are named here too, beside the metrics that fill them.
"""

from anomret.reporting.results import (
    METRIC_LABELS,
    EvaluationResult,
    ImageScore,
    read_image_scores,
    write_image_scores,
)

__all__ = ["METRIC_LABELS", "EvaluationResult", "ImageScore", "read_image_scores", "write_image_scores"]
