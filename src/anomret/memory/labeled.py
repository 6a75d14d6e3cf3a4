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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.checks import integer_at_least
from anomret.data.batch import Batch
from anomret.encoders.base import Encoder, Features
from anomret.memory.base import MemorySettings
from anomret.memory.store import BankError, TensorSpec, load_bank, save_bank, validate_tensors

log = logging.getLogger(__name__)

NORMAL_LABEL = torch.tensor([1.0, 0.0])
ANOMALOUS_LABEL = torch.tensor([0.0, 1.0])
_EXACT = 1e-6  # bilinear weights can sum to 1 - ulp; treat values this close as exactly 0 or 1


_TENSORS = {
    "image_keys": TensorSpec(("n_images", "image_dim")),
    "image_values": TensorSpec(("n_images", "2")),
    "patch_keys": TensorSpec(("n_patches", "patch_dim")),
    "patch_values": TensorSpec(("n_patches", "2")),
}


@dataclass
class LabeledMemoryBank:
    """Keys (L2-normalised) and one-hot values of both memory levels."""

    kind: ClassVar[str] = "labeled"

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

    @property
    def layer(self) -> int | None:
        """The encoder block whose patch grid built the patch level (queries must use the same)."""
        return self.metadata.get("build", {}).get("layer")

    def check_compatible(self, dims: Mapping[str, int]) -> None:
        for level in ("image", "patch"):
            stored = getattr(self, f"{level}_keys").shape[1]
            if level in dims and stored != dims[level]:
                raise BankError(
                    f"the memory bank's {level} keys are {stored}-d but this run's encoder gives {dims[level]}-d "
                    f"{level} features: the bank was built for another encoder or layer. Fix: leave memory.path "
                    "unset (banks are cached per encoder), or point it at a bank built by this encoder."
                )

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
        if metadata.get("kind") != cls.kind:
            raise BankError(
                f"{path} holds a '{metadata.get('kind')}' bank, not an MRAD labelled bank: it was built for "
                "another method. Fix: point memory.path at a bank built with memory=labeled."
            )
        validate_tensors(path, tensors, _TENSORS)
        for level in ("image", "patch"):
            values = tensors[f"{level}_values"]
            if not (((values == 0) | (values == 1)).all() and (values.sum(dim=1) == 1).all()):
                raise BankError(
                    f"memory bank {path}: {level}_values are not one-hot labels. Delete it to rebuild it."
                )
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


