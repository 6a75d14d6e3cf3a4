"""The configs ship inside the wheel, so a non-editable install finds and composes them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_configs_are_found_from_an_installed_wheel(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(REPO)],
        check=True,
        timeout=600,
    )
    wheel = next(dist.glob("anomret-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "anomret/conf/config.yaml",
        "anomret/conf/eval.yaml",
        "anomret/conf/experiment/demo.yaml",
    } <= names

    # An unpacked wheel is what a non-editable install puts in site-packages; it comes first on the path.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env.pop("ANOMRET_CONFIG_DIR", None)
    located = subprocess.run(
        [sys.executable, "-c", "import anomret.config as c; print(c.__file__); print(c.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert located == [str(site / "anomret" / "config.py"), str(site / "anomret" / "conf")]
    composed = subprocess.run(
        [sys.executable, "-m", "anomret.train", "+experiment=demo", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "name: tiny_clip" in composed.stdout and "name: synthetic_a" in composed.stdout


def test_config_dir_can_be_overridden(tmp_path, monkeypatch):
    from anomret.config import config_dir

    (tmp_path / "config.yaml").write_text("defaults: []\n")
    monkeypatch.setenv("ANOMRET_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    monkeypatch.setenv("ANOMRET_CONFIG_DIR", str(tmp_path / "missing"))
    assert config_dir() == REPO / "conf"  # falls back to the clone's configs
