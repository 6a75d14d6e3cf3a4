"""The deterministic preprocessing of the official MRAD/AnomalyCLIP/RAD codes.

One geometry (square, aspect-ignoring resize, then centre crop) is shared by the image and mask
paths, so ground truth always lands on the pixels of the image it annotates:

- image: ``uint8 [H, W, 3]`` -> PIL resize to ``resize x resize`` (bicubic or bilinear) -> centre
  crop -> float ``[0, 1]`` -> normalise with the encoder's mean/std;
- mask: ``{0, 1}`` -> 8-bit ``L`` image with values 0/255 -> PIL bilinear resize to ``resize`` -> the
  same centre crop -> ``/ 255`` -> nearest resize to ``mask_size`` when it differs from the crop ->
  ``> threshold``.

Resizing goes through PIL, as in the official pipelines (torchvision ``Resize`` on PIL images):
PIL antialiases when downscaling and resamples in two passes with uint8 rounding in between, which
torch's interpolation does not reproduce exactly. Masks are resized as 8-bit images because both
official codes do so (MRAD: bilinear to 518, ``ToTensor``, ``> 0.5``; RAD: bilinear to 512, crop 448,
``ToTensor``, nearest to 256, ``> 0``): the uint8 rounding flips boundary pixels against a float
resize (tens per mask at MVTec sizes, thousands at an exact 2x reduction), so the ground truth, and
with it every pixel metric, would differ from the published protocol. No augmentation: both methods
are evaluated deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from anomret.encoders.base import Preprocess

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
INTERPOLATIONS = tuple(_PIL_FILTERS)


def resize_square(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize a PIL image to ``size x size`` ignoring its aspect ratio (PIL filters, antialiased)."""
    if interpolation not in _PIL_FILTERS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if image.size == (size, size):
        return image
    return image.resize((size, size), _PIL_FILTERS[interpolation])


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centred ``size x size`` crop, rounded as torchvision's ``CenterCrop``."""
    if size > height or size > width:
        raise ValueError(f"crop {size} is larger than the {height}x{width} input")
    return round((height - size) / 2.0), round((width - size) / 2.0)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centred ``size x size`` crop of a PIL image."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    top, left = crop_box(height, width, size)
    return image.crop((left, top, left + size, top + size))


def resize_nearest(x: Tensor, size: int) -> Tensor:
    """Nearest resize of the last two dimensions to ``size x size``.

    Uses ``torch``'s legacy nearest (source index ``floor(i * in / out)``), as the RAD evaluation
    resizes its ground truth.
    """
    if x.shape[-2:] == (size, size):
        return x
    batched = x.reshape(-1, 1, *x.shape[-2:])
    out = F.interpolate(batched, size=(size, size), mode="nearest")
    return out.reshape(*x.shape[:-2], size, size)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of ``[3, H, W]``."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


@dataclass(frozen=True)
class SquareResizeCrop:
    """The geometry shared by images and masks: square resize to ``resize``, centre crop to ``crop``."""

    resize: int
    crop: int

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop} resize={self.resize}")

    def __call__(self, image: Image.Image, interpolation: str) -> Image.Image:
        return center_crop(resize_square(image, self.resize, interpolation), self.crop)


class ImageTransform:
    """``uint8 [H, W, 3]`` -> normalised ``float32 [3, crop, crop]`` for an encoder's ``Preprocess``."""

    def __init__(self, preprocess: Preprocess) -> None:
        if preprocess.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(
                f"Preprocess.interpolation must be 'bicubic' or 'bilinear', got {preprocess.interpolation!r}"
            )
        self.preprocess = preprocess
        self.geometry = SquareResizeCrop(preprocess.resize, preprocess.crop)

    def __call__(self, image: np.ndarray) -> Tensor:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {tuple(image.shape)}")
        pil = self.geometry(Image.fromarray(image), self.preprocess.interpolation)
        x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return normalize(x, self.preprocess.mean, self.preprocess.std).contiguous()


class MaskTransform:
    """``bool [H, W]`` -> ``float32 [mask_size, mask_size]`` in ``{0, 1}``, aligned with the image.

    The mask is resized as an 8-bit 0/255 image (as the official codes do), brought to ``[0, 1]``
    by ``/ 255`` and only then thresholded.

    Args:
        preprocess: the image preprocessing whose geometry the mask must follow.
        mask_size: side of the output mask (defaults to ``preprocess.crop``).
        threshold: a resized pixel is anomalous when its value in ``[0, 1]`` is ``> threshold``
            (0.5 as MRAD/AnomalyCLIP; 0.0 reproduces RAD's ``> 0`` after resizing).
    """

    def __init__(self, preprocess: Preprocess, mask_size: int | None = None, threshold: float = 0.5) -> None:
        self.geometry = SquareResizeCrop(preprocess.resize, preprocess.crop)
        self.mask_size = preprocess.crop if mask_size is None else int(mask_size)
        if self.mask_size <= 0:
            raise ValueError(f"mask_size must be positive, got {mask_size}")
        self.threshold = float(threshold)

    def __call__(self, mask: np.ndarray) -> Tensor:
        levels = np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)
        pil = self.geometry(Image.fromarray(levels), "bilinear")
        x = torch.from_numpy(np.array(pil, dtype=np.uint8)).float().div_(255.0)
        x = resize_nearest(x, self.mask_size)
        return (x > self.threshold).float()

    def empty(self) -> Tensor:
        """The all-zero mask of normal images and of images without ground truth."""
        return torch.zeros(self.mask_size, self.mask_size, dtype=torch.float32)