@overload
def region_prototypes(
    patches: Tensor, masks: Tensor, *, with_owners: Literal[False] = ...
) -> tuple[Tensor, Tensor]: ...
@overload
def region_prototypes(
    patches: Tensor, masks: Tensor, *, with_owners: Literal[True]
) -> tuple[Tensor, Tensor, Tensor]: ...
def region_prototypes(
    patches: Tensor, masks: Tensor, *, with_owners: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Region prototypes of a batch: patch grids ``[B, h, w, C]`` and binary masks ``[B, H, W]``.

    Returns keys ``[P, C]`` (L2-normalised means) and one-hot values ``[P, 2]``, in image order,
    anomalous prototype before normal one for each image; with ``with_owners`` also the batch position
    ``[P]`` of the image each prototype comes from.
    """
    anomalous_cells, normal_cells = patch_cell_labels(masks, (patches.shape[1], patches.shape[2]))
    keys, values, owners = [], [], []
    for position, (grid, anomalous, normal) in enumerate(
        zip(patches.float(), anomalous_cells, normal_cells, strict=True)
    ):
        for cells, label in ((anomalous, ANOMALOUS_LABEL), (normal, NORMAL_LABEL)):
            if cells.any():
                keys.append(grid[cells].mean(dim=0))
                values.append(label)
                owners.append(position)
    if not keys:
        keys_t, values_t = patches.new_zeros(0, patches.shape[-1]).float(), patches.new_zeros(0, 2).float()
    else:
        keys_t, values_t = F.normalize(torch.stack(keys), dim=-1), torch.stack(values).to(patches.device)
    if with_owners:
        return keys_t, values_t, torch.tensor(owners, dtype=torch.long)
    return keys_t, values_t


@dataclass
class LabeledBankBuilder:
    """Accumulates batches of auxiliary features into a :class:`LabeledMemoryBank`.

    Every entry remembers the dataset row it came from, so the partial states of several processes
    (DDP) merge into the bank a single process would build, in the same order.
    ``max_image_entries`` / ``max_patch_entries`` randomly subsample a level after the pass (the
    memory-size ablation of the MRAD reviews); ``None`` keeps everything.
    """

    layer: int
    max_image_entries: int | None = None
    max_patch_entries: int | None = None
    seed: int = 0
    _parts: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)

    def add(self, features: Features, batch: Batch) -> None:
        """Add a batch: the global features, the patch grid of ``layer``, masks, labels and row indices."""
        self.add_arrays(features.cls, features.patches[self.layer], batch.mask, batch.label, batch.index)

    def add_arrays(
        self, cls: Tensor, patches: Tensor, masks: Tensor, labels: Tensor, indices: Tensor
    ) -> None:
        """Global features ``[B, D]``, patch grids ``[B, h, w, C]``, masks, labels ``[B]``, row indices ``[B]``."""
        indices = torch.as_tensor(indices).reshape(-1).cpu().long()
        if not (masks.shape[0] == labels.shape[0] == indices.shape[0] == cls.shape[0]):
            raise ValueError("cls, masks, labels and indices must have the same batch size")
        empty = int(((labels == 1) & (masks.flatten(1).amax(dim=1) == 0)).sum())
        if empty:
            # The official code keeps such images (their whole grid becomes a normal prototype); say so,
            # because it usually means the auxiliary masks are missing.
            log.warning(
                "%d anomalous auxiliary image(s) have an empty mask; their patches count as normal", empty
            )
        self._append("image_keys", F.normalize(cls.detach().float(), dim=-1).cpu())
        self._append("image_values", F.one_hot(labels.long().cpu(), 2).float())
        self._append("image_index", indices)
        keys, values, owners = region_prototypes(patches.detach(), masks, with_owners=True)
        self._append("patch_keys", keys.cpu())
        self._append("patch_values", values.cpu())
        self._append("patch_index", indices[owners.cpu()])

    def _append(self, name: str, tensor: Tensor) -> None:
        self._parts.setdefault(name, []).append(tensor)

    @property
    def n_images(self) -> int:
        return sum(k.shape[0] for k in self._parts.get("image_keys", []))

    def state(self) -> dict[str, Tensor]:
        return {name: torch.cat(parts) for name, parts in self._parts.items()}

    def load_states(self, states: list[dict[str, Tensor]]) -> None:
        """Merge the states of several processes into dataset order, each image once.

        A sampler that pads the processes' shares repeats a few images; only the first process's
        entries of an image are kept.
        """
        self._parts = {}
        seen = torch.zeros(0, dtype=torch.long)
        kept: list[dict[str, Tensor]] = []
        for state in (state for state in states if state):
            fresh_images = ~torch.isin(state["image_index"], seen)
            fresh_patches = ~torch.isin(state["patch_index"], seen)
            seen = torch.cat([seen, state["image_index"]])
            kept.append(
                {
                    name: tensor[fresh_images if name.startswith("image") else fresh_patches]
                    for name, tensor in state.items()
                }
            )
        if not kept:
            return
        merged = {name: torch.cat([state[name] for state in kept]) for name in kept[0]}
        for level in ("image", "patch"):
            # Stable: the prototypes of one image keep their order (anomalous before normal).
            order = torch.sort(merged[f"{level}_index"], stable=True).indices
            for name in (f"{level}_keys", f"{level}_values", f"{level}_index"):
                self._parts[name] = [merged[name][order]]

    def _subsample(
        self, keys: Tensor, values: Tensor, limit: int | None, offset: int
    ) -> tuple[Tensor, Tensor]:
        if limit is None or keys.shape[0] <= limit:
            return keys, values
        generator = torch.Generator().manual_seed(self.seed + offset)
        chosen = torch.randperm(keys.shape[0], generator=generator)[:limit].sort().values
        return keys[chosen], values[chosen]

    def build(self, metadata: dict[str, Any] | None = None) -> LabeledMemoryBank:
        if not self._parts.get("image_keys"):
            raise ValueError("no auxiliary images were added: the memory would be empty")
        state = self.state()
        image_keys, image_values = self._subsample(
            state["image_keys"], state["image_values"], self.max_image_entries, 0
        )
        patch_keys, patch_values = self._subsample(
            state["patch_keys"], state["patch_values"], self.max_patch_entries, 1
        )
        return LabeledMemoryBank(image_keys, image_values, patch_keys, patch_values, dict(metadata or {}))

    def reset(self) -> None:
        self._parts = {}


@dataclass
class LabeledMemorySettings(MemorySettings):
    """Hydra ``memory=labeled``: how the MRAD bank is built and where it is cached.

    Args:
        path / cache_dir / rebuild: see :class:`~anomret.memory.base.MemorySettings`.
        layer: encoder block whose patch grid forms the patch level (``None``: the last one extracted).
            Queries are read from the same block.
        max_image_entries / max_patch_entries: random subsampling of each level (memory-size ablation).
        seed: seed of that subsampling.
    """

    kind: ClassVar[str] = "labeled"
    layer: int | None = None
    max_image_entries: int | None = None
    max_patch_entries: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        integer_at_least(self.max_image_entries, "memory.max_image_entries", 1, none="keep everything")
        integer_at_least(self.max_patch_entries, "memory.max_patch_entries", 1, none="keep everything")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"memory.seed must be a non-negative integer, got {self.seed!r}")

    def resolve_layer(self, encoder_layers: tuple[int, ...]) -> int:
        layer = max(encoder_layers) if self.layer is None else self.layer
        if layer not in encoder_layers:
            raise ValueError(
                f"memory.layer={layer} is not extracted by the encoder (its layers: {list(encoder_layers)}). "
                "Fix: set memory.layer to one of them, or null for the last."
            )
        return layer

    def build_settings(self, encoder: Encoder) -> dict[str, Any]:
        return {
            "layer": self.resolve_layer(encoder.layers),
            "max_image_entries": self.max_image_entries,
            "max_patch_entries": self.max_patch_entries,
            "seed": self.seed,
        }

    def builder(self, encoder: Encoder) -> LabeledBankBuilder:
        return LabeledBankBuilder(
            self.resolve_layer(encoder.layers), self.max_image_entries, self.max_patch_entries, self.seed
        )

    def bank_class(self) -> type[LabeledMemoryBank]:
        return LabeledMemoryBank
