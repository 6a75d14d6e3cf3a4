"""Built-in synthetic anomaly-detection data: two domains of disjoint categories in MVTec-AD layout.

The real benchmarks cannot be fetched on machines without internet, yet every protocol needs data:
cross-dataset zero-shot runs (MRAD: memory from one domain, evaluation on another whose categories it
has never seen) and multi-class unsupervised runs (RAD: normal training images, then test images).
This module renders, deterministically from a seed, two small domains for that purpose::

    <root>/<domain>/<category>/train/good/000.png
    <root>/<domain>/<category>/test/good/000.png
    <root>/<domain>/<category>/test/<defect>/000.png
    <root>/<domain>/<category>/ground_truth/<defect>/000_mask.png     uint8 0/255
    <root>/<domain>/meta.json                                          (anomret.data.meta format)
    <root>/<domain>/synthetic.json                                     the spec that wrote the tree

Each category is either a procedural texture or a simple object on a background, with per-image
nuisance variation (shift, rotation, colour jitter, sensor noise). Anomalous images carry one defect
of :data:`DEFECT_KINDS`; its mask is exactly the set of pixels the defect changed: every pixel
outside the mask equals the same image rendered without the defect (see :func:`render_sample`).

Every image has a random generator of its own, seeded from (seed, domain, category, split, kind,
index): the same spec gives byte-identical files (for a given numpy/scipy build, whose vectorised
sin/exp may differ in the last bit between builds), and changing counts never changes other images.
:func:`ensure_synthetic` generates a domain on first use and reuses it afterwards.

Usage::

    python -m anomret.data.synthetic ROOT [--seed N] [--image-size S] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomret.data.meta import Meta, make_record, write_meta_json

log = logging.getLogger(__name__)

DOMAINS: dict[str, tuple[str, ...]] = {
    "synthetic_a": ("weave", "wood", "pill"),
    "synthetic_b": ("grid", "nut", "board"),
}
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "missing_area", "foreign_texture")
NORMAL_KIND = "good"
STAMP_FILENAME = "synthetic.json"
# Part of the stamp: bump it whenever rendering changes, so trees written by an older generator are
# regenerated instead of silently reused.
GENERATOR_VERSION = 1

# Pixel values of a clean render are kept in this range and sensor noise within +-_NOISE_CLIP, so a
# normal pixel never saturates; a defect that moves a pixel by _MIN_CHANGE then always survives
# noise and 8-bit rounding, which is what makes "mask == changed pixels" exact.
_CLEAN_RANGE = (16.0, 239.0)
_NOISE_CLIP = 10.0
_MIN_CHANGE = 12.0

FloatImage = np.ndarray  # float32 [H, W, 3], 0..255 scale
BoolMap = np.ndarray  # bool [H, W]


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic domain is generated with (recorded in its ``synthetic.json`` stamp).

    Attributes:
        image_size: side of the square images, in pixels.
        n_train: normal training images per category.
        n_test_normal: normal test images per category.
        n_test_per_defect: anomalous test images per category and defect kind.
        seed: base seed; images are seeded per (seed, domain, category, split, kind, index).
    """

    image_size: int = 128
    n_train: int = 10
    n_test_normal: int = 6
    n_test_per_defect: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        for name in ("n_train", "n_test_normal", "n_test_per_defect", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered sample.

    Attributes:
        image: ``uint8 [H, W, 3]`` RGB.
        mask: ``bool [H, W]`` pixels changed by the defect, or ``None`` for an image without defect.
        foreground: ``bool [H, W]`` where defects may be placed: the object's pixels, or the whole
            image for a texture.
    """

    image: np.ndarray
    mask: np.ndarray | None
    foreground: np.ndarray


@dataclass(frozen=True)
class _Scene:
    image: FloatImage  # clean render, within _CLEAN_RANGE
    background: FloatImage  # what shows through where material is missing
    foreground: BoolMap


# ----------------------------------------------------------------------------------------------------
# Seeding and small helpers
# ----------------------------------------------------------------------------------------------------


def _key(text: str) -> int:
    # Python's hash() is salted per process; a digest keeps seeds stable across runs and machines.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _rng(
    spec: SyntheticSpec, domain: str, category: str, split: str, kind: str, index: int, stream: int
) -> np.random.Generator:
    """A generator of its own per image, so adding images or categories never shifts the others."""
    entropy = [spec.seed, _key(domain), _key(category), _key(split), _key(kind), index, stream]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _frame(
    rng: np.random.Generator, size: int, max_angle: float, max_shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a frame rotated by up to ``max_angle`` degrees about a shifted centre."""
    y, x = _pixel_grid(size)
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
    cx, cy = size / 2 + rng.uniform(-max_shift, max_shift, 2)
    dx, dy = x - cx, y - cy
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return cos * dx + sin * dy, cos * dy - sin * dx


def _noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Smooth Gaussian noise of zero mean and unit standard deviation (``sigma`` may be anisotropic)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _colour(*rgb: float) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32)


