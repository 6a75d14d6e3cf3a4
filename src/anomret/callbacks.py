"""Lightning callbacks: test overlays (saved and logged to W&B) and streamed prediction outputs."""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from anomret.data.batch import Batch
from anomret.data.io import read_image
from anomret.data.transforms import SquareResizeCrop
from anomret.decisions.record import Thresholds
from anomret.decisions.writers import decision_columns
from anomret.encoders.base import Preprocess
from anomret.files import atomic_open
from anomret.viz import overlay_panel, save_png

log = logging.getLogger(__name__)


def display_image(image_path: str, preprocess: Preprocess, size: int) -> np.ndarray:
    """The pixels an anomaly map covers: the image through the encoder's resize and crop, at ``size``."""
    geometry = SquareResizeCrop(preprocess.resize, preprocess.crop)
    image = geometry(Image.fromarray(read_image(image_path)), preprocess.interpolation)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


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
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.n_per_category <= 0 or not outputs:
            return
        maps = outputs["anomaly_map"].detach().float().cpu()
        scores = outputs["image_score"].detach().float().cpu()
        preprocess = trainer.datamodule.preprocess
        for i, category in enumerate(batch.category):
            low, high = float(maps[i].min()), float(maps[i].max())
            bounds = self._ranges.setdefault(category, [low, high])
            bounds[0], bounds[1] = min(bounds[0], low), max(bounds[1], high)
            label = int(batch.label[i])
            if not self._wanted(category, label):
                continue
            self._kept[category].append(
                _Kept(
                    # Read from disk: with the feature store, a batch may hold features instead of images.
                    image=display_image(batch.image_path[i], preprocess, maps.shape[-1]),
                    anomaly_map=maps[i].numpy(),
                    mask=batch.mask[i].detach().cpu().numpy() > 0.5,
                    score=float(scores[i]),
                    label=label,
                    # The defect folder disambiguates stems repeated across defect types (MVTec: 000.png).
                    name=f"{Path(batch.image_path[i]).parent.name}_{Path(batch.image_path[i]).stem}",
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


class PredictionWriter(BasePredictionWriter):
    """Streams predictions to disk: one ``.npy`` map per image, ``predictions.csv``, then overlays; with
    thresholds (:attr:`thresholds`), also each image's decision and its defect mask.

    Output files mirror the input's tree and keep each image's whole file name, so two images never share
    an output (``a.png``, ``a.jpg``, ``a_png.png`` and ``sub/a.png`` give ``maps/a.png.npy``,
    ``maps/a.jpg.npy``, ``maps/a_png.png.npy`` and ``maps/sub/a.png.npy``); each CSV row names its files.

    Maps are written batch by batch, so memory does not grow with the number of images. Overlays are
    drawn at the end, from the saved maps, on one colour range for the whole input (its 1st to 99.9th
    percentile of map values), so images can be compared with each other.

    With thresholds, each CSV row also gives ``label`` (``anomalous`` / ``normal``), the ``threshold`` and
    ``pixel_threshold`` used, the ``defect_fraction`` of map pixels at or above the pixel threshold and,
    with ``masks``, the ``mask_file``: ``masks/<relative path>.png``, 0/255 on the map's grid (the same
    pixels as the ``.npy`` map: the encoder's view of the image). ``normalized_score`` is added when the
    thresholds normalise.

    Args:
        output_dir: where ``predictions.csv``, ``maps/`` and ``overlays/`` go.
        preprocess: the encoder's preprocessing, to draw overlays on the pixels the maps cover.
        input_dir: the folder the images were found under; output paths mirror paths relative to it.
        save_maps: keep the ``.npy`` anomaly maps (they are still used for the overlays).
        overlays: draw overlay PNGs.
        masks: write the defect mask PNG of each image (when there is a pixel threshold).
    """

    def __init__(
        self,
        output_dir: str,
        preprocess: Preprocess,
        input_dir: str | None = None,
        save_maps: bool = True,
        overlays: bool = True,
        masks: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.preprocess = preprocess
        self.input_dir = None if input_dir is None else Path(input_dir)
        self.save_maps = save_maps
        self.overlays = overlays
        self.masks = masks
        self.thresholds: Thresholds | None = None
        self.rows: list[dict[str, Any]] = []
        self._samples: list[np.ndarray] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows, self._samples = [], []

    def relative(self, image_path: str) -> str:
        """The image's path below the input folder (its file name when it lies elsewhere)."""
        path = Path(image_path)
        if self.input_dir is not None and path.is_relative_to(self.input_dir):
            return path.relative_to(self.input_dir).as_posix()
        return path.name

    def output(self, folder: str, image_path: str, suffix: str) -> Path:
        """``output_dir/folder/<relative path of the image><suffix>``: unique per image by construction."""
        return self.output_dir / folder / f"{self.relative(image_path)}{suffix}"

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if prediction is None:  # a pass that predicts nothing to write (calibration)
            return
        maps = prediction["anomaly_map"].detach().float().cpu().numpy()
        scores = {k: v.detach().float().cpu() for k, v in prediction.items() if k != "anomaly_map"}
        for i, image_path in enumerate(batch.image_path):
            map_path = self.output("maps", image_path, ".npy")
            map_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(map_path, maps[i])
            # A strided subsample is enough to place the colour range; all values would not fit in memory.
            self._samples.append(maps[i].reshape(-1)[:: max(1, maps[i].size // 4096)])
            row = {"image_path": image_path, "category": batch.category[i]}
            row.update({name: float(values[i]) for name, values in scores.items()})
            row["map_max"] = float(maps[i].max())
            if self.thresholds is not None:
                row.update(self._decisions(image_path, row["image_score"], maps[i]))
            if self.save_maps:
                row["map_file"] = map_path.relative_to(self.output_dir).as_posix()
            if self.overlays:
                row["overlay_file"] = (
                    self.output("overlays", image_path, ".png").relative_to(self.output_dir).as_posix()
                )
            self.rows.append(row)

    def _decisions(self, image_path: str, score: float, anomaly_map: np.ndarray) -> dict[str, Any]:
        thresholds = self.thresholds
        assert thresholds is not None
        row = decision_columns(thresholds, score)
        row["pixel_threshold"] = thresholds.pixel
        mask = thresholds.mask(anomaly_map)
        row["defect_fraction"] = None if mask is None else float(mask.mean())
        if self.masks and mask is not None:
            path = self.output("masks", image_path, ".png")
            save_png(mask.astype(np.uint8) * 255, path)
            row["mask_file"] = path.relative_to(self.output_dir).as_posix()
        return row

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        self._write_csv()
        if self.overlays:
            self._draw_overlays()
        if not self.save_maps:
            shutil.rmtree(self.output_dir / "maps", ignore_errors=True)
        log.info("wrote predictions for %d images to %s", len(self.rows), self.output_dir)

    def _write_csv(self) -> None:
        with atomic_open(self.output_dir / "predictions.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)

    def _draw_overlays(self) -> None:
        values = np.concatenate(self._samples)
        vmin, vmax = float(np.percentile(values, 1)), float(np.percentile(values, 99.9))
        for row in self.rows:
            anomaly_map = np.load(self.output("maps", row["image_path"], ".npy"))
            image = display_image(row["image_path"], self.preprocess, anomaly_map.shape[-1])
            caption = f"{self.relative(row['image_path'])}\nscore {row['image_score']:.4f}"
            panel = overlay_panel(image, anomaly_map, None, vmin, vmax, caption=caption)
            save_png(panel, self.output("overlays", row["image_path"], ".png"))
