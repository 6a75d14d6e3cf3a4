"""Test-pass results gathered across processes, then evaluated once, per category.

Under DDP every process scores its share of the test images (Lightning's distributed sampler may repeat
a few to even out the shares). Each batch is kept with the dataset row numbers of its images; at the end
rank 0 gathers every share, keeps each row once, restores the dataset order and computes the metrics
with :class:`~anomret.metrics.evaluator.CategoryEvaluator`; the result is broadcast, so every process
reports the numbers a single process would. The same rows, in the same order, become the result's
per-image records (category, image path, label, score: ``image_scores.csv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from anomret.distributed import broadcast_from_zero, gather_to_zero
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.metrics.results import EvaluationResult, ImageScore


@dataclass
class _ScoredBatch:
    """One scored batch on the CPU, as it is gathered: dataset row numbers ``[B]`` and what belongs to
    each row; ``map``/``mask`` ``[B, H, W]`` only when the evaluator needs them."""

    index: Tensor
    category: list[str]
    image: list[str]
    score: Tensor
    label: Tensor
    map: Tensor | None
    mask: Tensor | None


class GatheredEvaluation:
    """Collects scored batches with their row indices; :meth:`compute` evaluates them across ranks."""

    def __init__(self, evaluator: CategoryEvaluator) -> None:
        self.evaluator = evaluator
        self._batches: list[_ScoredBatch] = []

    def reset(self) -> None:
        self._batches = []
        self.evaluator.reset()

    def update(
        self,
        indices: Tensor,
        categories: Sequence[str],
        image_scores: Tensor,
        labels: Tensor,
        maps: Tensor | None,
        masks: Tensor | None,
        image_paths: Sequence[str] | None = None,
    ) -> None:
        kept_map = kept_mask = None
        if maps is not None and self.evaluator.needs_maps:
            assert masks is not None  # masks come with maps
            kept_map, kept_mask = maps.detach().cpu().float(), masks.detach().cpu().bool()
        self._batches.append(
            _ScoredBatch(
                index=indices.detach().cpu().long().reshape(-1),
                category=[str(c) for c in categories],
                image=[""] * len(categories) if image_paths is None else [str(p) for p in image_paths],
                score=image_scores.detach().cpu().float().reshape(-1),
                label=labels.detach().cpu().reshape(-1),
                map=kept_map,
                mask=kept_mask,
            )
        )

    def compute(self) -> EvaluationResult:
        gathered = gather_to_zero(self._batches)
        self._batches = []
        result = None
        if gathered is not None:
            result = self._evaluate([batch for share in gathered for batch in share])
        result = broadcast_from_zero(result)
        assert result is not None  # rank 0 gathered every share and evaluated them
        return result

    def _evaluate(self, batches: list[_ScoredBatch | None]) -> EvaluationResult:
        # Rows in dataset order, each once: (index, batch number, position in batch).
        seen: dict[int, tuple[int, int]] = {}
        for number, batch in enumerate(batches):
            assert batch is not None  # none is released yet
            for position, index in enumerate(batch.index.tolist()):
                seen.setdefault(index, (number, position))
        self.evaluator.reset()
        order = sorted(seen)
        remaining = [0] * len(batches)
        for number, _ in seen.values():
            remaining[number] += 1
        # Feed consecutive rows of one batch together; release each batch once it has been read.
        images: list[ImageScore] = []
        start = 0
        while start < len(order):
            number, position = seen[order[start]]
            end = start + 1
            while end < len(order) and seen[order[end]] == (number, position + end - start):
                end += 1
            batch = batches[number]
            assert batch is not None  # released only after its last row was read
            rows = slice(position, position + end - start)
            self.evaluator.update(
                batch.category[rows],
                batch.score[rows],
                batch.label[rows],
                None if batch.map is None else batch.map[rows],
                None if batch.mask is None else batch.mask[rows],
            )
            images += [
                ImageScore(category, image, int(label), float(score))
                for category, image, label, score in zip(
                    batch.category[rows],
                    batch.image[rows],
                    batch.label[rows].tolist(),
                    batch.score[rows].tolist(),
                    strict=True,
                )
            ]
            remaining[number] -= end - start
            if remaining[number] == 0:
                batches[number] = None  # the evaluator holds its own copy now: keep one copy in memory
            start = end
        result = self.evaluator.compute()
        result.images = images
        return result
