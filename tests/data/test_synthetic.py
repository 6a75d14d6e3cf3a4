"""The built-in synthetic domains: layout, meta.json, determinism, reuse, regeneration and mask fidelity."""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomret.data import synthetic
from anomret.data.meta import read_meta_json
from anomret.data.sources import load_source
from anomret.data.synthetic import (
    DEFECT_KINDS,
    DOMAINS,
    STAMP_FILENAME,
    SyntheticSpec,
    ensure_synthetic,
    generate_domain,
    main,
    render_sample,
)

# Small enough that a whole domain takes a fraction of a second; large enough for every defect kind.
SMALL = SyntheticSpec(image_size=64, n_train=2, n_test_normal=1, n_test_per_defect=1, seed=0)
OBJECTS = {"pill", "nut", "board"}
CATEGORY_KINDS = [(domain, category) for domain, categories in DOMAINS.items() for category in categories]


def tree_hashes(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def tree_mtimes(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        path.relative_to(directory).as_posix(): (path.stat().st_mtime_ns, path.stat().st_ino)
        for path in directory.rglob("*")
    }


def leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


def read_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# ----------------------------------------------------------------------------------------------------
# Layout and meta.json (the session's default-spec data, as the demo and the other tests see it)
# ----------------------------------------------------------------------------------------------------


def test_domains_have_three_disjoint_categories() -> None:
    assert set(DOMAINS) == {"synthetic_a", "synthetic_b"}
    assert all(len(categories) == 3 for categories in DOMAINS.values())
    assert not set(DOMAINS["synthetic_a"]) & set(DOMAINS["synthetic_b"])
    # Each domain mixes textures and objects.
    assert all(set(categories) & OBJECTS and set(categories) - OBJECTS for categories in DOMAINS.values())


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_meta_json_indexes_the_mvtec_tree(data_dir: Path, domain: str) -> None:
    root = data_dir / "synthetic" / domain
    spec = SyntheticSpec()
    train = read_meta_json(root, split="train", source=domain)
    test = read_meta_json(root, split="test", source=domain)
    assert train.categories == list(DOMAINS[domain]) == test.categories

    for category in DOMAINS[domain]:
        rows = train.filter(categories=[category])
        assert len(rows) == spec.n_train and rows.count(1) == 0
        assert all(row.image_path.parent == root / category / "train" / "good" for row in rows)
        rows = test.filter(categories=[category])
        defects = [row.defect for row in rows if row.is_anomalous]
        assert rows.count(0) == spec.n_test_normal
        assert sorted(defects) == sorted(DEFECT_KINDS * spec.n_test_per_defect)

    for row in train + test:
        assert row.image_path.is_file()
        image = read_array(row.image_path)
        assert image.shape == (spec.image_size, spec.image_size, 3) and image.dtype == np.uint8
        if not row.is_anomalous:
            assert row.mask_path is None and row.defect == "good"
            continue
        assert row.image_path.parent == root / row.category / "test" / row.defect
        assert (
            row.mask_path
            == root / row.category / "ground_truth" / row.defect / f"{row.image_path.stem}_mask.png"
        )
        mask = read_array(row.mask_path)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}

    # The project's own loader accepts it, masks required, with its size checks.
    table = load_source(domain, root, split="test", require_masks=True)
    assert len(table) == len(test) and table.has_masks


def test_files_on_disk_are_the_rendered_samples(data_dir: Path) -> None:
    root = data_dir / "synthetic" / "synthetic_b"
    for category in DOMAINS["synthetic_b"]:
        normal = render_sample("synthetic_b", category, "train", "good", 3)
        np.testing.assert_array_equal(
            read_array(root / category / "train" / "good" / "003.png"), normal.image
        )
        anomalous = render_sample("synthetic_b", category, "test", "spot", 1)
        np.testing.assert_array_equal(
            read_array(root / category / "test" / "spot" / "001.png"), anomalous.image
        )
        mask = read_array(root / category / "ground_truth" / "spot" / "001_mask.png")
        np.testing.assert_array_equal(mask > 0, anomalous.mask)


# ----------------------------------------------------------------------------------------------------
# Images and masks
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("domain", "category"), CATEGORY_KINDS)
def test_mask_is_exactly_the_pixels_the_defect_changed(domain: str, category: str) -> None:
    for kind in DEFECT_KINDS:
        for index in range(2):
            anomalous = render_sample(domain, category, "test", kind, index)
            clean = render_sample(domain, category, "test", kind, index, apply_defect=False)
            assert clean.mask is None and anomalous.mask is not None
            delta = np.abs(anomalous.image.astype(int) - clean.image.astype(int)).max(axis=-1)
            np.testing.assert_array_equal(delta > 0, anomalous.mask, err_msg=f"{category}/{kind}/{index}")
            # On objects, defects lie on the object; textures are foreground everywhere.
            assert not (anomalous.mask & ~anomalous.foreground).any()
            assert anomalous.foreground.all() == (category not in OBJECTS)
            # Detectable: the defect stands out of the surface it replaced, not by a few grey levels.
            assert delta[anomalous.mask].mean() > 30, f"{category}/{kind}/{index} is too faint"
            assert anomalous.mask.sum() >= 20


