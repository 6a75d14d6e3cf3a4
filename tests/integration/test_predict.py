"""``anomret.predict``: a saved bank applied to a folder of unlabelled images of any kind."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from anomret.data.errors import DatasetNotFoundError, EmptyCategoryError
from anomret.pipeline import predict, run


@pytest.fixture
def bank(compose_config, tmp_path):
    path = tmp_path / "bank.safetensors"
    overrides = [
        "+experiment=demo",
        f"memory.path={path}",
        "logger=none",
        f"paths.output_dir={tmp_path / 'train'}",
    ]
    run(compose_config(overrides), fit=True)
    return path


def test_predict_writes_scores_maps_and_overlays(compose_config, tmp_path, data_dir, bank):
    images = tmp_path / "mine"
    (images / "line1").mkdir(parents=True)
    source = Image.open(data_dir / "synthetic" / "synthetic_a" / "wood" / "test" / "spot" / "000.png")
    source.save(images / "line1" / "part.png")
    source.convert("RGB").save(images / "line1" / "part.jpg")  # same stem, other format
    source.convert("L").save(images / "gray.png")  # grayscale, directly in the input folder
    source.convert("RGBA").save(images / "rgba.png")
    (images / "notes.txt").write_text("not an image")

    cfg = compose_config(
        ["+experiment=demo", f"memory.path={bank}", f"input={images}"], config_name="predict"
    )
    table = predict(cfg)

    rows = list(csv.DictReader(table.open()))
    assert sorted(r["image_path"].split("/mine/")[1] for r in rows) == [
        "gray.png",
        "line1/part.jpg",
        "line1/part.png",
        "rgba.png",
    ]
    assert all(0.0 <= float(r["image_score"]) <= 1.0 for r in rows)
    out = tmp_path / "run"
    maps = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.npy"))
    # Natural order reads part.jpg first; part.png, same stem, keeps its format in its output names.
    assert maps == ["line1/part.npy", "line1/part_png.npy", "mine/gray.npy", "mine/rgba.npy"]
    assert np.load(out / "maps" / "mine" / "gray.npy").shape == (cfg.model.map_size, cfg.model.map_size)
    assert len(list((out / "overlays").rglob("*.png"))) == 4


def test_predict_needs_a_bank_and_images(compose_config, tmp_path, bank):
    with pytest.raises(ValueError, match=r"memory\.path"):
        predict(compose_config(["+experiment=demo", f"input={tmp_path}"], config_name="predict"))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        predict(
            compose_config(["+experiment=demo", f"memory.path={bank}", f"input={tmp_path / 'no'}"], "predict")
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyCategoryError, match="no images"):
        predict(
            compose_config(
                ["+experiment=demo", f"memory.path={bank}", f"input={tmp_path / 'empty'}"], "predict"
            )
        )
