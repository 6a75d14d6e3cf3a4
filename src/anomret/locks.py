"""Exclusive locks on files that several runs may write at once (memory banks).

A writer holds an OS lock (``flock``) on a small file beside its target, ``.<name>.lock``, from reading
the target's state to the rename of the new file, so two writers never both extend the state they read.
The OS releases the lock when the holding process ends, however it ends, so a killed writer never
blocks the next one. A second writer waits, polling, up to a time limit (``None``: as long as it takes;
``0``: not at all), saying once that it waits and for whom; past the limit it is refused with a message
naming the file, the holder and the setting that raises the limit.

The lock files stay in place: removing one that a waiting writer has opened would let two writers in.
``flock`` excludes processes on one machine and, on Linux NFS clients, across machines (it is then an
NFS byte-range lock); storage without working locks gives no exclusion.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How often a waiting writer tries again.
LOCK_POLL_S = 0.5
# Directories a lock cannot be created in: readers go on without one (a write there fails by itself).
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class LockBusyError(OSError):
    """Another process holds the lock past the waiting limit (a user error: retry later)."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: hidden, beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


class FileLock:
    """An exclusive lock on ``target`` (see the module docstring), taken with :meth:`acquire`.

    Args:
        target: the file the lock protects (it need not exist).
        what: how messages name it ("memory bank").
        timeout_setting: the setting that sets the waiting limit, named in messages.
    """

    def __init__(self, target: str | os.PathLike[str], what: str = "file", timeout_setting: str = "") -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.what = what
        self.timeout_setting = timeout_setting
        self._fd: int | None = None
        self.waited_s = 0.0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; ``True`` when this object holds it now."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._record_holder()
        return True

    def _record_holder(self) -> None:
        # Read by waiting writers, for their messages only: the lock itself is the flock.
        assert self._fd is not None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as its holder recorded it (best effort)."""
        try:
            holder = json.loads(self.path.read_text() or "{}")
            return (
                f"process {holder['pid']} on {holder['host']}, since {holder['since']}: {holder['command']}"
            )
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def acquire(
        self,
        timeout_s: float | None,
        *,
        leader: bool = True,
        share: Callable[[Any], Any] = lambda value: value,
    ) -> None:
        """Take the lock, waiting up to ``timeout_s`` seconds (``None``: without limit).

        Under DDP only the ``leader`` process touches the lock; every process calls this with a ``share``
        that hands the leader's state to all (a broadcast), so all of them wait, and return or raise,
        together, one collective per poll. Raises :class:`LockBusyError` past the limit.
        """
        start = time.monotonic()
        told = False
        while True:
            state, failure = None, None
            if leader:
                waited = time.monotonic() - start
                try:
                    if self._try_or_skip():
                        state = ("held", "")
                    elif timeout_s is not None and waited >= timeout_s:
                        state = ("refused", self._refusal(waited, timeout_s))
                    else:
                        state = ("waiting", self.holder())
                except OSError as error:  # e.g. no space for the lock file: the others must not wait on
                    state, failure = ("failed", str(error)), error
            status, detail = share(state)
            if status == "failed":
                raise failure if failure is not None else OSError(detail)
            if status == "held":
                self.waited_s = time.monotonic() - start
                if told and leader:
                    log.info("%s %s is free after %.0f s", self.what, self.target, self.waited_s)
                return
            if status == "refused":
                raise LockBusyError(detail)
            if not told and leader:
                limit = "as long as it takes" if timeout_s is None else f"up to {timeout_s:g} s"
                setting = f" ({self.timeout_setting})" if self.timeout_setting else ""
                log.warning(
                    "%s %s is being written by %s; waiting %s%s",
                    self.what,
                    self.target,
                    detail,
                    limit,
                    setting,
                )
            told = True
            time.sleep(LOCK_POLL_S)

    def _try_or_skip(self) -> bool:
        try:
            return self.try_acquire()
        except OSError as error:
            if error.errno not in _READ_ONLY:
                raise
            # A bank on read-only storage can still be read; writing it fails with its own message.
            log.warning(
                "cannot create the lock file %s (%s): concurrent writers of %s are not excluded",
                self.path,
                error.strerror,
                self.target,
            )
            return True

    def _refusal(self, waited: float, timeout_s: float) -> str:
        setting = f" ({self.timeout_setting}={timeout_s:g})" if self.timeout_setting else ""
        raise_it = f", or raise {self.timeout_setting} to wait longer" if self.timeout_setting else ""
        return (
            f"{self.what} {self.target} is being written by {self.holder()}; gave up after {waited:.0f} s"
            f"{setting}. Fix: retry when that run has finished{raise_it}."
        )

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
