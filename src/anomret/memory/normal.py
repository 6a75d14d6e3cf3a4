"""Hydra ``memory=normal``: RAD's memory of normal images and how it is built, cached and extended.

The bank is :class:`~anomret.memory.normal_bank.NormalMemoryBank`, built by
:class:`~anomret.memory.normal_builder.NormalBankBuilder`. A bank built from some categories can be
extended with the normal images of new ones (:meth:`NormalMemorySettings.append_missing`): only the new
images are encoded, and the result has the same rows and fingerprint as a bank built from all of them at
once (the paper's incremental onboarding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from anomret.checks import integer_at_least
from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder
from anomret.memory.base import MemorySettings
from anomret.memory.fewshot import select_images
from anomret.memory.normal_bank import NormalMemoryBank, write_concatenated
from anomret.memory.normal_builder import NormalBankBuilder
from anomret.memory.rows import STORAGE_DTYPES
from anomret.memory.store import (
    BankError,
    check_bank,
    fingerprint_of_rows,
    read_bank_metadata,
    sample_rows,
)

log = logging.getLogger(__name__)

# Stored rows: in memory, memory-mapped from a bank file, or read from a memory pass's scratch files.


@dataclass
class NormalMemorySettings(MemorySettings):
    """Hydra ``memory=normal``: RAD's memory of normal images (see the module docstring).

    Args:
        path / cache_dir / rebuild: see :class:`~anomret.memory.base.MemorySettings`.
        source: ``train``: the evaluation dataset's own train split (RAD); ``aux``: the aux_dataset.
        layers: encoder blocks whose patch grids are stored (``None``: every block the encoder extracts).
        dtype: storage of the patch grids, ``fp16`` (default), ``fp32`` or ``int8``.
        mmap: read the patch grids from disk per query (default) instead of loading the whole bank.
        placement: where retrieval reads the patch rows: ``auto`` (default), ``device`` or ``stream``
            (:mod:`~anomret.memory.placement`); like ``mmap``, not part of the bank's identity.
        device_budget: device memory the rows may take under ``auto`` (``16GiB``; ``auto``: free memory
            less a reserve).
        stream_budget: host and device memory of one layer's rows per streamed batch (``512MiB``).
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
    placement: str = "auto"
    device_budget: int | str | None = "auto"
    stream_budget: int | str = "512MiB"
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
