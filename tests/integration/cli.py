"""The one way the integration tests run an entry point: as a user types it, a new process in a fresh
working directory, with only the documented environment (offline hub and W&B, the shared data folder)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path


def run_cli(
    args: list[str],
    cwd: Path,
    *,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd`` (``args`` start with ``-m anomret.<entry point>``); asserts success when
    ``check``. ``data_dir``: where the synthetic data already is (``ANOMRET_DATA_DIR``), else generated."""
    environment = {k: v for k, v in os.environ.items() if k not in ("ANOMRET_DEBUG", "HYDRA_FULL_ERROR")}
    environment.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    if data_dir is not None:
        environment["ANOMRET_DATA_DIR"] = str(data_dir)
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# What a normal run must not print: the libraries' hints, warnings and deprecations, Lightning's own
# copies of log lines, Hydra's line before an error, and warnings of anomret's beyond the random-weights one.
_NOISE = re.compile(
    r"Warning: |[Dd]eprecat|💡|Tip:|Error executing job|`weights_only`|\]\[root\]\[|anonymous setting"
    r"|^INFO: |^WARNING: |\]\[WARNING\]"
)
_EXPECTED = re.compile(r"\]\[anomret\.encoders\.weights\]\[WARNING\] - encoder \w+ uses RANDOM weights")


def unexpected_lines(output: str) -> list[str]:
    """The lines of a command's output that a user should not have to read past (see ``_NOISE``)."""
    return [line for line in output.splitlines() if _NOISE.search(line) and not _EXPECTED.search(line)]


def free_port() -> int:
    """A loopback port free at the time of asking (for a DDP rendezvous or a service)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
