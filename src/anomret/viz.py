"""Anomaly-map overlays as plain uint8 arrays (no plotting library needed).

A panel shows the input with the ground-truth outline, the anomaly map blended over the input in a jet
colour map (with the same outline and, given a pixel threshold, the outline of the predicted mask), and a
colour bar of the score scale. It is drawn at the input's own resolution: the map is upsampled to the
region of the image it covers. Colours are scaled with a fixed ``[vmin, vmax]`` range (a category's score
range) rather than per image, so a normal image looks calm instead of being stretched to full red.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anomret.files import atomic_path

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
GROUND_TRUTH_COLOUR = (0, 255, 0)  # on the plain image
GROUND_TRUTH_ON_MAP_COLOUR = (255, 255, 255)  # on the heat map, where green would drown
PREDICTION_COLOUR = (255, 0, 255)
_WHITE = (255, 255, 255)

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map ``[H, W]`` values to jet colours (uint8 ``[H, W, 3]``) over ``[vmin, vmax]``."""
    span = max(vmax - vmin, 1e-12)
    scaled = np.clip((values - vmin) / span, 0.0, 1.0)
    channels = [np.interp(scaled, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask (the mask minus its 4-neighbour erosion), ``thickness`` wide."""
    padded = np.pad(mask, 1, mode="edge")
    eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    ring = mask & ~eroded
    for _ in range(thickness - 1):  # grow inwards and outwards so a large image keeps a visible line
        padded = np.pad(ring, 1)
        ring = (
            padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        )
    return ring


def upsample_map(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float ``[h, w]`` map to ``[height, width]``."""
    if anomaly_map.shape == (height, width):
        return anomaly_map.astype(np.float32, copy=False)
    resized = Image.fromarray(anomaly_map.astype(np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def predicted_mask(
    anomaly_map: np.ndarray, pixel_threshold: float, box: Box, image_shape: tuple[int, int]
) -> np.ndarray:
    """The predicted defect mask at the image's own resolution: the map upsampled (bilinear) into ``box``,
    the region the encoder saw, then ``>= pixel_threshold``; pixels outside the region are never flagged."""
    left, top, right, bottom = box
    mask = np.zeros(image_shape, bool)
    mask[top:bottom, left:right] = upsample_map(anomaly_map, right - left, bottom - top) >= pixel_threshold
    return mask


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _format(value: float) -> str:
    return f"{value:.3g}"


def colorbar(
    height: int, vmin: float, vmax: float, *, threshold: float | None = None, font_size: int = 11
) -> np.ndarray:
    """A vertical colour bar ``height`` pixels tall (``vmax`` at the top) with five labelled ticks.

    ``threshold`` (within the range) is marked with a line across the bar in the prediction colour; the
    panel's caption gives its value.
    """
    font = _font(font_size)
    bar_width = max(10, font_size)
    ticks = np.linspace(vmax, vmin, 5)
    labels = [_format(t) for t in ticks]
    label_width = max(_text_size(font, text)[0] for text in labels)
    margin = font_size // 2 + 1  # room for the top and bottom labels, centred on their ticks
    canvas = Image.new("RGB", (bar_width + 6 + label_width + 2, height), _WHITE)
    inner = max(height - 2 * margin, 2)
    gradient = np.linspace(vmax, vmin, inner)[:, None].repeat(bar_width, axis=1)
    canvas.paste(Image.fromarray(colorize(gradient, vmin, vmax)), (0, margin))
    draw = ImageDraw.Draw(canvas)
    span = vmax - vmin if vmax > vmin else 1.0
    for value, text in zip(ticks, labels, strict=True):
        y = margin + round((vmax - value) / span * (inner - 1))
        draw.line([(bar_width, y), (bar_width + 3, y)], fill=(0, 0, 0))
        draw.text((bar_width + 6, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    if threshold is not None and vmin <= threshold <= vmax:
        y = margin + round((vmax - threshold) / span * (inner - 1))
        draw.line([(0, y), (bar_width + 3, y)], fill=PREDICTION_COLOUR, width=max(1, font_size // 8))
    return np.asarray(canvas)


def _place(mask: np.ndarray, box: Box, image_shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask at the image's resolution: as it is, or resized into ``box`` from the map's grid."""
    if mask.shape == image_shape:
        return mask.astype(bool)
    left, top, right, bottom = box
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (right - left, bottom - top), Image.Resampling.NEAREST
    )
    placed = np.zeros(image_shape, bool)
    placed[top:bottom, left:right] = np.asarray(resized) > 127
    return placed


def overlay_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    caption: str = "",
    *,
    map_box: Box | None = None,
    pixel_threshold: float | None = None,
    show_colorbar: bool = True,
) -> np.ndarray:
    """Input with mask outline | heat map over the input | colour bar, under a caption (may be multi-line).

    Args:
        image: uint8 ``[H, W, 3]`` at the resolution the panel is drawn at (the image's own).
        anomaly_map: ``[h, w]`` scores; upsampled (bilinear) to ``map_box``.
        mask: ground truth, boolean ``[H, W]`` or on the map's ``[h, w]`` grid (all false for a normal
            image); ``None`` where there is no ground truth to show (prediction).
        vmin, vmax: the colour range (a category's score range, so panels compare).
        map_box: the region of ``image`` the map covers (the encoder's crop); the whole image by default.
        pixel_threshold: outline the predicted mask (map ≥ threshold) and mark it on the colour bar.
        show_colorbar: append the colour bar.
    """
    height, width = image.shape[:2]
    left, top, right, bottom = map_box or (0, 0, width, height)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"map_box {map_box} lies outside the {width}x{height} image")
    if mask is not None and mask.shape not in ((height, width), anomaly_map.shape):
        raise ValueError(
            f"mask is {mask.shape}: expected the image's {(height, width)} or the map's {anomaly_map.shape}"
        )
    thickness = max(1, round(max(height, width) / 300))
    values = upsample_map(anomaly_map, right - left, bottom - top)
    ground_truth = None
    if mask is not None and mask.any():
        ground_truth = outline(_place(mask, (left, top, right, bottom), (height, width)), thickness)

    plain = image.copy()
    heat = image.copy()
    region = heat[top:bottom, left:right].astype(np.float32)
    heat[top:bottom, left:right] = (alpha * colorize(values, vmin, vmax) + (1 - alpha) * region).round()
    if (left, top, right, bottom) != (0, 0, width, height):
        # Where the map stops: the encoder saw only the crop.
        frame = np.zeros((height, width), bool)
        frame[top:bottom, left:right] = True
        heat[outline(frame, thickness)] = (0, 0, 0)
    if ground_truth is not None:
        plain[ground_truth] = GROUND_TRUTH_COLOUR
        heat[ground_truth] = GROUND_TRUTH_ON_MAP_COLOUR
    if pixel_threshold is not None:
        predicted = predicted_mask(anomaly_map, pixel_threshold, (left, top, right, bottom), (height, width))
        heat[outline(predicted, thickness)] = PREDICTION_COLOUR

    font_size = max(11, round(height / 40))
    gap = np.full((height, max(4, font_size // 2), 3), 255, np.uint8)
    parts = [plain, gap, heat]
    if show_colorbar:
        parts += [gap, colorbar(height, vmin, vmax, threshold=pixel_threshold, font_size=font_size)]
    panel = np.concatenate(parts, axis=1)
    lines = caption.splitlines()
    if mask is not None or pixel_threshold is not None:
        # Named whenever a mask is given, even an empty one, so the panels of a category share one height.
        # ASCII only: the default font has no glyph for "≥".
        legend = ["green/white: ground truth"] if mask is not None else []
        if pixel_threshold is not None:
            legend.append(f"magenta: map >= {_format(pixel_threshold)}")
        lines.append(", ".join(legend))
    if not lines:
        return panel
    font = _font(font_size)
    line_height = round(font_size * 1.25)
    strip = Image.new("RGB", (panel.shape[1], 4 + line_height * len(lines)), _WHITE)
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        draw.text((2, 2 + line_height * row), line, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(strip), panel], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 image atomically (a killed run leaves no half-written overlay)."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