def _mix(t: np.ndarray, low: np.ndarray, high: np.ndarray) -> FloatImage:
    return low + t[..., None] * (high - low)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance (negative inside), in pixels."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _finish(
    rng: np.random.Generator, image: FloatImage, background: FloatImage, foreground: BoolMap
) -> _Scene:
    """Apply the per-image colour jitter to the render and its background, and keep them in range."""
    gain = 1.0 + rng.uniform(-0.035, 0.035, 3).astype(np.float32)
    offset = np.float32(rng.uniform(-8.0, 8.0))
    low, high = _CLEAN_RANGE
    return _Scene(
        image=np.clip(image * gain + offset, low, high).astype(np.float32),
        background=np.clip(background * gain + offset, low, high).astype(np.float32),
        foreground=foreground,
    )


def _hole(rng: np.random.Generator, size: int) -> FloatImage:
    """The dark backing seen through a texture where material is missing."""
    depth = _noise(rng, size, 6 * size / 128)
    return _colour(*rng.uniform(22, 34, 3)) + 5.0 * depth[..., None]


# ----------------------------------------------------------------------------------------------------
# Categories: textures fill the image, objects lie on a background
# ----------------------------------------------------------------------------------------------------


def _weave(rng: np.random.Generator, size: int) -> _Scene:
    """Twill (denim-like) cloth: blue warp threads float over two beige weft threads, giving diagonals."""
    k = size / 128
    u, v = _frame(rng, size, 3.0, size)
    period = 8.0 * k * rng.uniform(0.97, 1.03)
    fu, fv = u / period, v / period
    cu, cv = np.floor(fu), np.floor(fv)
    weft_on_top = (cu + cv) % 3 == 0
    # Rounded threads: bright along the middle, dark in the gaps between neighbours.
    profile = np.where(weft_on_top, np.sin(np.pi * (fv - cv)), np.sin(np.pi * (fu - cu))) ** 0.7
    fibres = np.where(weft_on_top, _noise(rng, size, (0.6, 3.0 * k)), _noise(rng, size, (3.0 * k, 0.6)))
    warp, weft = _colour(62, 84, 138), _colour(206, 192, 158)
    base = np.where(weft_on_top[..., None], weft, warp)
    image = base * (0.45 + 0.55 * profile)[..., None] + 7.0 * fibres[..., None]
    return _finish(rng, image, _hole(rng, size), np.ones((size, size), bool))


def _wood(rng: np.random.Generator, size: int) -> _Scene:
    """Planed wood: growth rings of a far-away pith, bent by smooth turbulence, with fine streaks."""
    k = size / 128
    y, x = _pixel_grid(size)
    pith_x = size * rng.uniform(-0.5, 1.5)
    pith_y = size + rng.uniform(120, 260) * k
    turbulence = 3.0 * k * _noise(rng, size, 12 * k) + 0.8 * k * _noise(rng, size, 3 * k)
    radius = np.hypot(x - pith_x, (y - pith_y) * 1.6) + turbulence
    period = 7.5 * k * rng.uniform(0.9, 1.1)
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * radius / period)) ** 2.2
    streaks = _noise(rng, size, (0.5, 6.0 * k))
    image = _mix(1.0 - rings, _colour(112, 68, 38), _colour(196, 146, 96)) + 6.0 * streaks[..., None]
    return _finish(rng, image, _hole(rng, size), np.ones((size, size), bool))


