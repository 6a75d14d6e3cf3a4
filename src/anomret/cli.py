"""How the command-line entry points end: a user error or a signal is one ``error:`` line, never a traceback.

Wrong input (a missing dataset, a bad setting, a foreign bank, a typo in an override) is answered with the
error's own message, which says what is wrong and how to fix it, and exit status 1. A traceback helps
only when the error is a bug, so it is shown with ``ANOMRET_DEBUG=1`` (or Hydra's own
``HYDRA_FULL_ERROR=1``) and for errors that are not user errors.

SIGTERM (what SLURM sends on pre-emption or at the time limit) and SIGINT (Ctrl-C) stop a run where it is,
with one line that says which run or sweep job was stopped and that its results were not written, and the
conventional status 128 + signal number (143, 130). Results, banks, checkpoints and feature-store entries
are all written atomically, so nothing that looks complete is left behind.

This module is imported by every entry point before anything else, so it imports nothing heavy.

Every entry point runs inside :func:`user_errors`::

    def main() -> None:
        with user_errors():
            hydra_task()
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO

# Set beside HYDRA_FULL_ERROR when this module set it, so that processes started from this one (DDP
# ranks) do not take it for the user's request for tracebacks.
_PASSED_ON = "ANOMRET_HYDRA_FULL_ERROR_SET"
# Hydra writes this line to stderr before re-raising a job's error; the job is named in our own line.
_HYDRA_JOB_ERROR = "Error executing job with overrides: "


class RunInterrupted(BaseException):
    """The run was stopped by a signal (a BaseException, as KeyboardInterrupt: no ``except Exception``
    in between may swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.job = _current_job()
        super().__init__(signal.Signals(signum).name)


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def debugging() -> bool:
    """The user asked for tracebacks: ``ANOMRET_DEBUG=1`` or their own ``HYDRA_FULL_ERROR=1``."""
    return _set("ANOMRET_DEBUG") or (_set("HYDRA_FULL_ERROR") and not _set(_PASSED_ON))


# Errors that mean "your input is wrong", each raised with a message that says how to fix it, by module.
# ValueError and OSError cover the constructors' range checks and missing or unreadable files.
_USER_ERRORS = (
    ("anomret.data.errors", "DataError"),
    ("anomret.plugins", "MissingPluginError"),
    ("anomret.memory.store", "BankError"),
    ("anomret.models.checkpoint", "CheckpointError"),
    ("anomret.encoders.weights", "WeightsUnavailableError"),
    ("hydra.errors", "HydraException"),
    ("omegaconf.errors", "OmegaConfBaseException"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The user-error classes, from the modules already imported: an error of a class whose module was
    never imported cannot have been raised, and reporting a typo must not wait for torch to import."""
    found: list[type[BaseException]] = [ValueError, OSError]
    for module, name in _USER_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def _current_job() -> str | None:
    """``job N (overrides)`` of a running multirun, ``None`` outside a sweep."""
    if "hydra" not in sys.modules:
        return None
    from anomret.config import sweep_job_config

    config = sweep_job_config()
    if config is None:
        return None
    overrides = ",".join(config.overrides.task) or "no overrides"
    return f"job {config.job.num} ({overrides}) of the sweep in {config.sweep.dir}"


def describe(error: BaseException, job: str | None = None) -> str:
    """``error: <message>`` on one line, with the error Hydra wraps and the sweep job it happened in."""
    # Hydra appends its config search path to composition errors: not what the user needs to read.
    message = " ".join(str(error).split("\nConfig search path")[0].split()) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in str(error):
        message += ": " + " ".join(str(cause).split())
    return f"error: {job}: {message}" if job else f"error: {message}"


def describe_interruption(interrupted: RunInterrupted) -> str:
    where = interrupted.job or "the run"
    return (
        f"error: {where} was stopped by {signal.Signals(interrupted.signum).name}; its results were not "
        "written (rerun it to complete it)"
    )


_HANDLER_PID: list[int] = []  # the process that installed the handler (forked workers inherit it)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if _HANDLER_PID and os.getpid() != _HANDLER_PID[-1]:
        # A forked DataLoader worker: end as the signal ends a process, the run reports it.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise RunInterrupted(signum)


class _StderrWithoutHydraJobLine:
    """stderr, less Hydra's "Error executing job with overrides" line (the job goes into our ``error:``)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith(_HYDRA_JOB_ERROR):
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def user_errors(hydra: bool = True) -> Iterator[None]:
    """Report user errors and signals as one ``error:`` line on stderr and exit with a non-zero status.

    Args:
        hydra: the body runs a ``@hydra.main`` task. Hydra prints a trimmed traceback of any error
            itself; it is told to pass errors through instead (as ``HYDRA_FULL_ERROR=1`` does), so that
            they reach this handler whole.
    """
    debug = debugging()
    set_here = hydra and not _set("HYDRA_FULL_ERROR")
    if set_here:
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_PASSED_ON] = "1"
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    _HANDLER_PID.append(os.getpid())
    for signum in previous:
        signal.signal(signum, _raise_interrupted)
    stderr = sys.stderr
    if hydra and not debug:
        sys.stderr = _StderrWithoutHydraJobLine(stderr)
    try:
        if hydra:
            # -v / --verbose is the run's verbose=true (Hydra itself takes no such flag).
            verbose = [arg for arg in sys.argv[1:] if arg in ("-v", "--verbose")]
            if verbose:
                sys.argv[1:] = [arg for arg in sys.argv[1:] if arg not in verbose] + ["verbose=true"]
            # Before Hydra composes: a launcher or sweeper plugin that is not installed is named with
            # the package to install, instead of Hydra's "Could not find 'hydra/launcher/...'".
            from anomret.plugins import check_hydra_plugins

            check_hydra_plugins(sys.argv[1:])
        yield
    except RunInterrupted as interrupted:
        sys.stderr = stderr
        print(describe_interruption(interrupted), file=stderr, flush=True)
        raise SystemExit(128 + interrupted.signum) from None
    except Exception as error:  # SystemExit (--help, a finished sweep) passes; user errors are named
        if debug or not isinstance(error, user_error_types()):
            raise
        sys.stderr = stderr
        stderr.flush()
        print(describe(error, _current_job()), file=stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        sys.stderr = stderr
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _HANDLER_PID.pop()
        if set_here:
            os.environ.pop("HYDRA_FULL_ERROR", None)
            os.environ.pop(_PASSED_ON, None)


def answer_help(doc: str | None, command: str) -> None:
    """``-h``/``--help``: what the command does, its config groups and their options, how to see more;
    printed from the config folder's listing (Hydra's own help composes every group, seconds of work)."""
    if not any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        return
    from anomret.config import config_dir

    root = config_dir()
    groups = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("hydra",))
    lines = [
        f"usage: python -m anomret.{command} [-m] [+experiment=NAME] [GROUP=OPTION ...] [KEY=VALUE ...] [-v]",
        "",
        (doc or "").strip(),
        "",
        "config groups (GROUP=OPTION; +experiment=NAME picks a whole recipe):",
    ]
    for group in groups:
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        if options:
            prefix = "+" if group in ("experiment", "variant", "hparams_search") else ""
            lines.append(f"  {prefix}{group}: {', '.join(options)}")
    lines += [
        "",
        "options:",
        "  -m, --multirun      a sweep: one job per combination of comma-separated values",
        "  -v, --verbose       everything the libraries print, and anomret's debug lines",
        "  --cfg job           print the composed config and exit (add --resolve to resolve it)",
        "  --info              Hydra's view of the config search path and defaults",
        "  --hydra-help        Hydra's own options (launchers, sweepers, output directories)",
        "",
        f"configs: {root}   docs: README.md",
    ]
    print("\n".join(lines))
    raise SystemExit(0)
