"""RAD's multi-layer memory of normal images, pooled over every category of the memory source.

Per memory image (the RAD paper, Sec. 3.1):

- ``cls``: the encoder's final global feature, L2-normalised, float32 ``[N, D]`` (global retrieval);
- ``patches.<layer>``: the L2-normalised patch grid of every configured layer ``[N, h, w, C]``, stored
  fp16 (default), fp32 or int8 (symmetric, one scale per patch vector in ``scales.<layer>`` ``[N, h, w]``);
- ``category``: the row's category, an index into the metadata's ``categories``; the metadata's
  ``images`` list says which image each row comes from (the rows of :func:`~anomret.memory.store.sample_rows`).

The file is an ordinary anomret bank (:mod:`anomret.memory.store`: safetensors, fingerprints, atomic
writes). Loaded with ``mmap`` (the default), only ``cls`` and ``category`` are read; the patch grids
stay on disk and retrieval reads the rows of the K retrieved images only, so the bank need fit in
neither RAM nor GPU memory.

Opening a bank checks that it is what it claims: as many rows as image records, each row's category
that of its record, each image once, unit-length global keys, and a spread sample of the patch vectors
(:meth:`~anomret.memory.rows.PatchRows.check_sample`; each patch row is checked whole when it is first read).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from anomret.memory.placement import PlacedRows, RowPlacement
from anomret.memory.rows import STORAGE_DTYPES, ArrayDescription, PatchRows, row_pieces, unit_vectors
from anomret.memory.store import (
    BankError,
    StreamedTensor,
    TensorSpec,
    load_bank,
    open_bank_memmap,
    save_bank_streaming,
    validate_tensors,
)

log = logging.getLogger(__name__)

# Stored rows: in memory, memory-mapped from a bank file, or read from a memory pass's scratch files.


def _tensor_spec(layers: list[int], dtype: str) -> dict[str, TensorSpec]:
    spec = {
        "cls": TensorSpec(("n_images", "cls_dim")),
        "category": TensorSpec(("n_images",), (torch.int64,)),
    }
    for layer in layers:
        spec[f"patches.{layer}"] = TensorSpec(
            ("n_images", "h", "w", f"dim_{layer}"), (STORAGE_DTYPES[dtype],)
        )
        if dtype == "int8":
            spec[f"scales.{layer}"] = TensorSpec(("n_images", "h", "w"))
    return spec


@dataclass
class NormalMemoryBank:
    """Global keys, per-layer patch grids and row categories of RAD's memory (see the module docstring)."""

    kind: ClassVar[str] = "normal"

    cls: Tensor  # [N, D] float32, L2-normalised
    category: Tensor  # [N] int64 index into metadata["categories"]
    patches: dict[int, PatchRows]
    metadata: dict[str, Any] = field(default_factory=dict)
    # Where retrieval reads the patch rows (memory.placement), and the rows placed by the last ``to``.
    placement: RowPlacement = field(default_factory=RowPlacement)
    placed: PlacedRows | None = None

    def __post_init__(self) -> None:
        n = self.cls.shape[0]
        if n == 0:
            raise ValueError("the normal memory is empty: the memory source gave no images")
        if not self.patches:
            raise ValueError("the normal memory holds no patch layers")
        for layer, rows in self.patches.items():
            if len(rows) != n:
                raise ValueError(f"layer {layer} holds {len(rows)} rows but the memory has {n} images")

    @property
    def n_images(self) -> int:
        return int(self.cls.shape[0])

    @property
    def layers(self) -> list[int]:
        return sorted(self.patches)

    @property
    def categories(self) -> list[str]:
        return list(self.metadata.get("categories", []))

    @property
    def storage_dtype(self) -> str:
        return str(self.metadata.get("build", {}).get("dtype", "fp32"))

    @property
    def grid(self) -> tuple[int, int]:
        shape = self.patches[self.layers[0]].shape
        return shape[1], shape[2]

    def images_per_category(self) -> dict[str, int]:
        counts = torch.bincount(self.category.cpu(), minlength=len(self.categories)).tolist()
        return dict(zip(self.categories, counts, strict=False))

    def summary(self) -> str:
        mapped = " memory-mapped" if any(r.memory_mapped for r in self.patches.values()) else ""
        h, w = self.grid
        return (
            f"{self.n_images} normal images of {len(self.categories)} categories, layers {self.layers}, "
            f"{h}×{w} grids, {self.storage_dtype}{mapped}"
        )

    def check_compatible(self, dims: Mapping[str, int]) -> None:
        stored = {"cls": self.cls.shape[1]}
        stored.update({f"patch.{layer}": rows.shape[-1] for layer, rows in self.patches.items()})
        for name, size in dims.items():
            if name in stored and stored[name] != size:
                raise BankError(
                    f"the memory bank's {name} features are {stored[name]}-d but this run's encoder gives "
                    f"{size}-d ones: the bank was built for another encoder. Fix: leave memory.path unset "
                    "(banks are cached per encoder), or point it at a bank built by this encoder."
                )

    def to(self, device: torch.device | str, layers: Sequence[int] | None = None) -> NormalMemoryBank:
        """The bank for retrieval on ``device``: the global keys move, and the patch rows of ``layers``
        (default: all) are placed as ``placement`` says (:mod:`~anomret.memory.placement`)."""
        layers = self.layers if layers is None else sorted(layers)
        placed = self.placed
        if placed is None or not placed.serves(device, layers):
            placed = self.placement.place(self.patches, layers, device)
        return replace(self, cls=self.cls.to(device), category=self.category.to(device), placed=placed)

    def save(self, path: str | Path) -> Path:
        """Write the bank, slice by slice (no second copy of the rows in memory)."""
        small = {"cls": self.cls.cpu().float(), "category": self.category.cpu().long()}
        tensors = {
            name: StreamedTensor(tensor.dtype, tuple(tensor.shape), functools.partial(list, [tensor]))
            for name, tensor in small.items()
        }
        for layer, rows in self.patches.items():
            tensors[f"patches.{layer}"] = StreamedTensor(
                rows.dtype, rows.shape, functools.partial(row_pieces, rows.values)
            )
            if rows.scales is not None:
                tensors[f"scales.{layer}"] = StreamedTensor(
                    torch.float32, rows.shape[:3], functools.partial(row_pieces, rows.scales)
                )
        return save_bank_streaming(path, tensors, {"kind": self.kind, **self.metadata})

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> NormalMemoryBank:
        """Open a bank file; with ``mmap`` the patch grids stay on disk and are read row by row.

        Refuses (naming the file) a bank whose tensors, records or sampled rows are not sound: see the
        module docstring.
        """
        tensors: Mapping[str, Any]
        if mmap:
            tensors, metadata = open_bank_memmap(path)  # rows and metadata of one file
        else:
            tensors, metadata = load_bank(path)
        if metadata.get("kind") != cls.kind:
            raise BankError(
                f"{path} holds a '{metadata.get('kind')}' bank, not a RAD normal-image bank: it was built for "
                "another method. Fix: point memory.path at a bank built with memory=normal."
            )
        build = metadata.get("build", {})
        layers, dtype = list(build.get("layers", [])), build.get("dtype")
        if not layers or dtype not in STORAGE_DTYPES:
            raise BankError(
                f"memory bank {path} does not record its layers and dtype. Delete it to rebuild it."
            )
        validate_tensors(
            path, {name: ArrayDescription.of(t) for name, t in tensors.items()}, _tensor_spec(layers, dtype)
        )
        small = {name: torch.as_tensor(np.array(tensors[name])) for name in ("cls", "category")}
        cls_keys, category = small["cls"].float(), small["category"].long()
        if not unit_vectors(cls_keys).all():
            raise BankError(
                f"memory bank {path}: tensor 'cls' holds NaN, infinite or non-unit global keys: the file is "
                "damaged. Fix: delete it so that it is built again (memory.rebuild=true)."
            )
        check_records(path, category, metadata)
        patches = {
            layer: PatchRows(
                tensors[f"patches.{layer}"],
                tensors.get(f"scales.{layer}"),
                f"memory bank {path}, layer {layer}",
            )
            for layer in layers
        }
        for rows in patches.values():
            rows.check_sample()
        metadata = {k: v for k, v in metadata.items() if k not in ("kind", "format_version")}
        return cls(cls_keys, category, patches, metadata)


