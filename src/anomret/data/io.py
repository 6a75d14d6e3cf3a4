"""Reading images and masks from disk into plain numpy arrays.

Images come back as ``uint8 [H, W, 3]`` RGB whatever the file holds; masks as ``bool [H, W]``.
The conversion rules (documented on :func:`read_image` and :func:`read_mask`) are the single place
where file formats are dealt with, so the rest of the pipeline only ever sees one image type.

EXIF orientation tags are deliberately ignored, as in the official MRAD/AnomalyCLIP/RAD loaders:
rotating an image but not its mask would misalign the ground truth.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomret.data.errors import InvalidSampleError

# Candidate bit depths for integer images stored in containers wider than 8 bits: sensors deliver
# 10, 12 or 14 significant bits in 16-bit files, and scaling by 65535 would leave them nearly black.
_BIT_DEPTHS = (8, 10, 12, 14, 16)

# Errors PIL raises for a file it cannot read; DecompressionBombError (an image over PIL's pixel limit)
# derives from Exception only.
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)

# PIL refuses images over Image.MAX_IMAGE_PIXELS as possible decompression bombs; a trusted dataset of
# very large images can raise the limit.
MAX_PIXELS_VARIABLE = "ANOMRET_MAX_IMAGE_PIXELS"
if os.environ.get(MAX_PIXELS_VARIABLE):
    Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_VARIABLE])

# PIL decodes multi-band TIFFs with more bits per sample than this by keeping the high byte only.
_HIGH_DEPTH_TIFF_BITS = 8


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header only (no pixel decoding).

    Raises:
        InvalidSampleError: the file is missing or not an image PIL can identify.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error


def check_image(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image whose whole file has been checked, not just its header.

    A truncated or corrupt file with an intact header passes :func:`image_size` and fails only when its
    pixels are decoded, in the middle of a run. The check is complete but cheap where the format allows:

    - PNG: every chunk's checksum up to the end marker (:meth:`PIL.Image.Image.verify`), no decompression
      (about 0.6 ms for a 1024×1024 image, against 14 ms for a decode);
    - JPEG: the end-of-image marker is present (a truncated file has none), else a full decode decides;
    - every other format: a full decode.

    Raises:
        InvalidSampleError: the file is missing, truncated, corrupt, over the pixel limit or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
            elif image.format != "JPEG" or not _ends_with_jpeg_marker(path):
                image.load()
            return size
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error


def _ends_with_jpeg_marker(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 64))
        tail = handle.read().rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB.

    Conversion rules:

    - grayscale (``1``, ``L``) is replicated to three channels; palette (``P``) images are expanded
      through their palette; ``CMYK``, ``YCbCr`` and other colour spaces are converted by PIL.
    - alpha (``RGBA``, ``LA``, ``PA``) is **dropped**, not composited: transparent pixels keep the
      colour stored under them, which is what the official loaders (``convert("RGB")``) see too.
    - integer images wider than 8 bits (``I;16``, ``I;16B``, ``I``, 16-bit PNG/TIFF) are scaled by
      the range of their bit depth, inferred per image as the smallest of 8, 10, 12, 14, 16 bits
      that holds the image's maximum: a 12-bit sensor image (max <= 4095) is scaled by 255/4095, a
      full-range 16-bit image by 255/65535, and 8-bit data stored in a 16-bit file is left as is.
      Because the depth is inferred per image, a dataset whose images straddle a boundary (one
      image peaking at 4000, another at 5000) is scaled inconsistently: convert such data offline.
    - float images (``F``, float TIFF) are clipped at 0 and divided by their maximum, or taken as
      already in ``[0, 1]`` when the maximum does not exceed 1; NaNs become 0.
    - multi-band 16-bit TIFFs are decoded with ``tifffile`` when it is installed and scaled like
      grayscale ones (one depth for all bands). PIL alone keeps the high byte of each sample, which
      is right for full-range data only; 16-bit RGB PNGs go that way too.

    Raises:
        InvalidSampleError: the file is missing, truncated, corrupt or of an unsupported mode.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if _is_high_depth_multiband_tiff(image):
                array = _read_tiff_multiband(path, image)
                if array is not None:
                    return array
            image.load()
            return _to_rgb_uint8(image)
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as ``bool [H, W]``: any value above zero is anomalous.

    Any mode is accepted: 8/16-bit and float grayscale, palette masks (the palette *index* is the
    class id, as in VisA, so index > 0 is anomalous), and RGB masks (anomalous where any colour
    channel is above zero). Alpha channels are ignored, since an opaque alpha would mark every pixel.
    Lossy (JPEG) masks are binarised the same way, as the official loaders do; compression noise
    near edges therefore counts as anomalous.

    Raises:
        InvalidSampleError: the file is missing, truncated or corrupt.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
                array = np.asarray(image)[..., :-1]
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                array = np.asarray(image.convert("L"))
            else:
                array = np.asarray(image)
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error
    array = np.nan_to_num(array, nan=0.0) if array.dtype.kind == "f" else array
    if array.ndim == 3:
        anomalous = (array > 0).any(axis=-1)
        assert isinstance(anomalous, np.ndarray)  # a 3-d array reduces to a 2-d one, not a scalar
        return anomalous
    return array > 0


def _unreadable(path: str | Path, error: BaseException) -> InvalidSampleError:
    """The error for one file that cannot be read; callers add the fix of their context (a dataset index,
    a prediction folder)."""
    if not Path(path).exists():
        return InvalidSampleError(f"image file not found: {path}")
    if isinstance(error, Image.DecompressionBombError):
        return InvalidSampleError(
            f"cannot read image file {path}: {error}\n"
            f"Fix: downscale the image, or raise the limit of {Image.MAX_IMAGE_PIXELS} pixels with "
            f"{MAX_PIXELS_VARIABLE}=N if the file is trusted."
        )
    return InvalidSampleError(
        f"cannot read image file {path}: {type(error).__name__}: {error}\n"
        "The file is truncated, corrupt or not an image."
    )


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(image, dtype=np.uint8)[..., :3].copy()
    if mode in ("L", "1", "LA", "La"):
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("P", "PA"):
        # Expanding through RGBA keeps PIL quiet about transparency stored in the palette.
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)[..., :3].copy()
    if mode.startswith("I"):
        gray = _scale_integer(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        gray = _scale_float(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as error:
        raise ValueError(f"unsupported image mode {mode!r}") from error


def _scale_integer(array: np.ndarray) -> np.ndarray:
    """Scale integer data wider than 8 bits to uint8 by the range of its inferred bit depth."""
    values = np.clip(array.astype(np.int64), 0, None)
    peak = int(values.max()) if values.size else 0
    depth = next((bits for bits in _BIT_DEPTHS if peak <= (1 << bits) - 1), None)
    if depth is None:  # wider than 16 bits (mode "I" holds int32)
        depth = peak.bit_length()
    if depth == 8:
        return values.astype(np.uint8)
    scaled = values.astype(np.float64) * (255.0 / ((1 << depth) - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _scale_float(array: np.ndarray) -> np.ndarray:
    values = np.clip(np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    peak = float(values.max()) if values.size else 0.0
    scale = 1.0 if peak <= 1.0 else peak
    return np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)


def _is_high_depth_multiband_tiff(image: Image.Image) -> bool:
    if image.format != "TIFF" or image.mode not in ("RGB", "RGBA", "CMYK"):
        return False
    bits = getattr(image, "tag_v2", {}).get(258)  # BitsPerSample
    if isinstance(bits, int):
        bits = (bits,)
    if not bits:
        return False
    return max(bits) > _HIGH_DEPTH_TIFF_BITS


def _read_tiff_multiband(path: Path, image: Image.Image) -> np.ndarray | None:
    try:
        import tifffile
    except ImportError:
        warnings.warn(
            f"{path} is a multi-band TIFF with more than 8 bits per sample; without the 'tifffile' package "
            "PIL keeps only the high byte of each sample, which darkens 10/12/14-bit data. "
            "Install tifffile (pip install tifffile) to read such files exactly.",
            stacklevel=3,
        )
        return None
    try:
        array = np.asarray(tifffile.imread(path, key=0))
    except Exception as error:  # tifffile has its own error types; report them like PIL's
        raise _unreadable(path, error) from error
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (separate bands) storage
    if array.ndim != 3 or array.shape[-1] < 3:
        return None
    if image.mode == "CMYK":
        return None  # PIL's colour conversion is the better path for ink separations
    bands = array[..., :3]
    # One scale for all three bands, so that colour balance is kept.
    return _scale_float(bands) if bands.dtype.kind == "f" else _scale_integer(bands)
