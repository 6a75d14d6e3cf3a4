"""Calibration: which images set the thresholds (``calibration=`` group), and the pass that scores them.

Thresholds come from images named in the config, never from the test images a run then reports:

- ``images: holdout`` — a seeded share of each category's **normal train** images of ``dataset``
  (``calibration.holdout``), held out of the memory: RAD builds its memory from that split, and would
  otherwise retrieve the very image it calibrates on (a zero score). Method ``fpr`` only.
- ``images: dataset`` — a labelled validation dataset (``calibration.dataset``: a dataset config, split
  and categories included); ``f1`` uses its labels (and masks for the pixel threshold), ``fpr`` its
  normal images. Refused when it is the split that is reported.
- ``images: folder`` — a folder of normal images (all taken as normal). Method ``fpr`` only.

``method: f1`` is anomalib's adaptive threshold (the highest F1 on the calibration images); ``method: fpr``
the lowest threshold that flags at most ``target_fpr`` of the normal calibration images
(``pixel_target_fpr`` of their pixels). ``calibration.thresholds=FILE`` uses saved thresholds instead.
The calibration pass runs the model's own prediction loop under the run's Trainer (devices, DDP).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from omegaconf import DictConfig, OmegaConf

from anomret.config import resolved_dict
from anomret.data.batch import Batch
from anomret.data.samples import NORMAL, SampleTable
from anomret.decisions.record import Thresholds, ThresholdsError, scoring_identity
from anomret.decisions.settings import CalibrationError, CalibrationSettings, settings_of
from anomret.distributed import all_gather
from anomret.fingerprint import digest
from anomret.metrics.thresholds import (
    allowed_false_positives,
    decide,
    f1_optimal_threshold,
    fpr_threshold,
    precision_recall_f1,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ images
def _train_split(cfg: DictConfig) -> Any:
    return {**resolved_dict(cfg.dataset), "split": "train", "require_masks": False}


def _load(source: Mapping[str, Any]) -> SampleTable:
    from anomret.data.datamodule import SourceSpec

    spec = SourceSpec.from_config(source)
    if spec.synthetic:
        from anomret.data.synthetic import ensure_synthetic

        ensure_synthetic(Path(spec.root).parent, domains=(spec.name,))
    return spec.load()


def held_out_images(cfg: DictConfig) -> SampleTable | None:
    """The normal train images ``images: holdout`` calibrates on (and the memory leaves out); ``None``
    for other calibrations."""
    settings = settings_of(cfg)
    if settings.images != "holdout" or not settings.calibrates:
        return None
    from anomret.memory.fewshot import select_images

    normals = _load(_train_split(cfg)).filter(label=NORMAL)
    if not normals:
        raise CalibrationError(
            f"calibration.images=holdout needs normal train images of {cfg.dataset.get('name')}, which has "
            "none. Fix: calibrate on a validation dataset or a folder of normal images."
        )
    return select_images(normals, fraction=float(settings.holdout), seed=int(settings.seed))


def without(samples: SampleTable, removed: SampleTable) -> SampleTable:
    paths = {str(sample.image_path) for sample in removed}
    return SampleTable(sample for sample in samples if str(sample.image_path) not in paths)


def calibration_images(cfg: DictConfig, settings: CalibrationSettings) -> SampleTable:
    if settings.images == "holdout":
        held_out = held_out_images(cfg)
        assert held_out is not None
        return held_out
    if settings.images == "dataset":
        return _load(settings.dataset or {})
    from anomret.data.folder import image_folder_samples, readable_samples

    folder = str(settings.folder)
    return readable_samples(image_folder_samples(folder, source="calibration"), folder)


def refuse_overlaps(samples: SampleTable, test: SampleTable | None, bank_metadata: dict[str, Any]) -> None:
    """Calibration images must be neither reported test images nor memory images."""
    paths = {str(Path(sample.image_path).resolve()) for sample in samples}
    if test is not None:
        shared = sorted(paths & {str(Path(s.image_path).resolve()) for s in test})
        if shared:
            raise CalibrationError(
                f"{len(shared)} calibration image(s) are test images this run reports (e.g. {shared[0]}): "
                "thresholds set on them would grade themselves. Fix: calibrate on other images."
            )
    rows = bank_metadata.get("images") or []
    in_memory = sorted(paths & {str(Path(str(row[0])).resolve()) for row in rows})
    if in_memory:
        raise CalibrationError(
            f"{len(in_memory)} calibration image(s) are in the memory bank (e.g. {in_memory[0]}): each "
            "would retrieve itself and score as perfectly normal. Fix: calibration=normal_holdout in the "
            "run that builds the bank (it leaves the held-out images out), or calibrate on other images."
        )


# ------------------------------------------------------------------------------------------- pass
class CalibrationPass(LightningModule):
    """``trainer.predict(CalibrationPass(model), dataloaders=...)``: the model's own forward over the
    calibration images; every process ends with every image's score, label, map and mask."""

    def __init__(self, model: LightningModule, keep_maps: bool) -> None:
        super().__init__()
        self.model = model  # registered, so the Trainer moves it (and its bank, on start) to the device
        self.keep_maps = keep_maps
        self.rows: list[dict[str, Any]] = []

    def on_predict_start(self) -> None:
        self.rows = []
        self.model.on_predict_start()

    def predict_step(self, batch: Batch, batch_idx: int) -> None:
        with torch.no_grad():
            scored = self.model(batch)
        self.rows.append(
            {
                "index": batch.index.cpu(),
                "score": scored.image_score.detach().float().cpu(),
                "label": batch.label.cpu(),
                "map": scored.anomaly_map.detach().float().cpu() if self.keep_maps else None,
                "mask": (batch.mask > 0.5).cpu() if self.keep_maps else None,
            }
        )

    def on_predict_epoch_end(self) -> None:
        self.rows = [row for share in all_gather(self.rows) for row in share]


