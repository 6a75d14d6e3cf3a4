"""Per-category evaluation, as the papers report it: metrics per category, then the unweighted mean.

The evaluator only accumulates during the test loop (CPU, float32 maps, bool masks) and computes at the
end, one category at a time, so the working memory is bounded by the largest category.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from anomret.checks import integer_at_least, number_in
from anomret.metrics import functional
from anomret.metrics.results import METRIC_KEYS, THRESHOLDED_KEYS, EvaluationResult
from anomret.metrics.thresholds import decide, precision_recall_f1

__all__ = ["METRIC_KEYS", "THRESHOLDED_KEYS", "CategoryEvaluator"]

log = logging.getLogger(__name__)


# Metric key -> functional binary metric; both levels share one sort of their scores.
_IMAGE = {"image_auroc": "auroc", "image_ap": "average_precision", "image_f1max": "f1_max"}
_PIXEL = {"pixel_auroc": "auroc", "pixel_ap": "average_precision", "pixel_f1max": "f1_max"}


@dataclass
class _CategoryData:
    scores: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    maps: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    has_maps: bool | None = None  # decided by the first batch of the category


def _owned(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A CPU copy in ``dtype`` that the evaluator owns.

    ``Tensor.to`` returns its input when nothing changes; storing that would alias the caller's tensor
    (a reused buffer, or a view that keeps a larger tensor alive), so it is cloned then.
    """
    converted = tensor.to("cpu", dtype)
    return converted.clone() if converted is tensor else converted


