"""One bank cache for every method: banks are identified by what they contain, not by who uses them.

A bank's identity is its kind (``labeled``, ``normal``, ...), the encoder fingerprint, the data
fingerprint of the images it was built from and its build settings. Cached banks are named after that
identity (``<kind>-<source>-<encoder>-<digest>.safetensors`` under ``memory.cache_dir``), so methods that
need the same bank (MRAD-TF, -FT and -CLIP all read the labelled bank) share one file.

An explicit ``memory.path`` is the user's file: it is built when missing and reused when it matches, but a
file that holds another bank is never replaced silently (``memory.rebuild=true`` replaces it).

What a run does with the file (reuse, extend or build it) is :func:`decide_bank`'s answer, read from the
file as it is on disk; a run that writes takes the bank's writers' lock first (:mod:`anomret.memory.writers`),
so the answer still holds when its new file is renamed into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder
from anomret.fingerprint import digest
from anomret.memory.base import AppendableSettings, MemorySettings
from anomret.memory.store import BankError, BankStatus, check_bank, read_bank_metadata

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
    build = {"data": settings.data_fingerprint(samples), **settings.build_settings(encoder)}
    if feature_dtype is not None:
        build["features"] = (
            feature_dtype  # features read back from an fp16 store build a (slightly) other bank
        )
    metadata = {"kind": settings.kind, "source": source, "encoder": encoder.fingerprint(), "build": build}
    if settings.path:
        return BankPlan(Path(settings.path), metadata, explicit=True)
    name = f"{settings.kind}-{source}-{encoder.name}-{bank_identity(metadata)[:12]}.safetensors"
    return BankPlan(Path(settings.cache_dir) / name, metadata, explicit=False)


@dataclass(frozen=True)
class BankDecision:
    """What a run does with its bank file: ``reuse`` it, ``append`` the images at positions ``missing`` of
    the run's memory images, or ``build`` it (``reason`` says why, for the log)."""

    action: str
    missing: tuple[int, ...] = field(default=())
    reason: str = ""


def decide_bank(settings: MemorySettings, plan: BankPlan, samples: SampleTable) -> BankDecision:
    """Reuse, extend or build the bank at ``plan.path``, from the file as it is now.

    With ``memory.append`` (kinds that support it) an existing file that lacks some of ``samples`` is
    extended, one that lacks none is used as it is. Otherwise a matching file is reused and a missing one
    built. Raises :class:`BankError` for a bank of another encoder or kind, and for an explicit path that
    holds a bank built from other data or settings (unless ``rebuild``).
    """
    path = plan.path
    appending = settings.supports_append and isinstance(settings, AppendableSettings) and settings.append
    if appending and path.exists() and not settings.rebuild:
        missing = settings.missing_images(path, plan.metadata, samples)
        if missing:
            return BankDecision("append", tuple(missing), f"it lacks {len(missing)} of this run's images")
        return BankDecision("reuse", reason="append mode: it holds every image of this run")
    if path.exists():
        stored_kind = read_bank_metadata(path).get("kind")
        if stored_kind != settings.kind:
            raise BankError(
                f"memory bank {path} is a '{stored_kind}' bank but this run needs a '{settings.kind}' bank "
                f"(memory={settings.kind}). Fix: point memory.path at another file, or leave it unset."
            )
    check = check_bank(  # raises for another encoder
        path, plan.metadata["encoder"], plan.metadata["build"], stored_build=settings.stored_build
    )
    if check.status is BankStatus.MATCH and not settings.rebuild:
        return BankDecision("reuse", reason="it matches this run")
    if check.status is BankStatus.STALE:
        if plan.explicit and not settings.rebuild:
            raise BankError(
                f"memory.path={path} holds a bank {check.reason}. A named bank is never replaced silently. Fix: "
                "pass memory.rebuild=true to replace it, choose another memory.path for these settings, or leave "
                "memory.path unset to cache one bank per setting."
            )
        return BankDecision("build", reason=f"it is stale ({check.reason})")
    return BankDecision("build", reason="memory.rebuild=true" if settings.rebuild else "it does not exist")
