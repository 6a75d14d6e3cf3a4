"""Bank files are checked against what they claim before they are used: format version, metadata, rows
against image records, and RAD's stored vectors (a sample on load, each row whole when first read)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_rad import LAYERS, bank_from, random_features

from anomret.memory.labeled import LabeledMemoryBank
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.memory.rows import SAMPLED_ROWS
from anomret.memory.store import FORMAT_VERSION, BankError, check_bank, read_bank_metadata


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return size, json.loads(handle.read(size))


def _overwrite(path, name: str, rows: range | list[int], data: bytes | None = None, seed: int = 0) -> None:
    """Overwrite rows of tensor ``name`` in the file with ``data`` (default: random bytes)."""
    size, header = _header(path)
    start, end = header[name]["data_offsets"]
    row_bytes = (end - start) // header[name]["shape"][0]
    generator = np.random.default_rng(seed)
    with open(path, "r+b") as handle:
        for row in rows:
            handle.seek(8 + size + start + row * row_bytes)
            handle.write(data or generator.bytes(row_bytes))


def _saved(tmp_path, n=6, dtype="fp16", categories=None, name="bank.safetensors"):
    return bank_from(random_features(n, seed=3), dtype, categories).save(tmp_path / name)


def _with_metadata(path, **changes):
    """Rewrite a saved normal bank with its metadata changed (``None`` removes a key)."""
    bank = NormalMemoryBank.load(path)
    metadata = {**bank.metadata, **changes}
    bank.metadata = {k: v for k, v in metadata.items() if v is not None}
    out = path.with_name("changed.safetensors")
    bank.save(out)
    return out


@pytest.mark.parametrize("version", [99, 0, None, "1"])
def test_banks_of_an_unknown_format_version_are_refused_naming_the_file(tmp_path, version):
    path = tmp_path / "bank.safetensors"
    header = {"format_version": version, "kind": "labeled", "encoder": {}, "build": {}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"anomret": json.dumps(header)})
    for read in (read_bank_metadata, LabeledMemoryBank.load, NormalMemoryBank.load):
        with pytest.raises(BankError, match=rf"{path} has format version .* reads version {FORMAT_VERSION}"):
            read(path)
    with pytest.raises(BankError, match="format version"):
        check_bank(path, {}, {})


@pytest.mark.parametrize("text", ['{"format_version": 1, ', "[1, 2]", "not json"])
def test_bank_metadata_that_is_not_a_json_object_names_the_file(tmp_path, text):
    path = tmp_path / "bank.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"anomret": text})
    for read in (read_bank_metadata, NormalMemoryBank.load, LabeledMemoryBank.load):
        with pytest.raises(BankError, match=rf"memory bank {path}: its metadata is not"):
            read(path)


def test_a_bank_cut_short_is_named_on_memory_mapped_load(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(BankError, match=rf"memory bank {path}: tensor .* cut short or corrupt"):
        NormalMemoryBank.load(path)


def test_rows_and_image_records_that_disagree_are_refused_on_load(tmp_path):
    path = _saved(tmp_path, n=4, categories=["a", "a", "b", "b"])
    bank = NormalMemoryBank.load(path)
    assert bank.images_per_category() == {"a": 2, "b": 2}
    images = bank.metadata["images"]

    fewer = _with_metadata(path, images=images[:3])
    with pytest.raises(BankError, match=rf"{fewer} holds 4 rows but its metadata records 3 images"):
        NormalMemoryBank.load(fewer)
    # A row recorded as another category's image: "b" rows recorded as "a" images.
    relabelled = [[row[0], "a", *row[2:]] for row in images]
    wrong = _with_metadata(path, images=relabelled)
    with pytest.raises(BankError, match=r"2 rows disagree with their records \(e\.g\. row 2 is a 'b' row"):
        NormalMemoryBank.load(wrong)
    twice = _with_metadata(path, images=[images[0], images[0], *images[2:]], categories=["a", "b"])
    with pytest.raises(BankError, match=rf"holds image {images[0][0]} more than once"):
        NormalMemoryBank.load(twice)
    no_categories = _with_metadata(path, categories=["a"])
    with pytest.raises(BankError, match="indices outside its 1 categories"):
        NormalMemoryBank.load(no_categories, mmap=False)


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "int8"])
@pytest.mark.parametrize("garbage", ["random", "zeros"])
def test_garbage_patch_rows_are_refused_on_load_naming_the_bank(tmp_path, dtype, garbage):
    path = _saved(tmp_path, n=12, dtype=dtype)
    NormalMemoryBank.load(path)  # sound as written
    _, header = _header(path)
    row_bytes = (header["patches.1"]["data_offsets"][1] - header["patches.1"]["data_offsets"][0]) // 12
    _overwrite(path, "patches.1", range(12), None if garbage == "random" else bytes(row_bytes))
    named = rf"memory bank {path}(, layer 1: .* sampled stored vectors are not unit|: tensor 'patches\.1' contains NaN)"
    for mmap in (True, False):
        with pytest.raises(BankError, match=named):
            NormalMemoryBank.load(path, mmap=mmap)


def test_int8_scales_that_are_garbage_are_refused_on_load(tmp_path):
    path = _saved(tmp_path, n=5, dtype="int8")
    _overwrite(path, "scales.3", range(5), np.full(16, 7.5, dtype=np.float32).tobytes())
    with pytest.raises(BankError, match=r"layer 3: 20 of 20 sampled stored vectors are not unit"):
        NormalMemoryBank.load(path)


def test_global_keys_that_are_not_unit_vectors_are_refused(tmp_path):
    path = _saved(tmp_path)
    _overwrite(path, "cls", [2], np.full(16, np.nan, dtype=np.float32).tobytes())
    with pytest.raises(BankError, match=rf"memory bank {path}: tensor 'cls' holds NaN"):
        NormalMemoryBank.load(path)


def test_a_damaged_row_the_sample_missed_is_named_when_it_is_first_read(tmp_path):
    n = 2 * SAMPLED_ROWS
    path = _saved(tmp_path, n=n)
    sampled = set(np.linspace(0, n - 1, SAMPLED_ROWS).round().astype(int).tolist())
    damaged = next(row for row in range(n) if row not in sampled)
    for layer in LAYERS:
        _overwrite(path, f"patches.{layer}", [damaged], np.full(16 * 16, np.nan, np.float16).tobytes())
    bank = NormalMemoryBank.load(path)  # the sample does not see it
    rows = bank.patches[LAYERS[0]]
    sound = [row for row in range(n) if row != damaged][:5]
    assert torch.isfinite(rows.stored()[torch.tensor(sound)].float()).all()
    for read in (rows.stored().__getitem__, rows.__getitem__):
        with pytest.raises(
            BankError, match=rf"memory bank {path}, layer 1: the stored vectors of row {damaged}"
        ):
            read(torch.tensor([sound[0], damaged]))


@pytest.mark.parametrize(
    "change",
    [
        lambda header: header["cls"].pop("data_offsets"),
        lambda header: header["cls"].update(shape="many"),
        lambda header: header.update(cls=[1, 2]),
    ],
)
def test_a_malformed_tensor_header_is_named(tmp_path, change):
    path = _saved(tmp_path)
    size, header = _header(path)
    data = path.read_bytes()
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    with pytest.raises(BankError, match=rf"memory bank {path}: the header of tensor 'cls' is malformed"):
        NormalMemoryBank.load(path)
