"""Lightning callbacks: anomaly-map overlays saved as PNGs and logged to image-capable loggers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from anomret.viz import denormalize, overlay_panel, save_png

log = logging.getLogger(__name__)


@dataclass
class _Kept:
    image: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray
    score: float
    label: int
    name: str


class OverlayWriter(Callback):
    """Keeps a few test images per category and writes overlays at the end of the test pass.

    Per category it keeps the first ``n_per_category - 1`` anomalous images and the first normal one
    (or more anomalous ones when there are no normals), and colours every overlay of a category on
    that category's score range, tracked over all its maps.

    Args:
        output_dir: overlays go to ``output_dir/overlays/<category>/``.
        n_per_category: images kept per category (0 disables the callback).
    """

    def __init__(self, output_dir: str, n_per_category: int = 4) -> None:
        self.output_dir = Path(output_dir)
        self.n_per_category = n_per_category
        self._kept: dict[str, list[_Kept]] = {}
        self._ranges: dict[str, list[float]] = {}
        self.written: list[Path] = []

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._kept, self._ranges, self.written = {}, {}, []

    def _wanted(self, category: str, label: int) -> bool:
        kept = self._kept.setdefault(category, [])
        if len(kept) >= self.n_per_category:
            return False
        normals = sum(1 for item in kept if item.label == 0)
        anomalous = len(kept) - normals
        if label == 0:
            return normals == 0
        # Leave one slot for a normal image until one has been seen.
        return normals > 0 or anomalous < max(self.n_per_category - 1, 1)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.n_per_category <= 0 or not outputs:
            return
        maps = outputs["anomaly_map"].detach().float().cpu()
        scores = outputs["image_score"].detach().float().cpu()
        preprocess = trainer.datamodule.preprocess
        for i, category in enumerate(batch["category"]):
            low, high = float(maps[i].min()), float(maps[i].max())
            bounds = self._ranges.setdefault(category, [low, high])
            bounds[0], bounds[1] = min(bounds[0], low), max(bounds[1], high)
            label = int(batch["label"][i])
            if not self._wanted(category, label):
                continue
            self._kept[category].append(
                _Kept(
                    image=denormalize(batch["image"][i], preprocess.mean, preprocess.std, maps.shape[-1]),
                    anomaly_map=maps[i].numpy(),
                    mask=batch["mask"][i].detach().cpu().numpy() > 0.5,
                    score=float(scores[i]),
                    label=label,
                    # The defect folder disambiguates stems repeated across defect types (MVTec: 000.png).
                    name=f"{Path(batch['image_path'][i]).parent.name}_{Path(batch['image_path'][i]).stem}",
                )
            )

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for category, kept in self._kept.items():
            vmin, vmax = self._ranges[category]
            panels, captions = [], []
            for index, item in enumerate(kept):
                caption = f"{category}/{item.name}\nlabel {item.label}  score {item.score:.4f}"
                panel = overlay_panel(item.image, item.anomaly_map, item.mask, vmin, vmax, caption=caption)
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in category)
                self.written.append(
                    save_png(panel, self.output_dir / "overlays" / safe / f"{index:02d}_{item.name}.png")
                )
                panels.append(panel)
                captions.append(caption.replace("\n", "  "))
            for logger in wandb_loggers:
                logger.log_image(key=f"overlays/{category}", images=panels, caption=captions)
        log.info("wrote %d overlay images to %s", len(self.written), self.output_dir / "overlays")