def _grid(rng: np.random.Generator, size: int) -> _Scene:
    """Checkered tiles (slate and sand) separated by dark grout lines."""
    k = size / 128
    u, v = _frame(rng, size, 3.0, size)
    period = 21.0 * k
    cu, cv = np.floor(u / period), np.floor(v / period)
    fu, fv = u / period - cu, v / period - cv
    to_grout = period * np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv))
    grout = _coverage(to_grout - 1.3 * k)
    # Each tile gets its own shade, as fired tiles do; a per-image table keeps that vectorised.
    shades = rng.uniform(-9, 9, (16, 16)).astype(np.float32)
    tile_shade = shades[cu.astype(int) % 16, cv.astype(int) % 16]
    checker = ((cu + cv) % 2 == 0).astype(np.float32)
    tiles = _mix(checker, _colour(92, 104, 122), _colour(182, 172, 150)) + tile_shade[..., None]
    tiles += 5.0 * _noise(rng, size, 0.7)[..., None]
    image = _mix(grout, tiles, _colour(58, 56, 52))
    return _finish(rng, image, _hole(rng, size), np.ones((size, size), bool))


def _surface(rng: np.random.Generator, size: int, colour: np.ndarray, grain: float) -> FloatImage:
    """A matte background: a soft illumination gradient plus fine grain."""
    y, x = _pixel_grid(size)
    tilt = rng.uniform(-0.08, 0.08, 2)
    light = 1.0 + tilt[0] * (x / size - 0.5) + tilt[1] * (y / size - 0.5)
    return colour * light[..., None] + grain * _noise(rng, size, 0.8)[..., None]


def _shadow(coverage: np.ndarray, size: int) -> np.ndarray:
    """A soft drop shadow under an object, lit from the top left."""
    k = size / 128
    shifted = ndimage.shift(coverage, (3 * k, 3 * k), order=1, mode="constant")
    return 1.0 - 0.4 * ndimage.gaussian_filter(shifted, 3 * k)


def _on_surface(
    rng: np.random.Generator, surface: FloatImage, body: FloatImage, coverage: np.ndarray
) -> _Scene:
    """Lay an object (``body`` where ``coverage`` > 0) on ``surface``, casting a soft drop shadow.

    A piece broken out of the object reveals the surface without the shadow, as the missing piece
    no longer shades it.
    """
    shadowed = surface * _shadow(coverage, surface.shape[0])[..., None]
    image = shadowed * (1 - coverage[..., None]) + body * coverage[..., None]
    return _finish(rng, image, surface, coverage > 0)


def _pill(rng: np.random.Generator, size: int) -> _Scene:
    """A two-tone capsule (red and cream halves) lying on a dark slate surface."""
    k = size / 128
    u, v = _frame(rng, size, 8.0, 4 * k)
    scale = rng.uniform(0.97, 1.03)
    half_length, radius = 30 * k * scale, 19 * k * scale
    along = np.clip(u, -half_length, half_length)
    across = np.hypot(u - along, v)
    coverage = _coverage(across - radius)
    # Surface normal of the capsule, for shading and a specular highlight.
    nx, ny = (u - along) / radius, v / radius
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0, 1))
    shade = 0.45 + 0.5 * nz - 0.12 * ny - 0.08 * nx
    highlight = 70.0 * np.exp(-((nx + 0.25) ** 2 + (ny + 0.45) ** 2) / 0.03)
    halves = np.where((u < 0)[..., None], _colour(186, 48, 44), _colour(226, 214, 186))
    body = halves * shade[..., None] + highlight[..., None]
    body *= (1.0 - 0.35 * _coverage(np.abs(u) - 0.7 * k))[..., None]  # the seam between the halves
    return _on_surface(rng, _surface(rng, size, _colour(58, 64, 76), 3.0), body, coverage)


