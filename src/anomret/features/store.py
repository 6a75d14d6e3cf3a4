"""The feature store: encoder outputs cached on disk, so a frozen encoder runs once per image.

Every entry is one image's ``Features`` (CLS, patch grids, projected grids) in one safetensors file,
stored in fp16 by default (fp32 as an option). Entries live under a namespace named after the encoder
fingerprint and the preprocessing, and are keyed by the image's identity (resolved path, size and
modification time), so an edited image or another encoder never reads a stale entry.

Writes are atomic (temporary file, then rename), so concurrent jobs sharing the store never read a
half-written entry, and two writers of one entry write the same bytes. Readers open only the entries
a batch needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomret.encoders.base import Features, Preprocess
from anomret.files import atomic_path, remove_stale_temporaries
from anomret.fingerprint import digest

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


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
        namespace = digest({"encoder": encoder_fingerprint, "preprocess": asdict(preprocess), "dtype": dtype})
        self.directory = Path(root) / f"{encoder_fingerprint.get('name', 'encoder')}-{namespace[:16]}"
        self.reads = 0
        self.writes = 0

    def image_key(self, path: str | os.PathLike[str]) -> str:
        return image_key(path)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str) -> dict[str, Tensor] | None:
        """The entry's tensors in float32, or ``None`` when it is missing or unreadable (it is recomputed)."""
        path = self.path(key)
        try:
            tensors = load_file(str(path))
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError) as error:
            log.warning("feature store entry %s is unreadable (%s): recomputing it", path, error)
            return None
        self.reads += 1
        return {name: tensor.float() for name, tensor in tensors.items()}

    def write(self, key: str, tensors: dict[str, Tensor]) -> None:
        path = self.path(key)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        elif self.writes == 0:
            remove_stale_temporaries(path.parent)
        with atomic_path(path) as tmp:
            save_file(
                {n: t.detach().to("cpu", self.dtype).contiguous() for n, t in tensors.items()}, str(tmp)
            )
        self.writes += 1

    def describe(self) -> str:
        return f"feature store {self.directory} ({self.dtype_name})"
