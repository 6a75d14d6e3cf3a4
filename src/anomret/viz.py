"""Anomaly-map overlays as plain uint8 arrays (no plotting library needed).

A panel shows the input with the ground-truth outline next to the anomaly map blended over the input
in a jet colour map. Colours are scaled with a fixed ``[vmin, vmax]`` range (a category's score range)
rather than per image, so a normal image looks calm instead of being stretched to full red.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Jet colour map as piecewise-linear anchors (position, r, g, b).
_JET = np.array(
    [
        [0.00, 0.0, 0.0, 0.5],
        [0.11, 0.0, 0.0, 1.0],
        [0.125, 0.0, 0.0, 1.0],
        [0.34, 0.0, 0.85, 1.0],
        [0.35, 0.0, 0.9, 0.97],
        [0.64, 1.0, 1.0, 0.0],
        [0.66, 1.0, 0.86, 0.0],
        [0.89, 1.0, 0.0, 0.0],
        [1.00, 0.5, 0.0, 0.0],
    ]
)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map ``[H, W]`` values to jet colours (uint8 ``[H, W, 3]``) over ``[vmin, vmax]``."""
    span = max(vmax - vmin, 1e-12)
    scaled = np.clip((values - vmin) / span, 0.0, 1.0)
    channels = [np.interp(scaled, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (the mask minus its 4-neighbour erosion)."""
    padded = np.pad(mask, 1, mode="edge")
    eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~eroded


def overlay_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    caption: str = "",
) -> np.ndarray:
    """Side-by-side panel: input with mask outline | heat map over the input, under a caption (may be multi-line)."""
    left = image.copy()
    if mask is not None and mask.any():
        left[outline(mask.astype(bool))] = (0, 255, 0)
    heat = colorize(anomaly_map, vmin, vmax)
    right = (alpha * heat + (1 - alpha) * image).round().astype(np.uint8)
    if mask is not None and mask.any():
        right[outline(mask.astype(bool))] = (255, 255, 255)
    panel = np.concatenate([left, np.full((image.shape[0], 4, 3), 255, np.uint8), right], axis=1)
    if not caption:
        return panel
    lines = caption.splitlines()
    strip = Image.new("RGB", (panel.shape[1], 2 + 11 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        draw.text((2, 1 + 11 * row), line, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), panel], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
