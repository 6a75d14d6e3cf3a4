"""Memory banks on disk: safetensors files with a JSON fingerprint, written atomically.

A bank file holds plain tensors plus metadata under the ``anomret`` key: the encoder fingerprint,
the data fingerprint, the config that built it and a format version. Nothing is ever unpickled.
Writes go to a temporary file that is renamed into place, so a killed build never leaves a file
that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomret.data.samples import Sample

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "anomret"


class BankError(RuntimeError):
    """A memory bank file cannot be used: missing, unreadable, or built for something else."""


def digest(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(samples: Iterable[Sample], root: str | Path | None = None) -> dict[str, Any]:
    """Identity of the images a bank is built from: paths (relative to ``root``), labels, masks, sizes.

    File size and modification time stand in for content hashes, which would mean reading every
    image twice; a regenerated or edited dataset therefore triggers a rebuild.
    """
    rows = []
    for sample in samples:
        row = [_relative(sample.image_path, root), sample.category, sample.label]
        for path in (sample.image_path, sample.mask_path):
            if path is None:
                row.append(None)
                continue
            stat = Path(path).stat()
            row.append([_relative(path, root), stat.st_size, stat.st_mtime_ns])
        rows.append(row)
    return {"n_samples": len(rows), "digest": digest(rows)}


def _relative(path: Path, root: str | Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def save_bank(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and JSON ``metadata`` to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **metadata}, default=str)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_bank_metadata(path: str | Path) -> dict[str, Any]:
    """Read only the header of a bank file (no tensor data)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise BankError(
            f"{path} is not a readable memory bank ({error}). Delete it to rebuild it, or point "
            "memory.path at a bank written by anomret."
        ) from error
    if METADATA_KEY not in header:
        raise BankError(f"{path} is a safetensors file but not an anomret memory bank (no metadata).")
    return json.loads(header[METADATA_KEY])


def load_bank(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    metadata = read_bank_metadata(path)
    return load_file(str(path), device="cpu"), metadata


class BankStatus(Enum):
    MISSING = "missing"
    MATCH = "match"
    STALE = "stale"


@dataclass(frozen=True)
class BankCheck:
    status: BankStatus
    reason: str = ""


def check_bank(path: str | Path, encoder: dict[str, Any], build: dict[str, Any]) -> BankCheck:
    """Compare a bank file with what this run would build.

    Returns MISSING (no file), MATCH (reuse it) or STALE (same encoder, other data or settings:
    rebuild it). Raises :class:`BankError` when the file belongs to another encoder: its features
    live in another space, and silently overwriting a bank someone pointed us at loses work.
    """
    path = Path(path)
    if not path.exists():
        return BankCheck(BankStatus.MISSING)
    metadata = read_bank_metadata(path)
    if metadata.get("format_version") != FORMAT_VERSION:
        return BankCheck(BankStatus.STALE, f"format version {metadata.get('format_version')}")
    stored_encoder = metadata.get("encoder", {})
    if digest(stored_encoder) != digest(encoder):
        differences = sorted(
            key for key in set(stored_encoder) | set(encoder) if stored_encoder.get(key) != encoder.get(key)
        )
        raise BankError(
            f"memory bank {path} was built by another encoder "
            f"({stored_encoder.get('name', '?')}; differs in {', '.join(differences)}) than this run's "
            f"({encoder.get('name', '?')}). Its features are not comparable. Use memory.path to point at a "
            "bank built by this encoder, leave memory.path unset to cache banks per encoder, or delete the file."
        )
    if digest(metadata.get("build", {})) != digest(build):
        stored = metadata.get("build", {})
        changed = sorted(k for k in set(stored) | set(build) if stored.get(k) != build.get(k))
        return BankCheck(BankStatus.STALE, f"built with other {', '.join(changed)}")
    return BankCheck(BankStatus.MATCH)
