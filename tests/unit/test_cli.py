"""User errors at the command line: the message and its fix, a traceback only when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomret.cli import user_errors
from anomret.data.errors import UnknownCategoryError


def test_a_user_error_prints_its_message_and_exits_1(capsys):
    with pytest.raises(SystemExit) as info, user_errors(hydra=False):
        raise UnknownCategoryError("dataset 'x' has no category ['nope'].\nFix: pick one of [a, b].")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'x' has no category ['nope'].\nFix: pick one of [a, b].")
    assert "ANOMRET_DEBUG=1" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_debug_keeps_every_error(monkeypatch):
    with pytest.raises(KeyError), user_errors(hydra=False):
        raise KeyError("a bug, not a user error")
    monkeypatch.setenv("ANOMRET_DEBUG", "1")
    with pytest.raises(ValueError), user_errors(hydra=False):
        raise ValueError("shown with its traceback")


def test_hydra_is_told_to_pass_errors_through_only_inside(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with user_errors():
        assert os.environ["HYDRA_FULL_ERROR"] == "1"
    assert "HYDRA_FULL_ERROR" not in os.environ


def _train(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("ANOMRET_DEBUG", "HYDRA_FULL_ERROR")}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "anomret.train", *args],
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, time.perf_counter() - started


def test_train_with_a_bad_category_fails_in_seconds_with_the_message_first(tmp_path):
    cache = tmp_path / "cache"
    args = ["+experiment=demo", "dataset.categories=[pill,nope]", "logger=none"]
    result, seconds = _train(args, tmp_path, ANOMRET_CACHE_DIR=str(cache))
    assert result.returncode == 1
    assert "error: dataset 'synthetic_a' has no category ['nope']" in result.stderr
    assert "Fix: pick categories from that list" in result.stderr
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr
    assert not list(cache.rglob("*.safetensors")), "no bank is built for a run that cannot be evaluated"
    assert seconds < 60

    result, _ = _train(args, tmp_path, ANOMRET_CACHE_DIR=str(cache), ANOMRET_DEBUG="1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "UnknownCategoryError" in result.stderr


def test_a_launcher_plugin_that_is_not_installed_is_named_before_hydra_starts(tmp_path):
    result, _ = _train(["-m", "+experiment=demo", "hydra/launcher=ray", "seed=1,2"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: hydra/launcher=ray needs the Hydra plugin package hydra-ray-launcher"
    )
    assert "pip install hydra-ray-launcher" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()
