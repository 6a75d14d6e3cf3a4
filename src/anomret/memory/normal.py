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
neither RAM nor GPU memory. Cosine similarity ignores a vector's length, so int8 rows (one positive
scale per vector) score exactly as their dequantised values. Building is bounded too: the memory pass
writes each batch's rows to scratch files beside the bank as they arrive (:class:`NormalBankBuilder`),
and the file is written from them piece by piece.

A bank built from some categories can be extended with the normal images of new ones
(:meth:`NormalMemorySettings.append_missing`): only the new images are encoded, and the result has
the same rows and fingerprint as a bank built from all of them at once (the paper's incremental onboarding).
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.checks import integer_at_least
from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder, Features
from anomret.memory.base import MemorySettings
from anomret.memory.spill import MergedRows, RowSpill, SpillInfo, release_freed_memory
from anomret.memory.store import (
    BankError,
    StreamedTensor,
    TensorSpec,
    check_bank,
    fingerprint_of_rows,
    load_bank,
    open_memmap,
    read_bank_metadata,
    sample_rows,
    save_bank_streaming,
    validate_tensors,
)

log = logging.getLogger(__name__)

# Stored rows: in memory, memory-mapped from a bank file, or read from a memory pass's scratch files.
StoredArray = Tensor | np.ndarray | MergedRows

STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8}
_INT8_MAX = 127.0


def quantize_int8(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per vector (last axis): ``vectors ≈ q * scale``."""
    scale = vectors.abs().amax(dim=-1).clamp_min(1e-12) / _INT8_MAX
    quantized = torch.round(vectors / scale.unsqueeze(-1)).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return quantized, scale.float()


def encode_rows(vectors: Tensor, dtype: str) -> tuple[Tensor, Tensor | None]:
    """Float vectors → stored values (and int8 scales)."""
    if dtype == "int8":
        return quantize_int8(vectors.float())
    return vectors.to(STORAGE_DTYPES[dtype]), None


class PatchRows:
    """One layer's stored patch grids ``[N, h, w, C]``, handed out by row as float32.

    Backed by a tensor (a bank loaded eagerly), a read-only memory map (a loaded bank) or the scratch
    files of a memory pass (a bank just built, :class:`~anomret.memory.spill.MergedRows`): ``rows[index]``
    reads only the rows in ``index``. ``rows_read`` counts them.
    """

    def __init__(self, values: StoredArray, scales: StoredArray | None = None) -> None:
        self.values = values
        self.scales = scales
        self.rows_read = 0

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> torch.dtype:
        if isinstance(self.values, Tensor):
            return self.values.dtype
        return torch.from_numpy(np.empty(0, dtype=self.values.dtype)).dtype

    @property
    def memory_mapped(self) -> bool:
        return not isinstance(self.values, Tensor)

    def _take(self, array: StoredArray, index: Tensor) -> Tensor:
        if isinstance(array, Tensor):
            return array[index.to(array.device)]
        return torch.from_numpy(np.ascontiguousarray(array[index.numpy()]))

    def __getitem__(self, index: Tensor) -> Tensor:
        index = torch.as_tensor(index, dtype=torch.int64).cpu().reshape(-1)
        self.rows_read += int(index.numel())
        rows = self._take(self.values, index).float()
        if self.scales is not None:
            rows = rows * self._take(self.scales, index).float().unsqueeze(-1)
        return rows

    def stored(self) -> StoredRows:
        """The same rows as stored (fp16, fp32 or int8, no scales) for cosine similarity, which ignores
        each vector's positive scale: no float32 copy is made before the similarity kernel's own."""
        return StoredRows(self)

    def all(self) -> tuple[Tensor, Tensor | None]:
        """Every stored value (and scale) as CPU tensors (saving; small banks only)."""

        def whole(array: StoredArray | None) -> Tensor | None:
            if array is None or isinstance(array, Tensor):
                return array
            return torch.from_numpy(np.array(array))

        values = whole(self.values)
        assert values is not None
        return values, whole(self.scales)


@dataclass(frozen=True)
class _Described:
    """Shape and torch dtype of a tensor or memory map, for validation without reading the data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, array: Tensor | np.ndarray) -> Tensor | _Described:
        if isinstance(array, Tensor):
            return array
        return cls(tuple(array.shape), torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype)


