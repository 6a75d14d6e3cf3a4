"""The meta.json index format used by MRAD, AnomalyCLIP and AdaCLIP, read into a ``SampleTable``.

Layout of ``<root>/meta.json``::

    {"train": {category: [record, ...]}, "test": {category: [record, ...]}}

with records ``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Paths are relative
to ``root`` (root-prefixed paths, as some published scripts write them, are accepted too);
``mask_path`` is ``""`` for normal images and for datasets without pixel masks. Records that point
outside the root (``../``, absolute paths) are read as they are, with one warning: an index copied from
elsewhere often does that by mistake.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from anomret.data.errors import DataError, InvalidSampleError, SplitNotFoundError
from anomret.data.samples import Sample, SampleTable
from anomret.files import atomic_open

log = logging.getLogger(__name__)

META_FILENAME = "meta.json"
SPLITS = ("train", "test")

Record = dict[str, Any]
Meta = dict[str, dict[str, list[Record]]]


def make_record(img_path: str, mask_path: str, category: str, anomaly: int, defect: str = "") -> Record:
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
    with atomic_open(target, "w") as handle:
        json.dump(full, handle, indent=4)
    return target


def load_meta(root: str | Path, filename: str = META_FILENAME) -> Meta:
    """Read ``<root>/<filename>`` with split keys lower-cased (one published generator writes ``"Test"``).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: the file is not valid JSON or not ``{split: {category: [record, ...]}}``.
    """
    path = Path(root) / filename
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON ({error}).\n"
            "Fix: it was probably cut short by an interrupted write; regenerate it with "
            "python -m anomret.prepare NAME ROOT --force."
        ) from error
    if not isinstance(raw, dict) or not all(
        isinstance(per_category, dict | None) for per_category in raw.values()
    ):
        raise DataError(
            f"{path} is not a meta.json index: expected {{split: {{category: [record, ...]}}}} with splits "
            f"{SPLITS}.\nFix: regenerate it with python -m anomret.prepare NAME ROOT --force."
        )
    return {str(split).lower(): dict(per_category or {}) for split, per_category in raw.items()}


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


def _sample(
    root: Path, meta_path: Path, split: str, category: str, position: int, record: Any, source: str
) -> Sample:
    where = f"{meta_path}: {split}/{category} record {position}"
    if not isinstance(record, dict) or not record.get("img_path"):
        raise InvalidSampleError(
            f"{where} has no img_path: {record!r}.\n"
            "Fix: every record needs img_path, mask_path, cls_name, specie_name and anomaly (0 or 1)."
        )
    anomaly = record.get("anomaly")
    if anomaly in (0, 1, "0", "1", True, False):
        label = int(anomaly)
    else:
        raise InvalidSampleError(
            f"{where} ({record['img_path']}) has anomaly={anomaly!r}; it must be 0 (normal) or 1 (anomalous).\n"
            "Fix: correct the record in meta.json."
        )
    mask = record.get("mask_path") or ""
    mask_path = _resolve(root, mask) if mask else None
    if mask_path is not None and mask_path.is_dir():
        mask_path = None
    return Sample(
        image_path=_resolve(root, record["img_path"]),
        mask_path=mask_path,
        category=record.get("cls_name") or category,
        label=label,
        split=split,
        source=source,
        defect=record.get("specie_name", "") or "",
    )


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
    A ``mask_path`` that is empty or names a directory means "no mask". Categories not in the split
    yield no rows (:func:`anomret.data.sources.load_source` turns that into an error).

    Raises:
        SplitNotFoundError: the split is absent (also a ``KeyError``).
        InvalidSampleError: a record lacks ``img_path`` or has an ``anomaly`` other than 0/1.
    """
    root = Path(root).resolve()
    meta = load_meta(root, filename)
    split = split.lower()
    if split not in meta:
        raise SplitNotFoundError(
            f"{root / filename} has no '{split}' split (it has {sorted(meta)}).\n"
            "Fix: choose one of those splits, or regenerate the index with the prepare command."
        )
    per_category = meta[split]
    wanted = list(per_category) if categories is None else list(categories)
    samples = []
    for category in wanted:
        for position, record in enumerate(per_category.get(category) or []):
            samples.append(_sample(root, root / filename, split, category, position, record, source))
    _warn_outside(root, root / filename, split, samples)
    return SampleTable(samples)


def _warn_outside(root: Path, meta_path: Path, split: str, samples: list[Sample]) -> None:
    prefix = os.path.join(str(root), "")

    def outside(path: Path) -> bool:
        # Inside by the path as written (``..`` collapsed; the root may link to its data), or by where an
        # absolute path's links lead (it may name the root through another link).
        return not os.path.normpath(path).startswith(prefix) and not str(path.resolve()).startswith(prefix)

    outside_root = [
        path for sample in samples for path in (sample.image_path, sample.mask_path) if path and outside(path)
    ]
    if outside_root:
        log.warning(
            "%s: %d file(s) of the '%s' split lie outside the dataset root %s (e.g. %s); they are read as "
            "they are. If that is not intended, correct the paths in meta.json (relative to the root) or "
            "re-index the dataset with python -m anomret.prepare NAME ROOT --force.",
            meta_path,
            len(outside_root),
            split,
            root,
            outside_root[0],
        )
