"""How the command-line entry points report a user error: the message and its fix, no traceback.

Wrong input (a missing dataset, a bad setting, a foreign bank, a typo in an override) is answered with the
error's own message, which says what is wrong and how to fix it. A traceback helps only when the error is
a bug, so it is shown with ``ANOMRET_DEBUG=1`` (or Hydra's own ``HYDRA_FULL_ERROR=1``) and for errors
that are not user errors.

Every entry point runs inside :func:`user_errors`::

    def main() -> None:
        with user_errors():
            hydra_task()
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

HINT = "(for the traceback, run again with ANOMRET_DEBUG=1)"
# Set beside HYDRA_FULL_ERROR when this module set it, so that processes started from this one (DDP
# ranks) do not take it for the user's request for tracebacks.
_PASSED_ON = "ANOMRET_HYDRA_FULL_ERROR_SET"


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def debugging() -> bool:
    """The user asked for tracebacks: ``ANOMRET_DEBUG=1`` or their own ``HYDRA_FULL_ERROR=1``."""
    return _set("ANOMRET_DEBUG") or (_set("HYDRA_FULL_ERROR") and not _set(_PASSED_ON))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean "your input is wrong", each raised with a message that says how to fix it.

    ValueError and OSError cover the constructors' range checks and missing or unreadable files.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from anomret.data.errors import DataError
    from anomret.encoders.weights import WeightsUnavailableError
    from anomret.memory.store import BankError
    from anomret.plugins import MissingPluginError

    return (
        DataError,
        MissingPluginError,
        BankError,
        WeightsUnavailableError,
        ValueError,
        OSError,
        HydraException,
        OmegaConfBaseException,
    )


def describe(error: BaseException) -> str:
    """``error: <message>`` and, for a config error Hydra wraps, the error underneath."""
    message = str(error).strip() or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in message:
        message += f"\n{str(cause).strip()}"
    return f"error: {message}\n{HINT}"


@contextmanager
def user_errors(hydra: bool = True) -> Iterator[None]:
    """Report user errors as their message on stderr and exit with status 1.

    Args:
        hydra: the body runs a ``@hydra.main`` task. Hydra prints a trimmed traceback of any error
            itself; it is told to pass errors through instead (as ``HYDRA_FULL_ERROR=1`` does), so that
            they reach this handler whole.
    """
    debug = debugging()
    set_here = hydra and not _set("HYDRA_FULL_ERROR")
    if set_here:
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_PASSED_ON] = "1"
    try:
        if hydra:
            # Before Hydra composes: a launcher or sweeper plugin that is not installed is named with
            # the package to install, instead of Hydra's "Could not find 'hydra/launcher/...'".
            from anomret.plugins import check_hydra_plugins

            check_hydra_plugins(sys.argv[1:])
        yield
    except user_error_types() as error:
        if debug:
            raise
        sys.stderr.flush()
        print(describe(error), file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if set_here:
            os.environ.pop("HYDRA_FULL_ERROR", None)
            os.environ.pop(_PASSED_ON, None)