def check_records(path: str | Path, category: Tensor, metadata: Mapping[str, Any]) -> None:
    """Refuse a bank whose rows and metadata disagree: row count against image records, each row's
    category against its record's, an image recorded twice. Banks without records are checked for
    their category indices only."""
    fix = "Fix: delete it so that it is built again (memory.rebuild=true)."
    categories = metadata.get("categories")
    n = int(category.numel())
    if not isinstance(categories, list) or (n and not categories):
        raise BankError(f"memory bank {path} does not list the categories of its rows. {fix}")
    if n and (int(category.min()) < 0 or int(category.max()) >= len(categories)):
        raise BankError(
            f"memory bank {path}: its 'category' tensor holds indices outside its {len(categories)} "
            f"categories. {fix}"
        )
    images = metadata.get("images")
    if images is None:
        return
    if not isinstance(images, list) or len(images) != n:
        count = len(images) if isinstance(images, list) else "no list of"
        raise BankError(
            f"memory bank {path} holds {n} rows but its metadata records {count} images: rows and records "
            f"disagree (two writers were not excluded, or the file is damaged). {fix}"
        )
    try:
        names = [categories[i] for i in category.tolist()]
        wrong = [i for i, (record, name) in enumerate(zip(images, names, strict=True)) if record[1] != name]
        paths = [record[0] for record in images]
    except (TypeError, IndexError, KeyError) as error:
        raise BankError(f"memory bank {path}: its image records are malformed ({error}). {fix}") from error
    if wrong:
        first = wrong[0]
        raise BankError(
            f"memory bank {path}: {len(wrong)} rows disagree with their records (e.g. row {first} is a "
            f"'{names[first]}' row but its record is {paths[first]} of '{images[first][1]}'). {fix}"
        )
    if len(set(paths)) != n:
        twice = next(image for image, count in Counter(paths).items() if count > 1)
        raise BankError(f"memory bank {path} holds image {twice} more than once. {fix}")


