"""Building RAD's normal memory in bounded memory, under one process or DDP.

The memory pass writes each batch's rows to scratch files beside the bank as they arrive
(:mod:`anomret.memory.spill`); only the global keys and dataset indices stay in memory, and the bank is
written from the files piece by piece.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.data.batch import Batch
from anomret.encoders.base import Features
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.memory.rows import PatchRows, encode_rows
from anomret.memory.spill import MergedRows, RowSpill, SpillInfo, release_freed_memory

log = logging.getLogger(__name__)

# Stored rows: in memory, memory-mapped from a bank file, or read from a memory pass's scratch files.


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

    def add(self, features: Features, batch: Batch) -> None:
        missing = [layer for layer in self.layers if layer not in features.patches]
        if missing:
            raise ValueError(
                f"the encoder did not return layers {missing} (it returned {list(features.patches)})"
            )
        if self._spill is None:
            beside = self.beside or Path(tempfile.gettempdir()) / "anomret" / "normal-bank"
            self._spill = RowSpill(Path(beside))
        self._index.append(batch.index.reshape(-1).cpu().long())
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
