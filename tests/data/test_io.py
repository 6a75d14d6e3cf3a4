"""read_image / read_mask on real files of every mode the readers promise to handle."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomret.data.errors import InvalidSampleError
from anomret.data.io import check_image, image_size, read_image, read_mask


def _gradient(height: int = 8, width: int = 16) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)


def _check_rgb(array: np.ndarray, height: int = 8, width: int = 16) -> None:
    assert array.dtype == np.uint8 and array.shape == (height, width, 3)


def test_rgb_png_round_trips(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), rgb)


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    gray = _gradient()
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    _check_rgb(out)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_bilevel_image_becomes_black_and_white(tmp_path: Path) -> None:
    Image.fromarray(_gradient() > 100).save(tmp_path / "b.png")
    out = read_image(tmp_path / "b.png")
    assert set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out[..., 0] == 255, _gradient() > 100)


def test_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[..., 3] = 0  # fully transparent: the stored colour is still returned
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    _check_rgb(out)
    assert tuple(out[0, 0]) == (200, 100, 50)


def test_la_drops_alpha(tmp_path: Path) -> None:
    Image.merge("LA", [Image.fromarray(_gradient()), Image.new("L", (16, 8), 7)]).save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[..., 1], _gradient())


def test_palette_is_expanded_through_the_palette(tmp_path: Path) -> None:
    image = Image.new("P", (16, 8))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    indices = np.zeros((8, 16), dtype=np.uint8)
    indices[:, 8:] = 2
    indices[0, 0] = 1
    image.putdata(indices.flatten().tolist())
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    out = read_image(tmp_path / "p.png")
    assert (
        tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 15]) == (0, 0, 255) and tuple(out[1, 1]) == (0, 0, 0)
    )


@pytest.mark.parametrize(("peak", "depth"), [(65535, 16), (4095, 12), (1023, 10), (200, 8)])
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path: Path, peak: int, depth: int) -> None:
    values = np.linspace(0, peak, 128).round().astype(np.uint16).reshape(8, 16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    _check_rgb(out)
    expected = np.rint(values.astype(np.float64) * 255 / ((1 << depth) - 1)).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.max() == (255 if depth > 8 else peak)


def test_16_bit_tiff_big_endian_is_scaled(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    values = np.linspace(0, 4095, 128).round().astype(">u2").reshape(8, 16)
    tifffile.imwrite(tmp_path / "be.tif", values)
    assert Image.open(tmp_path / "be.tif").mode == "I;16B"
    out = read_image(tmp_path / "be.tif")
    assert out[..., 0].max() == 255 and out[0, 0, 0] == 0
    np.testing.assert_array_equal(out[..., 0], np.rint(values.astype(float) * 255 / 4095).astype(np.uint8))


def test_16_bit_rgb_tiff_keeps_low_bit_depth_data_visible(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    values = np.zeros((8, 16, 3), dtype=np.uint16)
    values[..., 0] = 4095  # 12-bit data: PIL alone would return 4095 >> 8 == 15
    values[..., 1] = 2048
    tifffile.imwrite(tmp_path / "rgb16.tif", values, photometric="rgb")
    out = read_image(tmp_path / "rgb16.tif")
    assert tuple(out[0, 0]) == (255, 128, 0)


def test_16_bit_rgb_tiff_without_tifffile_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tifffile = pytest.importorskip("tifffile")
    values = np.full((8, 16, 3), 4095, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", values, photometric="rgb")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # makes "import tifffile" fail
    with pytest.warns(UserWarning, match="install tifffile|Install tifffile"):
        out = read_image(tmp_path / "rgb16.tif")
    assert out.max() == 4095 >> 8  # PIL's high byte: the documented fallback


def test_32_bit_integer_image(tmp_path: Path) -> None:
    values = np.linspace(0, 4095, 128).round().astype(np.int32).reshape(8, 16)
    Image.fromarray(values).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert read_image(tmp_path / "i.tif")[..., 2].max() == 255


@pytest.mark.parametrize(("scale", "expected_peak"), [(1.0, 255), (0.5, 128), (1000.0, 255)])
def test_float_tiff(tmp_path: Path, scale: float, expected_peak: int) -> None:
    values = np.linspace(0, 1, 128, dtype=np.float32).reshape(8, 16) * scale
    values[0, 1] = -3.0  # negatives clip to black
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    out = read_image(tmp_path / "f.tif")
    assert out[0, 1, 0] == 0 and out.max() == expected_peak


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    red, green, blue = read_image(tmp_path / "c.jpg")[4, 8].astype(int)
    assert red > 200 and green < 50 and blue < 50


def test_truncated_file_is_an_invalid_sample(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    assert image_size(path) == (64, 64)  # the header is intact ...
    with pytest.raises(InvalidSampleError) as info:
        read_image(path)  # ... the pixels are not
    assert str(path) in str(info.value) and "corrupt" in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_whole_file_check_catches_what_the_header_misses(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    assert check_image(path) == (64, 64)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert image_size(path) == (64, 64)  # the header is intact
    with pytest.raises(InvalidSampleError, match="truncated") as info:
        check_image(path)
    assert str(path) in str(info.value)


def test_whole_file_check_catches_corrupt_png_data(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the compressed pixels
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidSampleError, match=r"x\.png"):
        check_image(path)


def test_image_over_the_pixel_limit_names_the_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels > 2 x limit: a decompression bomb
    for reader in (image_size, check_image, read_image):
        with pytest.raises(InvalidSampleError) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and "ANOMRET_MAX_IMAGE_PIXELS" in message, message


def test_not_an_image_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(InvalidSampleError, match="UnidentifiedImageError"):
        read_image(tmp_path / "x.png")
    with pytest.raises(InvalidSampleError, match="not found"):
        read_mask(tmp_path / "missing.png")
    with pytest.raises(InvalidSampleError, match="not found"):
        image_size(tmp_path / "missing.png")


def test_mask_binarises_any_positive_value(tmp_path: Path) -> None:
    values = np.zeros((8, 16), dtype=np.uint8)
    values[1, 1], values[2, 2], values[3, 3] = 1, 2, 255  # VisA-style class ids count too
    Image.fromarray(values).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == bool and out.shape == (8, 16)
    np.testing.assert_array_equal(out, values > 0)


def test_mask_16_bit_and_float(tmp_path: Path) -> None:
    values = np.zeros((8, 16), dtype=np.uint16)
    values[0, :3] = (1, 300, 65535)
    Image.fromarray(values).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m16.png"), values > 0)
    floats = np.zeros((8, 16), dtype=np.float32)
    floats[5, 5] = 0.25
    Image.fromarray(floats).save(tmp_path / "mf.tif")
    assert read_mask(tmp_path / "mf.tif").sum() == 1


def test_rgb_mask_uses_any_channel_and_ignores_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: must not mark everything
    rgba[2, 3, 2] = 9  # only blue set
    Image.fromarray(rgba).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.sum() == 1 and out[2, 3]
    Image.fromarray(rgba[..., :3]).save(tmp_path / "m_rgb.png")
    assert read_mask(tmp_path / "m_rgb.png").sum() == 1


def test_palette_mask_uses_indices(tmp_path: Path) -> None:
    image = Image.new("P", (16, 8))
    image.putpalette([255, 255, 255] + [0, 0, 0] * 255)  # index 0 is drawn white, index 1 black
    indices = np.zeros((8, 16), dtype=np.uint8)
    indices[4, 4] = 1
    image.putdata(indices.flatten().tolist())
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), indices > 0)
