"""Atomic file writes, the one way anomret writes anything a later run reads.

A file is written to a temporary sibling and renamed into place, so a killed run never leaves a file
that looks complete, and concurrent readers see either the old file or the new one. The temporary
name records host and process id, so leftovers of a killed writer are recognised and removed later
without touching a live writer's file. Scratch directories a writer fills before producing its file
(:func:`scratch_directory`) are named the same way and cleaned the same way. Files get the permissions the umask allows (``mkstemp`` alone
would make them ``0600``, unreadable to colleagues on shared storage).

A write that fails (a full disk, a quota, a read-only folder) is reported as a :class:`WriteError`, an
``OSError`` whose message names the file, the reason and the fix: a bare ``write()`` error names no file,
and safetensors reports its own I/O errors as ``SafetensorError``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"
# A temporary file this old is abandoned whoever wrote it (another host's writer cannot be checked).
STALE_AFTER_S = 24 * 3600


class WriteError(OSError):
    """A file could not be written; the message names it, says why and how to fix it."""

    def __init__(self, code: int | None, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(code, message, str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(path: str | os.PathLike[str], error: BaseException, elsewhere: str = "") -> WriteError:
    """The :class:`WriteError` for a failed write of ``path``; ``elsewhere`` says how to write it elsewhere
    (e.g. "set features.dir to another disk")."""
    code = getattr(error, "errno", None)
    if code is None:  # safetensors: "... I/O error: No space left on device (os error 28)"
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else str(error)
    also = f", or {elsewhere}" if elsewhere else ""
    if code in _FULL:
        fix = f"free space on that disk (or raise the quota or file-size limit){also}"
    elif code in _NOT_ALLOWED:
        fix = f"make the folder writable{also}"
    else:
        fix = f"check the disk{also}"
    number = f" [Errno {code}]" if code else ""
    return WriteError(code, f"cannot write {path}: {reason}{number}. Fix: {fix}.", path)


@contextmanager
def naming_failed_writes(path: str | os.PathLike[str], elsewhere: str = "") -> Iterator[None]:
    """Inside the block, a write error that does not name its file (``write()``'s, safetensors') becomes a
    :class:`WriteError` naming ``path``. Its message holds the reason and error number, so the original
    is not chained (the command line would print it as a second line)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        if error.filename is not None:
            raise
        raise write_error(path, error, elsewhere) from None
    except SafetensorError as error:
        if "os error" not in str(error):
            raise
        raise write_error(path, error, elsewhere) from None


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open()`` for writing, atomically: the file appears whole when the block ends without error."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, naming_failed_writes(path), open(tmp, mode, **kwargs) as handle:
        yield handle


def scratch_directory(path: str | os.PathLike[str]) -> Path:
    """A new, empty directory beside ``path`` for the scratch data of the writer that will produce ``path``.

    The caller removes it when done; a killed writer's directory is found and removed later by
    :func:`remove_stale_temporaries`, as its temporary files are. It is hidden and never has the name of
    the finished file, so nothing in it is mistaken for a complete result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _named_by_a_writer(name: str) -> list[str] | None:
    # ".<target>.<host>-<pid>.<random>.tmp" -> [".<target>", "<host>-<pid>", "<random>"]
    parts = name[: -len(_TMP_SUFFIX)].rsplit(".", 2)
    return parts if len(parts) == 3 and "-" in parts[1] else None


def _writer_is_gone(name: str, now: float, mtime: float) -> bool:
    if now - mtime > STALE_AFTER_S:
        return True
    # Only a writer on this host can be checked.
    parts = _named_by_a_writer(name)
    if parts is None:
        return False
    host, _, pid = parts[1].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _last_modified(candidate: Path) -> float:
    # A scratch directory's own time changes only when entries are added: its files' times count too.
    if not candidate.is_dir():
        return candidate.stat().st_mtime
    times = [candidate.stat().st_mtime]
    times += [entry.stat().st_mtime for entry in candidate.iterdir()]
    return max(times)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files and scratch directories left in ``directory`` by writers that were killed;
    returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    now = time.time()
    for candidate in directory.glob(f".*{_TMP_SUFFIX}"):
        try:
            if candidate.is_symlink() or not (candidate.is_file() or candidate.is_dir()):
                continue
            if candidate.is_dir() and _named_by_a_writer(candidate.name) is None:
                continue  # a directory is removed only when its name says a writer made it
            if _writer_is_gone(candidate.name, now, _last_modified(candidate)):
                if candidate.is_dir():
                    shutil.rmtree(candidate)
                else:
                    candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:
            continue  # removed by someone else meanwhile
    if removed:
        log.info("removed %d abandoned temporary file(s) or directories in %s", len(removed), directory)
    return removed