class StoredRows:
    """Row access to a :class:`PatchRows`' stored values (see :meth:`PatchRows.stored`)."""

    def __init__(self, rows: PatchRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Tensor) -> Tensor:
        index = torch.as_tensor(index, dtype=torch.int64).cpu().reshape(-1)
        self.rows.rows_read += int(index.numel())
        return self.rows._take(self.rows.values, index)


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

    def to(self, device: torch.device | str) -> NormalMemoryBank:
        # Only the small global keys move; patch rows are read per query and cast on the query's device.
        return NormalMemoryBank(self.cls.to(device), self.category.to(device), self.patches, self.metadata)

    def save(self, path: str | Path) -> Path:
        """Write the bank, slice by slice (no second copy of the rows in memory)."""
        small = {"cls": self.cls.cpu().float(), "category": self.category.cpu().long()}
        tensors = {
            name: StreamedTensor(tensor.dtype, tuple(tensor.shape), lambda tensor=tensor: [tensor])
            for name, tensor in small.items()
        }
        for layer, rows in self.patches.items():
            tensors[f"patches.{layer}"] = StreamedTensor(
                rows.dtype, rows.shape, lambda rows=rows: _row_pieces(rows.values)
            )
            if rows.scales is not None:
                tensors[f"scales.{layer}"] = StreamedTensor(
                    torch.float32, rows.shape[:3], lambda rows=rows: _row_pieces(rows.scales)
                )
        return save_bank_streaming(path, tensors, {"kind": self.kind, **self.metadata})

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> NormalMemoryBank:
        """Open a bank file; with ``mmap`` the patch grids stay on disk and are read row by row."""
        metadata = read_bank_metadata(path)
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
        tensors: Mapping[str, Any]
        if mmap:
            tensors = open_memmap(path)
        else:
            tensors, _ = load_bank(path)
        validate_tensors(
            path, {name: _Described.of(t) for name, t in tensors.items()}, _tensor_spec(layers, dtype)
        )
        small = {name: torch.as_tensor(np.array(tensors[name])) for name in ("cls", "category")}
        if not torch.isfinite(small["cls"]).all():
            raise BankError(f"memory bank {path}: tensor 'cls' contains NaN or infinite values. Delete it.")
        patches = {
            layer: PatchRows(tensors[f"patches.{layer}"], tensors.get(f"scales.{layer}")) for layer in layers
        }
        metadata = {k: v for k, v in metadata.items() if k not in ("kind", "format_version")}
        return cls(small["cls"].float(), small["category"].long(), patches, metadata)


