"""Stored patch rows of RAD's normal memory: the storage dtypes, int8 quantisation and row access.

A layer's patch grids ``[N, h, w, C]`` are stored fp16 (default), fp32 or int8 (symmetric, one scale per
patch vector). :class:`PatchRows` hands them out by row, whatever backs them: a tensor (a bank loaded
eagerly), a read-only memory map (a loaded bank) or the scratch files of a memory pass
(:class:`~anomret.memory.spill.MergedRows`). Cosine similarity ignores a vector's length, so int8 rows
(one positive scale per vector) score exactly as their dequantised values.

Stored vectors are L2-normalised, which makes garbage cheap to recognise: a vector that is not finite, or
whose length is not 1 within its storage's rounding, cannot come from a build. :meth:`PatchRows.check_sample`
checks a spread sample of vectors when a bank is opened (garbage files are refused before any scoring),
and each row, the first time it is read, has every value checked finite (from its bits) and a spread of
its vectors checked for length (a damaged region the sample missed is named instead of turning scores
into NaN). Neither catches finite values that are wrong but keep the sampled lengths at 1 (e.g. another
image's rows, or a damaged vector between the sampled ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from anomret.features.store import finite_rows
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
_LENGTH_TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float16): 1e-2}
# Vectors checked per layer when a bank is opened: this many rows, spread over the bank (first and last
# included), a few positions each.
SAMPLED_ROWS = 64
SAMPLED_POSITIONS = 4
# Vectors whose length is checked when a row is first read (every value of the row is checked finite).
FIRST_READ_POSITIONS = 16
# Float bit patterns: with the sign bit cleared, a value is NaN or infinite iff it is at least this.
_NOT_FINITE = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
}


def _numpy(array: Tensor | np.ndarray) -> np.ndarray:
    # The checks run in numpy: on small arrays torch's thread pool costs more than the arithmetic.
    return array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)


def unit_vectors(values: Tensor | np.ndarray, scales: Tensor | np.ndarray | None = None) -> np.ndarray:
    """Which stored vectors (last axis) are finite with length 1 up to their storage's rounding.

    int8 vectors ``q · s`` are off by at most ``s / 2`` per component, so their length is within
    ``√C · s / 2`` of 1; their scales must be finite and positive.
    """
    values = _numpy(values)
    vectors = values.astype(np.float32)
    with np.errstate(all="ignore"):  # garbage overflows: its length is then infinite, and refused
        length = np.sqrt(np.einsum("...c,...c->...", vectors, vectors))
        if scales is None:
            tolerance: np.ndarray | float = _LENGTH_TOLERANCE.get(values.dtype, 1e-3)
            valid = np.ones(length.shape, dtype=bool)
        else:
            scales = _numpy(scales).astype(np.float32)
            length = length * scales  # ‖q · s‖ = ‖q‖ · s for s > 0
            tolerance = values.shape[-1] ** 0.5 * scales / 2 + 1e-3
            valid = np.isfinite(scales) & (scales > 0)
        # A NaN or infinite component makes the length NaN or infinite.
        return valid & np.isfinite(length) & (np.abs(length - 1) <= tolerance)


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
        """Check the rows of ``index`` (their ``values``, read already) not checked before: every value
        finite, and the length of :data:`FIRST_READ_POSITIONS` vectors spread over the row; ``scales``
        (int8) are read here when not given."""
        if self._checked is None:
            self._checked = torch.zeros(len(self), dtype=torch.bool)
        fresh = (~self._checked[index]).nonzero().reshape(-1)
        if fresh.numel() == 0:
            return
        every = fresh.numel() == index.numel()  # no copy of the rows when all of them are new
        fresh_values = values if every else values[fresh]
        fresh_scales = None
        if self.scales is not None and scales is not None:
            fresh_scales = scales if every else scales[fresh]
        elif self.scales is not None:
            fresh_scales = self._take(self.scales, index[fresh])
        h, w = fresh_values.shape[1:3]
        cells = np.linspace(0, h * w - 1, min(h * w, FIRST_READ_POSITIONS)).round().astype(np.int64)
        ys, xs = torch.from_numpy(cells // w), torch.from_numpy(cells % w)
        sampled = unit_vectors(
            fresh_values[:, ys, xs], None if fresh_scales is None else fresh_scales[:, ys, xs]
        ).all(axis=1)
        sound = finite_rows(fresh_values) & sampled
        if fresh_scales is not None:
            sound &= finite_rows(fresh_scales) & (_numpy(fresh_scales) > 0).reshape(len(sound), -1).all(
                axis=1
            )
        if not sound.all():
            row = int(index[fresh[int(np.flatnonzero(~sound)[0])]])
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

        def pick(array: Tensor | np.ndarray) -> np.ndarray:
            if isinstance(array, Tensor):
                return _numpy(array[torch.from_numpy(rows), torch.from_numpy(ys), torch.from_numpy(xs)])
            return np.ascontiguousarray(array[rows, ys, xs])  # only these vectors' pages are read

        values, scales = self.values, self.scales
        assert not isinstance(values, MergedRows) and not isinstance(scales, MergedRows)  # returned above
        sound = unit_vectors(pick(values), None if scales is None else pick(scales))
        if not sound.all():
            bad = int(rows[int(np.flatnonzero(~sound)[0])])
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
