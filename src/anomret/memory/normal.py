"""Hydra ``memory=normal``: RAD's memory of normal images and how it is built, cached and extended.

The bank is :class:`~anomret.memory.normal_bank.NormalMemoryBank`, built by
:class:`~anomret.memory.normal_builder.NormalBankBuilder`. A bank built from some categories can be
extended with the normal images of new ones (:meth:`NormalMemorySettings.missing_images`,
:meth:`NormalMemorySettings.write_appended`): only the new images are encoded (the paper's incremental
onboarding).

RAD scores a query against the set of memory images, whatever their order, so a bank's data identity is
the set of its images (:func:`image_set_fingerprint`): an extended bank, whose new rows follow the old
ones, is the bank a build from the same images gives, whichever order the categories are listed in, and
later runs that name it reuse it. A stored bank's identity is computed from its image records, not taken
from the digest it stores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from anomret.checks import integer_at_least
from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder
from anomret.memory.base import MemoryBank, MemorySettings
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


def image_set_fingerprint(rows: list[list[Any]]) -> dict[str, Any]:
    """The data fingerprint of the images of :func:`~anomret.memory.store.sample_rows` ``rows``, in any
    order (JSON round trips keep it unchanged)."""
    return fingerprint_of_rows(sorted(rows, key=lambda row: json.dumps(row, default=str)))


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
        super().__post_init__()
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

    def data_fingerprint(self, samples: SampleTable) -> dict[str, Any]:
        return image_set_fingerprint(sample_rows(samples))

    def stored_build(self, metadata: dict[str, Any]) -> dict[str, Any]:
        build = dict(metadata.get("build", {}))
        images = metadata.get("images")
        if isinstance(images, list):  # what the rows are, not what a digest says (banks of any version)
            build["data"] = image_set_fingerprint(images)
        return build

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

    def missing_images(self, path: Path, metadata: dict[str, Any], samples: SampleTable) -> list[int]:
        """Positions of the ``samples`` the bank at ``path`` lacks.

        ``metadata`` is what this run would build (kind, source, encoder, build settings). Raises
        :class:`BankError` for a bank of another encoder, kind or settings, or whose images changed.
        Read under the bank's writers' lock, so that the write that follows extends this very state.
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
        by_path = {row[0]: row for row in stored.get("images") or []}
        rows = sample_rows(samples)
        changed_images = [row[0] for row in rows if row[0] in by_path and by_path[row[0]] != row]
        if changed_images:
            raise BankError(
                f"cannot append to {path}: {len(changed_images)} of its images changed on disk since it was built "
                f"(e.g. {changed_images[0]}). Fix: memory.rebuild=true to build it again."
            )
        return [position for position, row in enumerate(rows) if row[0] not in by_path]

    def write_appended(
        self, path: Path, metadata: dict[str, Any], added: SampleTable, part: MemoryBank
    ) -> None:
        """Rewrite the bank at ``path`` as its rows, then those of ``part`` (the memory pass over ``added``).

        The old rows and their records are read from one open file, the one this writes over; the result
        records the images of both and the fingerprint of their set.
        """
        assert isinstance(part, NormalMemoryBank)  # this kind's own memory pass built it
        old = NormalMemoryBank.load(path, mmap=True)
        known = {row[0] for row in old.metadata.get("images") or []}
        again = [row[0] for row in sample_rows(added) if row[0] in known]
        if again:
            raise BankError(
                f"cannot append to {path}: it holds {again[0]} already (it changed since its images were read)"
            )
        all_rows = list(old.metadata.get("images") or []) + sample_rows(added)
        build = {**metadata["build"], "data": image_set_fingerprint(all_rows)}
        write_concatenated(path, old, part, {**metadata, "build": build, "images": all_rows})
