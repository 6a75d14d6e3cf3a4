"""The decisions of a test pass, per image: ``predictions.csv`` beside ``results.json``.

Under DDP every process scores its share (a sampler may repeat a few images); the rows are gathered on
rank 0, each image kept once, in dataset order.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer

from anomret.data.batch import Batch
from anomret.decisions.record import Thresholds
from anomret.distributed import gather_to_zero
from anomret.files import atomic_open


def decision_columns(thresholds: Thresholds, score: float) -> dict[str, Any]:
    """The columns every per-image output gives beside a score: label, threshold, normalised score."""
    row: dict[str, Any] = {"label": thresholds.label(score), "threshold": thresholds.image}
    if thresholds.normalize:
        row["normalized_score"] = thresholds.normalized_score(score)
    return row


class EvaluationDecisionWriter(Callback):
    """Writes ``predictions.csv`` of the test images (score, true label, decision, threshold) once the run
    has thresholds (:attr:`thresholds`, set after calibration); writes nothing without them."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.thresholds: Thresholds | None = None
        self._rows: list[dict[str, Any]] = []
        self.written: Path | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows, self.written = [], None

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.thresholds is None or not outputs:
            return
        scores = outputs["image_score"].detach().double().cpu().tolist()
        for i, score in enumerate(scores):
            self._rows.append(
                {
                    "index": int(batch.index[i]),
                    "image_path": batch.image_path[i],
                    "category": batch.category[i],
                    "true_label": int(batch.label[i]),
                    "image_score": score,
                    **decision_columns(self.thresholds, score),
                }
            )

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.thresholds is None:
            return
        shares = gather_to_zero(self._rows)
        if shares is None or not trainer.is_global_zero:
            return
        rows = {row["index"]: row for share in shares for row in share}
        ordered = [{k: v for k, v in rows[i].items() if k != "index"} for i in sorted(rows)]
        if not ordered:
            return
        path = self.output_dir / "predictions.csv"
        with atomic_open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ordered[0]))
            writer.writeheader()
            writer.writerows(ordered)
        self.written = path
