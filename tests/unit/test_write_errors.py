"""A write that fails (full disk, quota, file-size limit) names the file, why and the fix, whoever writes it:
banks (safetensors or streamed), feature-store entries and plain files; nothing half-written is left."""

from __future__ import annotations

import resource
import signal
from contextlib import contextmanager

import pytest
import torch
from safetensors import SafetensorError
from test_rad import bank_from, random_features

from anomret.cli import describe
from anomret.encoders.base import Preprocess
from anomret.features.store import FeatureStore
from anomret.files import WriteError, write_text_atomic
from anomret.memory.labeled import LabeledMemoryBank
from anomret.memory.store import save_bank

LIMIT = 2**20


@contextmanager
def file_size_limit(limit: int = LIMIT):
    """The kernel refuses, for this process, writes that would make a file larger than ``limit`` bytes
    (EFBIG): a real failed write, as a full disk gives, without a small disk or root."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _assert_named(error: WriteError, path, elsewhere: str) -> None:
    assert isinstance(error, OSError) and error.filename == str(path)
    lines = describe(error).splitlines()
    assert len(lines) == 1, "one error line"
    assert lines[0].startswith(f"error: cannot write {path}: File too large [Errno 27]. Fix: free space")
    assert elsewhere in lines[0]
    assert not list(path.parent.glob(".*.tmp")), "no temporary file is left behind"
    assert not path.exists()


def test_a_labeled_bank_that_cannot_be_written_is_named(tmp_path):
    labels = torch.eye(2)[torch.arange(600) % 2]  # 600 image keys of 512 floats: 1.2 MiB
    bank = LabeledMemoryBank(torch.randn(600, 512), labels, torch.randn(4, 8), labels[:4].clone())
    path = tmp_path / "labeled.safetensors"
    with file_size_limit(), pytest.raises(WriteError) as caught:
        bank.save(path)
    _assert_named(caught.value, path, "memory.path")


def test_a_streamed_normal_bank_that_cannot_be_written_is_named(tmp_path):
    bank = bank_from(random_features(1200, seed=1), "fp32")  # about 2.4 MiB of patch rows
    path = tmp_path / "normal.safetensors"
    with file_size_limit(), pytest.raises(WriteError) as caught:
        bank.save(path)
    _assert_named(caught.value, path, "memory.path")


def test_a_feature_entry_and_a_plain_file_that_cannot_be_written_are_named(tmp_path):
    store = FeatureStore(tmp_path, {"name": "toy"}, Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3), "fp32")
    entry = store.path("ab" * 16)
    with file_size_limit(), pytest.raises(WriteError) as caught:
        store.write("ab" * 16, {"cls": torch.zeros(2 * LIMIT // 4)})
    _assert_named(caught.value, entry, "features.dir")
    text = tmp_path / "results.json"
    with file_size_limit(), pytest.raises(WriteError) as caught:
        write_text_atomic(text, "x" * (2 * LIMIT))
    _assert_named(caught.value, text, "")


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("anomret.memory.store.save_file", full)
    path = tmp_path / "bank.safetensors"
    with pytest.raises(WriteError) as caught:
        save_bank(path, {"x": torch.zeros(1)}, {})
    assert str(caught.value) == (
        f"cannot write {path}: No space left on device [Errno 28]. Fix: free space on that disk (or raise the "
        "quota or file-size limit), or set memory.path (or memory.cache_dir) to another disk."
    )
