"""``python -m anomret.prepare NAME ROOT``: index a downloaded benchmark (or your own folder) as ``meta.json``.

Usage::

    python -m anomret.prepare NAME ROOT [--force] [--dry-run]
    python -m anomret.prepare --list

NAME is a benchmark (mvtec, visa, btad, mpdd, dtd, sdd, ksdd2, dagm, headct, brainmri, br35h, isic, colondb,
clinicdb, kvasir, endo, realiad, 3dadam) or ``folder`` for any folder in MVTec layout with categories of
any name (:mod:`anomret.data.prepare` does the work).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from anomret.cli import user_errors
from anomret.data.datasets import READERS
from anomret.data.errors import DataError
from anomret.data.prepare import build_meta, prepare_meta, resolve_spec, summarize


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
        prog="python -m anomret.prepare",
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
            target, meta = prepare_meta(spec.name, root, force=args.force)
            print(f"{spec.title}: wrote {target}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summarize(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
