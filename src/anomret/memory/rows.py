"""Stored patch rows of RAD's normal memory: the storage dtypes, int8 quantisation and row access.

A layer's patch grids ``[N, h, w, C]`` are stored fp16 (default), fp32 or int8 (symmetric, one scale per
patch vector). :class:`PatchRows` hands them out by row, whatever backs them: a tensor (a bank loaded
eagerly), a read-only memory map (a loaded bank) or the scratch files of a memory pass
(:class:`~anomret.memory.spill.MergedRows`). Cosine similarity ignores a vector's length, so int8 rows
(one positive scale per vector) score exactly as their dequantised values.

Stored vectors are L2-normalised, which makes garbage cheap to recognise: a vector that is not finite, or
whose length is not 1 within its storage's rounding, cannot come from a build. :meth:`PatchRows.check_sample`
checks a spread sample of vectors when a bank is opened (garbage files are refused before any scoring),
and every row is checked the first time it is read (a damaged region the sample missed is named instead
of turning scores into NaN). Neither catches rows that are unit vectors but wrong (e.g. another image's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from anomret.memory.spill import MergedRows
from anomret.memory.store import BankError

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


# How far a stored unit vector's length may be from 1: float rounding of its dtype (int8's bound is exact,
# per vector, from its scale: see unit_vectors).
_LENGTH_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}
# Vectors checked per layer when a bank is opened: this many rows, spread over the bank (first and last
# included), a few positions each.
SAMPLED_ROWS = 64
SAMPLED_POSITIONS = 4


def unit_vectors(values: Tensor, scales: Tensor | None = None) -> Tensor:
    """Which stored vectors (last axis) are finite with length 1 up to their storage's rounding.

    int8 vectors ``q · s`` are off by at most ``s / 2`` per component, so their length is within
    ``√C · s / 2`` of 1; their scales must be finite and positive.
    """
    if scales is None:
        vectors = values.float()
        tolerance: Tensor | float = _LENGTH_TOLERANCE.get(values.dtype, 1e-3)
        valid = torch.ones(values.shape[:-1], dtype=torch.bool, device=values.device)
    else:
        scales = scales.float()
        vectors = values.float() * scales.unsqueeze(-1)
        tolerance = values.shape[-1] ** 0.5 * scales / 2 + 1e-3
        valid = torch.isfinite(scales) & (scales > 0)
    length = torch.linalg.vector_norm(vectors, dim=-1)
    return valid & torch.isfinite(length) & ((length - 1).abs() <= tolerance)


def encode_rows(vectors: Tensor, dtype: str) -> tuple[Tensor, Tensor | None]:
    """Float vectors → stored values (and int8 scales)."""
    if dtype == "int8":
        return quantize_int8(vectors.float())
    return vectors.to(STORAGE_DTYPES[dtype]), None


class PatchRows:
    """One layer's stored patch grids ``[N, h, w, C]``, handed out by row as float32.

    Backed by a tensor (a bank loaded eagerly), a read-only memory map (a loaded bank) or the scratch
    files of a memory pass (a bank just built, :class:`~anomret.memory.spill.MergedRows`): ``rows[index]``
    reads only the rows in ``index``. ``rows_read`` counts them. Each row is checked the first time it is
    read (see the module docstring); ``source`` names the rows in the error.
    """

    def __init__(
        self, values: StoredArray, scales: StoredArray | None = None, source: str = "the memory"
    ) -> None:
        self.values = values
        self.scales = scales
        self.source = source
        self.rows_read = 0
        self._checked: Tensor | None = None  # per row: already read and found sound

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
        values = self._take(self.values, index)
        scales = None if self.scales is None else self._take(self.scales, index)
        self.check_first_read(index, values, scales)
        rows = values.float()
        if scales is not None:
            rows = rows * scales.float().unsqueeze(-1)
        return rows

    def check_first_read(self, index: Tensor, values: Tensor, scales: Tensor | None = None) -> None:
        """Check the rows of ``index`` (their ``values``, read already) not checked before; ``scales``
        (int8) are read here when not given."""
        if self._checked is None:
            self._checked = torch.zeros(len(self), dtype=torch.bool)
        fresh = (~self._checked[index]).nonzero().reshape(-1)
        if fresh.numel() == 0:
            return
        if self.scales is not None:
            fresh_scales = scales[fresh] if scales is not None else self._take(self.scales, index[fresh])
        else:
            fresh_scales = None
        sound = unit_vectors(values[fresh], fresh_scales).flatten(1).all(dim=1)
        if not sound.all():
            row = int(index[fresh[~sound][0]])
            raise BankError(
                f"{self.source}: the stored vectors of row {row} are not unit vectors (NaN, infinite or of "
                "another length): the file is damaged. Fix: delete it so that it is built again "
                "(memory.rebuild=true)."
            )
        self._checked[index[fresh]] = True

    def check_sample(self) -> None:
        """Check a spread sample of stored vectors (see the module docstring) without reading whole rows."""
        n, h, w = self.shape[:3]
        if n == 0 or isinstance(self.values, MergedRows):
            return  # rows of a memory pass: just computed, not read from a file
        rows = np.unique(np.linspace(0, n - 1, min(n, SAMPLED_ROWS)).round().astype(np.int64))
        spread = np.arange(SAMPLED_POSITIONS, dtype=np.int64) * (h * w // SAMPLED_POSITIONS)
        rows = np.repeat(rows, SAMPLED_POSITIONS)
        cells = (np.tile(spread, len(rows) // SAMPLED_POSITIONS) + rows * 7919) % (h * w)
        ys, xs = cells // w, cells % w

        def pick(array: StoredArray) -> Tensor:
            if isinstance(array, Tensor):
                return array[torch.from_numpy(rows), torch.from_numpy(ys), torch.from_numpy(xs)]
            return torch.from_numpy(np.ascontiguousarray(array[rows, ys, xs]))  # only these vectors' pages

        values = pick(self.values)
        scales = None if self.scales is None else pick(self.scales)
        sound = unit_vectors(values, scales)
        if not sound.all():
            bad = int(rows[int((~sound).nonzero()[0])])
            raise BankError(
                f"{self.source}: {int((~sound).sum())} of {len(sound)} sampled stored vectors are not unit "
                f"vectors (NaN, infinite or of another length; e.g. in row {bad}): the file is damaged or not "
                "a bank's rows. Fix: delete it so that it is built again (memory.rebuild=true)."
            )

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
        values = self.rows._take(self.rows.values, index)
        self.rows.check_first_read(index, values)
        return values


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