def _nut(rng: np.random.Generator, size: int) -> _Scene:
    """A steel hex nut, with chamfered corners and a threaded bore, on a brushed, sand-coloured plate."""
    k = size / 128
    u, v = _frame(rng, size, 10.0, 4 * k)
    scale = rng.uniform(0.97, 1.03)
    apothem, bore = 36 * k * scale, 15 * k * scale
    angles = np.deg2rad(np.arange(6) * 60.0)
    to_edge = np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - apothem
    radius = np.hypot(u, v)
    coverage = _coverage(to_edge) * _coverage(bore - radius)
    azimuth = np.arctan2(v, u)
    metal = 112 + 30 * np.cos(2 * (azimuth - rng.uniform(0, np.pi))) + 7 * np.sin(radius * 2.4 / k)
    metal = metal * np.where(radius > apothem * 1.02, 0.78, 1.0)  # chamfered corners catch less light
    metal = metal + 40.0 * _coverage(radius - bore - 3.5 * k)  # bright chamfer around the bore
    steel = metal[..., None] * _colour(0.96, 0.99, 1.05) + 4.0 * _noise(rng, size, 0.8)[..., None]
    plate = (
        _surface(rng, size, _colour(210, 200, 176), 2.0) + 6.0 * _noise(rng, size, (0.5, 9 * k))[..., None]
    )
    return _on_surface(rng, plate, steel, coverage)


def _box_distance(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float, corner: float) -> np.ndarray:
    """Signed distance to a rounded rectangle centred at the origin."""
    qu, qv = np.abs(u) - half_u + corner, np.abs(v) - half_v + corner
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0) - corner


def _board(rng: np.random.Generator, size: int) -> _Scene:
    """A green circuit board with two rows of gold pads, traces, silkscreen and mounting holes."""
    k = size / 128
    u, v = _frame(rng, size, 5.0, 4 * k)
    scale = rng.uniform(0.97, 1.03)
    half_u, half_v = 46 * k * scale, 32 * k * scale
    coverage = _coverage(_box_distance(u, v, half_u, half_v, 5 * k))
    for su in (-1, 1):
        for sv in (-1, 1):
            hole = np.hypot(u - su * (half_u - 7 * k), v - sv * (half_v - 7 * k))
            coverage = coverage * _coverage(3.5 * k - hole)
    board = _colour(34, 112, 64) + 4.0 * _noise(rng, size, (0.6, 2.0))[..., None]
    pads = np.zeros_like(u)
    traces = np.zeros_like(u)
    for pu in (-27, -9, 9, 27):
        for pv in (-14, 14):
            pads = np.maximum(pads, _coverage(_box_distance(u - pu * k, v - pv * k, 5 * k, 4 * k, 1 * k)))
            # Each pad is wired outwards to the board edge.
            lead = _box_distance(u - pu * k, v - np.sign(pv) * 23 * k, 1.1 * k, 9 * k, 0)
            traces = np.maximum(traces, _coverage(lead))
    silk = _coverage(np.abs(_box_distance(u, v, 38 * k, 24 * k, 2 * k)) - 0.6 * k)
    board = _mix(traces, board, _colour(62, 150, 86))
    board = _mix(silk, board, _colour(226, 228, 220))
    gold = _colour(208, 168, 78) * (0.9 + 0.1 * np.cos(u / (4 * k)))[..., None]
    board = _mix(pads, board, gold)
    return _on_surface(rng, _surface(rng, size, _colour(40, 40, 46), 3.0), board, coverage)


_CATEGORIES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "weave": _weave,
    "wood": _wood,
    "pill": _pill,
    "grid": _grid,
    "nut": _nut,
    "board": _board,
}


# ----------------------------------------------------------------------------------------------------
# Foreign textures (pasted in by the foreign_texture defect), unlike any category's own surface
# ----------------------------------------------------------------------------------------------------


def _vivid(rng: np.random.Generator) -> np.ndarray:
    """A saturated random colour, so a pasted patch never blends into its surroundings."""
    channels = rng.permutation([rng.uniform(30, 80), rng.uniform(90, 160), rng.uniform(180, 235)])
    return _colour(*channels)


def _speckle(rng: np.random.Generator, size: int) -> FloatImage:
    grains = _noise(rng, size, 0.9)
    return _mix(np.clip(grains * 0.5 + 0.5, 0, 1), _vivid(rng) * 0.4, _vivid(rng))


