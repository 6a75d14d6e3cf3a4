"""Index a downloaded benchmark: write ``ROOT/meta.json`` from the dataset's published folder layout.

The command line is ``python -m anomret.prepare`` (:mod:`anomret.prepare`). NAME is one of ``DATASETS`` (case-insensitive): mvtec, visa, btad, mpdd, dtd, sdd, ksdd2, dagm,
headct, brainmri, br35h, isic, colondb, clinicdb, kvasir, endo, realiad, 3dadam; or ``folder`` for any
folder in MVTec layout with categories of any name (your own images). The index has the AnomalyCLIP/MRAD
format (:mod:`anomret.data.meta`), so the official codes can read it too. Nothing is copied,
converted or re-binarised: records point at the published files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from anomret.data.datasets import DATASETS, READERS, DatasetSpec, get_spec
from anomret.data.errors import DataError, DatasetNotFoundError, UnknownDatasetError
from anomret.data.meta import META_FILENAME, SPLITS, Meta, write_meta_json

__all__ = ["DATASETS", "READERS", "build_meta", "prepare", "prepare_meta", "resolve_spec", "summarize"]

log = logging.getLogger(__name__)


def resolve_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (case-insensitive, aliases accepted)."""
    spec = get_spec(name)
    if spec is None:
        raise UnknownDatasetError(
            f"unknown dataset '{name}'; the prepare command knows: {', '.join(READERS)}.\n"
            "Fix: use one of those names; for your own images in MVTec layout (any category names) use "
            "'folder': python -m anomret.prepare folder ROOT."
        )
    return spec


def build_meta(name: str, root: str | Path) -> Meta:
    """Index ``root`` as dataset ``name`` without writing anything."""
    spec = resolve_spec(name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset '{spec.name}': root {root} does not exist.\n"
            f"Expected layout:\n{spec.layout.rstrip()}\n"
            f"Download: {spec.download}\n"
            f"Fix: download and extract it there, then run: {spec.prepare_command(root)}"
        )
    return spec.read(root)


def prepare(name: str, root: str | Path, force: bool = False) -> Path:
    """Write ``root/meta.json`` for dataset ``name`` and return its path.

    Raises:
        DataError: an index exists already and ``force`` is False; or the layout does not fit
            (:class:`~anomret.data.errors.LayoutError`), or samples do not pair up
            (:class:`~anomret.data.errors.InvalidSampleError`).
    """
    return prepare_meta(name, root, force)[0]


def prepare_meta(name: str, root: str | Path, force: bool) -> tuple[Path, Meta]:
    spec = resolve_spec(name)
    root = Path(root).expanduser()
    target = root / META_FILENAME
    if target.exists() and not force:
        raise DataError(
            f"{target} already exists; not overwriting it.\n"
            f"Fix: pass --force (force=True) to re-index {spec.title}: {spec.prepare_command(root)} --force"
        )
    meta = build_meta(spec.name, root)
    try:
        return write_meta_json(root, meta), meta
    except OSError as error:
        raise DataError(
            f"cannot write {target}: {error.strerror or error}.\n"
            "Fix: the index must sit in ROOT because its paths are relative to ROOT; make ROOT writable, "
            "or build a writable tree of symbolic links to the files and index that instead."
        ) from error


def summarize(meta: Meta) -> str:
    """A table of normal / anomalous / with-mask counts per split and category, with totals."""
    header = ("split", "category", "normal", "anomalous", "with mask")
    rows: list[tuple[str, ...]] = []
    for split in SPLITS:
        per_category = meta.get(split) or {}
        totals = [0, 0, 0]
        for category, records in per_category.items():
            counts = [
                sum(1 for r in records if not r["anomaly"]),
                sum(1 for r in records if r["anomaly"]),
                sum(1 for r in records if r["mask_path"]),
            ]
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
            rows.append((split, category, *map(str, counts)))
        if len(per_category) > 1:
            rows.append((split, f"[all {len(per_category)}]", *map(str, totals)))
        if not per_category:
            rows.append((split, "(empty)", "0", "0", "0"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(header), *(line(row) for row in rows)])
