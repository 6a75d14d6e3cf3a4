"""Input that is almost right is named before any compute: links in a prediction folder, index records
outside the dataset root, a benchmark name for a folder of one's own categories, an evaluation split
whose metrics are undefined."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest

from anomret.data.errors import DatasetNotFoundError, LayoutError
from anomret.data.folder import image_folder_samples, input_base
from anomret.data.meta import make_record, write_meta_json
from anomret.data.prepare import prepare
from anomret.data.sources import load_source

from .fake_trees import build_tree, write_image


@pytest.mark.parametrize("kind", ["loop", "broken"])
def test_an_input_link_that_leads_nowhere_is_a_clear_error(tmp_path, kind):
    link = tmp_path / "images"
    link.symlink_to(link if kind == "loop" else tmp_path / "gone")
    message = (
        "is a symbolic link that loops" if kind == "loop" else f"is a symbolic link to {tmp_path / 'gone'}"
    )
    for read in (image_folder_samples, input_base):
        with pytest.raises(
            DatasetNotFoundError, match=rf"prediction input {link} {message}.*Fix: pass input="
        ):
            read(link)


def test_links_in_an_input_folder_are_followed_and_those_that_lead_nowhere_are_named(tmp_path, caplog):
    elsewhere, base = tmp_path / "elsewhere", tmp_path / "input"
    write_image(base / "a" / "1.png")
    write_image(elsewhere / "kept" / "2.png", seed=1)
    write_image(elsewhere / "3.png", seed=2)
    (base / "b").symlink_to(elsewhere / "kept")  # a folder of images kept elsewhere
    (base / "c.png").symlink_to(elsewhere / "3.png")  # an image kept elsewhere
    (base / "d.png").symlink_to(elsewhere / "gone.png")  # broken
    (base / "e").symlink_to(base / "e")  # loops
    (base / "a" / "again").symlink_to(base / "a")  # its own folder: would read 1.png twice, forever
    (base / "f").symlink_to(base / "a")  # a folder of the input: would read 1.png twice
    with caplog.at_level(logging.WARNING, logger="anomret.data.folder"):
        samples = image_folder_samples(base)
    found = [(sample.image_path.relative_to(base).as_posix(), sample.category) for sample in samples]
    assert found == [("a/1.png", "a"), ("b/2.png", "b"), ("c.png", "input")]
    assert f"skipped 4 symbolic link(s) under {base} that lead nowhere" in caplog.text
    for link in ("a/again", "d.png", "e", "f"):
        assert str(base / link) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomret.data.folder"):
        image_folder_samples(base / "a" / "1.png")
        image_folder_samples(elsewhere)
    assert not caplog.text, "nothing to say about inputs without such links"


def test_index_records_outside_the_dataset_root_are_read_with_one_warning(tmp_path, caplog):
    root = tmp_path / "mine"
    inside = write_image(root / "cat" / "0.png")
    write_image(tmp_path / "above.png", seed=1)
    absolute = write_image(tmp_path / "far" / "1.png", seed=2)
    records = [
        make_record("cat/0.png", "", "cat", 0),
        make_record("../above.png", "", "cat", 0),
        make_record(str(absolute), "", "cat", 0),
    ]
    write_meta_json(root, {"train": {}, "test": {"cat": records}})
    with caplog.at_level(logging.WARNING, logger="anomret.data"):
        table = load_source("mine", root, require_masks=False)
    assert [sample.image_path for sample in table] == [inside, root / "../above.png", absolute]
    warnings = [
        record.getMessage() for record in caplog.records if "outside the dataset root" in record.message
    ]
    assert len(warnings) == 1
    assert (
        f"2 file(s) of the 'test' split lie outside the dataset root {root} (e.g. {root / '../above.png'})"
        in (warnings[0])
    )
    assert "python -m anomret.prepare NAME ROOT --force" in warnings[0]
    caplog.clear()
    write_meta_json(root, {"train": {}, "test": {"cat": records[:1]}})
    with caplog.at_level(logging.WARNING, logger="anomret.data"):
        load_source("mine", root, require_masks=False)
    assert "outside the dataset root" not in caplog.text


def test_a_benchmark_name_for_a_folder_of_ones_own_categories_points_to_prepare_folder(tmp_path):
    root = tmp_path / "my line"
    write_image(root / "widget" / "test" / "good" / "0.png")
    write_image(root / "gadget" / "train" / "good" / "0.png", seed=1)
    write_image(root / "gadget" / "test" / "good" / "0.png", seed=2)
    for name in ("mvtec", "visa", "mpdd"):
        with pytest.raises(LayoutError) as refused:
            prepare(name, root)
        assert (
            f"if they are your own categories, index them with: python -m anomret.prepare folder {shlex.quote(str(root))}"
            in str(refused.value)
        )
    assert prepare("folder", root) == root / "meta.json"


def test_an_evaluation_split_without_anomalous_images_is_named_before_any_compute(tmp_path, caplog):
    root = build_tree("mvtec", tmp_path).root
    prepare("mvtec", root)
    with caplog.at_level(logging.WARNING, logger="anomret.data.sources"):
        load_source("mvtec", root, split="train")  # a memory source: normal images are what it wants
    assert "undefined" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="anomret.data.sources"):
        load_source("mvtec", root, split="train", evaluated=True)
        load_source("mvtec", root, split="test", evaluated=True)
    (warning,) = [record.getMessage() for record in caplog.records if record.name == "anomret.data.sources"]
    assert warning == (
        "mvtec [train]: no category has anomalous images, so their detection metrics (AUROC, AP, F1, PRO) are "
        "undefined and show as '–'. Fix: evaluate on the test split (dataset.split=test): a train split holds "
        "normal images only."
    )


def test_categories_lacking_one_kind_of_image_are_named(tmp_path, caplog):
    root = tmp_path / "mine"
    for category in ("both", "defects"):
        for i in range(2):
            write_image(root / category / f"{i}.png", seed=i)
    records = {
        category: [make_record(f"{category}/{i}.png", "", category, label) for i, label in enumerate(labels)]
        for category, labels in (("both", (0, 1)), ("defects", (1, 1)))
    }
    write_meta_json(root, {"train": {}, "test": records})
    with caplog.at_level(logging.WARNING, logger="anomret.data.sources"):
        load_source("mine", root, require_masks=False, evaluated=True)
    assert "mine [test]: categories ['defects'] lack normal images, so their detection metrics" in caplog.text
    assert "leave them out (dataset.categories=[...])" in caplog.text


def test_records_inside_a_linked_root_are_not_outside(tmp_path, caplog):
    data = tmp_path / "data"
    write_image(data / "cat" / "0.png")
    link = tmp_path / "linked"
    link.symlink_to(data)
    write_meta_json(
        data, {"train": {}, "test": {"cat": [make_record(str(link / "cat" / "0.png"), "", "cat", 0)]}}
    )
    with caplog.at_level(logging.WARNING, logger="anomret.data"):
        load_source("mine", Path(link), require_masks=False)
    assert "outside the dataset root" not in caplog.text
