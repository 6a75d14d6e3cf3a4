"""torchmetrics ``Metric`` wrappers around the exact functional metrics.

Every prediction is kept (the metrics are exact, not binned), on the CPU and in compact dtypes (float32
scores, bool targets), so GPU memory does not grow with the test set. The states are ``cat`` lists, so
distributed runs gather all predictions before ``compute``. Scores are stored as given, never rescaled;
the only change is the cast to float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from anomret.metrics import functional

__all__ = ["AUPRO", "AUROC", "AveragePrecision", "F1Max"]


def _to_state(values: Tensor, dtype: torch.dtype) -> Tensor:
    # Tensor.to returns its input when nothing changes: clone then, so a caller reusing its buffer (or
    # passing a view of a larger tensor) cannot alter or pin the stored state.
    converted = values.detach().to(device="cpu", dtype=dtype)
    return converted.clone() if converted.data_ptr() == values.data_ptr() else converted


def _cat(state: list[Tensor] | Tensor, empty: Tensor) -> Tensor:
    # After a distributed sync torchmetrics may hand back an already concatenated tensor.
    if isinstance(state, list) and not state:
        return empty
    return dim_zero_cat(state)


def _check_binary(target: Tensor, name: str) -> None:
    if target.dtype != torch.bool and not ((target == 0) | (target == 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1)")


class _BinaryScoreMetric(Metric):
    """Stores flattened scores and binary targets; subclasses name the functional metric."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _functional_name: str
    # States: lists of batches, concatenated into one tensor only inside a synced (distributed) compute.
    preds: list[Tensor] | Tensor
    target: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of scores and binary targets of the same shape (any shape; flattened)."""
        if preds.shape != target.shape:
            raise ValueError(
                f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape"
            )
        # Checked here, before the casts: float32 would turn huge values into inf, bool would hide a 0.5.
        if not torch.isfinite(preds).all():
            raise ValueError("preds contains NaN or infinite values")
        _check_binary(target, "target")
        assert isinstance(self.preds, list) and isinstance(self.target, list)  # not inside a compute
        self.preds.append(_to_state(preds.flatten(), torch.float32))
        self.target.append(_to_state(target.flatten(), torch.bool))

    def compute(self) -> Tensor:
        """The metric over everything seen since the last reset (NaN if only one class was seen)."""
        preds = _cat(self.preds, torch.empty(0))
        target = _cat(self.target, torch.empty(0, dtype=torch.bool))
        value = functional.binary_metrics(preds, target, (self._functional_name,))[self._functional_name]
        return torch.tensor(value, dtype=torch.float64)


class AUROC(_BinaryScoreMetric):
    """Exact ROC AUC (sklearn's ``roc_auc_score``), no sigmoid on raw scores."""

    _functional_name = "auroc"


class AveragePrecision(_BinaryScoreMetric):
    """Step-wise average precision (sklearn's ``average_precision_score``)."""

    _functional_name = "average_precision"


class F1Max(_BinaryScoreMetric):
    """Maximum F1 over the exact precision-recall curve."""

    _functional_name = "f1_max"


class AUPRO(Metric):
    """Area under the per-region-overlap curve up to ``fpr_limit`` (see ``functional.aupro``).

    Args:
        fpr_limit: FPR integration limit.
        num_thresholds: ``None`` for the exact MVTec AUPRO, an integer for the thresholded variant of the
            official MRAD/AnomalyCLIP code.
        fpr_normalization: ``"limit"``, ``"max"`` or ``"minmax"``; ``None`` picks the variant's default.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # States: lists of batches, concatenated into one tensor only inside a synced (distributed) compute.
    maps: list[Tensor] | Tensor
    masks: list[Tensor] | Tensor

    def __init__(
        self,
        fpr_limit: float = 0.3,
        num_thresholds: int | None = None,
        fpr_normalization: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Validated now so a bad config fails at construction, not after a whole test pass.
        self.settings = functional.resolve_aupro_settings(fpr_limit, num_thresholds, fpr_normalization)
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch of anomaly maps ``[B, H, W]`` and binary masks of the same shape."""
        if maps.ndim != 3 or maps.shape != masks.shape:
            raise ValueError(
                f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [B, H, W] of the same shape"
            )
        if (
            isinstance(self.maps, list)
            and self.maps
            and tuple(self.maps[0].shape[1:]) != tuple(maps.shape[1:])
        ):
            raise ValueError(
                f"maps are {tuple(maps.shape[1:])} but earlier batches were {tuple(self.maps[0].shape[1:])}"
            )
        if not torch.isfinite(maps).all():
            raise ValueError("maps contains NaN or infinite values")
        _check_binary(masks, "masks")
        assert isinstance(self.maps, list) and isinstance(self.masks, list)  # not inside a compute
        self.maps.append(_to_state(maps, torch.float32))
        self.masks.append(_to_state(masks, torch.bool))

    def compute(self) -> Tensor:
        """AUPRO over all maps seen since the last reset (NaN without anomalous or normal pixels)."""
        maps = _cat(self.maps, torch.empty(0, 0, 0))
        masks = _cat(self.masks, torch.empty(0, 0, 0, dtype=torch.bool))
        return torch.tensor(functional.aupro(maps, masks, **self.settings), dtype=torch.float64)
