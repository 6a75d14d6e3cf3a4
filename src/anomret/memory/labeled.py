"""MRAD's two-level feature→label memory, built from a labelled auxiliary dataset.

- Image level: one key per auxiliary image, its L2-normalised global feature, with the one-hot label
  of the image (normal ``[1, 0]``, anomalous ``[0, 1]``).
- Patch level: per image, region prototypes: the mean of the patch features inside the anomalous
  region and the mean of those outside it (a normal image gives one prototype), each L2-normalised
  after averaging, labelled anomalous/normal.

Which patch cells count as inside/outside follows the official code: the binary mask is bilinearly
resized to the patch grid (no antialias), cells equal to 1 are anomalous, cells equal to 0 normal,
and boundary cells with fractional values are dropped from both regions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.memory.store import load_bank, save_bank

log = logging.getLogger(__name__)

NORMAL_LABEL = torch.tensor([1.0, 0.0])
ANOMALOUS_LABEL = torch.tensor([0.0, 1.0])
_EXACT = 1e-6  # bilinear weights can sum to 1 - ulp; treat values this close as exactly 0 or 1


@dataclass
class LabeledMemoryBank:
    """Keys (L2-normalised) and one-hot values of both memory levels."""

    image_keys: Tensor  # [N, D]
    image_values: Tensor  # [N, 2]
    patch_keys: Tensor  # [M, C]
    patch_values: Tensor  # [M, 2]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for level in ("image", "patch"):
            keys, values = getattr(self, f"{level}_keys"), getattr(self, f"{level}_values")
            if keys.ndim != 2 or values.shape != (keys.shape[0], 2):
                raise ValueError(f"{level} bank: keys {tuple(keys.shape)} vs values {tuple(values.shape)}")
            if keys.shape[0] == 0:
                raise ValueError(f"{level}-level memory is empty: the auxiliary data gave no entries")

    def summary(self) -> str:
        def counts(values: Tensor) -> str:
            anomalous = int(values[:, 1].sum().item())
            return f"{values.shape[0]} ({values.shape[0] - anomalous} normal, {anomalous} anomalous)"

        return f"image entries {counts(self.image_values)}, patch entries {counts(self.patch_values)}"

    def to(self, device: torch.device | str) -> LabeledMemoryBank:
        return LabeledMemoryBank(
            self.image_keys.to(device),
            self.image_values.to(device),
            self.patch_keys.to(device),
            self.patch_values.to(device),
            self.metadata,
        )

    def save(self, path: str | Path) -> Path:
        tensors = {
            "image_keys": self.image_keys,
            "image_values": self.image_values,
            "patch_keys": self.patch_keys,
            "patch_values": self.patch_values,
        }
        return save_bank(path, tensors, {"kind": "labeled", **self.metadata})

    @classmethod
    def load(cls, path: str | Path) -> LabeledMemoryBank:
        tensors, metadata = load_bank(path)
        if metadata.get("kind") != "labeled":
            raise ValueError(f"{path} holds a '{metadata.get('kind')}' bank, not an MRAD labelled bank")
        metadata.pop("kind")
        metadata.pop("format_version", None)
        return cls(metadata=metadata, **tensors)


def patch_cell_labels(masks: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Which grid cells are anomalous / normal for ``[B, H, W]`` binary masks.

    Returns two bool tensors ``[B, h, w]``; boundary cells are in neither.
    """
    resized = F.interpolate(masks.float().unsqueeze(1), size=grid, mode="bilinear", align_corners=False)
    resized = resized.squeeze(1)
    return resized >= 1 - _EXACT, resized <= _EXACT