def test_normal_images_vary_but_anomalies_do_not_shift_mean_intensity() -> None:
    spec = SyntheticSpec(image_size=64)
    for domain, category in CATEGORY_KINDS:
        normal = [render_sample(domain, category, "test", "good", i, spec).image for i in range(16)]
        anomalous = [
            render_sample(domain, category, "test", k, i, spec).image for k in DEFECT_KINDS for i in range(4)
        ]
        # Nuisance variation: no two normal images are the same, nor nearly so.
        stack = np.stack(normal).astype(float)
        differences = np.abs(stack[:, None] - stack[None]).mean(axis=(2, 3, 4))
        assert differences[~np.eye(len(normal), dtype=bool)].min() > 3.0, category
        # Image mean intensity alone ranks anomalous above normal images no better than a coin with a bias.
        normal_means = np.array([image.mean() for image in normal])
        anomalous_means = np.array([image.mean() for image in anomalous])
        auroc = (anomalous_means[:, None] > normal_means[None]).mean()
        assert 0.2 < auroc < 0.8, f"{category}: mean intensity separates anomalies (AUROC {auroc:.2f})"


def test_render_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        render_sample("synthetic_c", "weave", "test", "good", 0)
    with pytest.raises(ValueError, match="has no category"):
        render_sample("synthetic_a", "nut", "test", "good", 0)
    with pytest.raises(ValueError, match="kind"):
        render_sample("synthetic_a", "weave", "train", "scratch", 0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSpec(image_size=16)
    with pytest.raises(ValueError, match="n_train"):
        SyntheticSpec(n_train=-1)


# ----------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_other_images(tmp_path: Path) -> None:
    first = tree_hashes(generate_domain(tmp_path / "one", "synthetic_a", SMALL))
    second = tree_hashes(generate_domain(tmp_path / "two", "synthetic_a", SMALL))
    assert first == second
    assert sum(name.endswith("_mask.png") for name in first) == 3 * len(DEFECT_KINDS)

    reseeded = tree_hashes(
        generate_domain(tmp_path / "three", "synthetic_a", SyntheticSpec(**{**vars(SMALL), "seed": 1}))
    )
    assert reseeded.keys() == first.keys()
    images = [name for name in first if name.endswith(".png") and not name.endswith("_mask.png")]
    assert all(reseeded[name] != first[name] for name in images)


def test_images_are_seeded_per_image_not_by_position_in_the_run(tmp_path: Path) -> None:
    few = generate_domain(tmp_path / "few", "synthetic_b", SMALL)
    more = generate_domain(tmp_path / "more", "synthetic_b", SyntheticSpec(**{**vars(SMALL), "n_train": 4}))
    for category in DOMAINS["synthetic_b"]:
        for name in ("train/good/000.png", "train/good/001.png", "test/good/000.png", "test/scratch/000.png"):
            assert (few / category / name).read_bytes() == (more / category / name).read_bytes()
    assert (more / "nut" / "train" / "good" / "003.png").is_file()


# ----------------------------------------------------------------------------------------------------
# ensure_synthetic: reuse, regeneration, interrupted runs, concurrency
# ----------------------------------------------------------------------------------------------------


def test_second_call_reuses_the_domains_untouched(tmp_path: Path) -> None:
    paths = ensure_synthetic(tmp_path, spec=SMALL)
    assert paths == {domain: tmp_path / domain for domain in DOMAINS}
    stamp = json.loads((paths["synthetic_a"] / STAMP_FILENAME).read_text())
    assert stamp["spec"] == vars(SMALL) and stamp["domain"] == "synthetic_a"
    before = {domain: tree_mtimes(path) for domain, path in paths.items()}
    time.sleep(0.01)  # a rewrite would then carry a later mtime
    assert ensure_synthetic(tmp_path, spec=SMALL) == paths
    assert {domain: tree_mtimes(path) for domain, path in paths.items()} == before
    assert leftovers(tmp_path) == []


def test_another_spec_regenerates_the_domain(tmp_path: Path) -> None:
    ensure_synthetic(tmp_path, ("synthetic_a",), SMALL)
    bigger = SyntheticSpec(**{**vars(SMALL), "seed": 3, "n_test_normal": 2})
    target = ensure_synthetic(tmp_path, ("synthetic_a",), bigger)["synthetic_a"]
    assert json.loads((target / STAMP_FILENAME).read_text())["spec"] == vars(bigger)
    assert tree_hashes(target) == tree_hashes(generate_domain(tmp_path / "fresh", "synthetic_a", bigger))
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "synthetic_b").exists()  # only the requested domain


