"""Saved thresholds (``thresholds.json``): the values, how and on which images they were found, and the
model they are valid with.

A threshold is a property of one scoring function: another encoder, bank, trained state or scoring setting
moves every score. The record therefore carries the identity of the model it was calibrated on
(:func:`scoring_identity`), and :meth:`Thresholds.check_model` refuses it for any other, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomret.files import write_text_atomic
from anomret.fingerprint import digest
from anomret.metrics.thresholds import decide, normalize

FORMAT = "anomret.thresholds/1"
ANOMALOUS, NORMAL = "anomalous", "normal"

# Settings that change how fast scores are computed, never their values.
_COMPUTE_ONLY = ("chunk", "tile")


class ThresholdsError(ValueError):
    """Saved thresholds that cannot be used with this model."""


def _settings_digest(node: Any) -> str:
    def keep(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items() if not any(word in str(k) for word in _COMPUTE_ONLY)}
        if isinstance(value, list):
            return [keep(v) for v in value]
        return value

    return digest(keep(node))


def trained_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names, shapes, dtypes and bytes (the trained heads and prompts)."""
    import torch

    sha = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def scoring_identity(model_config: Any, retrieval_config: Any, model: Any) -> dict[str, str]:
    """What the scores of ``model`` depend on, as digests: method, encoder, bank, trained state, settings.

    ``model_config`` and ``retrieval_config`` are the ``model=`` and ``retrieval=`` groups as plain
    containers; chunk sizes (compute only) are left out.
    """
    return {
        "method": str(model.method),
        "encoder": digest(model.encoder.fingerprint()),
        "bank": str((model.bank_info or {}).get("identity")),
        "trained": trained_digest(model.state_dict()),
        "settings": _settings_digest({"model": model_config, "retrieval": retrieval_config}),
    }


_IDENTITY_NAMES = {
    "method": "method",
    "encoder": "encoder (architecture, weights, input size, layers)",
    "bank": "memory bank",
    "trained": "trained heads/prompts",
    "settings": "scoring settings (model.map, model.score, retrieval, ...)",
}


@dataclass
class Thresholds:
    """Image and pixel thresholds (``score >= threshold`` is anomalous) and where they come from.

    Attributes:
        image: the image-score threshold.
        pixel: the anomaly-map threshold (``None`` when the calibration images give none, e.g. F1 on a
            dataset without masks).
        method: ``f1`` (labelled images) or ``fpr`` (normal images, a target false-positive rate).
        calibration: which images, how many, and the targets (``images``, ``source``, ``n_images``, ...).
        image_range, pixel_range: the calibration scores' range, for anomalib's normalisation.
        normalize: outputs also give normalised scores (threshold at 0.5).
        achieved: what the thresholds give on the calibration images (false-positive rates, F1).
        model: the identity of the model they were calibrated on (:func:`scoring_identity`).
    """

    image: float
    pixel: float | None
    method: str
    calibration: dict[str, Any]
    image_range: tuple[float, float]
    pixel_range: tuple[float, float] | None = None
    normalize: bool = False
    achieved: dict[str, float] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------ decisions
    def label(self, score: float) -> str:
        return ANOMALOUS if bool(decide(score, self.image)) else NORMAL

    def mask(self, anomaly_map: Any) -> np.ndarray | None:
        """The predicted defect mask of a map (``None`` without a pixel threshold)."""
        return None if self.pixel is None else decide(anomaly_map, self.pixel)

    def normalized_score(self, score: float) -> float:
        return float(normalize(score, self.image, *self.image_range))

    # ---------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_range"] = list(self.image_range)
        data["pixel_range"] = None if self.pixel_range is None else list(self.pixel_range)
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "thresholds") -> Thresholds:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ThresholdsError(
                f"{where} is not an anomret thresholds file of format {FORMAT} (found {found!r}). "
                "Fix: use the thresholds.json a calibrated run wrote (its path is in artifacts.json)."
            )
        try:
            image = float(data["image"])
            pixel = None if data.get("pixel") is None else float(data["pixel"])
            thresholds = cls(
                image=image,
                pixel=pixel,
                method=str(data["method"]),
                calibration=dict(data.get("calibration") or {}),
                image_range=tuple(float(v) for v in data["image_range"]),  # type: ignore[arg-type]
                pixel_range=None
                if data.get("pixel_range") is None
                else tuple(float(v) for v in data["pixel_range"]),  # type: ignore[arg-type]
                normalize=bool(data.get("normalize", False)),
                achieved={str(k): v for k, v in (data.get("achieved") or {}).items()},
                model={str(k): str(v) for k, v in (data.get("model") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ThresholdsError(
                f"{where} is incomplete or malformed ({type(error).__name__}: {error})"
            ) from None
        values = [thresholds.image, *(() if pixel is None else (pixel,))]
        if any(math.isnan(v) for v in values):
            raise ThresholdsError(f"{where} holds a NaN threshold")
        return thresholds

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ThresholdsError(
                f"thresholds file {path} does not exist. Fix: point at the thresholds.json of a run made "
                "with calibration= (its path is in the run's artifacts.json)."
            ) from None
        except (OSError, ValueError) as error:
            raise ThresholdsError(f"cannot read thresholds file {path}: {error}") from None
        return cls.from_dict(data, str(path))

    # ----------------------------------------------------------------------------------- validity
    def check_model(self, identity: dict[str, str], where: str = "the thresholds") -> None:
        """Refuse thresholds calibrated on another model, naming what differs."""
        differs = [key for key in _IDENTITY_NAMES if self.model.get(key) != identity.get(key)]
        if differs:
            raise ThresholdsError(
                f"{where} were calibrated on another model: its "
                + ", ".join(_IDENTITY_NAMES[key] for key in differs)
                + " differ from this run's, so the scores they cut are not comparable. Fix: calibrate this "
                "model (calibration=...), or use the model the thresholds were made with."
            )

    def describe(self) -> str:
        pixel = "none" if self.pixel is None else f"{self.pixel:.6g}"
        source = self.calibration.get("description", self.calibration.get("images", "?"))
        return f"image {self.image:.6g}, pixel {pixel} ({self.method} on {source})"
