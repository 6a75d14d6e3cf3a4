"""The meta.json index format used by MRAD, AnomalyCLIP and AdaCLIP, read into a ``SampleTable``.

Layout of ``<root>/meta.json``::

    {"train": {category: [record, ...]}, "test": {category: [record, ...]}}

with records ``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Paths are relative
to ``root`` (root-prefixed paths, as some published scripts write them, are accepted too);
``mask_path`` is ``""`` for normal images and for datasets without pixel masks.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from anomret.data.samples import Sample, SampleTable

META_FILENAME = "meta.json"
SPLITS = ("train", "test")

Record = dict[str, Any]
Meta = dict[str, dict[str, list[Record]]]


def make_record(
    img_path: str, mask_path: str, category: str, anomaly: int, defect: str = ""
) -> Record:
    """One meta.json record, with paths written POSIX-style relative to the dataset root."""
    return {
        "img_path": Path(img_path).as_posix(),
        "mask_path": Path(mask_path).as_posix() if mask_path else "",
        "cls_name": category,
        "specie_name": defect,
        "anomaly": int(anomaly),
    }


def write_meta_json(root: str | Path, meta: Meta, filename: str = META_FILENAME) -> Path:
    """Write ``meta`` to ``<root>/<filename>`` atomically (temp file + rename).

    A killed run never leaves a truncated index that later looks valid.
    """
    root = Path(root)
    unknown = set(meta) - set(SPLITS)
    if unknown:
        raise ValueError(f"meta.json splits must be {SPLITS}, got extra keys {sorted(unknown)}")
    full = {split: meta.get(split, {}) for split in SPLITS}
    target = root / filename
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=root)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(full, handle, indent=4)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _resolve(root: Path, path: str) -> Path:
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    joined = root / candidate
    # Some published generators write root-prefixed relative paths ("data/mvtec/bottle/..."); accept
    # them when the plain join does not exist but the path itself does.
    if not joined.exists() and candidate.exists():
        return candidate.resolve()
    return joined


def read_meta_json(
    root: str | Path,
    *,
    split: str,
    source: str,
    categories: list[str] | None = None,
    filename: str = META_FILENAME,
) -> SampleTable:
    """Read one split of ``<root>/meta.json`` into a ``SampleTable`` with absolute paths.

    Split keys are matched case-insensitively (one published generator writes ``"Test"``).
    A ``mask_path`` that is empty or names a directory means "no mask".
    """
    root = Path(root).resolve()
    with open(root / filename) as handle:
        meta = json.load(handle)
    by_split = {str(key).lower(): value for key, value in meta.items()}
    if split not in by_split:
        raise KeyError(f"{root / filename} has no '{split}' split (has {sorted(by_split)})")
    per_category: dict[str, list[Record]] = by_split[split] or {}
    wanted = list(per_category) if categories is None else list(categories)
    samples = []
    for category in wanted:
        for record in per_category.get(category, []):
            mask = record.get("mask_path") or ""
            mask_path = _resolve(root, mask) if mask else None
            if mask_path is not None and mask_path.is_dir():
                mask_path = None
            samples.append(
                Sample(
                    image_path=_resolve(root, record["img_path"]),
                    mask_path=mask_path,
                    category=record.get("cls_name", category),
                    label=int(record["anomaly"]),
                    split=split,
                    source=source,
                    defect=record.get("specie_name", "") or "",
                )
            )
    return SampleTable(samples)
