"""The GPU benchmark at reduced shapes on CPU, as a user runs it: every step finishes and reports, so the
script cannot rot between the GPU runs it is written for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "experiments" / "benchmarks" / "bench_gpu.py"


def test_every_step_runs_at_reduced_shapes_and_the_report_has_every_section(tmp_path, data_dir):
    work = tmp_path / "work"
    command = [sys.executable, str(BENCH), "--device", "cpu", "--out", str(tmp_path), "--work", str(work)]
    done = subprocess.run(
        [*command, "--budget", "1200"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "ANOMRET_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    assert "Not measured" not in report and "not measured" not in report, report
    for section in ("## 1. RAD", "## 2. MRAD-TF", "## 3. MRAD-FT", "## 4. The windowed kernel"):
        assert section in report

    rad = json.loads((work / "rad.json").read_text())
    assert [(run["k"], run["placement"]) for run in rad["runs"]] == [
        (4, "device"),
        (12, "device"),
        (4, "stream"),
    ]
    assert all(run["speedup_vs_official"] > 0 and run["test_vs_encoder"] > 0 for run in rad["runs"])
    mrad = json.loads((work / "mrad_tf.json").read_text())
    # The transcription of the official loop scores the images as anomret does.
    assert mrad["exact_vs_official_max_abs_diff"] < 1e-5
    assert {(run["policy"], run["batch"]) for run in mrad["runs"]} == {
        (p, b) for p in ("exact", "fast") for b in (1, 4)
    }
    for method in ("ft", "clip"):
        epochs = json.loads((work / f"{method}.json").read_text())["epochs"]
        assert epochs[0]["encoded"] > 0 and epochs[1]["encoded"] == 0, method  # epoch 2 reads the tier
    assert "| torch |" in json.loads((work / "kernel.json").read_text())["table"]