def _collected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores (and maps) of each image once, in dataset order."""
    order: dict[int, tuple[int, int]] = {}
    for number, row in enumerate(rows):
        for position, index in enumerate(row["index"].tolist()):
            order.setdefault(int(index), (number, position))
    picks = [order[index] for index in sorted(order)]
    out = {
        "score": np.array([float(rows[n]["score"][p]) for n, p in picks], dtype=np.float32),
        "label": np.array([int(rows[n]["label"][p]) for n, p in picks], dtype=np.int64),
    }
    if picks and rows[0]["map"] is not None:
        out["map"] = np.stack([rows[n]["map"][p].numpy() for n, p in picks])
        out["mask"] = np.stack([rows[n]["mask"][p].numpy() for n, p in picks])
    return out


def fit_thresholds(
    settings: CalibrationSettings,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
) -> tuple[float, float | None, dict[str, float]]:
    """Image and pixel thresholds of the calibration scores, and what they achieve there."""
    achieved: dict[str, float] = {}
    normal = labels == 0
    pixel = None
    if settings.method == "fpr":
        if not normal.any():
            raise CalibrationError("calibration.method=fpr needs normal calibration images; these have none")
        image = fpr_threshold(scores[normal], settings.target_fpr)
        achieved["image_fpr"] = float(decide(scores[normal], image).mean())
        if maps is not None:
            normal_pixels = maps[normal].reshape(-1)
            pixel = fpr_threshold(normal_pixels, settings.pixel_target_fpr)
            achieved["pixel_fpr"] = float(decide(normal_pixels, pixel).mean())
        if allowed_false_positives(settings.target_fpr, int(normal.sum())) == 0 and settings.target_fpr > 0:
            log.warning(
                "calibration: %d normal image(s) cannot resolve a %.3g false-positive rate (that takes at "
                "least %d): the image threshold lies above every calibration score",
                int(normal.sum()),
                settings.target_fpr,
                math.ceil(1 / settings.target_fpr),
            )
    else:
        image = f1_optimal_threshold(scores, labels)
        achieved.update(
            {f"image_{k}": v for k, v in precision_recall_f1(decide(scores, image), labels).items()}
        )
        if maps is not None and masks is not None and masks.any():
            pixel = f1_optimal_threshold(maps.reshape(-1), masks.reshape(-1))
            decided = decide(maps.reshape(-1), pixel)
            achieved.update(
                {f"pixel_{k}": v for k, v in precision_recall_f1(decided, masks.reshape(-1)).items()}
            )
        elif maps is not None:
            log.warning(
                "calibration: the calibration images have no defect masks, so no pixel threshold is set"
            )
    return image, pixel, achieved


def calibrate(parts: Any, trainer: Any, test_samples: SampleTable | None = None) -> Thresholds | None:
    """Thresholds for the assembled, loaded model ``parts`` as ``cfg.calibration`` says: calibrated on its
    images, read from ``calibration.thresholds``, or ``None`` (no calibration)."""
    cfg = parts.cfg
    settings = settings_of(cfg)
    identity = model_identity(cfg, parts.model)
    if settings.thresholds:
        thresholds = Thresholds.load(settings.thresholds)
        thresholds.check_model(identity, f"the thresholds in {settings.thresholds}")
        log.info("thresholds from %s: %s", settings.thresholds, thresholds.describe())
        return thresholds
    if not settings.calibrates:
        return None
    samples = calibration_images(cfg, settings)
    refuse_overlaps(samples, test_samples, getattr(parts.model.bank, "metadata", {}) or {})
    n_anomalous = samples.count(1)
    log.info(
        "calibrating thresholds (%s) on %d image(s) (%d anomalous) of %s",
        settings.method,
        len(samples),
        n_anomalous,
        settings.images,
    )
    calibration_pass = CalibrationPass(parts.model, keep_maps=True)
    trainer.predict(calibration_pass, dataloaders=parts.prediction_loader(samples), return_predictions=False)
    collected = _collected(calibration_pass.rows)
    maps, masks = collected.get("map"), collected.get("mask")
    image, pixel, achieved = fit_thresholds(settings, collected["score"], collected["label"], maps, masks)
    scores = collected["score"]
    from anomret.memory.store import data_fingerprint

    calibration = {
        **settings.describe(),
        "n_images": len(samples),
        "n_anomalous": n_anomalous,
        "categories": samples.categories,
        "data": digest(data_fingerprint(samples)),
        "description": f"{len(samples)} {settings.images} image(s)",
    }
    thresholds = Thresholds(
        image=image,
        pixel=pixel,
        method=str(settings.method),
        calibration=calibration,
        image_range=(float(scores.min()), float(scores.max())),
        pixel_range=None if maps is None else (float(maps.min()), float(maps.max())),
        normalize=bool(settings.normalize),
        achieved=achieved,
        model=identity,
    )
    log.info("thresholds: %s", thresholds.describe())
    return thresholds


def model_identity(cfg: DictConfig, model: Any) -> dict[str, str]:
    """:func:`scoring_identity` of the run's model with its ``model=`` and ``retrieval=`` settings."""
    containers = [OmegaConf.to_container(cfg[group], resolve=True) for group in ("model", "retrieval")]
    return scoring_identity(containers[0], containers[1], model)


__all__ = [
    "CalibrationError",
    "CalibrationPass",
    "CalibrationSettings",
    "Thresholds",
    "ThresholdsError",
    "calibrate",
    "held_out_images",
    "without",
]
