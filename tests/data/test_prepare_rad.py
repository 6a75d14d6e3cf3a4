"""The readers of RAD's further benchmarks: Real-IAD (JSON split files) and 3D-ADAM (anomalib layout)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from anomret.data.datamodule import SourceSpec
from anomret.data.datasets import get_spec
from anomret.data.errors import InvalidSampleError, LayoutError
from anomret.data.prepare import build_meta, prepare

from .fake_trees import build_3dadam, build_realiad, count, write_image, write_mask


def _records(meta: dict) -> list[dict]:
    return [record for split in meta.values() for rows in split.values() for record in rows]


def _pairs(meta: dict) -> set[tuple[str, str]]:
    return {(r["img_path"], r["mask_path"]) for r in _records(meta) if r["mask_path"]}


# --- Real-IAD ----------------------------------------------------------------------------------


def test_realiad_records_follow_the_json_split(tmp_path: Path) -> None:
    tree = build_realiad(tmp_path)
    meta = json.loads(prepare("realiad", tree.root).read_text())
    assert count(meta) == tree.expected
    assert meta["test"]["audiojack"][1] == {
        "img_path": "realiad_1024/audiojack/NG/AK/S0010/audiojack_0010_NG_AK_C2_2023.jpg",
        "mask_path": "realiad_1024/audiojack/NG/AK/S0010/audiojack_0010_NG_AK_C2_2023.png",
        "cls_name": "audiojack",
        "specie_name": "AK",
        "anomaly": 1,
    }
    # A view of a defective sample where the defect is not visible is labelled OK: a normal image.
    hidden = meta["test"]["audiojack"][-1]
    assert "/NG/" in hidden["img_path"] and hidden["anomaly"] == 0 and hidden["mask_path"] == ""
    assert all(r["anomaly"] == 0 for rows in meta["train"].values() for r in rows)


@pytest.mark.parametrize(("nested_jsons", "category_in_paths"), [(False, False), (True, True), (False, True)])
def test_realiad_json_placements_and_path_styles_give_the_same_index(
    tmp_path: Path, nested_jsons: bool, category_in_paths: bool
) -> None:
    reference = build_meta("realiad", build_realiad(tmp_path / "a").root)
    variant = build_realiad(tmp_path / "b", nested_jsons=nested_jsons, category_in_paths=category_in_paths)
    assert build_meta("realiad", variant.root) == reference
    assert _pairs(reference) == set(variant.pairs)


def test_realiad_reads_a_lower_resolution_image_set(tmp_path: Path) -> None:
    tree = build_realiad(tmp_path)
    (tree.root / "realiad_1024").rename(tree.root / "realiad_256")
    meta = build_meta("realiad", tree.root)
    assert count(meta) == tree.expected
    assert all(r["img_path"].startswith("realiad_256/") for r in _records(meta))


def test_realiad_missing_image_is_an_error(tmp_path: Path) -> None:
    tree = build_realiad(tmp_path)
    shutil.rmtree(tree.root / "realiad_1024" / "pcb" / "NG")
    with pytest.raises(InvalidSampleError, match=r"5 file\(s\) listed in the JSON files") as info:
        prepare("realiad", tree.root)  # 3 images + 2 masks
    assert "realiad_1024/pcb/NG/BX" in str(info.value)
    assert not (tree.root / "meta.json").exists()


def test_realiad_anomalous_entry_without_mask_is_an_error(tmp_path: Path) -> None:
    tree = build_realiad(tmp_path)
    path = tree.root / "realiad_jsons" / "realiad_jsons" / "pcb.json"
    data = json.loads(path.read_text())
    data["test"][1]["mask_path"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidSampleError, match=r"anomaly_class 'AK'\) has no mask_path"):
        prepare("realiad", tree.root)


def test_realiad_broken_or_foreign_json_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = build_realiad(tmp_path)
    json_dir = tree.root / "realiad_jsons" / "realiad_jsons"
    (json_dir / "notes.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert count(build_meta("realiad", tree.root)) == tree.expected
    assert "notes" in caplog.text and "28 of 30 categories are absent" in caplog.text
    (json_dir / "pcb.json").write_text('{"train": [')
    with pytest.raises(InvalidSampleError, match=r"pcb\.json is not valid JSON"):
        build_meta("realiad", tree.root)
    (json_dir / "pcb.json").write_text('{"samples": []}')
    with pytest.raises(InvalidSampleError, match="expected keys 'train' and 'test'"):
        build_meta("realiad", tree.root)


def test_realiad_without_images_or_jsons_is_a_layout_error(tmp_path: Path) -> None:
    tree = build_realiad(tmp_path)
    shutil.rmtree(tree.root / "realiad_1024")
    with pytest.raises(LayoutError, match="no image folder"):
        prepare("realiad", tree.root)
    shutil.rmtree(tree.root / "realiad_jsons")
    with pytest.raises(LayoutError, match="realiad_jsons"):
        prepare("realiad", tree.root)


# --- 3D-ADAM -----------------------------------------------------------------------------------


def test_3dadam_test_normals_come_from_validation(tmp_path: Path) -> None:
    tree = build_3dadam(tmp_path)
    meta = json.loads(prepare("3dadam", tree.root).read_text())
    assert count(meta) == tree.expected
    normals = [r["img_path"] for r in meta["test"]["1m1"] if not r["anomaly"]]
    assert normals == ["1m1/validation/good/rgb/000.png"]
    assert [r["img_path"] for r in meta["train"]["1m1"]] == [f"1m1/train/good/rgb/00{i}.png" for i in (0, 1)]
    assert not any("xyz" in r["img_path"] for r in _records(meta))
    assert {r["specie_name"] for r in meta["test"]["1m1"] if r["anomaly"]} == {"cut", "hole"}
    assert _pairs(meta) == set(tree.pairs)


def test_3dadam_test_good_is_read_and_validation_defects_are_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = build_3dadam(tmp_path)
    write_image(tree.root / "1m1" / "test" / "good" / "rgb" / "100.png")
    write_image(tree.root / "1m1" / "validation" / "cut" / "rgb" / "200.png")
    with caplog.at_level(logging.WARNING):
        meta = build_meta("3dadam", tree.root)
    assert count(meta)["test"]["1m1"] == (2, 4, 4)
    assert "validation/cut is not used" in caplog.text


def test_3dadam_mvtec_style_copy_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "3D-ADAM"
    write_image(root / "spurgear" / "train" / "good" / "000.png")
    write_image(root / "spurgear" / "test" / "good" / "001.png")
    write_image(root / "spurgear" / "test" / "cut" / "002.png")
    write_mask(root / "spurgear" / "ground_truth" / "cut" / "002.png")
    assert count(build_meta("3dadam", root)) == {
        "train": {"spurgear": (1, 0, 0)},
        "test": {"spurgear": (1, 1, 1)},
    }


def test_3dadam_defect_image_without_mask_is_an_error_naming_both(tmp_path: Path) -> None:
    tree = build_3dadam(tmp_path)
    (tree.root / "gripper_open" / "test" / "hole" / "ground_truth" / "001.png").unlink()
    with pytest.raises(InvalidSampleError) as info:
        prepare("3dadam", tree.root)
    assert str(tree.root / "gripper_open" / "test" / "hole" / "rgb" / "001.png") in str(info.value)
    assert str(tree.root / "gripper_open" / "test" / "hole" / "ground_truth") in str(info.value)


# --- names and configs -------------------------------------------------------------------------


def test_names_and_aliases() -> None:
    assert get_spec("Real-IAD") is get_spec("realiad")
    assert get_spec("3D-ADAM") is get_spec("adam3d") is get_spec("3dadam")
    assert len(get_spec("realiad").categories or ()) == 30  # type: ignore[union-attr]
    assert len(get_spec("3dadam").categories or ()) == 23  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "build"), [("realiad", build_realiad), ("3dadam", build_3dadam)])
def test_dataset_configs_load_the_train_and_test_splits(compose_config, tmp_path: Path, name, build) -> None:
    tree = build(tmp_path / "trees")
    prepare(name, tree.root)
    cfg = compose_config(["+experiment=demo", f"dataset={name}", f"dataset.root={tree.root}"])
    assert cfg.dataset.name == name and cfg.dataset.split == "test"
    test = SourceSpec.from_config(cfg.dataset).load()
    assert len(test) == sum(sum(c[:2]) for c in tree.expected["test"].values())
    train = SourceSpec.from_config({**cfg.dataset, "split": "train"}).load()  # RAD's memory source
    assert len(train) == sum(c[0] for c in tree.expected["train"].values()) and train.count(1) == 0
