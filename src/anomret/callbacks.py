"""Lightning callbacks: test overlays (saved, indexed for the report page and logged to W&B) and streamed
prediction outputs."""

from __future__ import annotations

import csv
import heapq
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
from anomret.data.io import read_image, read_mask
from anomret.data.transforms import crop_box
from anomret.decisions.record import Thresholds
from anomret.decisions.writers import decision_columns
from anomret.distributed import gather_to_zero
from anomret.encoders.base import Preprocess
from anomret.files import atomic_open
from anomret.viz import overlay_panel, predicted_mask, save_png

log = logging.getLogger(__name__)


@dataclass
class _Kept:
    index: int  # dataset row: one image, however many pools keep it
    anomaly_map: np.ndarray  # float16 on the map grid: half the memory, far below a colour step
    grid_mask: np.ndarray | None  # ground truth on the map grid, kept when the mask file is not known
    mask_path: str | None
    image_path: str
    score: float
    label: int

    @property
    def name(self) -> str:
        # The defect folder disambiguates stems repeated across defect types (MVTec: 000.png).
        path = Path(self.image_path)
        return f"{path.parent.name}_{path.stem}"


# The pools of a category, in the order overlays are taken from them: the likeliest false positives,
# the likeliest false negatives, then the clearest detections.
POOLS = ("highest_normal", "lowest_anomalous", "highest_anomalous")


def _rank(pool: str, score: float, index: int) -> tuple[float, int]:
    # Each pool keeps the images of largest rank; on equal scores the earlier dataset row wins.
    return (-score if pool == "lowest_anomalous" else score), -index


Heap = list[tuple[tuple[float, int], _Kept]]


def _wants(heap: Heap, rank: tuple[float, int], size: int) -> bool:
    # A row already held (seen by two processes) has the same rank, so it is not taken twice.
    return (len(heap) < size or rank > heap[0][0]) and all(held != rank for held, _ in heap)


def _offer(heap: Heap, pool: str, item: _Kept, size: int) -> None:
    rank = _rank(pool, item.score, item.index)
    if not _wants(heap, rank, size):
        return
    if len(heap) < size:
        heapq.heappush(heap, (rank, item))
    else:
        heapq.heapreplace(heap, (rank, item))


def _merge(
    shares: list[tuple[dict[str, dict[str, Heap]], dict[str, list[float]]]], size: int
) -> tuple[dict[str, dict[str, list[_Kept]]], dict[str, list[float]]]:
    """One set of pools and colour ranges from every process's (a row seen twice counts once)."""
    pools: dict[str, dict[str, Heap]] = {}
    ranges: dict[str, list[float]] = {}
    for share_pools, share_ranges in shares:
        for category, (low, high) in share_ranges.items():
            bounds = ranges.setdefault(category, [low, high])
            bounds[0], bounds[1] = min(bounds[0], low), max(bounds[1], high)
        for category, category_pools in share_pools.items():
            merged = pools.setdefault(category, {pool: [] for pool in POOLS})
            for pool, heap in category_pools.items():
                for _, item in heap:
                    _offer(merged[pool], pool, item, size)
    items = {c: {pool: [item for _, item in heap] for pool, heap in p.items()} for c, p in pools.items()}
    return items, ranges


def select_overlays(pools: dict[str, list[_Kept]], n: int) -> list[_Kept]:
    """Up to ``n`` distinct images, taken in turn from the pools (each sorted best first)."""
    ordered = {
        pool: sorted(pools.get(pool, []), key=lambda k: _rank(pool, k.score, k.index), reverse=True)
        for pool in POOLS
    }
    chosen: dict[int, _Kept] = {}
    while len(chosen) < n and any(ordered.values()):
        for pool in POOLS:
            while ordered[pool] and ordered[pool][0].index in chosen:
                ordered[pool].pop(0)
            if ordered[pool] and len(chosen) < n:
                item = ordered[pool].pop(0)
                chosen[item.index] = item
    return list(chosen.values())


def map_box(image_width: int, image_height: int, preprocess: Preprocess) -> tuple[int, int, int, int]:
    """The region of the original image an anomaly map covers: the encoder's centre crop of its square
    resize, in the original image's pixels."""
    top, left = crop_box(preprocess.resize, preprocess.resize, preprocess.crop)
    sx, sy = image_width / preprocess.resize, image_height / preprocess.resize
    return (
        round(left * sx),
        round(top * sy),
        round((left + preprocess.crop) * sx),
        round((top + preprocess.crop) * sy),
    )


