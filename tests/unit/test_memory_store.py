import os
from pathlib import Path

import pytest
import torch

from anomret.data.samples import Sample
from anomret.memory.store import (
    BankError,
    BankStatus,
    check_bank,
    data_fingerprint,
    load_bank,
    read_bank_metadata,
    save_bank,
)

ENCODER = {"name": "tiny", "weights": "random:0", "image_size": 64}
BUILD = {"data": {"digest": "abc"}, "max_patch_entries": None}


def _save(path, encoder=ENCODER, build=BUILD):
    return save_bank(path, {"keys": torch.ones(2, 3)}, {"encoder": encoder, "build": build})


def test_round_trip_and_header_only_read(tmp_path):
    path = _save(tmp_path / "b" / "bank.safetensors")
    tensors, metadata = load_bank(path)
    torch.testing.assert_close(tensors["keys"], torch.ones(2, 3))
    assert metadata["encoder"] == ENCODER
    assert read_bank_metadata(path)["build"] == BUILD


def test_check_bank_statuses(tmp_path):
    path = tmp_path / "bank.safetensors"
    assert check_bank(path, ENCODER, BUILD).status is BankStatus.MISSING
    _save(path)
    assert check_bank(path, ENCODER, BUILD).status is BankStatus.MATCH
    stale = check_bank(path, ENCODER, {**BUILD, "max_patch_entries": 100})
    assert stale.status is BankStatus.STALE and "max_patch_entries" in stale.reason
    with pytest.raises(BankError, match=r"another encoder.*image_size"):
        check_bank(path, {**ENCODER, "image_size": 518}, BUILD)


def test_unreadable_and_foreign_files_get_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BankError, match="not a readable memory bank"):
        check_bank(garbage, ENCODER, BUILD)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(BankError, match="not an anomret memory bank"):
        read_bank_metadata(foreign)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import anomret.memory.store as store

    def exploding_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "save_file", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "bank.safetensors")
    assert os.listdir(tmp_path) == []


def test_data_fingerprint_changes_with_content(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"1234")
    samples = [Sample(image, None, "c", 0, "test", "s")]
    first = data_fingerprint(samples, tmp_path)
    assert data_fingerprint(samples, tmp_path) == first
    image.write_bytes(b"123456")
    assert data_fingerprint(samples, tmp_path) != first
