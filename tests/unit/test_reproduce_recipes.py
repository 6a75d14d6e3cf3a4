"""The reproduction recipes name real experiments and real config keys.

Each script in ``experiments/reproduce/`` runs with its default settings and a recording ``python`` first
on ``PATH``: every ``anomret.train`` call it would make is expanded into its sweep's jobs (as Hydra's basic
sweeper does) and the first and last job are composed and validated like a real run. A key that a method's
config does not have, or an experiment that does not exist, fails here instead of after hours of compute.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from anomret.contracts import Purpose, check_config

RECIPES = Path(__file__).parents[2] / "experiments" / "reproduce"
SCRIPTS = sorted(RECIPES.glob("*.sh"))

# The recipes are shell scripts: they run as processes.
pytestmark = pytest.mark.integration

RECORDER = """#!{python}
import json, sys
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def recorded_calls(script: Path, tmp_path: Path) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    recorder = bin_dir / "python"
    recorder.write_text(RECORDER.format(python=sys.executable, log=str(log)))
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [shutil.which("bash"), str(script), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_every_table_has_a_script():
    assert {script.stem for script in SCRIPTS} >= {
        "mrad_table1",
        "mrad_table2_bias",
        "rad_table1",
        "rad_fewshot",
        "rad_data_scaling",
        "rad_ablation_a4",
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.stem for script in SCRIPTS])
def test_recipe_composes_into_valid_runs(script, tmp_path, compose_config):
    calls = recorded_calls(script, tmp_path)
    trains = [call[2:] for call in calls if call[:2] == ["-m", "anomret.train"]]
    reports = [call for call in calls if call[:2] == ["-m", "anomret.report"]]
    assert trains and reports, f"{script.name} runs no training or no report"
    for arguments in trains:
        overrides = [a for a in arguments if a != "-m" and not a.startswith("hydra.")]
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        for job in {0: jobs[0], -1: jobs[-1]}.values():
            cfg = compose_config(list(job))
            check_config(cfg, Purpose.TRAIN)
