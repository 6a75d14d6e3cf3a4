"""Your own images: a folder in MVTec layout with any category names, indexed by ``prepare folder``."""

from __future__ import annotations

import shutil

import pytest

from anomret.data.errors import InvalidSampleError
from anomret.data.prepare import prepare
from anomret.pipeline import run


def test_own_images_folder_runs_and_a_truncated_image_fails_before_the_bank(
    compose_config, tmp_path, data_dir
):
    mine = tmp_path / "mine"
    shutil.copytree(data_dir / "synthetic" / "synthetic_a" / "pill", mine / "widget")
    prepare("folder", mine)
    overrides = ["+experiment=demo", "dataset=folder", f"dataset.root={mine}", "logger=none"]

    image = mine / "widget" / "test" / "spot" / "000.png"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) - 16])  # the header is intact, the end of the file is not
    with pytest.raises(InvalidSampleError, match=r"(?s)000\.png.*truncated"):
        run(compose_config(overrides), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors")), "the source is checked before the bank"

    image.write_bytes(whole)
    result = run(compose_config([*overrides, "callbacks.overlays=null"]), fit=True)
    assert list(result.per_category) == ["widget"]
