"""The ``calibration=`` group's settings and the pairings no run may make, checked before anything is built
(this module imports no torch: :mod:`anomret.contracts` checks a config with it in under a second).
The calibration itself, and which images it reads, is :mod:`anomret.decisions.calibration`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from anomret.config import resolved_dict

METHODS = ("f1", "fpr")
IMAGE_SOURCES = ("holdout", "dataset", "folder")
_KEYS = (
    "method",
    "images",
    "target_fpr",
    "pixel_target_fpr",
    "holdout",
    "seed",
    "dataset",
    "folder",
    "normalize",
    "thresholds",
)


class CalibrationError(ValueError):
    """A calibration that cannot give honest thresholds (its images, its method or its targets)."""


@dataclass(frozen=True)
class CalibrationSettings:
    """The ``calibration=`` group (see the module docstring); ``method: null`` calibrates nothing."""

    method: str | None = None
    images: str | None = None
    target_fpr: float = 0.01
    pixel_target_fpr: float = 0.01
    holdout: float = 0.2
    seed: int = 0
    dataset: dict[str, Any] | None = None
    folder: str | None = None
    normalize: bool = False
    thresholds: str | None = None

    @classmethod
    def from_config(cls, node: Any) -> CalibrationSettings:
        values = resolved_dict(node) if isinstance(node, DictConfig) else dict(node or {})
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise CalibrationError(
                f"unknown calibration option(s) {', '.join(f'calibration.{k}' for k in unknown)}; "
                f"calibration options: {', '.join(_KEYS)}"
            )
        if values.get("method") in ("none", "null", ""):
            values["method"] = None
        settings = cls(**values)
        settings.check()
        return settings

    @property
    def calibrates(self) -> bool:
        return self.method is not None

    def check(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise CalibrationError(f"calibration.method must be f1, fpr or null, got {self.method!r}")
        if self.method is not None and self.thresholds:
            raise CalibrationError(
                "calibration.thresholds uses saved thresholds and calibration.method calibrates new ones: "
                "set one of them (calibration=none calibration.thresholds=FILE, or a calibration= option)"
            )
        for name in ("target_fpr", "pixel_target_fpr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise CalibrationError(f"calibration.{name} must be a rate in [0, 1), got {value!r}")
        if self.method is None:
            return
        if self.images not in IMAGE_SOURCES:
            raise CalibrationError(
                f"calibration.images must be one of {', '.join(IMAGE_SOURCES)} (which images set the "
                f"thresholds), got {self.images!r}"
            )
        if self.method == "f1" and self.images != "dataset":
            raise CalibrationError(
                f"calibration.method=f1 needs labelled anomalous images, but calibration.images={self.images} "
                "holds normal images only. Fix: calibration=labelled (a labelled validation dataset) or "
                "calibration.method=fpr (a target false-positive rate on normal images)."
            )
        if self.images == "holdout":
            if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)):
                raise CalibrationError(f"calibration.holdout must be a share in (0, 1), got {self.holdout!r}")
            if not 0 < self.holdout < 1:
                raise CalibrationError(f"calibration.holdout must be a share in (0, 1), got {self.holdout}")
        if self.images == "dataset" and not (isinstance(self.dataset, Mapping) and self.dataset.get("root")):
            raise CalibrationError(
                "calibration.images=dataset needs calibration.dataset: a dataset config with name, root and "
                "split (e.g. calibration.dataset.root=data/validation calibration.dataset.name=folder)"
            )
        if self.images == "folder" and not self.folder:
            raise CalibrationError(
                "calibration.images=folder needs calibration.folder=/path/to/normal/images"
            )

    def describe(self) -> dict[str, Any]:
        """What ``thresholds.json`` and ``results.json`` record about the calibration."""
        described: dict[str, Any] = {"method": self.method, "images": self.images}
        if self.method == "fpr":
            described.update(target_fpr=self.target_fpr, pixel_target_fpr=self.pixel_target_fpr)
        if self.images == "holdout":
            described.update(holdout=self.holdout, seed=self.seed)
        if self.images == "dataset" and self.dataset is not None:
            described["dataset"] = {k: self.dataset.get(k) for k in ("name", "root", "split", "categories")}
        if self.images == "folder":
            described["folder"] = str(Path(str(self.folder)).expanduser().resolve())
        return described


def settings_of(cfg: DictConfig) -> CalibrationSettings:
    return CalibrationSettings.from_config(cfg.get("calibration") or {})


def _same_place(a: Any, b: Any) -> bool:
    try:
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except (OSError, RuntimeError):
        return str(a) == str(b)


def check_calibration(cfg: DictConfig) -> CalibrationSettings:
    """The settings, with the pairings no run may make: calibrating on the split that is reported."""
    settings = settings_of(cfg)
    if settings.images == "dataset" and settings.dataset is not None:
        reported = cfg.get("dataset") or {}
        same_root = _same_place(settings.dataset.get("root"), reported.get("root"))
        if same_root and settings.dataset.get("split", "test") == reported.get("split", "test"):
            raise CalibrationError(
                f"calibration.dataset is the {reported.get('split', 'test')} split of {reported.get('name')} "
                "that this run reports: thresholds set on the test images make every thresholded metric "
                "an oracle. Fix: calibrate on other images (calibration=normal_holdout, a validation "
                "dataset, or a folder of normal images)."
            )
    return settings