def write_concatenated(
    path: str | Path, first: NormalMemoryBank, second: NormalMemoryBank, metadata: dict[str, Any]
) -> Path:
    """Write the rows of ``first`` then ``second`` (same layers and dtype) as one bank, streaming.

    ``first`` is typically the memory-mapped bank at ``path`` itself: its rows are copied slice by slice
    into a temporary file that then replaces it, so extending a bank never loads it whole.
    """
    if first.layers != second.layers or first.storage_dtype != second.storage_dtype:
        raise BankError(
            f"cannot append a bank of layers {second.layers} ({second.storage_dtype}) to one of layers "
            f"{first.layers} ({first.storage_dtype})"
        )
    names = [first.categories[i] for i in first.category.tolist()]
    names += [second.categories[i] for i in second.category.tolist()]
    categories = list(dict.fromkeys(names))
    lookup = {name: i for i, name in enumerate(categories)}
    n = len(names)
    cls = torch.cat([first.cls.cpu(), second.cls.cpu()])
    category = torch.tensor([lookup[name] for name in names], dtype=torch.long)
    tensors = {
        "cls": StreamedTensor(torch.float32, tuple(cls.shape), lambda: [cls]),
        "category": StreamedTensor(torch.int64, (n,), lambda: [category]),
    }

    def pieces(layer: int, scales: bool) -> Callable[[], Iterator[Tensor]]:
        def generate() -> Iterator[Tensor]:
            for bank in (first, second):
                rows = bank.patches[layer]
                yield from row_pieces(rows.scales if scales else rows.values)

        return generate

    for layer in first.layers:
        rows = first.patches[layer]
        tensors[f"patches.{layer}"] = StreamedTensor(rows.dtype, (n, *rows.shape[1:]), pieces(layer, False))
        if rows.scales is not None:
            tensors[f"scales.{layer}"] = StreamedTensor(
                torch.float32, (n, *rows.shape[1:3]), pieces(layer, True)
            )
    return save_bank_streaming(
        path, tensors, {"kind": NormalMemoryBank.kind, **metadata, "categories": categories}
    )
