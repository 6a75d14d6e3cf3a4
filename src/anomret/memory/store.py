"""Memory banks on disk: safetensors files with a JSON fingerprint, written atomically.

A bank file holds plain tensors plus metadata under the ``anomret`` key: the encoder fingerprint,
the data fingerprint, the config that built it and a format version. Nothing is ever unpickled.
Writes go to a temporary file that is renamed into place, so a killed build never leaves a file
that looks complete.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomret.data.samples import Sample
from anomret.files import atomic_path, remove_stale_temporaries
from anomret.fingerprint import digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "anomret"


class BankError(RuntimeError):
    """A memory bank file cannot be used: missing, unreadable, or built for something else."""


def data_fingerprint(samples: Iterable[Sample], root: str | Path | None = None) -> dict[str, Any]:
    """Identity of the images a bank is built from: paths (relative to ``root``), labels, masks, sizes.

    File size and modification time stand in for content hashes, which would mean reading every
    image twice; a regenerated or edited dataset therefore triggers a rebuild.
    """
    return fingerprint_of_rows(sample_rows(samples, root))


def sample_rows(samples: Iterable[Sample], root: str | Path | None = None) -> list[list[Any]]:
    """One JSON-able identity row per image (path, category, label, file sizes and times), in order.

    Banks that record which image each of their rows comes from store these rows, so a bank extended
    image by image has the same fingerprint as one built from all its images at once.
    """
    rows = []
    for sample in samples:
        row: list[Any] = [_relative(sample.image_path, root), sample.category, sample.label]
        for path in (sample.image_path, sample.mask_path):
            if path is None:
                row.append(None)
                continue
            stat = Path(path).stat()
            row.append([_relative(path, root), stat.st_size, stat.st_mtime_ns])
        rows.append(row)
    return rows


def fingerprint_of_rows(rows: list[list[Any]]) -> dict[str, Any]:
    """The data fingerprint of :func:`sample_rows` (JSON round trips keep it unchanged)."""
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
    remove_stale_temporaries(path.parent)
    header = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **metadata}, default=str)}
    with atomic_path(path) as tmp:
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp), metadata=header
        )
    return path


_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int64: "I64",
}


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor written piece by piece: its dtype, full shape and the pieces along axis 0, in order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[Tensor]]


def save_bank_streaming(
    path: str | Path, tensors: Mapping[str, StreamedTensor], metadata: dict[str, Any]
) -> Path:
    """Atomically write a bank as :func:`save_bank` does, without holding its tensors in memory.

    The file is an ordinary safetensors file (the same header and metadata); each tensor's pieces are
    written as they come, so a bank larger than RAM can be rewritten (e.g. extended) from a memory map.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    header: dict[str, Any] = {
        "__metadata__": {
            METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **metadata}, default=str)
        }
    }
    offset = 0
    for name, tensor in tensors.items():
        size = int(np.prod(tensor.shape, dtype=np.int64)) * torch.empty(0, dtype=tensor.dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, tensor in tensors.items():
            written, rows = 0, 0
            for piece in tensor.pieces():
                if piece.dtype != tensor.dtype or tuple(piece.shape[1:]) != tuple(tensor.shape[1:]):
                    raise ValueError(
                        f"{name}: piece {piece.dtype} {tuple(piece.shape)} does not fit {tensor}"
                    )
                data = memoryview(piece.detach().cpu().contiguous().numpy()).cast("B")  # no copy
                handle.write(data)
                written += data.nbytes
                rows += piece.shape[0]
            start, end = header[name]["data_offsets"]
            if written != end - start or rows != tensor.shape[0]:
                raise ValueError(f"{name}: pieces hold {rows} rows, the tensor has {tensor.shape[0]}")
    return path


def read_bank_metadata(path: str | Path) -> dict[str, Any]:
    """Read only the header of a bank file (no tensor data)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        if not path.exists():
            raise BankError(
                f"memory bank {path} does not exist. Fix: point memory.path at a bank file that "
                "anomret.train wrote (its path is in the run's artifacts.json), or run anomret.train to build one."
            ) from error
        raise BankError(
            f"{path} is not a readable memory bank ({error}). Delete it to rebuild it, or point "
            "memory.path at a bank written by anomret."
        ) from error
    if METADATA_KEY not in header:
        raise BankError(f"{path} is a safetensors file but not an anomret memory bank (no metadata).")
    return json.loads(header[METADATA_KEY])


@dataclass(frozen=True)
class TensorSpec:
    """What a bank tensor must look like: rank, dtypes, and named dimensions shared between tensors."""

    dims: tuple[str, ...]  # one name per axis; equal names must have equal sizes ("n", "d", ...)
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    finite: bool = True


def validate_tensors(
    path: str | Path,
    tensors: Mapping[str, Any],
    spec: Mapping[str, TensorSpec],
    known_sizes: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Check names, ranks, dtypes, shared dimensions and finiteness; returns the dimension sizes.

    ``tensors`` may hold tensors or lazily opened slices (anything with ``shape``/``dtype``): finiteness
    is checked only on real tensors, so a memory-mapped bank is not read whole to validate it.
    """
    fix = "Fix: delete the file so that it is rebuilt, or point memory.path at a bank written by anomret."
    names, expected = set(tensors), set(spec)
    if names != expected:
        raise BankError(
            f"memory bank {path} holds tensors {sorted(names)} but a bank of this kind has {sorted(expected)}. {fix}"
        )
    sizes: dict[str, int] = dict(known_sizes or {})
    for name, tensor_spec in spec.items():
        tensor = tensors[name]
        shape = tuple(tensor.shape)
        if len(shape) != len(tensor_spec.dims):
            raise BankError(
                f"memory bank {path}: tensor {name!r} has shape {shape}, expected "
                f"[{', '.join(tensor_spec.dims)}]. {fix}"
            )
        if tensor.dtype not in tensor_spec.dtypes:
            raise BankError(
                f"memory bank {path}: tensor {name!r} is {tensor.dtype}, expected one of "
                f"{[str(d) for d in tensor_spec.dtypes]}. {fix}"
            )
        for dim, size in zip(tensor_spec.dims, shape, strict=True):
            if dim.isdigit():
                if size != int(dim):
                    raise BankError(
                        f"memory bank {path}: tensor {name!r} has shape {shape}, axis must be {dim}. {fix}"
                    )
            elif sizes.setdefault(dim, size) != size:
                raise BankError(
                    f"memory bank {path}: tensor {name!r} has {dim}={size} but {sizes[dim]} elsewhere "
                    f"(shape {shape}). {fix}"
                )
        floating = isinstance(tensor, Tensor) and tensor.is_floating_point()
        if tensor_spec.finite and floating and not torch.isfinite(tensor).all():
            raise BankError(f"memory bank {path}: tensor {name!r} contains NaN or infinite values. {fix}")
    return sizes


def load_bank(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a whole bank into CPU memory (small banks)."""
    metadata = read_bank_metadata(path)
    try:
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError) as error:
        raise BankError(
            f"{path} is not a readable memory bank ({error}). Delete it to rebuild it."
        ) from error


_NUMPY_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "U8": np.uint8,
    "I64": np.int64,
}


def open_memmap(path: str | Path) -> dict[str, np.memmap]:
    """Memory-map every tensor of a safetensors file read-only, without reading its data.

    Indexing a map reads only the rows asked for (the page cache does the rest), so banks larger than
    RAM or GPU memory can be used. Tensors must be of a dtype numpy knows (not bf16).
    """
    path = Path(path)
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    offset = 8 + header_size
    maps = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise BankError(
                f"memory bank {path}: tensor {name!r} is {entry['dtype']}, which cannot be memory-mapped"
            )
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            maps[name] = np.zeros(shape, dtype=_NUMPY_DTYPES[entry["dtype"]])
            continue
        maps[name] = np.memmap(
            path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="r", offset=offset + start, shape=shape
        )
    return maps


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
