"""Encoder outputs kept in memory for the life of the process: device memory first, then host RAM.

The feature store (:mod:`anomret.features.store`) persists features on disk; this tier keeps them where
the model reads them, so a later epoch of MRAD-FT/CLIP, the next job of a sweep (Hydra's basic launcher
runs jobs one after another in one process) or a second evaluation skips the encoder *and* the disk. It
is on by default and never changes a number:

- with the store off (RAD's default, bit-exact with the official code) it holds the exact float32
  features the encoder gave; with the store on, exactly what the store gives (its dtype, read back as
  float32);
- entries are keyed like the store's: a namespace of the encoder fingerprint (weights, layers,
  precision, ...), the preprocessing and the storage, then the image's identity (resolved path, size,
  modification time); features computed on another kind of device are not served (they would differ in
  the last bits), the image is encoded again instead.

Budgets (``features.memory.host`` / ``features.memory.device``, bytes or ``auto``): ``auto`` is a quarter of
the RAM available when a run starts (plus what the tier already holds) and a tenth of the device's
memory. An entry goes to the device while its budget allows, else to the host; when full, the least
recently used entries make room. DataLoader workers are other processes: the dataset asks the tier
which images it holds (:meth:`FeatureMemory.holds`, a snapshot of the keys when the workers start) and
leaves those undecoded; the main process serves their features (:class:`~anomret.features.FeatureExtractor`),
and encodes an image itself should the tier have dropped it in between.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anomret.encoders.base import Encoder
from anomret.features.store import FeatureStore, image_key
from anomret.fingerprint import digest
from anomret.sizes import device_memory, format_size, host_available, parse_size

log = logging.getLogger(__name__)

_AUTO_HOST_SHARE = 0.25  # leaves the page cache room for memory-mapped banks
_AUTO_DEVICE_SHARE = 0.1


@dataclass
class _Entry:
    tensors: dict[str, Tensor]
    nbytes: int
    device_type: str  # where the features were computed
    on_device: bool  # held in device memory (else host RAM)


class FeatureMemory:
    """The process's in-memory feature tier (see the module docstring); :func:`feature_memory` is the one
    instance a run uses."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._snapshot: frozenset[tuple[str, str]] = frozenset()  # keys as pickled into a worker
        self.host_budget = 0
        self.device_budget: int | None = 0  # None: auto, settled on the first device entry
        self.host_bytes = 0
        self.device_bytes = 0
        self.hits = 0

    # ------------------------------------------------------------------------------------ settings
    def configure(self, host: object = "auto", device: object = "auto") -> None:
        """Set the budgets (``features.memory.host`` / ``.device``); entries over a smaller budget go."""
        host_bytes = parse_size(host, "features.memory.host")
        device_bytes = parse_size(device, "features.memory.device")
        if host_bytes is None:
            host_bytes = int(_AUTO_HOST_SHARE * (host_available() + self.host_bytes))
        self.host_budget = host_bytes
        self.device_budget = device_bytes
        self._shrink(on_device=False, need=0)
        if device_bytes is not None:
            self._shrink(on_device=True, need=0)

    @property
    def enabled(self) -> bool:
        return self.host_budget > 0 or self.device_budget is None or self.device_budget > 0

    def describe(self) -> str:
        device = "auto" if self.device_budget is None else format_size(self.device_budget)
        return (
            f"{len(self._entries)} image(s) in memory ({format_size(self.device_bytes)} on the device, "
            f"{format_size(self.host_bytes)} in RAM; budgets {device} / {format_size(self.host_budget)})"
        )

    def clear(self) -> None:
        self._entries.clear()
        self._snapshot = frozenset()
        self.host_bytes = self.device_bytes = self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------------------------- entries
    def holds(self, namespace: str, key: str) -> bool:
        return (namespace, key) in self._entries or (namespace, key) in self._snapshot

    def get(self, namespace: str, key: str, device: torch.device) -> dict[str, Tensor] | None:
        """The entry's tensors (on the device or in RAM), or ``None`` when absent or computed on another
        kind of device."""
        entry = self._entries.get((namespace, key))
        if entry is None or entry.device_type != device.type:
            return None
        self._entries.move_to_end((namespace, key))
        self.hits += 1
        return entry.tensors

    def put(self, namespace: str, key: str, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> bool:
        """Keep a copy of one image's ``tensors`` in ``dtype``; ``False`` when no budget can hold it."""
        if (namespace, key) in self._entries:
            self._entries.move_to_end((namespace, key))
            return True
        first = next(iter(tensors.values()))
        size = sum(t.numel() for t in tensors.values()) * torch.empty(0, dtype=dtype).element_size()
        on_device = first.is_cuda and self._room(on_device=True, need=size, device=first.device)
        if not on_device and not self._room(on_device=False, need=size):
            return False
        where = first.device if on_device else torch.device("cpu")
        # A copy, never a view: the batch's tensors must be free to go.
        copies = {name: t.detach().to(device=where, dtype=dtype, copy=True) for name, t in tensors.items()}
        self._entries[(namespace, key)] = _Entry(copies, size, first.device.type, on_device)
        if on_device:
            self.device_bytes += size
        else:
            self.host_bytes += size
        return True

    def _room(self, on_device: bool, need: int, device: torch.device | None = None) -> bool:
        if on_device and self.device_budget is None and device is not None:
            self.device_budget = int(_AUTO_DEVICE_SHARE * device_memory(device)[1])
        budget = (self.device_budget or 0) if on_device else self.host_budget
        if need > budget:
            return False
        self._shrink(on_device, need)
        return True

    def _shrink(self, on_device: bool, need: int) -> None:
        """Drop least recently used entries of one side until ``need`` more bytes fit its budget."""
        budget = (self.device_budget or 0) if on_device else self.host_budget
        held = self.device_bytes if on_device else self.host_bytes
        if held + need <= budget:
            return
        for name in [name for name, entry in self._entries.items() if entry.on_device == on_device]:
            entry = self._entries.pop(name)
            held -= entry.nbytes
            if held + need <= budget:
                break
        if on_device:
            self.device_bytes = held
        else:
            self.host_bytes = held

    # ------------------------------------------------------------------ what DataLoader workers see
    def __getstate__(self) -> dict[str, Any]:
        # A worker needs to know which images not to decode, never the tensors.
        return {"_snapshot": frozenset(self._entries) | self._snapshot}

    def __setstate__(self, state: dict[str, Any]) -> None:
        FeatureMemory.__init__(self)  # an empty memory that knows which keys the main process holds
        self._snapshot = state["_snapshot"]


_MEMORY = FeatureMemory()


def feature_memory() -> FeatureMemory:
    """The process's feature tier, shared by every run (and sweep job) of the process."""
    return _MEMORY


def namespace(encoder: Encoder, store: FeatureStore | None) -> str:
    """The tier's namespace of one encoder, preprocessing and storage: the store's when the store is on
    (entries are what it gives), exact float32 features otherwise."""
    storage = f"store:{store.dtype_name}" if store is not None else "exact fp32"
    return digest(
        {"encoder": encoder.fingerprint(), "preprocess": asdict(encoder.preprocess), "storage": storage}
    )


class TieredFeatures:
    """Where a run's datasets and its extractor get features: the feature store on disk (if on) and the
    process's feature memory. A dataset reads it as a :class:`~anomret.data.dataset.FeatureSource`."""

    def __init__(self, memory: FeatureMemory, namespace: str, store: FeatureStore | None) -> None:
        self.memory = memory
        self.namespace = namespace
        self.store = store
        self.dtype = torch.float32 if store is None else store.dtype

    def image_key(self, path: str | os.PathLike[str] | Path) -> str:
        return image_key(path)

    def read(self, key: str) -> dict[str, Tensor] | None:
        return None if self.store is None else self.store.read(key)

    def holds(self, key: str) -> bool:
        """The main process serves this image's features: a worker neither reads nor decodes it."""
        return self.memory.holds(self.namespace, key)

    def get(self, key: str, device: torch.device) -> dict[str, Tensor] | None:
        return self.memory.get(self.namespace, key, device)

    def put(self, key: str, tensors: Mapping[str, Tensor]) -> bool:
        return self.memory.put(self.namespace, key, tensors, self.dtype)


def tiered_features(config: Mapping[str, Any] | None, encoder: Encoder, store: FeatureStore | None):
    """The run's :class:`TieredFeatures` from ``features.memory`` (``None`` when both budgets are 0)."""
    settings = dict(config or {})
    unknown = sorted(set(settings) - {"host", "device"})
    if unknown:
        raise ValueError(f"unknown features.memory settings {unknown} (known: device, host)")
    memory = feature_memory()
    memory.configure(settings.get("host", "auto"), settings.get("device", "auto"))
    if not memory.enabled:
        return None
    log.info("encoder outputs are kept in memory for this process: %s", memory.describe())
    return TieredFeatures(memory, namespace(encoder, store), store)
