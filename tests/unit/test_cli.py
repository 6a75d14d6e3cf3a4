"""User errors at the command line: the message and its fix, a traceback only when asked for."""

from __future__ import annotations

import os
import signal

import pytest

from anomret.cli import user_error_types, user_errors
from anomret.data.errors import UnknownCategoryError


def test_a_user_error_prints_its_message_on_one_line_and_exits_1(capsys):
    with pytest.raises(SystemExit) as info, user_errors(hydra=False):
        raise UnknownCategoryError("dataset 'x' has no category ['nope'].\nFix: pick one of [a, b].")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: dataset 'x' has no category ['nope']. Fix: pick one of [a, b].\n"


def test_a_signal_is_one_line_and_the_status_of_that_signal(capsys):
    with pytest.raises(SystemExit) as info, user_errors(hydra=False):
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.code == 143
    assert capsys.readouterr().err == (
        "error: the run was stopped by SIGTERM; its results were not written (rerun it to complete it)\n"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is removed afterwards"


def test_errors_of_modules_never_imported_are_not_imported_to_classify_one(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "anomret.memory.store", raising=False)
    types = user_error_types()
    assert ValueError in types and "anomret.memory.store" not in sys.modules


def test_a_bug_keeps_its_traceback_and_debug_keeps_every_error(monkeypatch):
    with pytest.raises(KeyError), user_errors(hydra=False):
        raise KeyError("a bug, not a user error")
    monkeypatch.setenv("ANOMRET_DEBUG", "1")
    with pytest.raises(ValueError), user_errors(hydra=False):
        raise ValueError("shown with its traceback")


def test_hydra_is_told_to_pass_errors_through_only_inside(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with user_errors():
        assert os.environ["HYDRA_FULL_ERROR"] == "1"
    assert "HYDRA_FULL_ERROR" not in os.environ
