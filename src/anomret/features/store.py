"""The feature store: encoder outputs cached on disk, so a frozen encoder runs once per image.

Every entry is one image's ``Features`` (CLS, patch grids, projected grids) in one safetensors file,
stored in fp16 by default (fp32 as an option). Entries live under a namespace named after the encoder
fingerprint and the preprocessing, and are keyed by the image's identity (resolved path, size and
modification time), so an edited image or another encoder never reads a stale entry.

Writes are atomic (temporary file, then rename), so concurrent jobs sharing the store never read a
half-written entry, and two writers of one entry write the same bytes. Readers open only the entries
a batch needs.

An entry is checked against what it claims before it is used: it records its key and namespace (a
renamed, swapped or copied entry is another image's features), its tensors must have the names and
shapes this encoder produces (``schema.json``, written once per namespace from freshly encoded
features) and its values must be finite. An entry that fails is named in one warning and treated as
missing: its image is encoded again and the entry overwritten, so the next run finds it sound. Entries
whose values were changed but stay finite, under their own key, are not caught.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from anomret.encoders.base import Features, Preprocess
from anomret.files import atomic_path, naming_failed_writes, remove_stale_temporaries, write_text_atomic
from anomret.fingerprint import digest

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Entries that record their key and namespace; part of the namespace, so entries of earlier layouts
# (which did not) are never read.
ENTRY_FORMAT = 2
SCHEMA_FILENAME = "schema.json"
# How a failed entry write says where else the store can go.
_ELSEWHERE = "set features.dir to another disk (or features.enabled=false)"


# Float bit patterns: with the sign bit cleared, a value is NaN or infinite iff it is at least the limit.
_NOT_FINITE = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
}


def finite_rows(values: Tensor | np.ndarray) -> np.ndarray:
    """Which rows (first axis) of stored values hold finite values only, read from their bits: no float
    conversion, and numpy's single thread (torch's element-wise checks cost more on a busy CPU)."""
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    array = np.ascontiguousarray(array)
    if array.dtype not in _NOT_FINITE:
        return np.ones(len(array), dtype=bool)  # integers are always finite
    kind, magnitude, limit = _NOT_FINITE[array.dtype]
    bits = array.reshape(len(array), -1).view(kind)
    return (bits & kind(magnitude)).max(axis=1, initial=0) < limit


def image_key(path: str | os.PathLike[str]) -> str:
    """Identity of an image file: its resolved path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return digest([str(resolved), stat.st_size, stat.st_mtime_ns])[:32]


def features_to_tensors(features: Features, index: int) -> dict[str, Tensor]:
    """One image of a batch as named tensors (``cls``, ``patches.<layer>``, ``projected.<layer>``)."""
    tensors = {"cls": features.cls[index]}
    tensors.update({f"patches.{layer}": grid[index] for layer, grid in features.patches.items()})
    tensors.update({f"projected.{layer}": grid[index] for layer, grid in features.projected.items()})
    return tensors


class FeatureStore:
    """Disk cache of one encoder's outputs (``features.enabled=true``).

    Args:
        root: the store's directory (``features.dir``, shared by every run and job).
        encoder_fingerprint: the encoder's identity; together with ``preprocess`` it names the namespace.
        preprocess: the image preprocessing the features were computed from.
        dtype: ``fp16`` (default, half the disk) or ``fp32`` (bit-exact features).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        encoder_fingerprint: dict[str, Any],
        preprocess: Preprocess,
        dtype: str = "fp16",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"features.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.namespace = digest(
            {
                "encoder": encoder_fingerprint,
                "preprocess": asdict(preprocess),
                "dtype": dtype,
                "entry_format": ENTRY_FORMAT,
            }
        )
        self.directory = Path(root) / f"{encoder_fingerprint.get('name', 'encoder')}-{self.namespace[:16]}"
        self.reads = 0
        self.writes = 0
        self._schema: dict[str, list[int]] | None = None  # tensor name -> shape, as this encoder gives

    def image_key(self, path: str | os.PathLike[str]) -> str:
        return image_key(path)

    def holds(self, key: str) -> bool:
        """Whether the main process serves this entry from memory: never, for the disk store alone."""
        return False

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    @property
    def schema_path(self) -> Path:
        return self.directory / SCHEMA_FILENAME

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def schema(self) -> dict[str, list[int]] | None:
        """The names and shapes of this namespace's entries, once a writer has recorded them."""
        if self._schema is None:
            try:
                schema = json.loads(self.schema_path.read_text())
                self._schema = {str(name): [int(n) for n in shape] for name, shape in schema.items()}
            except FileNotFoundError:
                return None
            except (OSError, ValueError, TypeError, AttributeError) as error:
                log.warning(
                    "feature store schema %s is unreadable (%s): it is written again from fresh features",
                    self.schema_path,
                    error,
                )
                return None
        return self._schema

    def read(self, key: str) -> dict[str, Tensor] | None:
        """The entry's tensors in float32, or ``None`` when it is missing or unsound (it is recomputed)."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as handle:
                recorded = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError) as error:
            problem = f"it is unreadable ({error})"
        else:
            problem = self._problem(key, recorded, tensors) or next(
                (
                    f"its tensor {name!r} holds NaN or infinite values"
                    for name, tensor in tensors.items()
                    if not finite_rows(tensor.reshape(1, -1)).all()
                ),
                "",
            )
        if problem:
            log.warning("feature store entry %s is unsound: %s; recomputing it", path, problem)
            return None
        self.reads += 1
        return {name: tensor.float() for name, tensor in tensors.items()}

    def _problem(self, key: str, recorded: dict[str, str], tensors: dict[str, Tensor]) -> str:
        """Why an entry is not what it claims to be ("" when it is)."""
        if recorded.get("key") != key or recorded.get("namespace") != self.namespace:
            if recorded.get("namespace") == self.namespace:
                return f"it holds the features of another image (entry {recorded.get('key')})"
            return "it was written for another key or store (copied, renamed or from another anomret version)"
        wrong_dtype = sorted(name for name, tensor in tensors.items() if tensor.dtype != self.dtype)
        if wrong_dtype:
            return f"its tensors {wrong_dtype} are not {self.dtype_name}"
        schema = self.schema()
        if schema is not None:
            shapes = {name: list(tensor.shape) for name, tensor in tensors.items()}
            if shapes != schema:
                return f"its tensors {shapes} are not the {schema} this encoder gives"
        return ""

    def write(self, key: str, tensors: dict[str, Tensor]) -> None:
        path = self.path(key)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        elif self.writes == 0:
            remove_stale_temporaries(path.parent)
        stored = {n: t.detach().to("cpu", self.dtype).contiguous() for n, t in tensors.items()}
        self._record_schema({name: list(tensor.shape) for name, tensor in stored.items()})
        with atomic_path(path) as tmp, naming_failed_writes(path, _ELSEWHERE):
            save_file(stored, str(tmp), metadata={"key": key, "namespace": self.namespace})
        self.writes += 1

    def _record_schema(self, shapes: dict[str, list[int]]) -> None:
        """Record what this encoder gives, once per namespace (fresh features are the truth)."""
        schema = self.schema()
        if schema == shapes:
            return
        if schema is not None:
            log.warning(
                "feature store schema %s says %s but the encoder gives %s: it is written again",
                self.schema_path,
                schema,
                shapes,
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        with naming_failed_writes(self.schema_path, _ELSEWHERE):
            write_text_atomic(self.schema_path, json.dumps(shapes))
        self._schema = shapes

    def describe(self) -> str:
        return f"feature store {self.directory} ({self.dtype_name})"
