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


def _labeled_tensors(**changes):
    tensors = {
        "image_keys": torch.nn.functional.normalize(torch.randn(3, 4), dim=-1),
        "image_values": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        "patch_keys": torch.nn.functional.normalize(torch.randn(5, 6), dim=-1),
        "patch_values": torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]]),
    }
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch_keys": None, "patch_protos": torch.zeros(5, 6)}, r"holds tensors .*patch_protos"),
        ({"image_values": torch.ones(4, 2) / 2}, r"n_images=4 but 3"),
        ({"patch_keys": torch.zeros(5, 6, 1)}, r"patch_keys.*expected \[n_patches, patch_dim\]"),
        ({"image_keys": torch.full((3, 4), float("nan"))}, r"NaN or infinite"),
        ({"image_keys": torch.zeros(3, 4, dtype=torch.float16)}, r"is torch.float16"),
        ({"image_values": torch.tensor([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])}, r"not one-hot"),
    ],
)
def test_labeled_bank_with_valid_metadata_but_wrong_tensors_is_refused_on_load(tmp_path, changes, message):
    from anomret.memory.labeled import LabeledMemoryBank

    path = save_bank(tmp_path / "bank.safetensors", _labeled_tensors(**changes), {"kind": "labeled"})
    with pytest.raises(BankError, match=message):
        LabeledMemoryBank.load(path)


def test_bank_from_another_encoder_size_is_refused_when_attached(tmp_path):
    from anomret.memory.labeled import LabeledMemoryBank

    path = save_bank(tmp_path / "bank.safetensors", _labeled_tensors(), {"kind": "labeled"})
    bank = LabeledMemoryBank.load(path)
    bank.check_compatible({"image": 4, "patch": 6})
    with pytest.raises(BankError, match=r"patch keys are 6-d but this run's encoder gives 64-d"):
        bank.check_compatible({"image": 4, "patch": 64})


def test_saving_removes_temporaries_of_killed_writers_and_missing_bank_is_not_called_unreadable(tmp_path):
    import socket

    leftover = tmp_path / f".bank.safetensors.{socket.gethostname()}-999999999.x.tmp"
    leftover.write_bytes(b"partial")
    _save(tmp_path / "bank.safetensors")
    assert not leftover.exists()
    with pytest.raises(BankError, match="does not exist") as error:
        read_bank_metadata(tmp_path / "nowhere.safetensors")
    assert "Delete it" not in str(error.value)


def test_memory_map_reads_tensors_without_loading_them(tmp_path):
    from anomret.memory.store import open_memmap

    data = torch.arange(24, dtype=torch.float16).reshape(4, 3, 2)
    path = save_bank(tmp_path / "bank.safetensors", {"grid": data, "cls": torch.ones(4, 2)}, {"kind": "x"})
    maps = open_memmap(path)
    assert isinstance(maps["grid"], __import__("numpy").memmap)
    torch.testing.assert_close(torch.from_numpy(maps["grid"][[3, 1]]), data[[3, 1]])