@dataclass
class NormalBankBuilder:
    """Builds a :class:`NormalMemoryBank` from the memory pass, rows in dataset order, in bounded memory.

    Each batch's patch rows are converted to the storage dtype and appended to this process's scratch
    files beside the bank (:mod:`anomret.memory.spill`) as they arrive; only the global keys and dataset
    indices stay in memory. The state gathered under DDP is those small tensors plus where the files are;
    the merged bank reads every process's files, each image once. The bank :meth:`build` returns reads
    its rows from those files: save it, then :meth:`close` the builder (every process, once the bank file
    is whole) to remove them; otherwise they go when both the builder and the bank are dropped.
    """

    layers: tuple[int, ...]
    dtype: str = "fp16"
    # The bank file (or a name in its directory) the scratch files go beside; None: the system temp dir.
    beside: Path | None = None
    _index: list[Tensor] = field(default_factory=list, repr=False)
    _cls: list[Tensor] = field(default_factory=list, repr=False)
    _spill: RowSpill | None = field(default=None, repr=False)
    _merged: _MergedState | None = field(default=None, repr=False)

    def add(self, features: Features, batch: Mapping[str, Any]) -> None:
        missing = [layer for layer in self.layers if layer not in features.patches]
        if missing:
            raise ValueError(
                f"the encoder did not return layers {missing} (it returned {list(features.patches)})"
            )
        if self._spill is None:
            beside = self.beside or Path(tempfile.gettempdir()) / "anomret" / "normal-bank"
            self._spill = RowSpill(Path(beside))
        self._index.append(torch.as_tensor(batch["index"]).reshape(-1).cpu().long())
        self._cls.append(F.normalize(features.cls.detach().float(), dim=-1).cpu())
        for layer in self.layers:
            grid = F.normalize(features.patches[layer].detach().float(), dim=-1)
            values, scales = encode_rows(grid, self.dtype)
            self._spill.append(f"patches.{layer}", values)
            if scales is not None:
                self._spill.append(f"scales.{layer}", scales)
            del grid, values, scales
        release_freed_memory()  # this batch's buffers are freed: keep the pass at one batch in RAM

    def state(self) -> dict[str, Any]:
        """Indices and global keys of this process's rows, and where its patch rows are on disk."""
        if self._spill is None:
            return {}
        for parts in (self._index, self._cls):
            parts[:] = [torch.cat(parts)] if len(parts) > 1 else parts
        return {"index": self._index[0], "cls": self._cls[0], "rows": self._spill.finish()}

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Merge several processes' states in dataset order; an image a padded sampler repeats is kept
        once (the first process's copy)."""
        states = [state for state in states if state]
        self._merged = None
        if not states:
            return
        seen = torch.zeros(0, dtype=torch.long)
        fresh = []
        for state in states:
            # Within one state an index appears once (a process sees an image at most once).
            fresh.append(~torch.isin(state["index"], seen))
            seen = torch.cat([seen, state["index"]])
        index = torch.cat([state["index"][keep] for state, keep in zip(states, fresh, strict=True)])
        order = torch.sort(index).indices
        cls = torch.cat([state["cls"][keep] for state, keep in zip(states, fresh, strict=True)])
        part = torch.cat([torch.full((int(keep.sum()),), p) for p, keep in enumerate(fresh)])
        row = torch.cat([torch.arange(keep.numel())[keep] for keep in fresh])
        self._merged = _MergedState(
            index[order],
            cls[order],
            part[order].numpy(),
            row[order].numpy(),
            [s["rows"] for s in states],
            self._spill,
        )

    def build(self, metadata: dict[str, Any] | None = None) -> NormalMemoryBank:
        """The bank; ``metadata["images"]`` (one row per dataset index) names each row's image."""
        if self._merged is None:
            self.load_states([self.state()])  # one process, without a gather
        merged = self._merged
        if merged is None:
            raise ValueError("no memory images were added: the memory would be empty")
        metadata = dict(metadata or {})
        images = metadata.get("images")
        index = merged.index
        if images is not None:
            if index.numel() != len(images) or not torch.equal(index, torch.arange(len(images))):
                raise ValueError(
                    f"the memory pass saw {index.numel()} images but the memory source lists {len(images)}"
                )
            names = [row[1] for row in images]
        else:
            names = ["unknown"] * index.numel()
        categories = list(dict.fromkeys(names))
        lookup = {name: i for i, name in enumerate(categories)}
        category = torch.tensor([lookup[name] for name in names], dtype=torch.long)
        metadata["categories"] = categories
        patches = {
            layer: PatchRows(
                merged.rows(f"patches.{layer}"),
                merged.rows(f"scales.{layer}") if self.dtype == "int8" else None,
            )
            for layer in self.layers
        }
        return NormalMemoryBank(merged.cls, category, patches, metadata)

    def close(self) -> None:
        """Remove this process's scratch files (the bank :meth:`build` returned can no longer be read)."""
        if self._spill is not None:
            self._spill.remove()
        self._spill, self._merged, self._index, self._cls = None, None, [], []


@dataclass(frozen=True)
class _MergedState:
    """The merged pass: per output row its dataset index, global key, and which process's row it is."""

    index: Tensor
    cls: Tensor
    part: np.ndarray
    row: np.ndarray
    parts: list[SpillInfo]
    owner: RowSpill | None  # this process's files, kept while the built bank reads them

    def rows(self, name: str) -> MergedRows:
        return MergedRows(name, self.parts, self.part, self.row, self.owner)


_PIECE_BYTES = 4 * 2**20  # a streamed save holds about this much of a tensor at a time


def _row_pieces(array: StoredArray | None) -> Iterator[Tensor]:
    """A stored array's rows in slices of at most ~4 MiB, read from disk slice by slice when on disk."""
    if array is None:
        return
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(_numpy_dtype(array)).itemsize
    chunk = max(1, _PIECE_BYTES // max(1, row_bytes))
    for start in range(0, int(array.shape[0]), chunk):
        piece = array[start : start + chunk]
        if isinstance(piece, Tensor):
            yield piece
        else:  # a memory map's slice is copied into memory; a slice read from scratch files already is
            yield torch.from_numpy(piece if type(piece) is np.ndarray else np.array(piece))


def _numpy_dtype(array: StoredArray) -> np.dtype:
    if isinstance(array, Tensor):
        return torch.empty(0, dtype=array.dtype).numpy().dtype
    return np.dtype(array.dtype)


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
                yield from _row_pieces(rows.scales if scales else rows.values)

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


def select_images(
    samples: SampleTable,
    *,
    shots: int | None = None,
    fraction: float | None = None,
    categories: list[str] | None = None,
    seed: int = 0,
) -> SampleTable:
    """The memory images of a few-shot or data-scaling run, in the source's order.

    Per category (only those in ``categories`` when given; the others are kept whole), a seeded random
    draw keeps ``shots`` images, or ``max(1, round(fraction × n))``. The draw depends on the seed and
    the category only, and a larger budget keeps a superset of a smaller one.
    """
    if shots is None and fraction is None:
        return samples
    chosen: set[int] = set()
    groups: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.category, []).append(position)
    unknown = sorted(set(categories or []) - set(groups))
    if unknown:
        raise ValueError(
            f"memory.subset_categories names {unknown}, which the memory source does not hold "
            f"(it has {sorted(groups)})"
        )
    for category, positions in groups.items():
        if categories is not None and category not in categories:
            chosen.update(positions)
            continue
        n = shots if shots is not None else max(1, round(float(fraction) * len(positions)))  # type: ignore[arg-type]
        ordered = sorted(positions, key=lambda p: str(samples[p].image_path))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(category.encode()))
        permutation = torch.randperm(len(ordered), generator=generator).tolist()
        chosen.update(ordered[i] for i in permutation[: min(n, len(ordered))])
    return SampleTable([samples[p] for p in sorted(chosen)])