class OverlayWriter(Callback):
    """Overlays of the most telling test images of each category, drawn at the end of the test pass.

    While the test pass runs it keeps, per category and in bounded memory (at most ``n_per_category``
    maps per pool), the highest-scoring normal images (the likeliest false positives), the lowest-scoring
    anomalous ones (the likeliest false negatives) and the highest-scoring anomalous ones; under DDP every
    process's candidates are gathered. At the end it writes ``n_per_category`` of them per category, taken
    in turn from those pools, to ``overlays/<category>/`` and lists them in ``overlays/index.csv``
    (``category,image,label,score,file``), which the report page reads.

    Each overlay is drawn at the image's own resolution (the map upsampled to the region the encoder
    saw), with the ground-truth outline read from the mask file, a colour bar on the category's score
    range (tracked over all its maps) and, with ``pixel_threshold``, the outline of the predicted mask.

    Args:
        output_dir: overlays go to ``output_dir/overlays/<category>/``.
        n_per_category: images written per category (0 disables the callback).
        pixel_threshold: a map value at or above which a pixel is predicted anomalous; ``None``: no
            predicted outline.
    """

    def __init__(
        self, output_dir: str, n_per_category: int = 4, pixel_threshold: float | None = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.n_per_category = n_per_category
        self.pixel_threshold = pixel_threshold
        self._pools: dict[str, dict[str, Heap]] = {}
        self._ranges: dict[str, list[float]] = {}
        self.written: list[Path] = []

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pools, self._ranges, self.written = {}, {}, []

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
        # Lightning sets Trainer.datamodule when a loop starts but does not declare it.
        samples = getattr(trainer.datamodule, "test_samples", None)  # type: ignore[attr-defined]
        for i, category in enumerate(batch.category):
            low, high = float(maps[i].min()), float(maps[i].max())
            bounds = self._ranges.setdefault(category, [low, high])
            bounds[0], bounds[1] = min(bounds[0], low), max(bounds[1], high)
            index, label = int(batch.index[i]), int(batch.label[i])
            pools = self._pools.setdefault(category, {pool: [] for pool in POOLS})
            item = None
            for pool in ("highest_normal",) if label == 0 else ("lowest_anomalous", "highest_anomalous"):
                if not _wants(pools[pool], _rank(pool, float(scores[i]), index), self.n_per_category):
                    continue
                if item is None:  # copied only for an image some pool takes
                    mask_path = None if samples is None else samples[index].mask_path
                    item = _Kept(
                        index=index,
                        anomaly_map=maps[i].numpy().astype(np.float16),
                        grid_mask=None if samples is not None else batch.mask[i].cpu().numpy() > 0.5,
                        mask_path=None if mask_path is None else str(mask_path),
                        image_path=str(batch.image_path[i]),
                        score=float(scores[i]),
                        label=label,
                    )
                _offer(pools[pool], pool, item, self.n_per_category)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.n_per_category <= 0:
            return
        shares = gather_to_zero((self._pools, self._ranges))  # every process takes part
        if not trainer.is_global_zero or shares is None:
            return
        pools, ranges = _merge(shares, self.n_per_category)
        preprocess = trainer.datamodule.preprocess  # type: ignore[attr-defined]  # set, not declared
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        rows = []
        for category, category_pools in pools.items():
            vmin, vmax = ranges[category]
            kept = sorted(select_overlays(category_pools, self.n_per_category), key=lambda k: -k.score)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in category)
            panels, captions = [], []
            for position, item in enumerate(kept):
                caption = f"{category}/{item.name}\nlabel {item.label}  score {item.score:.4f}"
                panel = self.draw(item, preprocess, vmin, vmax, caption)
                path = save_png(
                    panel, self.output_dir / "overlays" / safe / f"{position:02d}_{item.name}.png"
                )
                self.written.append(path)
                rows.append(
                    [
                        category,
                        item.image_path,
                        item.label,
                        repr(item.score),
                        path.relative_to(self.output_dir).as_posix(),
                    ]
                )
                panels.append(panel)
                captions.append(caption.replace("\n", "  "))
            for logger in wandb_loggers:
                logger.log_image(key=f"overlays/{category}", images=panels, caption=captions)
        with atomic_open(self.output_dir / "overlays" / "index.csv", "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["category", "image", "label", "score", "file"])
            writer.writerows(rows)
        log.info("wrote %d overlay images to %s", len(self.written), self.output_dir / "overlays")

    def draw(self, item: _Kept, preprocess: Preprocess, vmin: float, vmax: float, caption: str) -> np.ndarray:
        """The overlay of one kept image at its own resolution."""
        image = read_image(item.image_path)
        height, width = image.shape[:2]
        if item.mask_path is not None:
            mask = read_mask(item.mask_path)
        elif item.grid_mask is not None:
            mask = item.grid_mask
        else:  # a normal image, or a dataset without masks: nothing to outline
            mask = np.zeros((height, width), bool)
        return overlay_panel(
            image,
            item.anomaly_map.astype(np.float32),
            mask,
            vmin,
            vmax,
            caption=caption,
            map_box=map_box(width, height, preprocess),
            pixel_threshold=self.pixel_threshold,
        )


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
            row: dict[str, Any] = {"image_path": image_path, "category": batch.category[i]}
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
        if self.masks and thresholds.pixel is not None:
            with Image.open(image_path) as image:  # the header only: the mask is drawn at its size
                width, height = image.size
            box = map_box(width, height, self.preprocess)
            at_image = predicted_mask(anomaly_map, thresholds.pixel, box, (height, width))
            path = self.output("masks", image_path, ".png")
            save_png(at_image.astype(np.uint8) * 255, path)
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
        pixel_threshold = None if self.thresholds is None else self.thresholds.pixel
        for row in self.rows:
            anomaly_map = np.load(self.output("maps", row["image_path"], ".npy"))
            image = read_image(row["image_path"])  # drawn at its own resolution
            height, width = image.shape[:2]
            caption = f"{self.relative(row['image_path'])}\nscore {row['image_score']:.4f}"
            if "label" in row:
                caption += f" ({row['label']})"
            panel = overlay_panel(
                image,
                anomaly_map,
                None,
                vmin,
                vmax,
                caption=caption,
                map_box=map_box(width, height, self.preprocess),
                pixel_threshold=pixel_threshold,
            )
            save_png(panel, self.output("overlays", row["image_path"], ".png"))
