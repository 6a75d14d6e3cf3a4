"""Who writes a bank, and from which state of it: the writers' lock, and one decision for every process.

A run that may write its bank (build it, or extend it with ``memory.append``) holds the bank's lock
(:mod:`anomret.locks`, ``.<bank>.lock`` beside it) from reading the file's state until every process has
opened the file it settled on: a second writer waits (``memory.lock_timeout_s``), then reads the bank
again, so it reuses a bank that appeared meanwhile, or extends the one it finds, instead of writing over
it. Under DDP only rank 0 takes the lock and reads the file; the others receive its decision, encode
their share, and open the file rank 0 wrote, so every process acts on the same state of the bank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from anomret.distributed import broadcast_from_zero
from anomret.locks import FileLock
from anomret.memory.base import MemorySettings

T = TypeVar("T")


def start_processes(trainer: Any) -> None:
    """Start a DDP run's other processes and join them now, as the Trainer's first call would.

    Lightning starts ranks 1..n-1 (by running the command again) at the first ``fit``/``predict``/``test``;
    the bank must be read before that, and the processes must share rank 0's reading of it, which needs
    their process group. A run of one process, or one whose processes exist already, is left alone.
    """
    import torch.distributed as dist
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    strategy = trainer.strategy
    if trainer.num_devices * trainer.num_nodes <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    if isinstance(strategy.launcher, _SubprocessScriptLauncher):
        strategy.launcher.launch(strategy.setup_environment, trainer=trainer)


def agreed(decide: Callable[[], T], leader: bool) -> T:
    """``decide()`` run by the ``leader`` (rank 0) only, its answer (or its error) shared with every process."""
    outcome: Any = None
    if leader:
        try:
            outcome = decide()
        except Exception as error:
            # The others raise it too instead of waiting for an answer.
            try:
                broadcast_from_zero(error)
            except Exception:  # an error that cannot be pickled: its message is enough for them
                broadcast_from_zero(RuntimeError(str(error)))
            raise
    outcome = broadcast_from_zero(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@contextmanager
def bank_writers_lock(path: str | Path, settings: MemorySettings, leader: bool) -> Iterator[FileLock]:
    """Hold the writers' lock of the bank at ``path`` (rank 0 only; every process waits with it)."""
    lock = FileLock(path, "memory bank", "memory.lock_timeout_s")
    lock.acquire(settings.lock_timeout_s, leader=leader, share=broadcast_from_zero)
    try:
        yield lock
    finally:
        lock.release()
