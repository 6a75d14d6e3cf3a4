"""Index a downloaded benchmark: write ``ROOT/meta.json`` from the dataset's published folder layout.

Usage::

    python -m anomret.data.prepare NAME ROOT [--force] [--dry-run]
    python -m anomret.data.prepare --list

NAME is one of ``DATASETS`` (case-insensitive): mvtec, visa, btad, mpdd, dtd, sdd, ksdd2, dagm,
headct, brainmri, br35h, isic, colondb, clinicdb, kvasir, endo, realiad, 3dadam; or ``folder`` for any
folder in MVTec layout with categories of any name (your own images). The index has the AnomalyCLIP/MRAD
format (:mod:`anomret.data.meta`), so the official codes can read it too. Nothing is copied,
converted or re-binarised: records point at the published files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from anomret.cli import user_errors
from anomret.data.datasets import DATASETS, READERS, DatasetSpec, get_spec
from anomret.data.errors import DataError, DatasetNotFoundError, UnknownDatasetError
from anomret.data.meta import META_FILENAME, SPLITS, Meta, write_meta_json

__all__ = ["DATASETS", "READERS", "build_meta", "main", "prepare", "resolve_spec", "summarize"]

log = logging.getLogger(__name__)


def resolve_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (case-insensitive, aliases accepted)."""
    spec = get_spec(name)
    if spec is None:
        raise UnknownDatasetError(
            f"unknown dataset '{name}'; the prepare command knows: {', '.join(READERS)}.\n"
            "Fix: use one of those names; for your own images in MVTec layout (any category names) use "
            "'folder': python -m anomret.data.prepare folder ROOT."
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
    return _prepare(name, root, force)[0]


def _prepare(name: str, root: str | Path, force: bool) -> tuple[Path, Meta]:
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


def _list_datasets() -> str:
    lines = []
    for spec in READERS.values():
        flags = ", ".join(
            flag for flag, on in (("masks", spec.has_masks), ("train split", spec.has_train_split)) if on
        )
        lines.append(
            f"{spec.name:<9} {spec.title}  [{flags or 'image labels only'}]\n          {spec.download}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    with user_errors(hydra=False):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anomret.data.prepare",
        description="Write ROOT/meta.json for a downloaded anomaly-detection benchmark.",
        epilog=f"datasets: {', '.join(READERS)} (--list shows layouts and download links)",
    )
    parser.add_argument("name", nargs="?", help="dataset name (case-insensitive)")
    parser.add_argument("root", nargs="?", help="the dataset folder, as extracted from its archive")
    parser.add_argument("--force", action="store_true", help="overwrite an existing meta.json")
    parser.add_argument("--dry-run", action="store_true", help="index and print the summary, write nothing")
    parser.add_argument("--list", action="store_true", help="list the known datasets and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.list:
        print(_list_datasets())
        return 0
    if args.name is None or args.root is None:
        parser.error("NAME and ROOT are required (or --list)")
    try:
        spec = resolve_spec(args.name)
        root = Path(args.root).expanduser()
        if args.dry_run:
            meta = build_meta(spec.name, root)
            print(f"{spec.title} at {root} (dry run, nothing written)")
        else:
            target, meta = _prepare(spec.name, root, force=args.force)
            print(f"{spec.title}: wrote {target}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summarize(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
