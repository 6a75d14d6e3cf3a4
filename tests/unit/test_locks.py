"""The writers' lock in one process: exclusion between two holders, the refusal message, the setting."""

from __future__ import annotations

import os

import pytest

from anomret.locks import FileLock, LockBusyError, lock_path
from anomret.memory.labeled import LabeledMemorySettings
from anomret.memory.normal import NormalMemorySettings


def test_two_holders_exclude_each_other_and_the_lock_file_stays_hidden_beside_the_target(tmp_path):
    target = tmp_path / "banks" / "bank.safetensors"  # neither it nor its folder exists yet
    first, second = FileLock(target), FileLock(target)
    assert first.try_acquire() and first.held
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()
    assert lock_path(target) == tmp_path / "banks" / ".bank.safetensors.lock" and lock_path(target).is_file()
    assert not target.exists()


def test_a_refused_writer_names_the_file_the_holder_and_the_setting(tmp_path):
    target = tmp_path / "bank.safetensors"
    with FileLock(target) as holder:
        holder.try_acquire()
        with pytest.raises(LockBusyError) as refused:
            FileLock(target, "memory bank", "memory.lock_timeout_s").acquire(0)
    assert isinstance(refused.value, OSError), "the command line reports it as a user error"
    assert str(refused.value).startswith(
        f"memory bank {target} is being written by process {os.getpid()} on "
    )
    assert str(refused.value).endswith(
        "gave up after 0 s (memory.lock_timeout_s=0). Fix: retry when that run has finished, or raise "
        "memory.lock_timeout_s to wait longer."
    )
    FileLock(target).acquire(0)  # released when the holder's block ended


@pytest.mark.parametrize("settings", [NormalMemorySettings, LabeledMemorySettings])
@pytest.mark.parametrize("value", [-1, "soon", True])
def test_the_waiting_limit_is_checked(settings, value):
    with pytest.raises(ValueError, match=r"memory\.lock_timeout_s must be a number of seconds ≥ 0 or null"):
        settings(lock_timeout_s=value)
    assert settings(lock_timeout_s=None).lock_timeout_s is None
