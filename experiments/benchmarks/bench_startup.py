"""How long each command takes before it answers: --help, --cfg job, a config error, a report, a run's start.

Every command runs as a user types it, in a fresh process from a scratch directory, several times; the
table gives the median and the fastest of the wall-clock times. "first output" of a run is the time from
starting the process to its first line about the data (the run has composed its config, imported what it
needs and built its encoder), the start-up a user waits through before any progress bar.

    python experiments/benchmarks/bench_startup.py [--repeats 5] [--out experiments/benchmarks/startup.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # sibling module: run these scripts as files

QUICK = [
    ("train --help", ["-m", "anomret.train", "--help"]),
    ("eval --help", ["-m", "anomret.eval", "--help"]),
    ("predict --help", ["-m", "anomret.predict", "--help"]),
    ("append --help", ["-m", "anomret.append", "--help"]),
    ("analysis.similarity --help", ["-m", "anomret.analysis.similarity", "--help"]),
    ("prepare --help", ["-m", "anomret.prepare", "--help"]),
    ("report --help", ["-m", "anomret.report", "--help"]),
    ("export --help", ["-m", "anomret.export", "--help"]),
    ("serve --help", ["-m", "anomret.serve", "--help"]),
    ("export RUN OUT (no such run directory)", ["-m", "anomret.export", "no-such-run", "out"]),
    ("serve PACKAGE (not a model package)", ["-m", "anomret.serve", "no-such-package"]),
    ("train +experiment=demo --cfg job", ["-m", "anomret.train", "+experiment=demo", "--cfg", "job"]),
    ("train dataset=nope (config error)", ["-m", "anomret.train", "dataset=nope"]),
    (
        "train +model.top_k_ration=0.1 (setting typo)",
        ["-m", "anomret.train", "+experiment=demo", "+model.top_k_ration=0.1"],
    ),
    ("eval +experiment=demo_mrad_ft (no checkpoint)", ["-m", "anomret.eval", "+experiment=demo_mrad_ft"]),
]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def time_command(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, check=False)
    return time.perf_counter() - started


def time_to_first_output(args: list[str], cwd: Path, marker: str) -> float:
    """Seconds until ``marker`` appears in the output; the process is then stopped."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if marker in line:
            elapsed = time.perf_counter() - started
            process.terminate()
            process.communicate()
            return elapsed
    raise RuntimeError(f"{' '.join(args)} ended without printing {marker!r}")


def _finished_run(root: Path) -> Path:
    """A run directory as anomret.train leaves it (what anomret.report reads), without running one."""
    run = root / "logs" / "demo" / "train" / "2026-01-01_00-00-00_000000"
    run.mkdir(parents=True)
    metrics = ["image_auroc", "image_ap", "pixel_auroc"]
    categories = {c: {m: 0.5 for m in metrics} | {"n_images": 14, "n_anomalous": 8} for c in ("a", "b")}
    results = {
        "metrics": metrics,
        "categories": categories,
        "mean": {m: 0.5 for m in metrics},
        "settings": {},
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def _finished_sweep(root: Path) -> Path:
    """A real four-job sweep of the RAD demo (run once, not timed): what ``anomret.report`` reads and plots."""
    sweep = root / "sweep"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "anomret.train",
            "-m",
            "+experiment=demo_rad",
            "retrieval.k=4,8",
            "retrieval.rho=0,1",
            "logger=none",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=root,
        env=_env(),
        check=True,
        capture_output=True,
    )
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("startup.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        cwd = Path(scratch)
        commands = [
            *QUICK,
            ("report DIR (a finished run)", ["-m", "anomret.report", str(_finished_run(cwd))]),
            (
                "report DIR (a four-job sweep: page and plots)",
                ["-m", "anomret.report", str(_finished_sweep(cwd))],
            ),
        ]
        for name, command in commands:
            times = [time_command(command, cwd) for _ in range(args.repeats)]
            rows.append((name, statistics.median(times), min(times)))
            print(f"{name}: median {rows[-1][1]:.2f} s, fastest {rows[-1][2]:.2f} s", flush=True)
        run = ["-m", "anomret.train", "+experiment=demo", "logger=none"]
        times = [time_to_first_output(run, cwd, "evaluation source:") for _ in range(args.repeats)]
        rows.append(("train +experiment=demo: first output", statistics.median(times), min(times)))
        print(f"{rows[-1][0]}: median {rows[-1][1]:.2f} s", flush=True)
    lines = [
        "# Start-up: how long each command takes before it answers",
        "",
        "Measured by `experiments/benchmarks/bench_startup.py` (each command in a fresh process from a scratch "
        f"directory, {args.repeats} times). Machine: {describe_machine()}.",
        "",
        "| command | median (s) | fastest (s) |",
        "|---|---:|---:|",
        *(f"| `{name}` | {median:.2f} | {fastest:.2f} |" for name, median, fastest in rows),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
