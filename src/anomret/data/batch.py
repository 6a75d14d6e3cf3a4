"""The batch every loader yields and every model, builder and callback reads: one typed record.

A batch mixes images the feature store does not have (decoded, at batch positions ``fresh``) with the
stored features of the others (at positions ``cached``), so cached images are never even decoded. Fields
are tensors, lists or ``None`` only, so Lightning moves a batch to the device as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate


@dataclass
class Batch:
    """A batch of images (and, for labelled data, their ground truth).

    Attributes:
        index: ``[B]`` int64 row numbers in the sample table (dataset order).
        category: the category of each image.
        image_path: the image file of each item.
        label: ``[B]`` int64, 1 for anomalous images (0 for unlabelled ones).
        mask: ``[B, H, W]`` float32 ground truth in {0, 1} (all zero without a pixel annotation).
        image: ``[F, 3, S, S]`` decoded, normalised images of the items at positions ``fresh``, or ``None``.
        fresh: ``[F]`` int64 batch positions of the decoded images.
        stored: stored features (named tensors ``cls``, ``patches.<layer>``, ...) of the items at
            positions ``cached``, or ``None``.
        cached: ``[C]`` int64 batch positions of the stored features.
        feature_key: each item's feature-store key, when a store is in use.
    """

    index: Tensor
    category: list[str]
    image_path: list[str]
    label: Tensor
    mask: Tensor
    image: Tensor | None
    fresh: Tensor
    stored: dict[str, Tensor] | None
    cached: Tensor
    feature_key: list[str] | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @classmethod
    def unlabelled(
        cls, index: Tensor, image: Tensor | None = None, image_path: list[str] | None = None
    ) -> Batch:
        """A batch of images without ground truth (normal labels, empty masks), e.g. in-memory uploads."""
        n = int(index.shape[0])
        if image is not None and image.shape[0] != n:
            raise ValueError(f"{image.shape[0]} images for {n} indices")
        return cls(
            index=index.to(torch.int64),
            category=[""] * n,
            image_path=list(image_path) if image_path is not None else [""] * n,
            label=torch.zeros(n, dtype=torch.int64),
            mask=torch.zeros(n, 1, 1),
            image=image,
            fresh=torch.arange(n) if image is not None else torch.zeros(0, dtype=torch.int64),
            stored=None,
            cached=torch.zeros(0, dtype=torch.int64),
        )

    @property
    def binary_masks(self) -> Tensor:
        """The ground truth as ``{0, 1}`` class indices ``[B, H, W]``."""
        return (self.mask > 0.5).long()


def collate_items(items: list[dict[str, Any]]) -> Batch:
    """Batch dataset items, of which some carry a decoded ``image`` and others stored ``features``."""
    fresh = [i for i, item in enumerate(items) if "image" in item]
    cached = [i for i, item in enumerate(items) if "features" in item]
    keys = [item.get("feature_key") for item in items]
    return Batch(
        index=torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
        category=[str(item["category"]) for item in items],
        image_path=[str(item["image_path"]) for item in items],
        label=torch.stack([torch.as_tensor(item["label"], dtype=torch.int64) for item in items]),
        mask=torch.stack([item["mask"] for item in items]),
        image=torch.stack([items[i]["image"] for i in fresh]) if fresh else None,
        fresh=torch.tensor(fresh, dtype=torch.int64),
        stored=default_collate([items[i]["features"] for i in cached]) if cached else None,
        cached=torch.tensor(cached, dtype=torch.int64),
        feature_key=None if any(key is None for key in keys) else [str(key) for key in keys],
    )
