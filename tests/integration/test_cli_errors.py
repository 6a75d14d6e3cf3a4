"""The command line as a user meets it: user errors and signals end in one ``error:`` line, with a
non-zero status and nothing that looks complete left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .cli import run_cli


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr
    return lines[-1]


def test_a_bad_category_fails_before_any_compute_with_the_message_and_the_fix(tmp_path, data_dir):
    args = ["-m", "anomret.train", "+experiment=demo", "dataset.categories=[pill,nope]", "logger=none"]
    result = run_cli(args, tmp_path, data_dir=data_dir, check=False)
    assert result.returncode == 1
    line = _error_line(result)
    assert (
        "dataset 'synthetic_a' has no category ['nope']" in line
        and "Fix: pick categories from that list" in line
    )
    assert not list(tmp_path.rglob("*.safetensors")), "no bank is built for a run that cannot be evaluated"

    debug = run_cli(args, tmp_path, data_dir=data_dir, env={"ANOMRET_DEBUG": "1"}, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UnknownCategoryError" in debug.stderr


def test_a_launcher_plugin_that_is_not_installed_is_named_before_hydra_starts(tmp_path):
    result = run_cli(
        ["-m", "anomret.train", "-m", "+experiment=demo", "hydra/launcher=ray", "seed=1,2"],
        tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert _error_line(result).startswith(
        "error: hydra/launcher=ray needs the Hydra plugin package hydra-ray-launcher"
    )
    assert "pip install hydra-ray-launcher" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_config_mistakes_are_one_line_each(tmp_path):
    cases = {
        (
            "anomret.train",
            "+experiment=demo",
            "+model.top_k_ration=0.1",
        ): "did you mean model.score.top_k_ratio?",
        (
            "anomret.train",
            "+experiment=demo",
            "retrieval=spatial",
        ): "uses 'softmax' retrieval but retrieval=spatial",
        ("anomret.eval", "+experiment=demo_mrad_ft"): "needs its trained parts (ckpt_path=)",
        ("anomret.append", "+experiment=demo", "memory.path=bank.safetensors"): "anomret.append extends RAD",
        ("anomret.train", "dataset=nope"): "Could not find 'dataset/nope'",
    }
    for (module, *args), expected in cases.items():
        # Python lists every module it imports: a config mistake is answered before torch is imported.
        result = run_cli(["-m", module, *args], tmp_path, check=False, env={"PYTHONPROFILEIMPORTTIME": "1"})
        imported = {
            line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if "import time:" in line
        }
        assert "anomret.contracts" in imported or "dataset=nope" in args, args
        assert "torch" not in imported and "lightning" not in imported, args
        result.stderr = "\n".join(line for line in result.stderr.splitlines() if "import time:" not in line)
        assert result.returncode == 1, (args, result.stderr)
        line = _error_line(result)
        assert expected in line, (args, line)
        assert "Error executing job" not in result.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


def _start(args: list[str], cwd: Path, data_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("ANOMRET_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", ANOMRET_DATA_DIR=str(data_dir))
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _signal_when(process: subprocess.Popen, marker: str, signum: int) -> str:
    """Send ``signum`` once ``marker`` appears in the output; returns the whole output."""
    seen: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(0.5)  # inside the pass, not at its first line
            process.send_signal(signum)
            break
    rest, _ = process.communicate(timeout=300)
    return "".join(seen) + rest


def test_sigterm_during_the_test_pass_of_an_eval_exits_143_with_one_line_and_no_results(tmp_path, data_dir):
    bank = tmp_path / "bank.safetensors"
    run_cli(
        ["-m", "anomret.train", "+experiment=demo", "logger=none", f"memory.path={bank}"],
        tmp_path,
        data_dir=data_dir,
    )
    out = tmp_path / "eval"
    args = [
        "-m",
        "anomret.eval",
        "+experiment=demo",
        f"memory.path={bank}",
        "data.eval_batch_size=1",
        f"hydra.run.dir={out}",
    ]
    process = _start(args, tmp_path, data_dir)
    output = _signal_when(process, "scoring the", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert output.strip().splitlines()[-1] == (
        "error: the run was stopped by SIGTERM; its results were not written (rerun it to complete it)"
    )
    assert "Traceback" not in output
    assert not (out / "results.json").exists() and not (out / "artifacts.json").exists()


def test_sigint_during_job_0_of_a_sweep_stops_the_sweep_naming_the_job(tmp_path, data_dir):
    args = [
        "-m",
        "anomret.train",
        "-m",
        "+experiment=demo",
        "logger=none",
        "data.eval_batch_size=1",
        "model.score.top_k_ratio=0.01,0.02",
    ]
    process = _start(args, tmp_path, data_dir)
    output = _signal_when(process, "scoring the", signal.SIGINT)
    assert process.returncode == 128 + signal.SIGINT, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(
        "error: job 0 (+experiment=demo,logger=none,data.eval_batch_size=1,model.score.top_k_ratio=0.01) of the sweep in "
    )
    assert last.endswith("was stopped by SIGINT; its results were not written (rerun it to complete it)")
    (sweep,) = (tmp_path / "logs" / "demo").glob("train-multirun/*")
    assert not list(sweep.rglob("results.json")) and not (sweep / "1").exists(), "job 1 never started"
