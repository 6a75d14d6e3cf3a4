"""A memory pass's large rows, written to disk as they arrive, so that building a bank holds one batch.

Each process appends every batch's rows, already in their stored dtype, to one raw file per tensor in a
scratch directory beside the bank (:class:`RowSpill`). Once the pass ends, :class:`MergedRows` shows
several processes' files as one array in dataset order (each image once), which the bank's streamed save
reads slice by slice with plain file reads (mapped pages would count as the process's resident memory). Only small things travel between processes: indices,
global keys and a :class:`SpillInfo` naming each process's directory, which must therefore lie on storage
every process sees (the bank's own directory, which rank 0 writes and every process then reads).

A killed build leaves only its hidden scratch directory, named like the temporary files of
:mod:`anomret.files` and removed like them by the next build or save in that directory.
"""

from __future__ import annotations

import ctypes
import functools
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


@functools.cache
def _malloc_trim() -> Any:
    # The process's own symbols include the C library's (find_library would run ldconfig to find it).
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc; a no-op elsewhere).

    A memory pass frees each batch's feature buffers (tens of MiB, below glibc's dynamic mmap threshold)
    but glibc keeps the freed pages in its heap, so without this the resident memory of a long pass grows
    towards the bank's size although nothing holds the rows.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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

    def file(self, name: str) -> Path:
        """The file of ``name``'s rows (raises a clear error when this process cannot see it)."""
        directory = Path(self.directory)
        if not directory.is_dir():
            raise BankError(
                f"the rows another process of this run wrote to {directory} (on host {self.host}) cannot be "
                "read here. The processes of a run write their rows beside the bank, so its directory must be "
                "on storage every process shares. Fix: set memory.cache_dir (or memory.path) to a shared "
                "directory."
            )
        return directory / f"{name}.bin"


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
        data = array.data.cast("B")
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

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, part: int, rows: np.ndarray, out: np.ndarray) -> None:
        """Read rows ``rows`` of one part into ``out`` by plain file reads, one per run of consecutive rows.

        Not memory-mapped: mapped pages would count as this process's resident memory, and a save reads
        every row once."""
        row_bytes = out[0].nbytes if len(out) else 0
        in_order = bool((np.diff(rows) > 0).all())
        order = None if in_order else np.argsort(rows, kind="stable")
        ordered = rows if order is None else rows[order]
        buffer = out if order is None else np.empty_like(out)
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # where a run of consecutive rows starts
        ends = np.append(starts[1:], len(ordered))
        path = self.parts[part].file(self.name)
        with open(path, "rb", buffering=0) as handle:
            for first, last in zip(starts.tolist(), ends.tolist(), strict=True):
                handle.seek(int(ordered[first]) * row_bytes)
                target = buffer[first:last].data.cast("B")
                while target:  # a raw read may return fewer bytes than asked
                    count = handle.readinto(target)
                    if not count:
                        raise BankError(f"{path} holds fewer rows than its process wrote")
                    target = target[count:]
        if order is not None:
            out[order] = buffer

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        positions = (
            np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key).reshape(-1)
        )
        parts, rows = self.part[positions], self.row[positions]
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        for part in np.unique(parts).tolist():
            chosen = parts == part
            if chosen.all():
                self._read(part, rows, out)
            else:
                block = np.empty((int(chosen.sum()), *self.shape[1:]), dtype=self.dtype)
                self._read(part, rows[chosen], block)
                out[chosen] = block
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
