import os
import socket
import time

import pytest

from anomret.files import (
    atomic_open,
    atomic_path,
    remove_stale_temporaries,
    scratch_directory,
    write_text_atomic,
)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_text_atomic(tmp_path / "results.json", "{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "bank.safetensors"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_open(target) as handle:
        handle.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".bank.safetensors.{host}-999999999.abc.tmp"  # no such process
    live = tmp_path / f".bank.safetensors.{host}-{os.getpid()}.def.tmp"
    other_recent = tmp_path / ".bank.safetensors.otherhost-12.ghi.tmp"
    other_old = tmp_path / ".bank.safetensors.otherhost-13.jkl.tmp"
    for path in (dead, live, other_recent, other_old):
        path.write_text("partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(other_old, (two_days_ago, two_days_ago))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, other_old])
    assert live.exists() and other_recent.exists()


def test_atomic_path_names_its_temporary_after_host_and_process(tmp_path):
    with atomic_path(tmp_path / "x.bin") as tmp:
        assert tmp.name.startswith(f".x.bin.{socket.gethostname()}-{os.getpid()}.")
        tmp.write_bytes(b"1")
    assert (tmp_path / "x.bin").read_bytes() == b"1"


def test_scratch_directories_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    live = scratch_directory(tmp_path / "bank.safetensors")
    assert live.name.startswith(f".bank.safetensors.{socket.gethostname()}-{os.getpid()}.")
    dead = tmp_path / f".bank.safetensors.{socket.gethostname()}-999999999.abc.tmp"
    other_host = tmp_path / ".bank.safetensors.otherhost-12.def.tmp"
    not_ours = tmp_path / ".cache.tmp"  # an old hidden directory no writer named: never removed
    for directory in (live, dead, other_host, not_ours):
        directory.mkdir(exist_ok=True)
        (directory / "patches.1.bin").write_bytes(b"rows")
    # Another host's directory counts as abandoned only when neither it nor its files changed for a day.
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (other_host, not_ours, not_ours / "patches.1.bin"):
        os.utime(path, (two_days_ago, two_days_ago))
    assert remove_stale_temporaries(tmp_path) == [dead]
    os.utime(other_host / "patches.1.bin", (two_days_ago, two_days_ago))
    assert remove_stale_temporaries(tmp_path) == [other_host]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, not_ours.name])
