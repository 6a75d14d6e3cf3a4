"""The memory-bank protocol every method's memory follows, and the settings every bank config shares.

A method's memory is one module in ``anomret.memory`` with three parts:

- a **bank** (:class:`MemoryBank`): tensors plus metadata, saved as one safetensors file, loaded (eagerly,
  or memory-mapped for banks larger than RAM), moved to a device, described in one line;
- a **builder** (:class:`BankBuilder`): fed one batch of encoder features at a time during the memory pass,
  its partial state merged across processes (DDP) so every rank ends with the same bank;
- **settings** (:class:`MemorySettings`, the Hydra ``memory=`` group): what identifies a bank (kind and
  build settings) and where it is cached.

Caching, fingerprints and refusal of foreign banks live in :mod:`anomret.memory.cache`, so a new memory
kind only says what it stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from anomret.data.batch import Batch
from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder, Features
from anomret.memory.store import data_fingerprint


@runtime_checkable
class MemoryBank(Protocol):
    kind: ClassVar[str]
    metadata: dict[str, Any]

    def save(self, path: str | Path) -> Path: ...

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank: ...

    def to(self, device: Any) -> MemoryBank: ...

    def summary(self) -> str: ...

    def check_compatible(self, dims: Mapping[str, int]) -> None:
        """Raise a clear error when the bank's feature sizes differ from the encoder's (``dims``)."""


@runtime_checkable
class AppendableSettings(Protocol):
    """The settings of a kind whose banks take new images (``supports_append``): ``append`` asks for it."""

    append: bool


class BankBuilder(Protocol):
    def add(self, features: Features, batch: Batch) -> None:
        """Add one batch of the memory pass (its features, masks, labels and dataset indices)."""

    def state(self) -> dict[str, Any]:
        """This process's partial state (CPU tensors, or where large rows are on disk), to be gathered
        across processes."""

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Replace the partial state by the union of every process's state, in sample order."""

    def build(self, metadata: dict[str, Any]) -> MemoryBank: ...


@dataclass
class MemorySettings:
    """What every ``memory=`` config has: where the bank lives and whether to rebuild it.

    Args:
        path: an explicit bank file. It is built when missing, reused when it matches this run, and never
            silently replaced: a file built from other data or settings is refused unless ``rebuild``.
        cache_dir: where banks go when ``path`` is unset, one file per kind, source, encoder and settings.
        rebuild: build again even when a matching bank exists (and replace an explicit ``path``).
        source: where the memory images come from: ``aux`` (the ``aux_dataset`` as configured, MRAD) or
            ``train`` (the evaluation dataset's own train split, RAD).
        lock_timeout_s: how long a run that must write the bank (build or extend it) waits for another
            run writing the same file, in seconds (``None``: as long as it takes; ``0``: it is refused at
            once). See :mod:`anomret.locks`.
    """

    kind: ClassVar[str] = ""
    path: str | None = None
    cache_dir: str = ".cache/banks"
    rebuild: bool = False
    source: str = "aux"
    lock_timeout_s: float | None = 3600.0
    # True when the bank a builder returns reads its rows from the builder's scratch files (bounded
    # building): the saved file replaces it on every process, and the builders are closed.
    streams_build: ClassVar[bool] = False
    # True for kinds whose banks can take new images without a rebuild (memory.append, anomret.append).
    supports_append: ClassVar[bool] = False

    def __post_init__(self) -> None:
        timeout = self.lock_timeout_s
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise ValueError(
                f"memory.lock_timeout_s must be a number of seconds ≥ 0 or null (no limit), got {timeout!r}"
            )

    def build_settings(self, encoder: Encoder) -> dict[str, Any]:
        """The settings that change a bank's content (recorded in its metadata and cache key)."""
        raise NotImplementedError

    def data_fingerprint(self, samples: SampleTable) -> dict[str, Any]:
        """Identity of the images a bank is built from (in order: a kind whose banks depend on the order of
        their rows, e.g. by subsampling them, keeps it)."""
        return data_fingerprint(samples)

    def stored_build(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The build settings (``data`` included) a stored bank's metadata stands for, to compare with
        this run's."""
        return dict(metadata.get("build", {}))

    def builder(self, encoder: Encoder) -> BankBuilder:
        raise NotImplementedError

    def bank_class(self) -> type[MemoryBank]:
        raise NotImplementedError

    def open(self, path: str | Path) -> MemoryBank:
        """Load a saved bank of this kind (memory-mapped where the kind supports it)."""
        return self.bank_class().load(path)

    def select(self, samples: SampleTable) -> SampleTable:
        """The images of the memory source the bank is built from (all by default; few-shot draws)."""
        return samples

    def describe_source(self, samples: SampleTable) -> dict[str, Any]:
        """Extra metadata recorded with a bank built from ``samples`` (e.g. which image each row is)."""
        return {}

    def missing_images(self, path: Path, metadata: dict[str, Any], samples: SampleTable) -> list[int]:
        """Positions of the ``samples`` the bank at ``path`` lacks (``supports_append`` kinds); raises
        :class:`~anomret.memory.store.BankError` for a bank that cannot take them (another encoder, kind or
        settings, or images changed on disk). ``metadata`` is what this run would build."""
        raise NotImplementedError(f"memory={self.kind} banks cannot be appended to")

    def write_appended(
        self, path: Path, metadata: dict[str, Any], added: SampleTable, part: MemoryBank
    ) -> None:
        """Rewrite the bank at ``path`` with the rows of ``part`` (a memory pass over ``added``, the images
        :meth:`missing_images` named) after its own."""
        raise NotImplementedError(f"memory={self.kind} banks cannot be appended to")
