"""A memory pass's large rows, written to disk as they arrive, so that building a bank holds one batch.

Each process appends every batch's rows, already in their stored dtype, to one raw file per tensor in a
scratch directory beside the bank (:class:`RowSpill`). Once the pass ends the files are memory-mapped, and
:class:`MergedRows` shows several processes' files as one array in dataset order (each image once), which
the bank's streamed save reads slice by slice. Only small things travel between processes: indices,
global keys and a :class:`SpillInfo` naming each process's directory, which must therefore lie on storage
every process sees (the bank's own directory, which rank 0 writes and every process then reads).

A killed build leaves only its hidden scratch directory, named like the temporary files of
:mod:`anomret.files` and removed like them by the next build or save in that directory.
"""

from __future__ import annotations

import shutil
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from torch import Tensor

from anomret.files import remove_stale_temporaries, scratch_directory
from anomret.memory.store import BankError


@dataclass(frozen=True)
class SpillInfo:
    """Where one process's rows are and what each file holds (small, so it is gathered across processes)."""

    directory: str
    host: str
    # tensor name -> (numpy dtype name, full shape with the rows first)
    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values()))[1][0] if self.tensors else 0

    def open(self, name: str) -> np.ndarray:
        """The rows of ``name``, memory-mapped read-only."""
        directory = Path(self.directory)
        if not directory.is_dir():
            raise BankError(
                f"the rows another process of this run wrote to {directory} (on host {self.host}) cannot be "
                "read here. The processes of a run write their rows beside the bank, so its directory must be "
                "on storage every process shares. Fix: set memory.cache_dir (or memory.path) to a shared "
                "directory."
            )
        dtype, shape = self.tensors[name]
        if shape[0] == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(directory / f"{name}.bin", dtype=dtype, mode="r", shape=shape)


class RowSpill:
    """One process's rows, appended batch by batch to ``<name>.bin`` files of a scratch directory.

    The directory is removed by :meth:`remove`, or when the object is garbage-collected (an error midway).
    """

    def __init__(self, beside: Path) -> None:
        remove_stale_temporaries(beside.parent)  # a killed build's rows may be tens of GB: free them first
        self.directory = scratch_directory(beside)
        self._remover = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self._handles: dict[str, IO[bytes]] = {}
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}  # dtype, row shape, rows
        self._info: SpillInfo | None = None

    def append(self, name: str, rows: Tensor) -> None:
        if self._info is not None:
            raise RuntimeError("rows were added after the memory pass ended")
        array = np.ascontiguousarray(rows.detach().cpu().numpy())
        dtype, row_shape, count = self._layout.get(name, (array.dtype, array.shape[1:], 0))
        if array.dtype != dtype or array.shape[1:] != row_shape:
            raise ValueError(
                f"{name}: a batch of {array.dtype} rows of shape {array.shape[1:]} does not match the earlier "
                f"batches' {dtype} rows of shape {row_shape}"
            )
        if name not in self._handles:
            # Unbuffered: each batch goes to the file (the page cache) at once, with no copy held here.
            self._handles[name] = open(self.directory / f"{name}.bin", "ab", buffering=0)  # noqa: SIM115
        data = memoryview(array).cast("B")
        while data:  # a raw write may take fewer bytes than offered
            data = data[self._handles[name].write(data) :]
        self._layout[name] = (dtype, row_shape, count + array.shape[0])

    def finish(self) -> SpillInfo:
        """Close the files (every byte on disk) and describe them; later calls return the same description."""
        if self._info is None:
            for handle in self._handles.values():
                handle.close()
            self._handles = {}
            tensors = {
                name: (dtype.name, (count, *row_shape))
                for name, (dtype, row_shape, count) in self._layout.items()
            }
            self._info = SpillInfo(str(self.directory), socket.gethostname(), tensors)
        return self._info

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        self._remover()


class MergedRows:
    """Several processes' rows of one tensor as one read-only array: row ``i`` is row ``row[i]`` of
    part ``part[i]``. Indexing with a slice or an index array reads only those rows from disk.

    The rows hold this process's :class:`RowSpill` (``owner``), so a bank built and used in one process
    stays readable until it is dropped or its builder is closed."""

    def __init__(
        self,
        name: str,
        parts: list[SpillInfo],
        part: np.ndarray,
        row: np.ndarray,
        owner: RowSpill | None = None,
    ) -> None:
        layouts = {(info.tensors[name][0], info.tensors[name][1][1:]) for info in parts if info.rows}
        if len(layouts) != 1:
            raise BankError(f"the processes of this run wrote {name} rows of different dtypes or shapes")
        dtype, row_shape = layouts.pop()
        self.name, self.parts, self.part, self.row = name, parts, part, row
        self.owner = owner  # this process's spill: its files live at least as long as these rows
        self.dtype = np.dtype(dtype)
        self.shape = (int(part.shape[0]), *row_shape)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, part: int) -> np.ndarray:
        if part not in self._maps:  # opened on first read: processes that never read open nothing
            self._maps[part] = self.parts[part].open(self.name)
        return self._maps[part]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        positions = (
            np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key).reshape(-1)
        )
        parts, rows = self.part[positions], self.row[positions]
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        for part in np.unique(parts).tolist():
            chosen = parts == part
            out[chosen] = self._map(part)[rows[chosen]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
