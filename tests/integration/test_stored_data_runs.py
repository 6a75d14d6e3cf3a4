"""Runs never trust stored data further than it was checked: a damaged or foreign bank stops the run before
the test pass, naming the file; a bad feature-store entry is named, recomputed, and changes no number."""

from __future__ import annotations

import json
import logging
import shutil
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from anomret.features.memory_tier import feature_memory
from anomret.features.store import image_key
from anomret.memory.store import BankError
from anomret.pipeline import run


def _with_metadata_text(source, target, text: str) -> None:
    with safe_open(str(source), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(target), metadata={"anomret": text})


def _garbage_rows(source, target) -> None:
    shutil.copy(source, target)
    with open(target, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name.startswith("patches."):
                start, end = entry["data_offsets"]
                handle.seek(8 + size + start)
                handle.write(np.random.default_rng(0).bytes(end - start))


def test_a_damaged_or_foreign_bank_stops_eval_before_the_test_pass_naming_the_file(compose_config, tmp_path):
    bank = tmp_path / "bank.safetensors"
    run(compose_config(["+experiment=demo_rad", f"memory.path={bank}"]), fit=True)
    shutil.rmtree(tmp_path / "run")
    metadata = json.loads(safe_open(str(bank), framework="pt").metadata()["anomret"])

    garbage, newer, broken = (tmp_path / f"{name}.safetensors" for name in ("garbage", "newer", "broken"))
    _garbage_rows(bank, garbage)
    _with_metadata_text(bank, newer, json.dumps({**metadata, "format_version": 99}))
    _with_metadata_text(bank, broken, json.dumps(metadata)[:-40])
    for path, message in (
        (garbage, rf"memory bank {garbage}, layer \d: .* sampled stored vectors are not unit vectors"),
        (newer, rf"memory bank {newer} has format version 99, but this anomret reads version 1"),
        (broken, rf"memory bank {broken}: its metadata is not valid JSON"),
    ):
        with pytest.raises(BankError, match=message):
            run(compose_config(["+experiment=demo_rad", f"memory.path={path}"], "eval"), fit=False)
        assert not (tmp_path / "run" / "overlays").exists(), "stopped before the test pass"


def test_swapped_or_non_finite_feature_entries_are_named_recomputed_and_change_no_number(
    compose_config, tmp_path, data_dir, caplog
):
    overrides = ["+experiment=demo_rad", "features.enabled=true", "features.dtype=fp32"]
    clean = run(compose_config(overrides), fit=True)
    (namespace,) = (tmp_path / ".cache" / "features").iterdir()
    test_images = sorted((data_dir / "synthetic" / "synthetic_a" / "wood" / "test").rglob("*.png"))
    entries = [namespace / key[:2] / f"{key}.safetensors" for key in map(image_key, test_images[:3])]
    swap = entries[0].read_bytes()
    entries[0].write_bytes(entries[1].read_bytes())
    entries[1].write_bytes(swap)
    with safe_open(str(entries[2]), framework="pt") as handle:
        recorded = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file({**tensors, "cls": tensors["cls"] * float("nan")}, str(entries[2]), metadata=recorded)

    feature_memory().clear()  # as a later process: the entries are read back from disk
    with caplog.at_level(logging.INFO, logger="anomret"):
        again = run(compose_config(overrides), fit=True)
    assert again.per_category == clean.per_category
    for entry, problem in zip(
        entries, ["holds the features of another image"] * 2 + ["'cls' holds NaN"], strict=True
    ):
        assert f"feature store entry {entry} is unsound: " in caplog.text
        assert problem in caplog.text.split(f"feature store entry {entry} is unsound: ")[1].splitlines()[0]
    assert "features: 3 image(s) encoded, 39 read from the feature store" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anomret"):
        run(compose_config(overrides), fit=True)
    assert "is unsound" not in caplog.text, "the recomputed entries were written over the bad ones"
    assert "features: 0 image(s) encoded, 42 read from the feature store" in caplog.text