@pytest.mark.parametrize("damage", ["no_stamp", "corrupt_stamp", "stale_temp_dirs"])
def test_interrupted_or_foreign_trees_are_regenerated(tmp_path: Path, damage: str) -> None:
    target = tmp_path / "synthetic_b"
    if damage == "stale_temp_dirs":
        # A generation killed mid-way (before its rename) and one killed mid-swap.
        (tmp_path / ".synthetic_b.tmp-killed" / "grid" / "train").mkdir(parents=True)
        (tmp_path / ".synthetic_b.old-killed").mkdir()
    else:
        (target / "grid" / "train" / "good").mkdir(parents=True)
        (target / "grid" / "train" / "good" / "stray.png").write_bytes(b"partial")
        if damage == "corrupt_stamp":
            (target / STAMP_FILENAME).write_text('{"generator_version": ')
    ensure_synthetic(tmp_path, ("synthetic_b",), SMALL)
    assert not (target / "grid" / "train" / "good" / "stray.png").exists()
    assert tree_hashes(target) == tree_hashes(generate_domain(tmp_path / "fresh", "synthetic_b", SMALL))
    assert leftovers(tmp_path) == []


def test_a_failed_generation_leaves_the_previous_tree_in_place(tmp_path: Path, monkeypatch) -> None:
    target = ensure_synthetic(tmp_path, ("synthetic_a",), SMALL)["synthetic_a"]
    before = tree_hashes(target)
    calls = 0
    real_render = synthetic.render_sample

    def dies_midway(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt  # as a Ctrl-C half-way through writing
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_sample", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, ("synthetic_a",), SyntheticSpec(**{**vars(SMALL), "seed": 9}))
    assert tree_hashes(target) == before
    assert leftovers(tmp_path) == []

    calls = 0
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, ("synthetic_b",), SMALL)
    assert not (tmp_path / "synthetic_b").exists()  # nothing that could pass for a complete tree


@pytest.mark.integration  # starts processes
def test_concurrent_callers_wait_for_the_generation_in_progress(tmp_path: Path) -> None:
    lock = tmp_path / ".synthetic_a.lock"
    code = (
        "import sys; from anomret.data.synthetic import SyntheticSpec, ensure_synthetic; "
        f"ensure_synthetic(sys.argv[1], ('synthetic_a',), SyntheticSpec(**{vars(SMALL)!r}))"
    )
    with open(lock, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # as another process generating right now
        waiter = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
        try:
            time.sleep(2.0)
            assert waiter.poll() is None, "the second caller did not wait for the lock"
            assert not (tmp_path / "synthetic_a").exists()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    assert waiter.wait(timeout=60) == 0
    assert tree_hashes(tmp_path / "synthetic_a") == tree_hashes(
        generate_domain(tmp_path / "fresh", "synthetic_a", SMALL)
    )


def test_ensure_rejects_unknown_domains_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synthetic_c"):
        ensure_synthetic(tmp_path, ("synthetic_a", "synthetic_c"), SMALL)
    assert not (tmp_path / "synthetic_a").exists()


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def test_command_line_generates_reuses_and_forces(tmp_path: Path, capsys) -> None:
    args = [
        str(tmp_path),
        "--image-size",
        "48",
        "--n-train",
        "1",
        "--n-test-normal",
        "1",
        "--n-test-per-defect",
        "1",
    ]
    assert main([*args, "--seed", "4"]) == 0
    assert "synthetic_a" in capsys.readouterr().out
    stamp = json.loads((tmp_path / "synthetic_b" / STAMP_FILENAME).read_text())
    assert stamp["spec"] == {
        "image_size": 48,
        "n_train": 1,
        "n_test_normal": 1,
        "n_test_per_defect": 1,
        "seed": 4,
    }

    before = tree_mtimes(tmp_path / "synthetic_a")
    assert main([*args, "--seed", "4", "--domains", "synthetic_a"]) == 0
    assert tree_mtimes(tmp_path / "synthetic_a") == before
    assert main([*args, "--seed", "4", "--domains", "synthetic_a", "--force"]) == 0
    assert tree_mtimes(tmp_path / "synthetic_a") != before

    with pytest.raises(SystemExit) as error:
        main([str(tmp_path), "--image-size", "8"])
    assert error.value.code == 2


def test_a_defect_that_matches_the_surface_still_changes_every_masked_pixel() -> None:
    # A pasted patch or revealed background can equal the surface by chance; the mask must still hold.
    base = np.full((8, 8, 3), 100.0, dtype=np.float32)
    altered = base.copy()
    altered[:2] = 200.0
    region = np.zeros((8, 8), bool)
    region[:4] = True
    out = synthetic._apply(base, altered, region)
    changed = np.abs(out - base).max(axis=-1)
    assert (changed[region] > 0).all() and (changed[region] >= synthetic._MIN_CHANGE).all()
    assert (out[:2] == 200.0).all()  # the intended alteration is kept where it does change the pixel
    assert (changed[~region] == 0).all()
