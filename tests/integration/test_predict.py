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
    # Outputs mirror the input tree and keep the whole file name: part.png and part.jpg stay apart.
    assert maps == ["gray.png.npy", "line1/part.jpg.npy", "line1/part.png.npy", "rgba.png.npy"]
    assert np.load(out / "maps" / "gray.png.npy").shape == (cfg.model.map.size, cfg.model.map.size)
    assert len(list((out / "overlays").rglob("*.png"))) == 4


def _write_images(folder, data_dir, names):
    source = Image.open(data_dir / "synthetic" / "synthetic_a" / "pill" / "test" / "good" / "000.png")
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        # Every image differs, so each map can be traced back to its image.
        source.rotate(90 * index).save(folder / name)


def test_names_never_collide_and_unreadable_files_are_skipped(
    compose_config, tmp_path, data_dir, bank, caplog
):
    images = tmp_path / "collide"
    _write_images(images, data_dir, ["a.png", "a_png.png", "sub/a.png", "a.jpg"])
    (images / "zz_bad.png").write_text("junk\n")
    whole = (images / "a.png").read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])  # valid header, data cut short
    cfg = compose_config(
        ["+experiment=demo", f"memory.path={bank}", f"input={images}", "data.eval_batch_size=1"],
        config_name="predict",
    )
    with caplog.at_level("WARNING"):
        rows = list(csv.DictReader(predict(cfg).open()))

    # The unreadable files are named in warnings and skipped; everything else is scored and written.
    assert sorted(row["image_path"].split("/collide/")[1] for row in rows) == [
        "a.jpg",
        "a.png",
        "a_png.png",
        "sub/a.png",
    ]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(images / "zz_bad.png") in warnings and str(images / "truncated.png") in warnings
    assert "skipped 2 unreadable file(s) of 6" in warnings
    assert "prepare" not in warnings

    # Every image has its own map and overlay, and its row points at them.
    out = tmp_path / "run"
    assert len(list((out / "maps").rglob("*.npy"))) == 4
    assert len(list((out / "overlays").rglob("*.png"))) == 4
    for row in rows:
        relative = row["image_path"].split("/collide/")[1]
        assert row["map_file"] == f"maps/{relative}.npy"
        assert row["overlay_file"] == f"overlays/{relative}.png"
        # The map behind each row is that image's map: its maximum is the row's map_max.
        assert float(np.load(out / row["map_file"]).max()) == pytest.approx(float(row["map_max"]))
    assert len({row["map_max"] for row in rows}) > 1


def test_a_folder_of_unreadable_files_is_an_error_before_the_bank_is_read(compose_config, tmp_path):
    images = tmp_path / "junk"
    images.mkdir()
    (images / "a.png").write_text("junk")
    cfg = compose_config(
        ["+experiment=demo", f"memory.path={tmp_path / 'none.safetensors'}", f"input={images}"], "predict"
    )
    with pytest.raises(EmptyCategoryError, match=r"(?s)none of the 1 image file\(s\).*a\.png"):
        predict(cfg)


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
