"""load_source: a prepared dataset root -> a validated SampleTable, and every way it can refuse."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from anomret.data.errors import (
    DatasetNotFoundError,
    EmptyCategoryError,
    InvalidSampleError,
    SplitNotFoundError,
    UnknownCategoryError,
)
from anomret.data.meta import make_record, write_meta_json
from anomret.data.prepare import prepare
from anomret.data.samples import SampleTable
from anomret.data.sources import load_source

from .fake_trees import build_tree, write_image, write_mask


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    tree = build_tree("mvtec", tmp_path)
    prepare("mvtec", tree.root)
    return tree.root


def _generic(root: Path, records: list[dict], split: str = "test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta: dict = {"train": {}, "test": {}}
    for record in records:
        meta[split].setdefault(record["cls_name"], []).append(record)
    write_meta_json(root, meta)
    return root


def test_round_trip_test_split(mvtec: Path) -> None:
    table = load_source("mvtec", mvtec)
    assert isinstance(table, SampleTable)
    assert table.categories == ["bottle", "wood"]
    assert len(table) == 10 and table.count(1) == 8
    assert all(s.split == "test" and s.source == "mvtec" for s in table)
    for sample in table:
        assert sample.image_path.is_absolute() and sample.image_path.is_file()
        assert (sample.mask_path is not None) == sample.is_anomalous
    first_anomalous = next(s for s in table if s.is_anomalous)
    assert first_anomalous.mask_path.name == first_anomalous.image_path.stem + "_mask.png"
    assert first_anomalous.defect == "broken"


def test_train_split_categories_and_source_tag(mvtec: Path) -> None:
    table = load_source("MVTec", mvtec, split="train", categories=["wood"], source="mvtec_aux")
    assert table.categories == ["wood"] and len(table) == 2 and table.count(1) == 0
    assert table.sources == ["mvtec_aux"]


def test_category_order_follows_the_request(mvtec: Path) -> None:
    assert load_source("mvtec", mvtec, categories=["wood", "bottle"]).categories == ["wood", "bottle"]


def test_missing_root_names_dataset_path_layout_download_and_command(tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "mvtec"
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("mvtec", root)
    message = str(info.value)
    assert "'mvtec'" in message and str(root) in message and "does not exist" in message
    assert "ground_truth/<defect type>/000_mask.png" in message  # the layout sketch
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in message
    assert f"python -m anomret.prepare mvtec {root}" in message


def test_root_without_meta_json_asks_for_the_prepare_command(tmp_path: Path) -> None:
    tree = build_tree("visa", tmp_path)
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("VISA", tree.root)
    message = str(info.value)
    assert str(tree.root / "meta.json") in message
    assert f"python -m anomret.prepare visa {tree.root}" in message


def test_user_dataset_without_meta_json_explains_the_format(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("my_parts", tmp_path / "mine")
    message = str(info.value)
    assert "'my_parts'" in message and '"img_path"' in message and "write_meta_json" in message
    assert "python -m anomret.prepare" in message


def test_user_dataset_with_meta_json_loads(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_image(root / "a" / "ok.png")
    write_image(root / "a" / "bad.png")
    write_mask(root / "a" / "bad_mask.png")
    _generic(
        root,
        [
            make_record("a/ok.png", "", "widget", 0),
            make_record("a/bad.png", "a/bad_mask.png", "widget", 1, "dent"),
        ],
    )
    table = load_source("my_parts", root)
    assert [s.label for s in table] == [0, 1] and table.sources == ["my_parts"]
    assert table[1].mask_path == (root / "a" / "bad_mask.png").resolve() and table[1].defect == "dent"


def test_anomalous_sample_without_mask_is_refused_when_masks_are_required(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_image(root / "bad.png")
    _generic(root, [make_record("bad.png", "", "widget", 1)])
    with pytest.raises(InvalidSampleError) as info:
        load_source("my_parts", root)  # user datasets require masks by default
    message = str(info.value)
    assert str((root / "bad.png").resolve()) in message and "require_masks=false" in message
    assert len(load_source("my_parts", root, require_masks=False)) == 1


def test_image_only_dataset_loads_without_masks(tmp_path: Path) -> None:
    tree = build_tree("brainmri", tmp_path)
    prepare("brainmri", tree.root)
    table = load_source("brainmri", tree.root)
    assert table.count(1) == 2 and all(s.mask_path is None for s in table)
    with pytest.raises(InvalidSampleError, match="have no mask"):
        load_source("brainmri", tree.root, require_masks=True)


def test_mask_of_another_size_names_both_files_and_sizes(mvtec: Path) -> None:
    mask = mvtec / "wood" / "ground_truth" / "crack" / "001_mask.png"
    write_mask(mask, size=(16, 12))
    with pytest.raises(InvalidSampleError) as info:
        load_source("mvtec", mvtec)
    message = str(info.value)
    assert (
        str(mask.resolve()) in message
        and str((mvtec / "wood" / "test" / "crack" / "001.png").resolve()) in message
    )
    assert "16x16" in message and "16x12" in message
    assert len(load_source("mvtec", mvtec, validate=False)) == 10  # nothing is read without validation


def test_missing_files_are_listed_with_a_count(mvtec: Path) -> None:
    for stem in ("000", "001"):
        (mvtec / "bottle" / "test" / "crack" / f"{stem}.png").unlink()
    (mvtec / "wood" / "ground_truth" / "broken" / "000_mask.png").unlink()
    with pytest.raises(InvalidSampleError) as info:
        load_source("mvtec", mvtec)
    message = str(info.value)
    assert "3 file(s)" in message and "000_mask.png" in message and "--force" in message


def test_unreadable_file_is_reported_by_validation(mvtec: Path) -> None:
    broken = mvtec / "bottle" / "test" / "good" / "000.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(InvalidSampleError) as info:
        load_source("mvtec", mvtec)
    assert str(broken.resolve()) in str(info.value) and "corrupt" in str(info.value)


def test_unknown_category_lists_the_available_ones(mvtec: Path) -> None:
    with pytest.raises(UnknownCategoryError) as info:
        load_source("mvtec", mvtec, categories=["bottle", "Wood"])
    assert "['Wood']" in str(info.value) and "available: ['bottle', 'wood']" in str(info.value)


def test_empty_category_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_image(root / "x.png")
    write_meta_json(
        root, {"train": {"widget": [make_record("x.png", "", "widget", 0)]}, "test": {"widget": []}}
    )
    with pytest.raises(EmptyCategoryError, match=r"\['widget'\] have no samples in the 'test' split"):
        load_source("my_parts", root, categories=["widget"])
    with pytest.raises(EmptyCategoryError):
        load_source("my_parts", root)
    assert len(load_source("my_parts", root, split="train")) == 1


def test_empty_split_of_a_test_only_dataset_says_so(tmp_path: Path) -> None:
    tree = build_tree("headct", tmp_path)
    prepare("headct", tree.root)
    with pytest.raises(EmptyCategoryError, match="test split only"):
        load_source("headct", tree.root, split="train")


def test_missing_split_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "old"
    write_image(root / "x.png")
    (root / "meta.json").write_text(json.dumps({"Test": {"c": [make_record("x.png", "", "c", 0)]}}))
    assert len(load_source("old_style", root, split="TEST")) == 1  # split keys are case-insensitive
    with pytest.raises(SplitNotFoundError, match="no 'train' split"):
        load_source("old_style", root, split="train")


def test_train_split_with_anomalies_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = build_tree("ksdd2", tmp_path)
    prepare("ksdd2", tree.root)
    with caplog.at_level(logging.WARNING, logger="anomret.data.sources"):
        table = load_source("ksdd2", tree.root, split="train")
    assert table.count(1) == 1
    assert "filter label == 0" in caplog.text


def test_bad_record_names_the_meta_file(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_image(root / "x.png")
    _generic(root, [{**make_record("x.png", "", "c", 0), "anomaly": 2}])
    with pytest.raises(InvalidSampleError, match=r"anomaly=2; it must be 0 \(normal\) or 1"):
        load_source("mine", root)


def test_truncated_image_with_valid_header_fails_when_the_source_is_read(mvtec: Path) -> None:
    image = next(s for s in load_source("mvtec", mvtec) if s.is_anomalous).image_path
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) - 20])  # the header and most pixels are there, the end is not
    with pytest.raises(InvalidSampleError) as info:
        load_source("mvtec", mvtec)
    message = str(info.value)
    assert str(image) in message and "truncated" in message and "Fix:" in message
