"""A Hydra callback that reports a sweep when its last job has finished (``hydra.callbacks`` in
``conf/hydra/default.yaml``).

At the end of a multirun it writes the sweep's report (``report.csv``, ``report.md`` and ``report.html``,
whose plots are inside the page: the sweep directory gains no folder beside its jobs), prints the table,
and ends with one line that names the sweep directory and the command that reports it again. With a launcher that runs jobs
elsewhere (SLURM), it runs where the sweep was started, once the launcher has collected the jobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReportCallback(Callback):
    """Writes and prints the sweep report at the end of a multirun (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rich.console import Console

        from anomret.reporting.sweep import RESULTS, ReportError, print_report, report_command, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        console = Console()
        if not any(sweep_dir.rglob(RESULTS)):
            # An entry point without results (predict, append): the sweep's outputs are its jobs' own.
            print(f"sweep finished: {sweep_dir}", flush=True)
            return
        try:
            # No plots/ folder: the page holds its plots, and the sweep directory keeps only its jobs' folders.
            report, _, out, _ = write_report([sweep_dir], plot_files=False)
        except ReportError as error:
            log.warning("the sweep report was not written: %s", error)
        else:
            print_report(console, report, out_dir=out)
        # The last line of the sweep: where it went and how to report it again.
        print(f"sweep finished: {sweep_dir}; report: {report_command(sweep_dir)}", flush=True)