def _stripes(rng: np.random.Generator, size: int) -> FloatImage:
    y, x = _pixel_grid(size)
    angle = rng.uniform(0, np.pi)
    phase = (np.cos(angle) * x + np.sin(angle) * y) / (rng.uniform(3.0, 5.0) * size / 128)
    return _mix(0.5 + 0.5 * np.sign(np.sin(phase)), _vivid(rng), _vivid(rng) * 0.45)


def _checks(rng: np.random.Generator, size: int) -> FloatImage:
    y, x = _pixel_grid(size)
    period = rng.uniform(2.5, 4.0) * size / 128
    squares = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    return _mix(squares, _vivid(rng), _colour(235, 235, 235) - _vivid(rng) * 0.5)


def _rust(rng: np.random.Generator, size: int) -> FloatImage:
    corrosion = np.clip(_noise(rng, size, 2.0 * size / 128) * 0.35 + 0.5, 0, 1)
    pits = _coverage(1.6 - _noise(rng, size, 0.8) * 1.0)
    return _mix(corrosion, _colour(120, 52, 22), _colour(214, 120, 48)) * (1 - 0.6 * (1 - pits))[..., None]


_FOREIGN: tuple[Callable[[np.random.Generator, int], FloatImage], ...] = (_speckle, _stripes, _checks, _rust)


# ----------------------------------------------------------------------------------------------------
# Defects: each returns the altered render and the region it alters (within the foreground)
# ----------------------------------------------------------------------------------------------------


