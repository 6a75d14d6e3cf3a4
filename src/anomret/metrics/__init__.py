"""Exact anomaly-detection metrics (functional and torchmetrics-style) and result reports."""

from anomret.metrics.classes import AUPRO, AUROC, AveragePrecision, F1Max
from anomret.metrics.evaluator import METRIC_KEYS, CategoryEvaluator
from anomret.metrics.functional import aupro, auroc, average_precision, binary_metrics, f1_max
from anomret.metrics.results import EvaluationResult

__all__ = [
    "AUPRO",
    "AUROC",
    "METRIC_KEYS",
    "AveragePrecision",
    "CategoryEvaluator",
    "EvaluationResult",
    "F1Max",
    "aupro",
    "auroc",
    "average_precision",
    "binary_metrics",
    "f1_max",
]
