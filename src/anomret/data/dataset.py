"""``AnomalyDataset``: a ``SampleTable`` read through an encoder's preprocessing.

Items are plain dicts, batched into a :class:`~anomret.data.batch.Batch` by
:func:`~anomret.data.batch.collate_items`::

    {"image": float32 [3, crop, crop], "mask": float32 [mask_size, mask_size] in {0, 1},
     "label": int64 scalar, "category": str, "image_path": str, "index": int}

With a feature source (the feature store), an item whose features are stored carries them (``features``:
named tensors) instead of the decoded ``image``, so cached images are not even read; ``feature_key``
names the entry. An item whose features the main process holds in memory (the source ``holds`` them)
carries neither: the model's feature extractor serves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from anomret.data.errors import InvalidSampleError
from anomret.data.io import read_image, read_mask
from anomret.data.samples import SampleTable
from anomret.data.transforms import ImageTransform, MaskTransform
from anomret.encoders.base import Preprocess


class FeatureSource(Protocol):
    """Where stored features come from (the feature store, with or without the in-memory tier): a key per
    image file, an entry per key, and whether the main process holds an entry in memory."""

    def image_key(self, path: str | Path) -> str: ...

    def read(self, key: str) -> dict[str, Tensor] | None: ...

    def holds(self, key: str) -> bool: ...


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
        feature_store: FeatureSource | None = None,
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
        held = False
        if self.feature_store is not None:
            item["feature_key"] = self.feature_store.image_key(sample.image_path)
            held = self.feature_store.holds(item["feature_key"])
            if not held:
                stored = self.feature_store.read(item["feature_key"])
        if stored is not None:
            item["features"] = stored
            image = None
        elif held:  # served from memory by the main process: not even decoded here
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
