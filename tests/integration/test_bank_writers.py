"""Writers of one bank exclude each other, with real processes: the lock (waiting, refusal, a killed
holder), DDP ranks that act on rank 0's reading, two `anomret.append` commands at once, a run that reuses
the bank written while it waited, and an extended bank that later runs reuse."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from anomret.locks import FileLock, LockBusyError
from anomret.memory.normal import NormalMemorySettings
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.memory.store import read_bank_metadata
from anomret.memory.writers import agreed, bank_writers_lock
from anomret.pipeline import append_memory, run

from .cli import free_port

WAIT = 120  # generous limits for a loaded machine; no test depends on how long anything takes


def _hold(target: str, held, release) -> None:
    lock = FileLock(target, "memory bank")
    lock.acquire(timeout_s=WAIT)
    held.set()
    release.wait(WAIT)
    lock.release()


def _holder(target: Path):
    context = mp.get_context("spawn")
    held, release = context.Event(), context.Event()
    process = context.Process(target=_hold, args=(str(target), held, release))
    process.start()
    assert held.wait(WAIT), "the holder took the lock"
    return process, release


def test_a_second_writer_is_refused_past_its_limit_and_waits_within_it(tmp_path, caplog):
    target = tmp_path / "bank.safetensors"
    process, release = _holder(target)
    lock = FileLock(target, "memory bank", "memory.lock_timeout_s")
    with pytest.raises(LockBusyError) as refused:
        lock.acquire(timeout_s=0)
    message = str(refused.value)
    assert message.startswith(f"memory bank {target} is being written by process {process.pid} on ")
    assert "gave up after 0 s (memory.lock_timeout_s=0). Fix: retry when that run has finished" in message

    waiting = threading.Thread(target=lock.acquire, args=(WAIT,))
    with caplog.at_level(logging.WARNING, logger="anomret.locks"):
        waiting.start()
        while "waiting up to 120 s (memory.lock_timeout_s)" not in caplog.text:
            assert waiting.is_alive(), "it waits while the other holds the lock"
            waiting.join(0.05)
        assert not lock.held
        release.set()  # the holder lets go: the waiting writer gets the lock
        waiting.join(WAIT)
    assert lock.held
    process.join(WAIT)
    lock.release()


def test_a_killed_holder_never_blocks_the_next_writer(tmp_path):
    target = tmp_path / "bank.safetensors"
    process, _ = _holder(target)
    lock = FileLock(target)
    assert not lock.try_acquire()
    process.kill()
    process.join(WAIT)
    lock.acquire(timeout_s=WAIT)  # the OS released the dead holder's lock
    assert lock.held
    lock.release()


def _rank(rank: int, world: int, port: int, target: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        leader = rank == 0
        outcomes = []
        # Rank 0 reads the state; the others get its answer even where their own reading differs.
        outcomes.append(agreed(lambda: f"read by rank {rank}", leader))
        try:
            agreed(lambda: (_ for _ in ()).throw(ValueError(f"refused by rank {rank}")), leader)
        except ValueError as error:
            outcomes.append(str(error))
        # Another process holds the bank's lock: with no waiting, every rank is refused together...
        try:
            with bank_writers_lock(target, NormalMemorySettings(lock_timeout_s=0), leader):
                outcomes.append("locked")
        except LockBusyError as error:
            outcomes.append(type(error).__name__)
        # ... and with waiting, they wait together until it lets go; only rank 0 holds the file.
        Path(out, f"ready{rank}").touch()
        with bank_writers_lock(target, NormalMemorySettings(lock_timeout_s=WAIT), leader) as lock:
            outcomes.append(f"locked, holding the file: {lock.held}")
        Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_rank_zeros_reading_and_wait_or_are_refused_together(tmp_path):
    target = tmp_path / "bank.safetensors"
    process, release = _holder(target)
    ranks = mp.start_processes(
        _rank, args=(2, free_port(), str(target), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
        assert not ranks.join(0.05), "the ranks wait for the lock"
    release.set()
    process.join(WAIT)
    while not ranks.join(WAIT):
        pass
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    common = ["read by rank 0", "refused by rank 0", "LockBusyError"]
    assert outcomes == [
        [*common, "locked, holding the file: True"],
        [*common, "locked, holding the file: False"],
    ]


def _command(
    module: str, args: list[str], tmp_path: Path, data_dir: Path, merged: bool = False
) -> subprocess.Popen:
    env = {
        **os.environ,
        "ANOMRET_ROOT": str(tmp_path),
        "ANOMRET_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
    )


def _images_by_category(bank: Path) -> dict[str, list[str]]:
    loaded = NormalMemoryBank.load(bank)  # refuses rows and records that disagree
    images: dict[str, list[str]] = {}
    for (path, category, *_), row_category in zip(
        loaded.metadata["images"], loaded.category.tolist(), strict=True
    ):
        assert loaded.categories[row_category] == category
        images.setdefault(category, []).append(path)
    return images


def test_two_appends_at_once_give_the_bank_of_their_union(compose_config, tmp_path, data_dir):
    bank = tmp_path / "bank.safetensors"
    pill = ["+experiment=demo_rad", "dataset.categories=[pill]", f"memory.path={bank}"]
    append_memory(compose_config(pill, "append"))
    both = [
        _command(
            "anomret.append",
            [
                "+experiment=demo_rad",
                "logger=none",
                f"memory.path={bank}",
                f"dataset.categories={categories}",
                f"hydra.run.dir={tmp_path / name}",
            ],
            tmp_path,
            data_dir,
        )
        for name, categories in (("a", "[pill,weave]"), ("b", "[pill,wood]"))
    ]
    outputs = [process.communicate(timeout=600) for process in both]
    assert [process.returncode for process in both] == [0, 0], [err[-3000:] for _, err in outputs]

    images = _images_by_category(bank)
    assert {category: len(paths) for category, paths in images.items()} == {
        "pill": 10,
        "weave": 10,
        "wood": 10,
    }
    assert len({path for paths in images.values() for path in paths}) == 30, "each image exactly once"
    # The bank equals one built from the union at once: the same identity, and eval gives its numbers.
    union = ["+experiment=demo_rad", "dataset.categories=[weave,wood,pill]"]
    fresh = run(compose_config([*union, f"memory.path={tmp_path / 'fresh.safetensors'}"]), fit=True)
    evaluated = run(compose_config([*union, f"memory.path={bank}"], "eval"), fit=False)
    assert evaluated.per_category == fresh.per_category
    assert read_bank_metadata(bank)["build"] == read_bank_metadata(tmp_path / "fresh.safetensors")["build"]


def test_a_writer_refused_by_a_busy_bank_says_so_in_one_line(tmp_path, data_dir):
    bank = tmp_path / "bank.safetensors"
    lock = FileLock(bank)
    assert lock.try_acquire()
    try:
        refused = _command(
            "anomret.append",
            ["+experiment=demo_rad", f"memory.path={bank}", "memory.lock_timeout_s=0"],
            tmp_path,
            data_dir,
        )
        _, stderr = refused.communicate(timeout=600)
    finally:
        lock.release()
    assert refused.returncode == 1
    (error,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: memory bank {bank} is being written by process {os.getpid()} on ")
    assert error.endswith(
        "gave up after 0 s (memory.lock_timeout_s=0). Fix: retry when that run has finished, or raise "
        "memory.lock_timeout_s to wait longer."
    )
    assert not bank.exists()


def test_a_bank_extended_with_categories_that_sort_first_is_reused_by_later_runs(compose_config, tmp_path):
    bank, fresh = tmp_path / "bank.safetensors", tmp_path / "fresh.safetensors"
    later = ["+experiment=demo_rad", "dataset.categories=[weave,wood,pill]"]
    first = ["+experiment=demo_rad", "dataset.categories=[pill]", f"memory.path={bank}"]
    append_memory(compose_config(first, "append"))
    append_memory(compose_config([*later, f"memory.path={bank}"], "append"))
    assert NormalMemoryBank.load(bank).categories == ["pill", "weave", "wood"], "new rows follow the old"
    extended = bank.stat().st_mtime_ns

    def identity() -> str:
        return json.loads((tmp_path / "run" / "artifacts.json").read_text())["bank_identity"]

    # A run naming the extended bank, without memory.append: the same images, so it is reused as it is.
    reused = run(compose_config([*later, f"memory.path={bank}"]), fit=True)
    assert bank.stat().st_mtime_ns == extended
    reused_identity = identity()
    built = run(compose_config([*later, f"memory.path={fresh}"]), fit=True)
    assert reused_identity == identity()
    assert reused.per_category == built.per_category


def test_a_run_that_waited_for_a_writer_reuses_the_bank_it_wrote(compose_config, tmp_path, data_dir):
    written = tmp_path / "written.safetensors"
    run(compose_config(["+experiment=demo_rad", f"memory.path={written}"]), fit=True)
    bank = tmp_path / "bank.safetensors"
    writer = FileLock(bank)
    assert writer.try_acquire()  # another run is writing this bank
    waiting = _command(
        "anomret.train",
        ["+experiment=demo_rad", "logger=none", f"memory.path={bank}", f"hydra.run.dir={tmp_path / 'b'}"],
        tmp_path,
        data_dir,
        merged=True,
    )
    lines = []
    for line in waiting.stdout:
        lines.append(line)
        if "is being written by" in line:
            break
    assert "waiting up to 3600 s (memory.lock_timeout_s)" in lines[-1], "".join(lines[-20:])
    shutil.copy(written, bank)  # ... and finishes it meanwhile
    built = bank.stat().st_mtime_ns
    writer.release()
    rest, _ = waiting.communicate(timeout=600)
    log = "".join(lines) + rest
    assert waiting.returncode == 0, log[-3000:]
    assert bank.stat().st_mtime_ns == built, "the bank that appeared while it waited is reused, not rebuilt"
    assert f"reusing memory bank {bank}" in log and "building memory bank" not in log
