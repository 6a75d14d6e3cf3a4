"""The prepare command: published folder layouts -> meta.json, on tiny fake trees of every dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anomret.data.datasets import get_spec
from anomret.data.errors import DataError, InvalidSampleError, LayoutError, UnknownDatasetError
from anomret.data.meta import read_meta_json
from anomret.data.prepare import DATASETS, build_meta, prepare
from anomret.prepare import main

from .fake_trees import BUILDERS, build_tree, count, write_image, write_mask

MRAD_DATASETS = [
    "mvtec", "visa", "btad", "mpdd", "dtd", "sdd", "ksdd2", "dagm",
    "headct", "brainmri", "br35h", "isic", "colondb", "clinicdb", "kvasir", "endo",
]  # fmt: skip
RAD_DATASETS = ["realiad", "3dadam"]  # RAD's benchmarks beyond MVTec and VisA
ALL_DATASETS = MRAD_DATASETS + RAD_DATASETS


def _meta(path: Path) -> dict:
    return json.loads(path.read_text())


def test_registry_covers_the_sixteen_mrad_datasets_then_rads() -> None:
    assert list(DATASETS) == ALL_DATASETS
    assert set(BUILDERS) == set(DATASETS)
    for spec in DATASETS.values():
        assert spec.layout.startswith("ROOT/") and spec.download and spec.description


@pytest.mark.parametrize("name", ALL_DATASETS)
def test_prepare_indexes_the_published_layout(tmp_path: Path, name: str) -> None:
    tree = build_tree(name, tmp_path)
    target = prepare(name, tree.root)

    assert target == tree.root / "meta.json"
    meta = _meta(target)
    assert set(meta) == {"train", "test"}
    assert count(meta) == {split: tree.expected.get(split, {}) for split in ("train", "test")}
    spec = DATASETS[name]
    assert spec.categories is not None and set(tree.categories) <= set(spec.categories)
    records = [r for split in meta.values() for rows in split.values() for r in rows]
    for record in records:
        assert set(record) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
        assert not Path(record["img_path"]).is_absolute()
        assert (tree.root / record["img_path"]).is_file()
        if record["mask_path"]:
            assert record["anomaly"] == 1 and (tree.root / record["mask_path"]).is_file()
        if spec.has_masks and record["anomaly"]:
            assert record["mask_path"], f"anomalous record without mask: {record}"
        if not spec.has_masks:
            assert record["mask_path"] == ""
    pairs = {(r["img_path"], r["mask_path"]) for r in records if r["mask_path"]}
    assert pairs == set(tree.pairs)


def test_train_split_is_kept_for_mvtec_and_visa(tmp_path: Path) -> None:
    for name in ("mvtec", "visa"):
        tree = build_tree(name, tmp_path)
        table = read_meta_json(prepare(name, tree.root).parent, split="train", source=name)
        assert len(table) > 0 and table.count(1) == 0  # normal images only
        assert DATASETS[name].has_train_split


def test_medical_categories_follow_the_mrad_class_list(tmp_path: Path) -> None:
    expected = {
        "headct": "brain",
        "brainmri": "brain",
        "br35h": "brain",
        "isic": "skin",
        "sdd": "electrical commutators",
    }
    expected |= dict.fromkeys(("colondb", "clinicdb", "kvasir", "endo"), "colon")
    for name, category in expected.items():
        meta = _meta(prepare(name, build_tree(name, tmp_path).root))
        assert list(meta["test"]) == [category]
        assert all(r["cls_name"] == category for r in meta["test"][category])


def test_polyp_masks_pair_by_stem_not_sorted_order(tmp_path: Path) -> None:
    # "1", "2", "10": lexicographic order of images ("1.png" < "10.png") and of suffixed masks
    # ("10_mask" < "1_mask") disagree, so positional pairing would swap them.
    root = tmp_path / "clinicdb"
    for stem in ("1", "2", "10"):
        write_image(root / "images" / f"{stem}.png")
        write_mask(root / "masks" / f"{stem}_mask.png")
    records = _meta(prepare("clinicdb", root))["test"]["colon"]
    assert {r["img_path"]: r["mask_path"] for r in records} == {
        f"images/{s}.png": f"masks/{s}_mask.png" for s in ("1", "2", "10")
    }


def test_visa_is_read_from_the_csv_without_copying(tmp_path: Path) -> None:
    tree = build_tree("visa", tmp_path)
    before = sorted(p.relative_to(tree.root) for p in tree.root.rglob("*"))
    meta = _meta(prepare("visa", tree.root))
    after = sorted(p.relative_to(tree.root) for p in tree.root.rglob("*"))
    assert set(after) - set(before) == {Path("meta.json")}
    record = meta["test"]["candle"][-1]
    assert record == {
        "img_path": "candle/Data/Images/Anomaly/001.JPG",
        "mask_path": "candle/Data/Masks/Anomaly/001.png",
        "cls_name": "candle",
        "specie_name": "",
        "anomaly": 1,
    }


def test_visa_mvtec_style_copy_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "VisA_pytorch" / "1cls"
    write_image(root / "pcb1" / "train" / "good" / "000.JPG")
    write_image(root / "pcb1" / "test" / "good" / "001.JPG")
    write_image(root / "pcb1" / "test" / "bad" / "002.JPG")
    write_mask(root / "pcb1" / "ground_truth" / "bad" / "002.png")
    assert count(build_meta("visa", root)) == {"train": {"pcb1": (1, 0, 0)}, "test": {"pcb1": (1, 1, 1)}}


@pytest.mark.parametrize(
    ("name", "folder"),
    [("headct", "brain"), ("sdd", "electrical commutators"), ("isic", "isic"), ("endo", "endo")],
)
def test_converted_mvtec_style_trees_get_the_canonical_category(
    tmp_path: Path, name: str, folder: str
) -> None:
    # The layout written by the AnomalyCLIP/AdaCLIP preprocessing scripts.
    root = tmp_path / name
    write_image(root / folder / "test" / "good" / "000.png")
    write_image(root / folder / "test" / "defect" / "001.png")
    write_mask(root / folder / "ground_truth" / "defect" / "001_mask.png")
    category = get_spec(name).categories[0]  # type: ignore[index]
    with_mask = 1 if DATASETS[name].has_masks else 0
    assert count(build_meta(name, root))["test"] == {category: (1, 1, with_mask)}


def test_dagm_mvtec_style_copy_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "DAGM_anomaly_detection"
    write_image(root / "Class3" / "train" / "good" / "0001.PNG")
    write_image(root / "Class3" / "test" / "defect" / "0002.PNG")
    write_mask(root / "Class3" / "ground_truth" / "defect" / "0002_label.PNG")
    assert count(build_meta("dagm", root)) == {"train": {"Class3": (1, 0, 0)}, "test": {"Class3": (0, 1, 1)}}


def test_dagm_and_kolektor_labels_come_from_the_masks(tmp_path: Path) -> None:
    tree = build_tree("dagm", tmp_path)
    # A blank label image does not make its image anomalous.
    write_mask(tree.root / "Class1" / "Test" / "Label" / "0003_label.PNG", box=None)
    meta = _meta(prepare("dagm", tree.root))
    assert count(meta)["test"]["Class1"] == (2, 1, 1)


def test_headct_image_missing_from_labels_csv_is_an_error(tmp_path: Path) -> None:
    tree = build_tree("headct", tmp_path)
    (tree.root / "head_ct" / "head_ct" / "002.png").unlink()
    with pytest.raises(
        InvalidSampleError, match=r"1 image\(s\) listed in .*labels\.csv do not exist"
    ) as info:
        prepare("headct", tree.root)
    assert str(tree.root / "head_ct" / "head_ct" / "002.png") in str(info.value)


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    tree = build_tree("mvtec", tmp_path)
    (tree.root / "bottle" / "test" / "broken" / "._000.png").write_bytes(b"\x00\x05AppleDouble")
    (tree.root / "bottle" / "ground_truth" / "broken" / ".DS_Store").write_bytes(b"\x00")
    (tree.root / "bottle" / "test" / "good" / "Thumbs.db").write_bytes(b"\x00")
    assert count(_meta(prepare("mvtec", tree.root))) == tree.expected


def test_mask_without_image_is_an_error_naming_both(tmp_path: Path) -> None:
    tree = build_tree("mvtec", tmp_path)
    stray = write_mask(tree.root / "bottle" / "ground_truth" / "broken" / "007_mask.png")
    with pytest.raises(InvalidSampleError) as info:
        prepare("mvtec", tree.root)
    message = str(info.value)
    assert str(stray) in message
    assert str(tree.root / "bottle" / "test" / "broken" / "007.png") in message
    assert not (tree.root / "meta.json").exists()


def test_mask_folder_without_image_folder_is_an_error(tmp_path: Path) -> None:
    tree = build_tree("mpdd", tmp_path)
    stray = write_mask(tree.root / "tubes" / "ground_truth" / "scratch" / "000_mask.png")
    with pytest.raises(InvalidSampleError, match="have no images") as info:
        prepare("mpdd", tree.root)
    assert str(stray) in str(info.value) and str(tree.root / "tubes" / "test" / "scratch") in str(info.value)


def test_anomalous_image_without_mask_is_an_error_naming_both(tmp_path: Path) -> None:
    tree = build_tree("isic", tmp_path)
    image = tree.root / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_0000001.jpg"
    (tree.root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000001_Segmentation.png").unlink()
    with pytest.raises(InvalidSampleError) as info:
        prepare("isic", tree.root)
    assert str(image) in str(info.value)
    assert str(tree.root / "ISBI2016_ISIC_Part1_Test_GroundTruth") in str(info.value)


def test_two_masks_for_one_image_is_an_error(tmp_path: Path) -> None:
    tree = build_tree("btad", tmp_path)
    write_mask(tree.root / "01" / "ground_truth" / "ko" / "000.bmp")  # beside 000.png
    with pytest.raises(InvalidSampleError, match="two masks"):
        prepare("btad", tree.root)


def test_visa_csv_with_missing_files_is_an_error(tmp_path: Path) -> None:
    tree = build_tree("visa", tmp_path)
    shutil.rmtree(tree.root / "pcb1")
    with pytest.raises(InvalidSampleError, match=r"do not exist") as info:
        prepare("visa", tree.root)
    assert "pcb1/Data/Images" in str(info.value) and "7 file(s)" in str(info.value)  # 5 images + 2 masks


@pytest.mark.parametrize("name", ALL_DATASETS)
def test_wrong_root_is_a_layout_error_with_tree_and_download(tmp_path: Path, name: str) -> None:
    root = tmp_path / "somewhere"
    (root / "unrelated").mkdir(parents=True)
    write_image(root / "picture.png")
    with pytest.raises(LayoutError) as info:
        prepare(name, root)
    message = str(info.value)
    spec = DATASETS[name]
    assert spec.title in message and "Expected layout" in message and "ROOT/" in message
    assert spec.download in message
    assert f"python -m anomret.prepare {name} {root}" in message


def test_layout_error_hints_at_a_single_nested_folder(tmp_path: Path) -> None:
    tree = build_tree("mvtec", tmp_path / "download" / "mvtec_anomaly_detection")
    with pytest.raises(LayoutError, match="holds a single folder, mvtec_anomaly_detection/"):
        prepare("mvtec", tree.root.parent.parent)


def test_existing_meta_is_kept_unless_forced(tmp_path: Path) -> None:
    tree = build_tree("btad", tmp_path)
    target = tree.root / "meta.json"
    target.write_text("{}")
    with pytest.raises(DataError, match="--force"):
        prepare("btad", tree.root)
    assert target.read_text() == "{}"
    prepare("btad", tree.root, force=True)
    assert count(_meta(target)) == tree.expected


def test_unknown_dataset_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownDatasetError, match="mvtec, visa, btad"):
        prepare("mvtec3d", tmp_path)


def test_names_are_case_insensitive_and_aliases_work(tmp_path: Path) -> None:
    tree = build_tree("sdd", tmp_path)
    assert prepare("KolektorSDD", tree.root).is_file()
    assert get_spec("MVTec") is DATASETS["mvtec"] and get_spec("BR35") is DATASETS["br35h"]


def test_cli_writes_and_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = build_tree("mvtec", tmp_path)
    assert main(["MVTec", str(tree.root)]) == 0
    out = capsys.readouterr().out
    assert (tree.root / "meta.json").is_file()
    assert "normal" in out and "anomalous" in out and "with mask" in out
    # test / bottle: 1 normal, 4 anomalous, 4 with mask
    assert any(line.split() == ["test", "bottle", "1", "4", "4"] for line in out.splitlines())


def test_cli_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = build_tree("br35h", tmp_path)
    assert main(["br35h", str(tree.root), "--dry-run"]) == 0
    assert not (tree.root / "meta.json").exists()
    assert any(
        line.split() == ["test", "brain", "2", "2", "0"] for line in capsys.readouterr().out.splitlines()
    )


def test_cli_refuses_to_overwrite_and_force_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = build_tree("headct", tmp_path)
    assert main(["headct", str(tree.root)]) == 0
    assert main(["headct", str(tree.root)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["headct", str(tree.root), "--force"]) == 0


def test_cli_reports_layout_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["visa", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "split_csv/1cls.csv" in err and "Traceback" not in err


def _own_images(root: Path) -> Path:
    """MVTec layout with category names no benchmark has: masks in widget/, none in gear/."""
    for index, split_type in enumerate(["train/good", "test/good", "test/dent"]):
        write_image(root / "widget" / split_type / "000.png", seed=index)
    write_mask(root / "widget" / "ground_truth" / "dent" / "000_mask.png")
    write_image(root / "gear" / "test" / "good" / "a.png", seed=5)
    write_image(root / "gear" / "test" / "chipped" / "b.png", seed=6)
    (root / "empty" / "test" / "good").mkdir(parents=True)  # a category folder without images
    (root / "notes").mkdir()  # not a category
    return root


def test_folder_reader_indexes_any_category_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = _own_images(tmp_path / "mine")
    with pytest.raises(LayoutError, match="does not look like MVTec AD"):
        build_meta("mvtec", root)

    with caplog.at_level("WARNING"):
        assert main(["folder", str(root)]) == 0
    assert ["test", "widget", "1", "1", "1"] in [
        line.split() for line in capsys.readouterr().out.splitlines()
    ]
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"{root / 'empty'} holds no images" in warnings
    assert f"{root / 'notes'}/ has no test/ or train/ folder" in warnings

    widget = read_meta_json(root, split="test", source="mine", categories=["widget"])
    assert sorted((s.defect, s.label, s.mask_path is not None) for s in widget) == [
        ("dent", 1, True),
        ("good", 0, False),
    ]
    gear = read_meta_json(root, split="test", source="mine", categories=["gear"])
    assert sorted((s.label, s.mask_path) for s in gear) == [(0, None), (1, None)]  # image labels only
    assert list(_meta(root / "meta.json")["train"]) == ["widget"]


def test_an_empty_category_folder_of_a_benchmark_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = build_tree("mvtec", tmp_path)
    (tree.root / "cable" / "test" / "good").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        prepare("mvtec", tree.root)
    assert any(f"{tree.root / 'cable'} holds no images" in r.getMessage() for r in caplog.records)
    assert "cable" not in _meta(tree.root / "meta.json")["test"]
