"""Where retrieval reads RAD's patch rows from (``memory.placement``): device memory, or streamed from the host.

The bank file is the same whatever the placement (as ``memory.mmap``, the read mode is not part of a bank's
identity), and every placement gives the same scores bit for bit: retrieval sees the same stored values,
only their location differs.

- ``device``: every scored layer's rows are copied once into the run device's memory (a GPU's, or RAM
  on a CPU run) and read in place: on a GPU the windowed kernel reads them straight through the
  neighbour index, with no host work and no host synchronisation per batch. Uploads go through two
  pinned staging buffers, so the host holds ~128 MiB of the bank at a time whatever its size.
- ``stream``: the rows stay on the host (in RAM with ``memory.mmap=false``, else memory-mapped). Per batch,
  the neighbours of all its images are gathered once (a row shared by several images is read once) into
  a compact tensor, with the neighbour indices remapped to it. On a GPU a background thread gathers each
  layer into pinned buffers and copies it on a side stream while the kernel scores the previous layer;
  the first layer's transfer waits for the batch's own encoder output (the neighbours come from its CLS).
  ``memory.stream_budget`` bounds one layer's compact rows: a batch whose neighbours need more is scored in
  groups of images, so memory stays bounded whatever the bank size (at least one image's K rows).
- ``auto`` (default): ``device`` on a GPU when the scored layers fit ``memory.device_budget`` (default: the
  device's free memory less a reserve for the encoder and activations, max(4 GiB, 20 % of the card)),
  else ``stream``; on a CPU run ``device`` when the rows are already in RAM (``memory.mmap=false``), else
  ``stream``.

Retrieval stays pure: it gets plain tensors (and remapped indices) from :meth:`PlacedRows.groups`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomret.memory.rows import PatchRows, StoredArray
from anomret.sizes import device_memory, format_size, parse_size

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "stream")
DEFAULT_STREAM_BUDGET = 512 * 2**20
_UPLOAD_PIECE = 64 * 2**20  # bytes per pinned staging buffer of a device upload
_GATHER_THREADS = 4  # host threads copying the rows of one layer (numpy and torch release the GIL)
_GATHER_MIN_ROWS = 16  # fewer rows are copied by one thread


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _row_bytes(rows: PatchRows) -> int:
    return math.prod(rows.shape[1:]) * _element_size(rows.dtype)


@dataclass
class RowGroup:
    """Consecutive images of a batch (``queries``) with the rows their neighbours read: ``banks`` by layer
    and ``neighbors`` ``[n, K]`` indexing those rows."""

    queries: slice
    banks: Mapping[int, Tensor]
    neighbors: Tensor


class PlacedRows:
    """The scored layers' rows as retrieval reads them on ``device`` (see the module docstring)."""

    mode = ""

    def __init__(self, patches: Mapping[int, PatchRows], layers: Sequence[int], device: torch.device) -> None:
        self.patches = {layer: patches[layer] for layer in layers}
        self.layers = tuple(layers)
        self.device = torch.device(device)
        self.n_rows = len(next(iter(self.patches.values())))

    def serves(self, device: torch.device | str, layers: Sequence[int]) -> bool:
        return _same_device(self.device, torch.device(device)) and set(layers) <= set(self.layers)

    def nbytes(self) -> int:
        return sum(len(rows) * _row_bytes(rows) for rows in self.patches.values())

    def groups(self, neighbors: Tensor, layers: Sequence[int]) -> Iterator[RowGroup]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index_a = torch.cuda.current_device() if a.index is None else a.index
    index_b = torch.cuda.current_device() if b.index is None else b.index
    return index_a == index_b


# ------------------------------------------------------------------------------------------- device
class DeviceRows(PlacedRows):
    """Every scored layer's stored rows in the device's memory, read in place."""

    mode = "device"

    def __init__(self, patches: Mapping[int, PatchRows], layers: Sequence[int], device: torch.device) -> None:
        super().__init__(patches, layers, device)
        self.tensors = {layer: upload(rows.values, self.device) for layer, rows in self.patches.items()}

    def groups(self, neighbors: Tensor, layers: Sequence[int]) -> Iterator[RowGroup]:
        yield RowGroup(slice(None), {layer: self.tensors[layer] for layer in layers}, neighbors)

    def describe(self) -> str:
        return f"device: {len(self.layers)} layer(s), {format_size(self.nbytes())} on {self.device}"


