"""AnomalyDataset items and the shared image/mask geometry of anomret.data.transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from anomret.data.batch import Batch, collate_items
from anomret.data.dataset import AnomalyDataset
from anomret.data.errors import InvalidSampleError
from anomret.data.samples import Sample, SampleTable
from anomret.data.transforms import ImageTransform, SquareResizeCrop, crop_box, resize_nearest
from anomret.encoders.base import Preprocess

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PRE = Preprocess(resize=20, crop=16, mean=MEAN, std=STD, interpolation="bicubic")


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _sample(image: Path, mask: Path | None, label: int, category: str = "widget") -> Sample:
    return Sample(image_path=image, mask_path=mask, category=category, label=label, split="test", source="t")


def _square_mask(height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 255
    return mask


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A 40 (wide) x 20 (high) image with a mask square at rows 6:14, cols 20:36."""
    rgb = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    return _save(tmp_path / "img.png", rgb), _save(
        tmp_path / "mask.png", _square_mask(20, 40, (6, 14), (20, 36))
    )


def test_item_keys_shapes_and_types(pair: tuple[Path, Path]) -> None:
    image, mask = pair
    item = AnomalyDataset(SampleTable([_sample(image, mask, 1)]), PRE)[0]
    assert set(item) == {"image", "mask", "label", "category", "image_path", "index"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and item["label"].item() == 1
    assert item["category"] == "widget" and item["image_path"] == str(image) and item["index"] == 0


def test_mask_square_lands_where_the_geometry_puts_it(pair: tuple[Path, Path]) -> None:
    image, mask = pair
    out = AnomalyDataset(SampleTable([_sample(image, mask, 1)]), PRE)[0]["mask"]
    # Squash 40x20 -> 20x20: rows keep their scale (6:14), columns halve (20:36 -> 10:18);
    # the centre crop 20 -> 16 removes 2 pixels on each side: rows 4:12, columns 8:16.
    expected = torch.zeros(16, 16)
    expected[4:12, 8:16] = 1
    torch.testing.assert_close(out, expected)


def test_mask_size_resizes_with_nearest(pair: tuple[Path, Path]) -> None:
    image, mask = pair
    table = SampleTable([_sample(image, mask, 1)])
    full = AnomalyDataset(table, PRE)[0]["mask"]
    small = AnomalyDataset(table, PRE, mask_size=8)[0]["mask"]
    assert small.shape == (8, 8)
    torch.testing.assert_close(small, full[::2, ::2])  # legacy nearest samples floor(i * 16 / 8)
    large = AnomalyDataset(table, PRE, mask_size=32)[0]["mask"]
    torch.testing.assert_close(large, full.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_mask_threshold_decides_partial_pixels(tmp_path: Path) -> None:
    image = _save(tmp_path / "i.png", np.zeros((32, 32, 3), dtype=np.uint8))
    # A one-pixel line halved in size becomes a line of partial values (< 0.5) after bilinear resizing.
    mask = _save(tmp_path / "m.png", _square_mask(32, 32, (8, 24), (15, 16)))
    pre = Preprocess(resize=16, crop=16, mean=MEAN, std=STD)
    table = SampleTable([_sample(image, mask, 1)])
    assert AnomalyDataset(table, pre, mask_threshold=0.5)[0]["mask"].sum() == 0
    assert AnomalyDataset(table, pre, mask_threshold=0.0)[0]["mask"].sum() > 0


def test_image_is_normalised_with_the_preprocess_statistics(tmp_path: Path) -> None:
    image = _save(tmp_path / "gray.png", np.full((10, 30, 3), (51, 102, 204), dtype=np.uint8))
    out = AnomalyDataset(SampleTable([_sample(image, None, 0)]), PRE)[0]["image"]
    for channel, value in enumerate((51, 102, 204)):
        expected = (value / 255 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(out[channel], torch.full((16, 16), expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_image_pipeline_matches_pil_resize_and_crop(pair: tuple[Path, Path], interpolation: str) -> None:
    image, _ = pair
    pre = Preprocess(resize=24, crop=20, mean=MEAN, std=STD, interpolation=interpolation)
    out = AnomalyDataset(SampleTable([_sample(image, None, 0)]), pre)[0]["image"]
    # The official pipelines: PIL Resize((24, 24)) -> CenterCrop(20) -> ToTensor -> Normalize.
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    pil = Image.open(image).convert("RGB").resize((24, 24), resample).crop((2, 2, 22, 22))
    ref = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
    ref = (ref - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_normal_images_get_an_empty_mask_even_with_a_mask_file(pair: tuple[Path, Path]) -> None:
    image, mask = pair
    dataset = AnomalyDataset(
        SampleTable([_sample(image, mask, 0), _sample(image, None, 1)]), PRE, mask_size=12
    )
    for item in (dataset[0], dataset[1]):
        assert item["mask"].shape == (12, 12) and item["mask"].sum() == 0
    assert dataset[1]["label"].item() == 1  # anomalous without pixel ground truth (image-level sets)


def test_mask_of_another_size_is_refused_at_load_time(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    image, _ = pair
    mask = _save(tmp_path / "small_mask.png", _square_mask(10, 20, (1, 5), (1, 5)))
    with pytest.raises(InvalidSampleError) as info:
        AnomalyDataset(SampleTable([_sample(image, mask, 1)]), PRE)[0]
    message = str(info.value)
    assert str(image) in message and str(mask) in message and "40x20" in message and "20x10" in message


def test_unreadable_image_is_refused_at_load_time(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InvalidSampleError, match=r"broken\.png"):
        AnomalyDataset(SampleTable([_sample(broken, None, 0)]), PRE)[0]


def test_items_collate_into_a_typed_batch(pair: tuple[Path, Path]) -> None:
    image, mask = pair
    table = SampleTable(
        [_sample(image, mask, 1, "a"), _sample(image, None, 0, "b"), _sample(image, None, 0, "c")]
    )
    loader = DataLoader(AnomalyDataset(table, PRE, mask_size=8), batch_size=3, collate_fn=collate_items)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.image is not None and batch.image.shape == (3, 3, 16, 16) and batch.mask.shape == (3, 8, 8)
    assert batch.label.tolist() == [1, 0, 0] and batch.label.dtype == torch.int64
    assert batch.category == ["a", "b", "c"] and batch.image_path == [str(image)] * 3
    assert batch.index.tolist() == [0, 1, 2] and batch.fresh.tolist() == [0, 1, 2]
    assert batch.stored is None and batch.cached.numel() == 0 and batch.feature_key is None
    assert batch.binary_masks.dtype == torch.int64 and batch.binary_masks.max() == 1


def test_crop_box_rounds_like_torchvision() -> None:
    assert crop_box(20, 20, 16) == (2, 2)
    assert crop_box(21, 23, 16) == (2, 4)  # round(2.5) == 2 (half to even), round(3.5) == 4
    with pytest.raises(ValueError, match="larger"):
        crop_box(10, 20, 16)


def test_geometry_and_transform_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="crop <= resize"):
        SquareResizeCrop(resize=16, crop=20)
    with pytest.raises(ValueError, match="bicubic"):
        ImageTransform(Preprocess(resize=16, crop=16, mean=MEAN, std=STD, interpolation="nearest"))
    with pytest.raises(ValueError, match="uint8"):
        ImageTransform(PRE)(np.zeros((8, 8, 3), dtype=np.float32))


def test_resize_nearest_keeps_leading_dimensions() -> None:
    x = torch.arange(16.0).view(1, 4, 4).expand(2, 4, 4)
    out = resize_nearest(x, 2)
    assert out.shape == (2, 2, 2)
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