@dataclass
class NormalMemorySettings(MemorySettings):
    """Hydra ``memory=normal``: RAD's memory of normal images (see the module docstring).

    Args:
        path / cache_dir / rebuild: see :class:`~anomret.memory.base.MemorySettings`.
        source: ``train``: the evaluation dataset's own train split (RAD); ``aux``: the aux_dataset.
        layers: encoder blocks whose patch grids are stored (``None``: every block the encoder extracts).
        dtype: storage of the patch grids, ``fp16`` (default), ``fp32`` or ``int8``.
        mmap: read the patch grids from disk per query (default) instead of loading the whole bank.
        shots: few-shot memory, this many images per category (``None``: all).
        fraction: data scaling, this share τ of each category's images (``None``: all).
        subset_categories: the categories ``shots`` / ``fraction`` apply to (``None``: all); the others are
            kept whole (incremental-class scaling: ``[transistor]``).
        seed: seed of the draw of ``shots`` / ``fraction``.
        append: when the bank at ``path`` holds a subset of this run's images (same encoder and
            settings), encode only the missing ones and append them instead of refusing the file.
    """

    kind: ClassVar[str] = "normal"
    source: str = "train"
    layers: list[int] | None = None
    dtype: str = "fp16"
    mmap: bool = True
    shots: int | None = None
    fraction: float | None = None
    subset_categories: list[str] | None = None
    seed: int = 0
    append: bool = False
    supports_append: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.source not in ("train", "aux"):
            raise ValueError(f"memory.source must be 'train' or 'aux', got {self.source!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"memory.dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        integer_at_least(self.shots, "memory.shots", 1, none="every train image")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
                raise ValueError(f"memory.fraction must be a number in (0, 1] or null, got {self.fraction!r}")
            if not 0 < self.fraction <= 1:
                raise ValueError(f"memory.fraction must be in (0, 1] (the share τ kept), got {self.fraction}")
        if self.shots is not None and self.fraction is not None:
            raise ValueError("set memory.shots or memory.fraction, not both")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"memory.seed must be a non-negative integer, got {self.seed!r}")
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
        if self.subset_categories is not None:
            self.subset_categories = [str(c) for c in self.subset_categories]

    def resolve_layers(self, encoder_layers: tuple[int, ...]) -> list[int]:
        if self.layers is None:
            return sorted(encoder_layers)
        missing = [layer for layer in self.layers if layer not in encoder_layers]
        if missing or not self.layers:
            raise ValueError(
                f"memory.layers={self.layers} must be a non-empty subset of the encoder's layers "
                f"{list(encoder_layers)}. Fix: set encoder.layers, or memory.layers=null for all of them."
            )
        return sorted(set(self.layers))

    def build_settings(self, encoder: Encoder) -> dict[str, Any]:
        return {
            "layers": self.resolve_layers(encoder.layers),
            "dtype": self.dtype,
            "shots": self.shots,
            "fraction": self.fraction,
            "subset_categories": self.subset_categories,
            "seed": self.seed if (self.shots or self.fraction) else None,
        }

    def select(self, samples: SampleTable) -> SampleTable:
        return select_images(
            samples,
            shots=self.shots,
            fraction=self.fraction,
            categories=self.subset_categories,
            seed=self.seed,
        )

    def describe_source(self, samples: SampleTable) -> dict[str, Any]:
        return {"images": sample_rows(samples)}

    # The built bank reads its rows from the builders' scratch files: the pipeline saves it, then every
    # process opens the saved file and closes its builder.
    streams_build: ClassVar[bool] = True

    def builder(self, encoder: Encoder) -> NormalBankBuilder:
        # Scratch files go beside the bank (same storage, visible to every process of a DDP run).
        beside = Path(self.path) if self.path else Path(self.cache_dir) / "normal-bank"
        return NormalBankBuilder(tuple(self.resolve_layers(encoder.layers)), self.dtype, beside)

    def bank_class(self) -> type[NormalMemoryBank]:
        return NormalMemoryBank

    def open(self, path: str | Path) -> NormalMemoryBank:
        return NormalMemoryBank.load(path, mmap=self.mmap)

    def append_missing(
        self,
        path: Path,
        metadata: dict[str, Any],
        samples: SampleTable,
        encode: Callable[[SampleTable], NormalMemoryBank],
        *,
        write: bool = True,
    ) -> SampleTable:
        """Extend the bank at ``path`` with the images of ``samples`` it lacks; returns the images added.

        ``metadata`` is what this run would build (kind, source, encoder, build settings); ``encode`` runs
        the memory pass over some samples (every process of a DDP run calls this; only the one with
        ``write`` rewrites the file). The extended bank keeps the old rows, then the new ones, and records
        the data fingerprint of all its images, so it equals a bank built from them in that order.
        Raises :class:`BankError` for a bank of another encoder, kind or settings, or whose images changed.
        """
        stored = read_bank_metadata(path)
        if stored.get("kind") != self.kind:
            raise BankError(
                f"cannot append to {path}: it is a '{stored.get('kind')}' bank, not a normal-image bank"
            )
        check_bank(path, metadata["encoder"], stored.get("build", {}))  # raises for another encoder
        ours = {k: v for k, v in metadata["build"].items() if k != "data"}
        theirs = {k: v for k, v in stored.get("build", {}).items() if k != "data"}
        if ours != theirs:
            changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise BankError(
                f"cannot append to {path}: it was built with other {', '.join(changed)}. Fix: use the settings it "
                "was built with, or build a new bank (another memory.path)."
            )
        old_rows = stored.get("images") or []
        by_path = {row[0]: row for row in old_rows}
        rows = sample_rows(samples)
        changed_images = [row[0] for row in rows if row[0] in by_path and by_path[row[0]] != row]
        if changed_images:
            raise BankError(
                f"cannot append to {path}: {len(changed_images)} of its images changed on disk since it was built "
                f"(e.g. {changed_images[0]}). Fix: memory.rebuild=true to build it again."
            )
        missing = SampleTable([s for s, row in zip(samples, rows, strict=True) if row[0] not in by_path])
        if not missing:
            return missing
        log.info("appending %d image(s) of %s to memory bank %s", len(missing), missing.categories, path)
        part = encode(missing)
        if write:
            all_rows = old_rows + sample_rows(missing)
            build = {**metadata["build"], "data": fingerprint_of_rows(all_rows)}
            old = NormalMemoryBank.load(path, mmap=True)
            write_concatenated(path, old, part, {**metadata, "build": build, "images": all_rows})
        return missing