def _concat(chunks: list[Tensor]) -> Tensor:
    """Concatenate in place of the chunks, releasing each chunk once copied.

    Peak memory stays at the stored data plus one chunk (``torch.cat`` would hold both copies), and a
    second ``compute()`` reuses the result.
    """
    if len(chunks) > 1:
        dtype = functools.reduce(torch.promote_types, (c.dtype for c in chunks))  # float32 + float64 scores
        out = torch.empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]), dtype=dtype)
        offset = 0
        while chunks:
            chunk = chunks.pop(0)
            out[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
            del chunk
        chunks.append(out)
    return chunks[0]


class CategoryEvaluator:
    """Accumulates scores per category and computes exact metrics for each.

    Args:
        metrics: which of ``METRIC_KEYS`` to compute (e.g. drop ``pixel_aupro`` for speed).
        aupro_fpr_limit: FPR integration limit of AUPRO.
        aupro_num_thresholds: ``None`` for the exact MVTec AUPRO, ``200`` for the thresholded AUPRO of the
            official MRAD/AnomalyCLIP code.
        aupro_fpr_normalization: ``"limit"``, ``"max"`` or ``"minmax"``; ``None`` picks the variant's
            default (``"limit"`` exact, ``"minmax"`` thresholded).
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRIC_KEYS,
        aupro_fpr_limit: float = 0.3,
        aupro_num_thresholds: int | None = None,
        aupro_fpr_normalization: str | None = None,
    ) -> None:
        requested = [str(m) for m in metrics]
        unknown = sorted(set(requested) - set(METRIC_KEYS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {list(METRIC_KEYS)}")
        if not requested:
            raise ValueError(f"no metrics requested; valid metrics: {list(METRIC_KEYS)}")
        self.metrics = tuple(key for key in METRIC_KEYS if key in requested)
        number_in(aupro_fpr_limit, "evaluation.aupro_fpr_limit", 0.0, 1.0, low_open=True)
        integer_at_least(aupro_num_thresholds, "evaluation.aupro_num_thresholds", 1, none="exact AUPRO")
        self.aupro_settings = functional.resolve_aupro_settings(
            aupro_fpr_limit, aupro_num_thresholds, aupro_fpr_normalization
        )
        self._needs_maps = any(key.startswith("pixel_") for key in self.metrics)
        self._data: dict[str, _CategoryData] = {}
        self.image_threshold: float | None = None
        self.pixel_threshold: float | None = None

    def set_thresholds(self, image: float | None, pixel: float | None = None) -> None:
        """Also compute precision, recall and F1 of the decisions ``score >= threshold`` per level (the
        pixel level only where pixel metrics are computed, the maps being kept for them)."""
        self.image_threshold = None if image is None else float(image)
        self.pixel_threshold = None if pixel is None else float(pixel)

    @property
    def computed_metrics(self) -> tuple[str, ...]:
        """The metric keys :meth:`compute` fills: the requested ones and those of the thresholds set."""
        thresholded = []
        if self.image_threshold is not None:
            thresholded += [key for key in THRESHOLDED_KEYS if key.startswith("image_")]
        if self.pixel_threshold is not None and self._needs_maps:
            thresholded += [key for key in THRESHOLDED_KEYS if key.startswith("pixel_")]
        return (*self.metrics, *thresholded)

    @property
    def needs_maps(self) -> bool:
        """Whether any requested metric is a pixel metric (anomaly maps must be kept)."""
        return self._needs_maps

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._data = {}

    def update(
        self,
        categories: Sequence[str] | str,
        image_scores: Tensor,
        labels: Tensor,
        maps: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            categories: the category of each image (or one name for the whole batch).
            image_scores: ``[B]`` image anomaly scores.
            labels: ``[B]`` binary image labels.
            maps: ``[B, H, W]`` anomaly maps, or ``None`` for image-only data (pixel metrics become NaN).
            masks: ``[B, H, W]`` (or ``[B, 1, H, W]``) binary ground-truth masks; given iff ``maps`` is.
        """
        image_scores = image_scores.detach().reshape(-1)
        labels = labels.detach().reshape(-1)
        batch = image_scores.numel()
        names = [categories] * batch if isinstance(categories, str) else [str(c) for c in categories]
        if len(names) != batch or labels.numel() != batch:
            raise ValueError(
                f"batch sizes differ: {len(names)} categories, {batch} image scores, {labels.numel()} labels"
            )
        if not torch.isfinite(image_scores).all():
            raise ValueError("image_scores contains NaN or infinite values")
        if labels.dtype != torch.bool and not ((labels == 0) | (labels == 1)).all():
            raise ValueError("labels must be binary (bool or 0/1)")
        if (maps is None) != (masks is None):
            raise ValueError("maps and masks must be given together (or both None for image-only data)")
        if maps is not None and masks is not None:
            maps, masks = self._check_maps(maps.detach(), masks.detach(), batch)

        # Scores keep their precision (they are few); maps are float32 and masks bool to bound memory.
        image_scores = _owned(
            image_scores, torch.float64 if image_scores.dtype == torch.float64 else torch.float32
        )
        labels = _owned(labels, torch.bool)
        kept_maps = kept_masks = None
        if maps is not None and masks is not None and self._needs_maps:  # both or neither (checked above)
            kept_maps, kept_masks = _owned(maps, torch.float32), _owned(masks, torch.bool)

        for name in dict.fromkeys(names):  # first-seen order, which is the dataset's category order
            if len(names) == 1 or all(n == name for n in names):
                index = None
            else:
                index = torch.tensor([i for i, n in enumerate(names) if n == name])
            data = self._data.setdefault(name, _CategoryData())
            if data.has_maps is None:
                data.has_maps = maps is not None
            elif data.has_maps != (maps is not None):
                raise ValueError(f"category {name!r}: some batches have anomaly maps and some do not")
            data.scores.append(image_scores if index is None else image_scores[index])
            data.labels.append(labels if index is None else labels[index])
            if kept_maps is not None and kept_masks is not None:
                data.maps.append(kept_maps if index is None else kept_maps[index])
                data.masks.append(kept_masks if index is None else kept_masks[index])

    @staticmethod
    def _check_maps(maps: Tensor, masks: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.ndim != 3 or maps.shape != masks.shape or maps.shape[0] != batch:
            raise ValueError(
                f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [B, H, W] with B = {batch}"
            )
        if not torch.isfinite(maps).all():
            raise ValueError("maps contains NaN or infinite values")
        if masks.dtype != torch.bool and not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must be binary (bool or 0/1)")
        return maps, masks

    def compute(self) -> EvaluationResult:
        """Metrics of every category seen since the last reset, in first-seen order."""
        per_category: dict[str, dict[str, float]] = {}
        counts: dict[str, dict[str, int]] = {}
        for name, data in self._data.items():
            start = time.perf_counter()
            scores, labels = _concat(data.scores), _concat(data.labels)
            counts[name] = {"n_images": int(labels.numel()), "n_anomalous": int(labels.sum())}
            values = dict.fromkeys(self.computed_metrics, math.nan)
            if self.image_threshold is not None:
                decided = decide(scores.numpy(), self.image_threshold)
                computed = precision_recall_f1(decided, labels.numpy())
                values.update({f"image_{name}": value for name, value in computed.items()})

            image_keys = [key for key in self.metrics if key in _IMAGE]
            if image_keys:
                computed = functional.binary_metrics(scores, labels, [_IMAGE[key] for key in image_keys])
                values.update({key: computed[_IMAGE[key]] for key in image_keys})

            if data.has_maps and self._needs_maps:
                maps, masks = _concat(data.maps), _concat(data.masks)
                pixel_keys = [key for key in self.metrics if key in _PIXEL]
                if pixel_keys:
                    computed = functional.binary_metrics(maps, masks, [_PIXEL[key] for key in pixel_keys])
                    values.update({key: computed[_PIXEL[key]] for key in pixel_keys})
                if "pixel_aupro" in self.metrics:
                    values["pixel_aupro"] = functional.aupro(maps, masks, **self.aupro_settings)
                if self.pixel_threshold is not None:
                    decided = decide(maps.numpy(), self.pixel_threshold)
                    computed = precision_recall_f1(decided, masks.numpy())
                    values.update({f"pixel_{name}": value for name, value in computed.items()})

            per_category[name] = values
            log.debug(
                "metrics of %r (%d images) computed in %.2f s",
                name,
                counts[name]["n_images"],
                time.perf_counter() - start,
            )
        if not per_category:
            log.warning("CategoryEvaluator.compute() called before any update(): the result is empty")
        return EvaluationResult(
            per_category=per_category,
            counts=counts,
            metrics=self.computed_metrics,
            settings={"aupro": dict(self.aupro_settings)},
        )
