"""``AnomalyDataset``: a ``SampleTable`` read through an encoder's preprocessing.

Items are plain dicts, batched by :func:`collate_items`::

    {"image": float32 [3, crop, crop], "mask": float32 [mask_size, mask_size] in {0, 1},
     "label": int64 scalar, "category": str, "image_path": str, "index": int}

With a feature store, an item whose features are stored carries them (``features``: named tensors)
instead of the decoded ``image``, so cached images are not even read; ``feature_key`` names the entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from anomret.data.errors import InvalidSampleError
from anomret.data.io import read_image, read_mask
from anomret.data.samples import SampleTable
from anomret.data.transforms import ImageTransform, MaskTransform
from anomret.encoders.base import Preprocess
from anomret.features.store import FeatureStore, image_key


class AnomalyDataset(Dataset):
    """Images and ground-truth masks of a sample table, preprocessed for one encoder.

    Args:
        samples: rows to serve, in order (``index`` in each item is the row number).
        preprocess: the encoder's square resize, centre crop and normalisation.
        mask_size: side of the returned masks; defaults to ``preprocess.crop``.
        mask_threshold: resized masks are binarised with ``> mask_threshold``.

    Normal images, and anomalous images of datasets without pixel annotations, get an all-zero mask.
    """

    def __init__(
        self,
        samples: SampleTable,
        preprocess: Preprocess,
        mask_size: int | None = None,
        mask_threshold: float = 0.5,
        feature_store: FeatureStore | None = None,
    ) -> None:
        self.samples = samples
        self.preprocess = preprocess
        self.feature_store = feature_store
        self.image_transform = ImageTransform(preprocess)
        self.mask_transform = MaskTransform(preprocess, mask_size, mask_threshold)

    @property
    def mask_size(self) -> int:
        return self.mask_transform.mask_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item: dict[str, Any] = {}
        stored = None
        if self.feature_store is not None:
            item["feature_key"] = image_key(sample.image_path)
            stored = self.feature_store.read(item["feature_key"])
        if stored is not None:
            item["features"] = stored
            image = None
        else:
            image = read_image(sample.image_path)
            item["image"] = self.image_transform(image)
        if sample.is_anomalous and sample.mask_path is not None:
            mask = read_mask(sample.mask_path)
            # Checked here too because validation may have been skipped (validate=False).
            if image is not None and mask.shape != image.shape[:2]:
                raise InvalidSampleError(
                    f"mask and image sizes differ: image {sample.image_path} is "
                    f"{image.shape[1]}x{image.shape[0]}, mask {sample.mask_path} is "
                    f"{mask.shape[1]}x{mask.shape[0]} (width x height).\n"
                    "Fix: the mask belongs to another image or was resized; correct the pairing in meta.json "
                    "or re-create the mask at the image's size."
                )
            mask_tensor = self.mask_transform(mask)
        else:
            mask_tensor = self.mask_transform.empty()
        item.update(
            mask=mask_tensor,
            label=torch.tensor(sample.label, dtype=torch.int64),
            category=sample.category,
            image_path=str(sample.image_path),
            index=index,
        )
        return item


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of which some carry a decoded ``image`` and others stored ``features``.

    ``image`` stacks the decoded images (batch positions in ``fresh``), ``features`` the stored ones
    (positions in ``cached``); either is ``None`` when no item has it. Everything else is batched by
    PyTorch's default collate.
    """
    fresh = [i for i, item in enumerate(items) if "image" in item]
    cached = [i for i, item in enumerate(items) if "features" in item]
    common = [{k: v for k, v in item.items() if k not in ("image", "features")} for item in items]
    batch = default_collate(common)
    batch["image"] = torch.stack([items[i]["image"] for i in fresh]) if fresh else None
    batch["features"] = default_collate([items[i]["features"] for i in cached]) if cached else None
    batch["fresh"] = torch.tensor(fresh, dtype=torch.long)
    batch["cached"] = torch.tensor(cached, dtype=torch.long)
    return batch