def _pick_point(rng: np.random.Generator, allowed: BoolMap, margin: float) -> np.ndarray:
    """A random ``(x, y)`` in ``allowed`` at least ``margin`` pixels inside it (and the image)."""
    inside = ndimage.distance_transform_edt(np.pad(allowed, 1))[1:-1, 1:-1]
    candidates = np.argwhere(inside >= margin)
    if len(candidates) == 0:
        candidates = np.argwhere(inside == inside.max())
    row, col = candidates[rng.integers(len(candidates))]
    return np.array([col, row], dtype=np.float32) + rng.uniform(0.2, 0.8, 2).astype(np.float32)


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Normalised radius of an irregular, smooth-edged blob: <= 1 inside it."""
    y, x = _pixel_grid(size)
    dx, dy = x - centre[0], y - centre[1]
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for harmonic in (2, 3, 4, 5):
        outline += rng.uniform(0, 0.4 / harmonic) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dx, dy) / (radius * outline)


def _polyline_distance(points: np.ndarray, size: int) -> np.ndarray:
    y, x = _pixel_grid(size)
    distance = np.full((size, size), np.inf, dtype=np.float32)
    for start, end in itertools.pairwise(points):
        direction = end - start
        t = ((x - start[0]) * direction[0] + (y - start[1]) * direction[1]) / max(direction @ direction, 1e-6)
        t = np.clip(t, 0.0, 1.0)
        distance = np.minimum(
            distance, np.hypot(x - start[0] - t * direction[0], y - start[1] - t * direction[1])
        )
    return distance


def _placed(
    rng: np.random.Generator,
    scene: _Scene,
    shape: Callable[[], tuple[BoolMap, np.ndarray]],
    min_pixels: float,
) -> tuple[BoolMap, np.ndarray]:
    """Draw a defect shape until enough of it lies on the foreground (defects never float off objects).

    Shapes are centred on the foreground, so each draw covers at least one pixel; after a bounded
    number of draws the largest one is kept (only tiny images get that far).
    """
    best: tuple[BoolMap, np.ndarray] | None = None
    for _ in range(50):
        region, field = shape()
        region = region & scene.foreground
        if region.sum() >= min_pixels:
            return region, field
        if best is None or region.sum() > best[0].sum():
            best = (region, field)
    assert best is not None
    return best


def _scratch(rng: np.random.Generator, scene: _Scene) -> tuple[FloatImage, BoolMap]:
    """A thin curved scratch, brighter or darker than the surface it cuts."""
    size = scene.foreground.shape[0]
    k = size / 128
    # At least 0.6 px, so the line always covers the pixel its start point lies in.
    half_width = max(rng.uniform(0.7, 1.3) * k, 0.6)

    length = rng.uniform(30, 55) * k

    def shape() -> tuple[BoolMap, np.ndarray]:
        start = _pick_point(rng, scene.foreground, 4 * k)
        steps = int(rng.integers(4, 8))
        step = length / steps
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, steps))
        offsets = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
        points = np.vstack([start, start + offsets]).astype(np.float32)
        distance = _polyline_distance(points, size)
        return distance <= half_width, distance

    # Most of the scratch must stay on the surface, not run off the object or the image.
    region, distance = _placed(rng, scene, shape, 0.6 * length * 2 * half_width)
    level = scene.image[region].mean()
    # Cut towards whichever side leaves more headroom, mostly: a scratch must stand out of its surface.
    brighter = (level < 128) == (rng.uniform() < 0.85)
    depth = rng.uniform(60, 95) * (1.0 if brighter else -1.0)
    profile = 1.0 - 0.4 * np.clip(distance / half_width, 0, 1)
    return scene.image + (depth * profile)[..., None], region


def _spot(rng: np.random.Generator, scene: _Scene) -> tuple[FloatImage, BoolMap]:
    """A stain: darker, brighter, or of another hue at the same brightness (invisible to mean intensity)."""
    size = scene.foreground.shape[0]
    k = size / 128
    radius = rng.uniform(4.5, 8.5) * k

    def shape() -> tuple[BoolMap, np.ndarray]:
        rho = _blob(rng, size, _pick_point(rng, scene.foreground, 0.6 * radius), radius)
        return rho <= 1.0, rho

    region, rho = _placed(rng, scene, shape, 0.5 * np.pi * radius**2)
    local = scene.image[region].mean(axis=0)
    mode = rng.integers(3)
    if mode == 0:
        stain = local * rng.uniform(0.2, 0.4)
    elif mode == 1:
        stain = local + (255 - local) * rng.uniform(0.65, 0.85)
    else:
        hue = _vivid(rng)
        stain = local.mean() + (hue - hue.mean()) * 1.3
    texture = 1.0 + 0.08 * _noise(rng, size, 1.2 * k)
    opacity = rng.uniform(0.75, 0.95) * (1.0 - 0.3 * np.clip(rho, 0, 1) ** 2)
    stained = stain * texture[..., None]
    return scene.image + opacity[..., None] * (stained - scene.image), region


def _missing_area(rng: np.random.Generator, scene: _Scene) -> tuple[FloatImage, BoolMap]:
    """Material broken away: a chip off an object's edge or a hole, showing what lies beneath."""
    size = scene.foreground.shape[0]
    k = size / 128
    radius = rng.uniform(6.0, 10.0) * k
    is_object = not scene.foreground.all()

    def shape() -> tuple[BoolMap, np.ndarray]:
        if is_object and rng.uniform() < 0.6:
            rim = scene.foreground & ~ndimage.binary_erosion(scene.foreground)
            centre = _pick_point(rng, rim, 0)
        else:
            centre = _pick_point(rng, scene.foreground, 0.8 * radius)
        rho = _blob(rng, size, centre, radius)
        return rho <= 1.0, rho

    region, _ = _placed(rng, scene, shape, 0.3 * np.pi * radius**2)
    return scene.background.copy(), region


def _foreign_texture(rng: np.random.Generator, scene: _Scene) -> tuple[FloatImage, BoolMap]:
    """A patch of an unrelated material pasted onto the surface."""
    size = scene.foreground.shape[0]
    k = size / 128
    radius = rng.uniform(7.0, 11.0) * k

    def shape() -> tuple[BoolMap, np.ndarray]:
        rho = _blob(rng, size, _pick_point(rng, scene.foreground, 0.7 * radius), radius)
        return rho <= 1.0, rho

    region, _ = _placed(rng, scene, shape, 0.5 * np.pi * radius**2)
    patch = _FOREIGN[int(rng.integers(len(_FOREIGN)))](rng, size)
    return patch, region


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene], tuple[FloatImage, BoolMap]]] = {
    "scratch": _scratch,
    "spot": _spot,
    "missing_area": _missing_area,
    "foreign_texture": _foreign_texture,
}


