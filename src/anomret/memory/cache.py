"""One bank cache for every method: banks are identified by what they contain, not by who uses them.

A bank's identity is its kind (``labeled``, ``normal``, ...), the encoder fingerprint, the data
fingerprint of the images it was built from and its build settings. Cached banks are named after that
identity (``<kind>-<source>-<encoder>-<digest>.safetensors`` under ``memory.cache_dir``), so methods that
need the same bank (MRAD-TF, -FT and -CLIP all read the labelled bank) share one file.

An explicit ``memory.path`` is the user's file: it is built when missing and reused when it matches, but a
file that holds another bank is never replaced silently (``memory.rebuild=true`` replaces it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder
from anomret.fingerprint import digest
from anomret.memory.base import MemoryBank, MemorySettings
from anomret.memory.store import (
    BankError,
    BankStatus,
    check_bank,
    data_fingerprint,
    read_bank_metadata,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankPlan:
    """Where this run's bank lives and what it must contain."""

    path: Path
    metadata: dict[str, Any]  # {"source", "encoder", "build"}; the bank's kind is added when saved
    explicit: bool

    @property
    def identity(self) -> str:
        return bank_identity(self.metadata)


def bank_identity(metadata: dict[str, Any]) -> str:
    """Digest of what makes two banks interchangeable (kind, encoder, data and settings)."""
    return digest([metadata.get("kind"), metadata["encoder"], metadata["build"]])


def plan_bank(
    settings: MemorySettings,
    encoder: Encoder,
    samples: SampleTable,
    source: str,
    feature_dtype: str | None = None,
) -> BankPlan:
    """Where the bank goes and what identifies it; ``feature_dtype`` is the store's rounding, if any."""
    build = {"data": data_fingerprint(samples), **settings.build_settings(encoder)}
    if feature_dtype is not None:
        build["features"] = (
            feature_dtype  # features read back from an fp16 store build a (slightly) other bank
        )
    metadata = {"kind": settings.kind, "source": source, "encoder": encoder.fingerprint(), "build": build}
    if settings.path:
        return BankPlan(Path(settings.path), metadata, explicit=True)
    name = f"{settings.kind}-{source}-{encoder.name}-{bank_identity(metadata)[:12]}.safetensors"
    return BankPlan(Path(settings.cache_dir) / name, metadata, explicit=False)


def find_bank(settings: MemorySettings, plan: BankPlan) -> MemoryBank | None:
    """The bank at ``plan.path`` when it matches this run; ``None`` when one must be built.

    Raises :class:`BankError` for a bank of another encoder or kind, and for an explicit path that holds
    a bank built from other data or settings (unless ``rebuild``).
    """
    path = plan.path
    if path.exists():
        stored_kind = read_bank_metadata(path).get("kind")
        if stored_kind != settings.kind:
            raise BankError(
                f"memory bank {path} is a '{stored_kind}' bank but this run needs a '{settings.kind}' bank "
                f"(memory={settings.kind}). Fix: point memory.path at another file, or leave it unset."
            )
    check = check_bank(path, plan.metadata["encoder"], plan.metadata["build"])  # raises for another encoder
    if check.status is BankStatus.MATCH and not settings.rebuild:
        bank = settings.open(path)
        log.info("reusing memory bank %s: %s", path, bank.summary())
        return bank
    if check.status is BankStatus.STALE:
        if plan.explicit and not settings.rebuild:
            raise BankError(
                f"memory.path={path} holds a bank {check.reason}. A named bank is never replaced silently. Fix: "
                "pass memory.rebuild=true to replace it, choose another memory.path for these settings, or leave "
                "memory.path unset to cache one bank per setting."
            )
        log.info("memory bank %s is stale (%s): rebuilding it", path, check.reason)
    return None
