"""``python -m anomret.report DIR [DIR ...]``: one table (CSV, markdown, rich), plots and a report page.

A DIR is a multirun directory, one run directory, or any folder above them: every ``results.json`` below it
is a job, and every job without one is listed as missing (:mod:`anomret.reporting.sweep`). It writes
``report.csv``, ``report.md``, plots and ``report.html`` (:mod:`anomret.reporting.page`) into DIR (or
``--out``) and prints the table, fitted to the console. Nothing on this path imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from anomret.cli import user_errors
from anomret.reporting.sweep import ReportError, print_report, write_report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    with user_errors(hydra=False):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anomret.report",
        description="Gather the results.json of a sweep's jobs (or of several runs) into one table, plots "
        "and a report page (report.html).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a multirun directory, or run directories")
    parser.add_argument(
        "--out", help="where to write report.csv, report.md, plots/ and report.html (default: DIR)"
    )
    parser.add_argument("--per-category", action="store_true", help="also one row per job and category")
    parser.add_argument("--paper", action="store_true", help="MRAD Table 1 layout of a sweep over dataset=")
    parser.add_argument("--allow-mixed", action="store_true", help="allow jobs of different methods")
    parser.add_argument(
        "--no-plots", action="store_true", help="tables and pages without the sweep plots (quickest)"
    )
    args = parser.parse_args(argv)

    try:
        report, table, out, written = write_report(
            args.dirs,
            args.out,
            per_category=args.per_category,
            plots=not args.no_plots,
            allow_mixed=args.allow_mixed,
            paper=args.paper,
        )
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # Console() is as wide as the terminal, or 80 columns (COLUMNS) when piped: the tables fit it.
    console = Console()
    print_report(console, report, table, args.per_category, out)
    # Paths are never broken across lines, even when they are wider than the console.
    console.print(f"wrote {len(written)} file(s) to {out}", soft_wrap=True)
    console.print(f"report page: {out / 'report.html'}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
