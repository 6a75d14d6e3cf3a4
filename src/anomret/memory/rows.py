"""Stored patch rows of RAD's normal memory: the storage dtypes, int8 quantisation and row access.

A layer's patch grids ``[N, h, w, C]`` are stored fp16 (default), fp32 or int8 (symmetric, one scale per
patch vector). :class:`PatchRows` hands them out by row, whatever backs them: a tensor (a bank loaded
eagerly), a read-only memory map (a loaded bank) or the scratch files of a memory pass
(:class:`~anomret.memory.spill.MergedRows`). Cosine similarity ignores a vector's length, so int8 rows
(one positive scale per vector) score exactly as their dequantised values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from anomret.memory.spill import MergedRows

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
class ArrayDescription:
    """Shape and torch dtype of a tensor or memory map, for validation without reading the data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, array: Tensor | np.ndarray) -> Tensor | ArrayDescription:
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


_PIECE_BYTES = 4 * 2**20  # a streamed save holds about this much of a tensor at a time


def row_pieces(array: StoredArray | None) -> Iterator[Tensor]:
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
