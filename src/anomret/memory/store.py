"""Memory banks on disk: safetensors files with a JSON fingerprint, written atomically.

A bank file holds plain tensors plus metadata under the ``anomret`` key: the encoder fingerprint,
the data fingerprint, the config that built it and a format version. Nothing is ever unpickled.
Writes go to a temporary file that is renamed into place, so a killed build never leaves a file
that looks complete. Reading checks what the file claims before trusting it: metadata that is not
JSON, or of a format version this anomret does not know, is refused with the file's name.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from anomret.data.samples import Sample
from anomret.files import atomic_path, naming_failed_writes, remove_stale_temporaries
from anomret.fingerprint import digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "anomret"
# How a failed bank write says where else the bank can go.
_ELSEWHERE = "set memory.path (or memory.cache_dir) to another disk"


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
    with atomic_path(path) as tmp, naming_failed_writes(path, _ELSEWHERE):
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
        with naming_failed_writes(path, _ELSEWHERE):
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
        for name, tensor in tensors.items():
            written, rows = 0, 0
            for piece in tensor.pieces():
                if piece.dtype != tensor.dtype or tuple(piece.shape[1:]) != tuple(tensor.shape[1:]):
                    raise ValueError(
                        f"{name}: piece {piece.dtype} {tuple(piece.shape)} does not fit {tensor}"
                    )
                data = piece.detach().cpu().contiguous().numpy().data.cast("B")  # no copy
                with naming_failed_writes(path, _ELSEWHERE):
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
    return parse_metadata(path, header[METADATA_KEY])


def parse_metadata(path: str | Path, text: str) -> dict[str, Any]:
    """A bank's metadata from its header text, refused (naming the file) when it is not a JSON object of
    a format version this anomret reads."""
    fix = "Fix: delete the file so that it is built again, or point memory.path at a bank written by anomret."
    try:
        metadata = json.loads(text)
    except ValueError as error:
        raise BankError(f"memory bank {path}: its metadata is not valid JSON ({error}). {fix}") from error
    if not isinstance(metadata, dict):
        raise BankError(f"memory bank {path}: its metadata is not a JSON object. {fix}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise BankError(
            f"memory bank {path} has format version {version!r}, but this anomret reads version "
            f"{FORMAT_VERSION} only. Fix: use the anomret version that wrote it, or delete the file so that "
            "this one builds it again."
        )
    return metadata


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
    """Read a whole bank into CPU memory (small banks); tensors and metadata come from one open file."""
    read_bank_metadata(path)  # names a missing, foreign or unknown-version file
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = parse_metadata(path, (handle.metadata() or {}).get(METADATA_KEY, "null"))
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise BankError(
            f"{path} is not a readable memory bank ({error}). Delete it to rebuild it."
        ) from error


_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "U8": np.uint8,
    "I64": np.int64,
}


def open_memmap(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file read-only, without reading its data.

    Indexing a map reads only the rows asked for (the page cache does the rest), so banks larger than
    RAM or GPU memory can be used. Tensors must be of a dtype numpy knows (not bf16).
    """
    return open_bank_memmap(path)[0]


def open_bank_memmap(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`open_memmap` and the bank's metadata, both from one open file: a bank replaced meanwhile
    (renamed over by a writer) can never give the rows of one file and the metadata of another."""
    path = Path(path)
    fix = "Fix: delete it so that it is built again, or point memory.path at a bank written by anomret."
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        read_bank_metadata(path)  # its message says where banks come from
        raise
    with handle:
        try:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
            size = os.fstat(handle.fileno()).st_size
        except (struct.error, ValueError, OSError) as error:
            raise BankError(f"{path} is not a readable memory bank ({error}). {fix}") from error
        if not isinstance(header, dict) or METADATA_KEY not in (header.get("__metadata__") or {}):
            raise BankError(f"{path} is a safetensors file but not an anomret memory bank (no metadata).")
        metadata = parse_metadata(path, header["__metadata__"][METADATA_KEY])
        offset = 8 + header_size
        # Memory maps, and plain arrays for the empty tensors (nothing to map).
        maps: dict[str, np.ndarray] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            kind = entry.get("dtype") if isinstance(entry, dict) else None
            if kind is not None and kind not in _NUMPY_DTYPES:
                raise BankError(
                    f"memory bank {path}: tensor {name!r} is {kind}, which cannot be memory-mapped"
                )
            try:
                shape, (start, end) = tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
                if kind is None:  # the header names no dtype
                    raise KeyError("dtype")
                dtype = np.dtype(_NUMPY_DTYPES[kind])
                size_ok = end - start == int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            except (KeyError, TypeError, ValueError) as error:
                raise BankError(
                    f"memory bank {path}: the header of tensor {name!r} is malformed. {fix}"
                ) from error
            if not size_ok or start < 0 or offset + end > size:
                raise BankError(
                    f"memory bank {path}: tensor {name!r} of shape {list(shape)} does not fit its place in the "
                    f"file (bytes {start}..{end} of {size - offset}): the file is cut short or corrupt. {fix}"
                )
            if end == start:
                maps[name] = np.zeros(shape, dtype=dtype)
                continue
            # Mapped through this handle: the maps keep its file, whatever is renamed over the path later.
            maps[name] = np.memmap(handle, dtype=dtype, mode="r", offset=offset + start, shape=shape)
    return maps, metadata


class BankStatus(Enum):
    MISSING = "missing"
    MATCH = "match"
    STALE = "stale"


@dataclass(frozen=True)
class BankCheck:
    status: BankStatus
    reason: str = ""


def check_bank(
    path: str | Path,
    encoder: dict[str, Any],
    build: dict[str, Any],
    stored_build: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> BankCheck:
    """Compare a bank file with what this run would build.

    Returns MISSING (no file), MATCH (reuse it) or STALE (same encoder, other data or settings:
    rebuild it). Raises :class:`BankError` when the file belongs to another encoder: its features
    live in another space, and silently overwriting a bank someone pointed us at loses work.
    ``stored_build`` gives the build settings the file's metadata stands for (by default, as recorded).
    """
    path = Path(path)
    if not path.exists():
        return BankCheck(BankStatus.MISSING)
    metadata = read_bank_metadata(path)  # refuses unknown format versions
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
    stored = stored_build(metadata) if stored_build is not None else metadata.get("build", {})
    if digest(stored) != digest(build):
        changed = sorted(k for k in set(stored) | set(build) if stored.get(k) != build.get(k))
        return BankCheck(BankStatus.STALE, f"built with other {', '.join(changed)}")
    return BankCheck(BankStatus.MATCH)