def upload(values: StoredArray, device: torch.device) -> Tensor:
    """A stored array as one tensor on ``device`` (a RAM tensor already there is used as it is), copied
    in pieces: to a GPU through two pinned buffers, so reading the next piece overlaps the copy."""
    if isinstance(values, Tensor) and _same_device(values.device, device):
        return values
    shape = tuple(int(n) for n in values.shape)
    dtype = values.dtype if isinstance(values, Tensor) else torch.from_numpy(np.empty(0, values.dtype)).dtype
    out = torch.empty(shape, dtype=dtype, device=device)
    row_bytes = max(1, math.prod(shape[1:]) * _element_size(dtype))
    step = max(1, _UPLOAD_PIECE // row_bytes)
    if device.type != "cuda":
        for start in range(0, shape[0], step):
            _copy_into(out[start : start + step], values[start : start + step])
        return out
    staging = [torch.empty((step, *shape[1:]), dtype=dtype, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    for number, start in enumerate(range(0, shape[0], step)):
        slot, stop = number % 2, min(start + step, shape[0])
        previous = copied[slot]
        if previous is not None:
            previous.synchronize()  # its previous piece has left the buffer
        _copy_into(staging[slot][: stop - start], values[start:stop])
        out[start:stop].copy_(staging[slot][: stop - start], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        copied[slot] = event
    torch.cuda.current_stream(device).synchronize()
    return out


def _copy_into(target: Tensor, piece: Any) -> None:
    """Copy a slice of stored rows (tensor, memory map or scratch rows) into a host tensor."""
    if isinstance(piece, Tensor):
        target.copy_(piece)
    else:
        np.copyto(target.numpy(), np.asarray(piece), casting="no")


# ------------------------------------------------------------------------------------------- stream
class StreamedRows(PlacedRows):
    """Rows left on the host, each batch's neighbours gathered once and moved (see the module docstring).

    Args:
        budget: bytes of one layer's compact rows (a group of images needs at least one image's K rows).
        prefetch: gather and copy every layer of a group in a background thread, ahead of its use (default
            on a GPU: the transfers then overlap the kernels). Without it each layer is gathered when read.
    """

    mode = "stream"

    def __init__(
        self,
        patches: Mapping[int, PatchRows],
        layers: Sequence[int],
        device: torch.device,
        budget: int = DEFAULT_STREAM_BUDGET,
        prefetch: bool | None = None,
    ) -> None:
        super().__init__(patches, layers, device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = self.cuda if prefetch is None else prefetch
        self.budget = budget
        self.row_bytes = max(_row_bytes(rows) for rows in self.patches.values())
        self.max_rows = max(1, budget // self.row_bytes)
        # Where a layer's compact rows land: one buffer per layer on a GPU or when prefetching (all of a
        # group's layers are in flight together), else one shared buffer (layers are read one at a time).
        self._buffers: dict[int | None, Tensor] = {}
        self._pinned: list[Tensor | None] = [None, None]
        self._pinned_free: list[torch.cuda.Event | None] = [None, None]
        self._next_slot = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda and self.prefetch else None
        self._worker = concurrent.futures.ThreadPoolExecutor(1) if self.prefetch else None
        self._gather_pool = concurrent.futures.ThreadPoolExecutor(_GATHER_THREADS)

    def describe(self) -> str:
        source = "memory map" if any(rows.memory_mapped for rows in self.patches.values()) else "RAM"
        prefetch = ", prefetched on a side stream" if self.prefetch and self.cuda else ""
        return (
            f"stream: {len(self.layers)} layer(s) read from the {source}, each batch's neighbours gathered "
            f"once, up to {format_size(self.budget)} per layer{prefetch} to {self.device}"
        )

    def close(self) -> None:
        for pool in (self._worker, self._gather_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    def __del__(self) -> None:
        for pool in (getattr(self, "_worker", None), getattr(self, "_gather_pool", None)):
            if pool is not None:
                pool.shutdown(wait=False)

    # ---------------------------------------------------------------------------------- grouping
    def query_groups(self, index: Tensor) -> list[slice]:
        """Consecutive images whose neighbours' union fits ``max_rows`` (one image per group at least)."""
        groups: list[slice] = []
        start, union = 0, set[int]()
        for query in range(index.shape[0]):
            merged = union | set(index[query].tolist())
            if query > start and len(merged) > self.max_rows:
                groups.append(slice(start, query))
                start, merged = query, set(index[query].tolist())
            union = merged
        groups.append(slice(start, index.shape[0]))
        return groups

    def groups(self, neighbors: Tensor, layers: Sequence[int]) -> Iterator[RowGroup]:
        missing = [layer for layer in layers if layer not in self.patches]
        if missing:
            raise KeyError(f"layers {missing} were not placed (placed: {list(self.layers)})")
        index = neighbors.to("cpu", torch.int64)  # the host gathers the rows: one synchronisation per batch
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_rows):
            raise ValueError(
                f"neighbor indices must lie in [0, {self.n_rows}) for a memory of {self.n_rows} images, got "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        for queries in self.query_groups(index):
            unique, inverse = torch.unique(index[queries], sorted=True, return_inverse=True)
            staged = _StagedLayers(self, unique, tuple(layers))
            try:
                yield RowGroup(queries, staged, inverse.to(self.device))
            finally:
                staged.finish()

    # ---------------------------------------------------------------------------------- staging
    def _buffer(self, key: int | None, n_rows: int, rows: PatchRows) -> Tensor:
        """``[n_rows, h, w, C]`` of a reusable buffer on the device (grown when a group needs more)."""
        shape = tuple(rows.shape[1:])
        need = n_rows * math.prod(shape) * _element_size(rows.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < need:
            capacity = max(need, min(self.budget, self.max_rows * self.row_bytes))
            buffer = torch.empty(capacity, dtype=torch.uint8, device=self.device)
            self._buffers[key] = buffer
        return buffer[:need].view(rows.dtype).view(n_rows, *shape)

    def _pinned_slot(self, need: int) -> tuple[int, Tensor]:
        slot = self._next_slot
        self._next_slot = 1 - slot
        free = self._pinned_free[slot]
        if free is not None:
            free.synchronize()  # its last copy to the device has finished
        buffer = self._pinned[slot]
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(max(need, self.budget), dtype=torch.uint8, pin_memory=True)
            self._pinned[slot] = buffer
        return slot, buffer

    def _stage(self, layer: int, unique: Tensor, target: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        """Gather ``unique`` rows of ``layer`` into ``target`` (on the device); returns it and, on a GPU,
        the event its copy records (on the side stream when prefetching)."""
        rows = self.patches[layer]
        rows.rows_read += int(unique.numel())
        if not self.cuda:
            gather(rows.values, unique, target, self._gather_pool)
            return target, None
        slot, pinned = self._pinned_slot(target.numel() * target.element_size())
        host = pinned[: target.numel() * target.element_size()].view(target.dtype).view(target.shape)
        gather(rows.values, unique, host, self._gather_pool)
        stream = self._copy_stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            target.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        self._pinned_free[slot] = copied
        return target, copied


class _StagedLayers(Mapping[int, Tensor]):
    """One group's compact rows by layer; reading a layer waits for its transfer (on the device)."""

    def __init__(self, owner: StreamedRows, unique: Tensor, layers: tuple[int, ...]) -> None:
        self.owner, self.unique, self.layers = owner, unique, layers
        per_layer = owner.cuda or owner.prefetch
        # Buffers are taken here, on the caller's thread and stream.
        self.targets = {
            layer: owner._buffer(layer if per_layer else None, len(unique), owner.patches[layer])
            for layer in layers
        }
        self.pending: dict[int, concurrent.futures.Future] = {}
        if owner.prefetch and owner._worker is not None:
            if owner._copy_stream is not None:
                # The side stream refills the buffers only after the kernels queued so far have read them.
                owner._copy_stream.wait_stream(torch.cuda.current_stream(owner.device))
            for layer in layers:
                self.pending[layer] = owner._worker.submit(owner._stage, layer, unique, self.targets[layer])

    def __getitem__(self, layer: int) -> Tensor:
        if layer not in self.targets:
            raise KeyError(layer)
        if layer in self.pending:
            tensor, copied = self.pending.pop(layer).result()
        else:
            tensor, copied = self.owner._stage(layer, self.unique, self.targets[layer])
        if copied is not None:
            torch.cuda.current_stream(self.owner.device).wait_event(copied)
        return tensor

    def __contains__(self, layer: object) -> bool:
        return layer in self.targets  # Mapping's default would read the layer

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def finish(self) -> None:
        """Wait for transfers nobody read, so the next group never refills a buffer still being filled."""
        for future in self.pending.values():
            future.result()
        self.pending.clear()


def gather(
    source: StoredArray, index: Tensor, out: Tensor, pool: concurrent.futures.Executor | None = None
) -> None:
    """``out[:] = source[index]`` on the host, in pieces on ``pool``'s threads for large gathers."""
    pieces = [(0, len(index))]
    if pool is not None and len(index) >= 2 * _GATHER_MIN_ROWS:
        bounds = np.linspace(0, len(index), min(_GATHER_THREADS, len(index) // _GATHER_MIN_ROWS) + 1)
        pieces = list(itertools.pairwise(int(b) for b in bounds))

    def copy(start: int, stop: int) -> None:
        rows, target = index[start:stop], out[start:stop]
        if isinstance(source, Tensor):
            torch.index_select(source, 0, rows.to(source.device), out=target)
        elif isinstance(source, np.ndarray):
            # mode='clip' (indices are checked already): 'raise' would buffer the whole output first
            np.take(source, rows.numpy(), axis=0, out=target.numpy(), mode="clip")
        else:  # a memory pass's scratch files
            target.copy_(torch.from_numpy(np.ascontiguousarray(source[rows.numpy()])))

    if pool is None or len(pieces) == 1:
        copy(*pieces[0])
        return
    for future in [pool.submit(copy, start, stop) for start, stop in pieces]:
        future.result()


# ------------------------------------------------------------------------------------------ policy
@dataclass(frozen=True)
class RowPlacement:
    """``memory.placement`` and its budgets (see the module docstring).

    Args:
        mode: ``auto``, ``device`` or ``stream``.
        device_budget: bytes of device memory the rows may take (``None``: free memory less a reserve).
        stream_budget: bytes of one layer's compact rows per group of a streamed batch.
        prefetch: streamed rows gathered and copied ahead of use (``None``: on a GPU).
    """

    mode: str = "auto"
    device_budget: int | None = None
    stream_budget: int = DEFAULT_STREAM_BUDGET
    prefetch: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENTS:
            raise ValueError(f"memory.placement must be one of {PLACEMENTS}, got {self.mode!r}")
        if self.stream_budget < 1:
            raise ValueError(f"memory.stream_budget must be positive, got {self.stream_budget}")

    @classmethod
    def of(cls, settings: Any) -> RowPlacement:
        """From a ``memory=`` config's ``placement``, ``device_budget`` and ``stream_budget``."""
        stream = parse_size(getattr(settings, "stream_budget", None), "memory.stream_budget")
        return cls(
            mode=str(getattr(settings, "placement", "auto")),
            device_budget=parse_size(getattr(settings, "device_budget", None), "memory.device_budget"),
            stream_budget=DEFAULT_STREAM_BUDGET if stream is None else stream,
        )

    def device_limit(self, device: torch.device) -> int | None:
        """Bytes the rows may take on ``device`` (``None``: no limit, a CPU run)."""
        if self.device_budget is not None:
            return self.device_budget
        if device.type != "cuda":
            return None
        free, total = device_memory(device)
        return max(0, free - max(4 * 2**30, total // 5))

    def choose(self, patches: Mapping[int, PatchRows], layers: Sequence[int], device: torch.device) -> str:
        if self.mode != "auto":
            return self.mode
        if device.type != "cuda":
            # On a CPU run, rows already in RAM are read in place; memory-mapped ones stay on disk.
            in_ram = all(isinstance(patches[layer].values, Tensor) for layer in layers)
            fits = self.device_budget is None or _layers_bytes(patches, layers) <= self.device_budget
            return "device" if in_ram and fits else "stream"
        limit = self.device_limit(device)
        return "device" if limit is None or _layers_bytes(patches, layers) <= limit else "stream"

    def place(
        self, patches: Mapping[int, PatchRows], layers: Sequence[int], device: torch.device | str
    ) -> PlacedRows:
        device = torch.device(device)
        mode = self.choose(patches, layers, device)
        if mode == "device":
            needed, limit = _layers_bytes(patches, layers), self.device_limit(device)
            if limit is not None and needed > limit:
                raise ValueError(
                    f"memory.placement=device: the scored layers' rows take {format_size(needed)} but "
                    f"{format_size(limit)} of {device} may hold them (memory.device_budget"
                    f"{'' if self.device_budget is not None else ': free memory less a reserve'}). Fix: "
                    "memory.placement=auto or stream (rows streamed from the host), or a larger "
                    "memory.device_budget."
                )
            placed: PlacedRows = DeviceRows(patches, layers, device)
        else:
            placed = StreamedRows(patches, layers, device, self.stream_budget, self.prefetch)
        log.info("memory rows: %s", placed.describe())
        return placed


def _layers_bytes(patches: Mapping[int, PatchRows], layers: Sequence[int]) -> int:
    return sum(len(patches[layer]) * _row_bytes(patches[layer]) for layer in layers)