def _apply(base: FloatImage, altered: FloatImage, region: BoolMap) -> FloatImage:
    """``altered`` inside ``region``, ``base`` elsewhere, every region pixel moved by at least _MIN_CHANGE.

    A pasted texture or a revealed background can match the surface at a few pixels by chance; those
    are pushed away from it so that the mask is exactly the set of changed pixels.
    """
    out = np.where(region[..., None], altered, base)
    weak = region & (np.abs(out - base).max(axis=-1) < _MIN_CHANGE)
    if weak.any():
        direction = np.where(base[weak].mean(axis=-1, keepdims=True) > 127.5, -1.0, 1.0)
        out[weak] = base[weak] + direction * _MIN_CHANGE
    return out


def _quantise(image: FloatImage) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_sample(
    domain: str,
    category: str,
    split: str,
    kind: str,
    index: int,
    spec: SyntheticSpec = SyntheticSpec(),
    *,
    apply_defect: bool = True,
) -> SyntheticImage:
    """Render one image of a domain, exactly as :func:`generate_domain` writes it.

    Args:
        domain: a key of :data:`DOMAINS`.
        category: one of the domain's categories.
        split: ``train`` or ``test``.
        kind: ``good`` or, in the test split, one of :data:`DEFECT_KINDS`.
        index: image number within ``<category>/<split>/<kind>/``.
        spec: image size and seed (the counts do not matter here).
        apply_defect: ``False`` renders the same image without its defect: every pixel outside the
            defect's mask is identical to the anomalous image.

    Raises:
        ValueError: an unknown domain, category, split or kind.
    """
    _check_names(domain, category)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kinds = (NORMAL_KIND,) if split == "train" else (NORMAL_KIND, *DEFECT_KINDS)
    if kind not in kinds:
        raise ValueError(f"kind for the {split} split must be one of {kinds}, got {kind!r}")
    size = spec.image_size
    rng = _rng(spec, domain, category, split, kind, index, stream=0)
    scene = _CATEGORIES[category](rng, size)
    # Drawn after the scene from the same stream, so the defect-free twin gets the very same noise.
    noise = np.clip(rng.normal(0, rng.uniform(1.5, 3.0), (size, size, 3)), -_NOISE_CLIP, _NOISE_CLIP)
    noise = noise.astype(np.float32)
    if kind == NORMAL_KIND or not apply_defect:
        return SyntheticImage(_quantise(scene.image + noise), None, scene.foreground)
    altered, region = _DEFECTS[kind](_rng(spec, domain, category, split, kind, index, stream=1), scene)
    image = _apply(scene.image, altered.astype(np.float32), region)
    return SyntheticImage(_quantise(image + noise), region, scene.foreground)


# ----------------------------------------------------------------------------------------------------
# Writing a domain
# ----------------------------------------------------------------------------------------------------


def _check_names(domain: str, category: str | None = None) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; known: {', '.join(DOMAINS)}")
    if category is not None and category not in DOMAINS[domain]:
        raise ValueError(f"{domain} has no category {category!r}; it has {', '.join(DOMAINS[domain])}")


def _stamp(domain: str, spec: SyntheticSpec) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "domain": domain,
        "categories": list(DOMAINS[domain]),
        "defect_kinds": list(DEFECT_KINDS),
        "spec": asdict(spec),
    }


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG carries no timestamp by default, so equal arrays give byte-identical files.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_tree(directory: Path, domain: str, spec: SyntheticSpec) -> int:
    """Write every image, mask, meta.json and (last) the stamp into ``directory``; returns the image count."""
    meta: Meta = {"train": {}, "test": {}}
    jobs = [("train", NORMAL_KIND, spec.n_train), ("test", NORMAL_KIND, spec.n_test_normal)]
    jobs += [("test", kind, spec.n_test_per_defect) for kind in DEFECT_KINDS]
    count = 0
    for category in DOMAINS[domain]:
        for split, kind, n_images in jobs:
            rows = meta[split].setdefault(category, [])
            for index in range(n_images):
                sample = render_sample(domain, category, split, kind, index, spec)
                image_path = f"{category}/{split}/{kind}/{index:03d}.png"
                _save_png(directory / image_path, sample.image)
                mask_path = ""
                if sample.mask is not None:
                    mask_path = f"{category}/ground_truth/{kind}/{index:03d}_mask.png"
                    _save_png(directory / mask_path, sample.mask.astype(np.uint8) * 255)
                rows.append(make_record(image_path, mask_path, category, int(kind != NORMAL_KIND), kind))
                count += 1
    write_meta_json(directory, meta)
    (directory / STAMP_FILENAME).write_text(json.dumps(_stamp(domain, spec), indent=2) + "\n")
    return count


