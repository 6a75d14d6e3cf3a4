"""The wall-clock time of each demo as a user runs it, and of the test suite's tiers: the figures the README
states come from here.

Each demo runs as typed (``python -m anomret.train +experiment=NAME``) from a fresh directory whose data
folder already holds the synthetic data (generating it takes about a second), so a figure is the run
itself: start-up, memory pass, training where the method trains, test pass and outputs. ``--suite`` also
times ``make test-fast`` and ``make test`` from the repository (minutes; run it on an idle machine).

    python experiments/benchmarks/bench_demos.py [--repeats 1] [--suite] [--out experiments/benchmarks/demos.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # sibling module: run these scripts as files

DEMOS = ("demo", "demo_mrad_ft", "demo_mrad_clip", "demo_rad", "demo_rad_fewshot")
REPOSITORY = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def time_demo(name: str, data: Path) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "data").symlink_to(data)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "anomret.train", f"+experiment={name}"],
            cwd=scratch,
            env=_env(),
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


def time_make(target: str) -> float:
    started = time.perf_counter()
    subprocess.run(["make", target], cwd=REPOSITORY, env=_env(), check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--suite", action="store_true", help="also time make test-fast and make test")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("demos.md"))
    args = parser.parse_args()
    from anomret.data.synthetic import ensure_synthetic

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        ensure_synthetic(data / "synthetic")
        for name in DEMOS:
            times = [time_demo(name, data) for _ in range(args.repeats)]
            rows.append((f"python -m anomret.train +experiment={name}", statistics.median(times)))
            print(f"{name}: {rows[-1][1]:.0f} s", flush=True)
        shutil.rmtree(data)
    if args.suite:
        for target in ("test-fast", "test"):
            rows.append((f"make {target}", time_make(target)))
            print(f"make {target}: {rows[-1][1]:.0f} s", flush=True)
    lines = [
        "# Demos and the test suite: wall-clock time",
        "",
        f"Measured by `experiments/benchmarks/bench_demos.py{' --suite' if args.suite else ''}` "
        f"(median of {args.repeats}). Machine: {describe_machine()}.",
        "",
        "| command | seconds |",
        "|---|---:|",
        *(f"| `{name}` | {seconds:.0f} |" for name, seconds in rows),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
