"""DDP inside Hydra runs and sweeps: how Lightning starts the other processes of one job.

Lightning's DDP launcher starts ranks 1..n-1 by re-running the command line with ``hydra.run.dir`` set.
Inside a multirun that re-runs the whole sweep (``-m`` and every swept value are still on the command
line) and points the processes at the single-run directory instead of the job's: the known
"multirun + DDP" pitfall. :func:`use_job_command_for_ddp` makes Lightning start them with the *job's own*
overrides instead, as a single run in the job's output directory, so a sweep whose jobs use
``trainer=ddp`` (or ``ddp_cpu``) runs each job once, with all its processes in that job's directory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts DDP process ``local_rank`` of the current Hydra job, and its cwd."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    config = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    if config.mode == RunMode.MULTIRUN:
        command += list(config.overrides.task)  # this job's values, not the sweep
    else:
        command += sys.argv[1:]
    command += [
        f"hydra.run.dir={config.runtime.output_dir}",
        f"hydra.job.name={config.job.name}",
        "hydra.output_subdir=null",  # rank 0 writes the job's .hydra/ files
    ]
    return command, get_original_cwd()


def use_job_command_for_ddp() -> None:
    """Make Lightning's DDP launcher start a Hydra job's other processes with :func:`job_command`."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher

    # Each launcher module calls the function through its own name for it.
    if hasattr(fabric_launcher, "_hydra_subprocess_cmd"):
        fabric_launcher._hydra_subprocess_cmd = lambda local_rank: job_command(local_rank)
    if hasattr(pytorch_launcher, "_hydra_subprocess_cmd"):
        pytorch_launcher._hydra_subprocess_cmd = lambda local_rank: job_command(local_rank)


# Set by Lightning's launcher in the launching process; left set, they make the next job of a sweep
# believe its processes already exist.
_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class DistributedJob:
    """Brackets one run: afterwards the process group is closed and the launcher's variables restored,
    so the next job of a sweep starts its own DDP processes (the second half of the pitfall)."""

    def __enter__(self) -> DistributedJob:
        import os

        self._saved = {name: os.environ.get(name) for name in _LAUNCHER_VARIABLES}
        return self

    def __exit__(self, *exc: object) -> None:
        import os

        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        dist.destroy_process_group()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
