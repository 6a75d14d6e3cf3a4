"""Ground-truth masks are resized as the official codes resize them: as 8-bit 0/255 images.

The expected masks are computed here with PIL and numpy calls written out step by step (the MRAD
and RAD pipelines), on an odd-sized mask with blobs of every orientation, so that the uint8
rounding inside PIL's resampler matters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from anomret.data.transforms import MaskTransform
from anomret.encoders.base import Preprocess

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _blobs(height: int, width: int, seed: int) -> np.ndarray:
    """``bool [height, width]``: smooth random blobs covering about a fifth of the image."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((height, width)), 6)
    return noise > np.quantile(noise, 0.8)


def _mrad_reference(mask: np.ndarray, size: int) -> np.ndarray:
    """MRAD/AnomalyCLIP: PIL ``L`` 0/255 -> bilinear (size, size) -> ToTensor (/255) -> > 0.5."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0 > 0.5


def _rad_reference(mask: np.ndarray) -> np.ndarray:
    """RAD: PIL ``L`` 0/255 -> bilinear (512, 512) -> CenterCrop 448 -> ToTensor -> nearest 256 -> > 0."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((512, 512), Image.Resampling.BILINEAR)
    cropped = np.asarray(resized.crop((32, 32, 480, 480)), dtype=np.float32) / 255.0
    source = np.floor(np.arange(256) * (448 / 256)).astype(int)  # torch's legacy nearest
    return cropped[np.ix_(source, source)] > 0.0


def _float_path(mask: np.ndarray, resize: int, crop: int, size: int, threshold: float) -> np.ndarray:
    """What a resize of the mask as a 32-bit float image gives (no uint8 rounding inside PIL)."""
    image = Image.fromarray(mask.astype(np.float32))
    resized = image.resize((resize, resize), Image.Resampling.BILINEAR)
    offset = (resize - crop) // 2
    cropped = np.asarray(resized.crop((offset, offset, offset + crop, offset + crop)), dtype=np.float32)
    source = np.floor(np.arange(size) * (crop / size)).astype(int)
    return cropped[np.ix_(source, source)] > threshold


@pytest.fixture(scope="module")
def odd_mask() -> np.ndarray:
    return _blobs(389, 517, seed=1)  # 517 wide, 389 high


def test_mrad_masks_match_pil_8bit_resize_then_half_threshold(odd_mask: np.ndarray) -> None:
    pre = Preprocess(resize=518, crop=518, mean=MEAN, std=STD, interpolation="bicubic")
    out = MaskTransform(pre, threshold=0.5)(odd_mask)
    assert out.shape == (518, 518) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy().astype(bool), _mrad_reference(odd_mask, 518))


def test_rad_masks_match_pil_resize_crop_nearest_and_zero_threshold(odd_mask: np.ndarray) -> None:
    pre = Preprocess(resize=512, crop=448, mean=MEAN, std=STD, interpolation="bilinear")
    out = MaskTransform(pre, mask_size=256, threshold=0.0)(odd_mask)
    assert out.shape == (256, 256)
    np.testing.assert_array_equal(out.numpy().astype(bool), _rad_reference(odd_mask))


def test_masks_given_as_0_255_or_bool_give_the_same_result(odd_mask: np.ndarray) -> None:
    pre = Preprocess(resize=512, crop=448, mean=MEAN, std=STD, interpolation="bilinear")
    transform = MaskTransform(pre, mask_size=256, threshold=0.0)
    torch.testing.assert_close(transform(odd_mask), transform(odd_mask.astype(np.uint8) * 255))


def test_a_float_resize_would_flip_boundary_pixels(odd_mask: np.ndarray) -> None:
    # The 8-bit path is not a detail: a float resize gives other ground truth on these very masks.
    pre = Preprocess(resize=512, crop=448, mean=MEAN, std=STD, interpolation="bilinear")
    rad = MaskTransform(pre, mask_size=256, threshold=0.0)(odd_mask).numpy().astype(bool)
    assert (rad != _float_path(odd_mask, 512, 448, 256, 0.0)).sum() > 0

    # An exact 2x reduction puts boundary pixels at exactly 0.5: 127.5 rounds to 128 > 0.5 in 8 bits,
    # where the float value 0.5 is not > 0.5; thousands of pixels flip.
    double = _blobs(1036, 1036, seed=2)
    pre = Preprocess(resize=518, crop=518, mean=MEAN, std=STD, interpolation="bicubic")
    mrad = MaskTransform(pre, threshold=0.5)(double).numpy().astype(bool)
    np.testing.assert_array_equal(mrad, _mrad_reference(double, 518))
    assert (mrad != _float_path(double, 518, 518, 518, 0.5)).sum() > 1000
