"""anomret: retrieval-based visual anomaly detection (MRAD, RAD) with Lightning and Hydra.

``anomret.load(PACKAGE)`` opens a model package (``python -m anomret.export``) and returns a detector
whose ``predict(images)`` decides on PIL images or arrays. Nothing heavy is imported until it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomret.package import Detector

__version__ = "0.1.0"


def load(path: Any, device: str | None = None) -> Detector:
    """Open, verify and build a model package; ``device`` defaults to CUDA when available."""
    from anomret.package import load as load_package

    return load_package(path, device=device)