def region_prototypes(patches: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Region prototypes of a batch: patch grids ``[B, h, w, C]`` and binary masks ``[B, H, W]``.

    Returns keys ``[P, C]`` (L2-normalised means) and one-hot values ``[P, 2]``, in image order,
    anomalous prototype before normal one for each image.
    """
    anomalous_cells, normal_cells = patch_cell_labels(masks, (patches.shape[1], patches.shape[2]))
    keys, values = [], []
    for grid, anomalous, normal in zip(patches.float(), anomalous_cells, normal_cells, strict=True):
        for cells, label in ((anomalous, ANOMALOUS_LABEL), (normal, NORMAL_LABEL)):
            if cells.any():
                keys.append(grid[cells].mean(dim=0))
                values.append(label)
    if not keys:
        return patches.new_zeros(0, patches.shape[-1]), patches.new_zeros(0, 2)
    return F.normalize(torch.stack(keys), dim=-1), torch.stack(values).to(patches.device)


@dataclass
class LabeledBankBuilder:
    """Accumulates batches of auxiliary features into a :class:`LabeledMemoryBank`.

    ``max_image_entries`` / ``max_patch_entries`` randomly subsample a level after the pass (the
    memory-size ablation of the MRAD reviews); ``None`` keeps everything.
    """

    max_image_entries: int | None = None
    max_patch_entries: int | None = None
    seed: int = 0
    _image_keys: list[Tensor] = field(default_factory=list, repr=False)
    _image_values: list[Tensor] = field(default_factory=list, repr=False)
    _patch_keys: list[Tensor] = field(default_factory=list, repr=False)
    _patch_values: list[Tensor] = field(default_factory=list, repr=False)

    def add(self, cls: Tensor, patches: Tensor, masks: Tensor, labels: Tensor) -> None:
        """Add a batch: global features ``[B, D]``, patch grids ``[B, h, w, C]``, masks, labels ``[B]``."""
        if masks.shape[0] != cls.shape[0] or labels.shape[0] != cls.shape[0]:
            raise ValueError("cls, masks and labels must have the same batch size")
        empty = int(((labels == 1) & (masks.flatten(1).amax(dim=1) == 0)).sum())
        if empty:
            # The official code keeps such images (their whole grid becomes a normal prototype); say so,
            # because it usually means the auxiliary masks are missing.
            log.warning(
                "%d anomalous auxiliary image(s) have an empty mask; their patches count as normal", empty
            )
        self._image_keys.append(F.normalize(cls.detach().float(), dim=-1).cpu())
        self._image_values.append(F.one_hot(labels.long().cpu(), 2).float())
        keys, values = region_prototypes(patches.detach(), masks)
        self._patch_keys.append(keys.cpu())
        self._patch_values.append(values.cpu())

    @property
    def n_images(self) -> int:
        return sum(k.shape[0] for k in self._image_keys)

    def _subsample(
        self, keys: Tensor, values: Tensor, limit: int | None, offset: int
    ) -> tuple[Tensor, Tensor]:
        if limit is None or keys.shape[0] <= limit:
            return keys, values
        generator = torch.Generator().manual_seed(self.seed + offset)
        chosen = torch.randperm(keys.shape[0], generator=generator)[:limit].sort().values
        return keys[chosen], values[chosen]

    def build(self, metadata: dict[str, Any] | None = None) -> LabeledMemoryBank:
        if not self._image_keys:
            raise ValueError("no auxiliary images were added: the memory would be empty")
        image_keys, image_values = self._subsample(
            torch.cat(self._image_keys), torch.cat(self._image_values), self.max_image_entries, 0
        )
        patch_keys, patch_values = self._subsample(
            torch.cat(self._patch_keys), torch.cat(self._patch_values), self.max_patch_entries, 1
        )
        return LabeledMemoryBank(image_keys, image_values, patch_keys, patch_values, dict(metadata or {}))

    def reset(self) -> None:
        for store in (self._image_keys, self._image_values, self._patch_keys, self._patch_values):
            store.clear()


@dataclass
class LabeledMemorySettings:
    """Hydra ``memory=labeled``: how the MRAD bank is built and where it is cached.

    Args:
        path: explicit bank file. A file built from other data or settings by the same encoder is
            rebuilt in place; one built by another encoder is refused.
        cache_dir: where banks go when ``path`` is unset, one file per (source, encoder, settings).
        rebuild: rebuild even when a matching bank exists.
        max_image_entries / max_patch_entries: random subsampling of each level (memory-size ablation).
        seed: seed of that subsampling.
    """

    path: str | None = None
    cache_dir: str = ".cache/banks"
    rebuild: bool = False
    max_image_entries: int | None = None
    max_patch_entries: int | None = None
    seed: int = 0

    def builder(self) -> LabeledBankBuilder:
        return LabeledBankBuilder(self.max_image_entries, self.max_patch_entries, self.seed)

    def build_settings(self) -> dict[str, Any]:
        return {
            "max_image_entries": self.max_image_entries,
            "max_patch_entries": self.max_patch_entries,
            "seed": self.seed,
        }

    def resolve_path(self, prefix: str, identity: str) -> Path:
        if self.path is not None:
            return Path(self.path)
        return Path(self.cache_dir) / f"{prefix}-{identity[:12]}.safetensors"