def _is_current(target: Path, domain: str, spec: SyntheticSpec) -> bool:
    try:
        stamp = json.loads((target / STAMP_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _stamp(domain, spec) and (target / "meta.json").is_file()


@contextlib.contextmanager
def _domain_lock(root: Path, domain: str) -> Iterator[None]:
    """Serialise generation of one domain across processes (pytest workers, a test beside the demo)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(root, domain), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _lock_path(root: Path, domain: str) -> Path:
    return root / f".{domain}.lock"


def _generate_locked(root: Path, domain: str, spec: SyntheticSpec) -> Path:
    """Write the domain into a temporary sibling, then swap it into place (caller holds the lock)."""
    target = root / domain
    # Only lock holders create these, so any found now were left by a killed generation.
    for leftover in [*root.glob(f".{domain}.tmp-*"), *root.glob(f".{domain}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{domain}.tmp-", dir=root))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the data is not
        count = _write_tree(staging, domain, spec)
        if target.exists() or target.is_symlink():
            retired = root / f".{domain}.old-{os.getpid()}-{time.time_ns()}"
            target.rename(retired)
            staging.rename(target)
            if retired.is_dir() and not retired.is_symlink():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                retired.unlink()
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "generated synthetic domain %s (%d images) in %s in %.2fs",
        domain,
        count,
        target,
        time.perf_counter() - started,
    )
    return target


def generate_domain(root: str | Path, domain: str, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """(Re)generate ``<root>/<domain>`` unconditionally, replacing any existing tree atomically.

    Returns:
        The domain folder, holding ``meta.json``.
    """
    _check_names(domain)
    root = Path(root)
    with _domain_lock(root, domain):
        return _generate_locked(root, domain, spec)


def ensure_synthetic(
    root: str | Path,
    domains: Iterable[str] = ("synthetic_a", "synthetic_b"),
    spec: SyntheticSpec = SyntheticSpec(),
) -> dict[str, Path]:
    """Generate the domains under ``root`` on first use; reuse them, untouched, afterwards.

    A domain whose ``synthetic.json`` stamp records ``spec`` (and this generator version) is reused;
    one with another stamp, or none (an interrupted or foreign tree), is regenerated. A killed
    generation never leaves a tree that looks complete: domains are written into a temporary
    sibling and renamed into place only when finished.

    Returns:
        ``{domain: <root>/<domain>}``.
    """
    root = Path(root)
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    for domain in domains:
        _check_names(domain)
    paths = {}
    for domain in domains:
        with _domain_lock(root, domain):
            target = root / domain
            if _is_current(target, domain, spec):
                log.debug("reusing synthetic domain %s at %s", domain, target)
            else:
                _generate_locked(root, domain, spec)
        paths[domain] = target
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m anomret.data.synthetic",
        description="Generate the built-in synthetic anomaly-detection domains (MVTec layout + meta.json).",
    )
    parser.add_argument("root", type=Path, help="folder that receives one sub-folder per domain")
    parser.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=list(DOMAINS))
    defaults = SyntheticSpec()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-test-normal", type=int, default=defaults.n_test_normal)
    parser.add_argument("--n-test-per-defect", type=int, default=defaults.n_test_per_defect)
    parser.add_argument("--force", action="store_true", help="regenerate even if an up-to-date tree exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        spec = SyntheticSpec(
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_normal=args.n_test_normal,
            n_test_per_defect=args.n_test_per_defect,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    for domain in args.domains:
        if args.force:
            path = generate_domain(args.root, domain, spec)
        else:
            path = ensure_synthetic(args.root, (domain,), spec)[domain]
        print(f"{domain}: {path} ({', '.join(DOMAINS[domain])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
