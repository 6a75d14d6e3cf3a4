"""RAD end to end on the synthetic data: the demo command, eval with a saved bank, K checks, appending."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anomret.memory.normal_bank import NormalMemoryBank
from anomret.memory.store import BankError, read_bank_metadata
from anomret.metrics.evaluator import METRIC_KEYS
from anomret.pipeline import append_memory, predict, run

from .cli import run_cli
from .test_train_eval import SYNTHETIC_A


def test_demo_rad_command_writes_results_overlays_and_a_normal_bank(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_cli(
        ["-m", "anomret.train", "+experiment=demo_rad", f"hydra.run.dir={run_dir}"],
        tmp_path,
        data_dir=data_dir,
    )

    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["categories"]) == sorted(SYNTHETIC_A)
    for values in [*results["categories"].values(), results["mean"]]:
        assert all(0.0 <= values[metric] <= 1.0 for metric in METRIC_KEYS)
    retrieval = results["settings"]["retrieval"]
    assert retrieval["k"] == retrieval["k_used"] == 8 and retrieval["rho"] == 1
    assert retrieval["memory_images"] == 30 and retrieval["memory_dtype"] == "fp16"
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [row["category"] for row in rows] == [*results["categories"], "mean"]
    for category in SYNTHETIC_A:
        assert len(list((run_dir / "overlays" / category).glob("*.png"))) >= 2
    bank = Path(json.loads((run_dir / "artifacts.json").read_text())["bank"])
    metadata = read_bank_metadata(bank)
    assert metadata["kind"] == "normal" and metadata["source"] == "synthetic_a"
    assert metadata["categories"] == SYNTHETIC_A and len(metadata["images"]) == 30
    assert all("/train/" in row[0] for row in metadata["images"]), "RAD's memory is the train split"


def test_eval_and_predict_with_the_saved_bank_and_k_is_checked_first(compose_config, tmp_path, data_dir):
    bank = tmp_path / "rad.safetensors"
    trained = run(compose_config(["+experiment=demo_rad", f"memory.path={bank}"]), fit=True)
    assert not list(tmp_path.glob(".*.tmp")), "the memory pass's scratch files are removed"
    evaluated = run(compose_config(["+experiment=demo_rad", f"memory.path={bank}"], "eval"), fit=False)
    assert evaluated.per_category == trained.per_category
    assert evaluated.settings["retrieval"]["k_used"] == 8
    # A bank of another encoder is refused, by eval and by a run that names it.
    for entry in ("eval", "config"):
        with pytest.raises(BankError, match="another encoder"):
            run(
                compose_config(["+experiment=demo_rad", f"memory.path={bank}", "encoder.seed=1"], entry),
                fit=entry == "config",
            )

    # predict applies the saved RAD bank to a folder of unlabelled images, as it does an MRAD bank.
    images = tmp_path / "mine"
    images.mkdir()
    for category, kind in (("wood", "spot"), ("pill", "good")):
        source = data_dir / "synthetic" / "synthetic_a" / category / "test" / kind / "000.png"
        shutil.copy(source, images / f"{category}.png")
    cfg = compose_config(["+experiment=demo_rad", f"memory.path={bank}", f"input={images}"], "predict")
    rows = list(csv.DictReader(predict(cfg).open()))
    assert sorted(Path(row["image_path"]).name for row in rows) == ["pill.png", "wood.png"]
    assert all(math.isfinite(float(row["image_score"])) for row in rows)
    maps = sorted((tmp_path / "run" / "maps").glob("*.npy"))
    assert [np.load(m).shape for m in maps] == [(cfg.model.map.size, cfg.model.map.size)] * 2

    # K larger than the memory: refused before the memory pass, naming both numbers.
    with pytest.raises(ValueError, match=r"retrieval\.k=31 is larger than the memory \(30 images\)"):
        run(compose_config(["+experiment=demo_rad", "retrieval.k=31"]), fit=True)
    assert not list((tmp_path / ".cache" / "banks").glob("normal-*"))


def test_few_shot_caps_k_and_records_it(compose_config):
    result = run(compose_config(["+experiment=demo_rad_fewshot", "memory.shots=1"]), fit=True)
    assert result.settings["retrieval"] == {
        **result.settings["retrieval"],
        "k": 8,
        "k_used": 3,
        "memory_images": 3,
    }


def test_appending_a_category_equals_building_with_it(compose_config, tmp_path, caplog):
    first, both = "[weave,wood]", "[weave,wood,pill]"
    appended, rebuilt = tmp_path / "appended.safetensors", tmp_path / "rebuilt.safetensors"
    overrides = ["+experiment=demo_rad", "memory.dtype=int8"]
    append_memory(
        compose_config([*overrides, f"dataset.categories={first}", f"memory.path={appended}"], "append")
    )
    assert read_bank_metadata(appended)["categories"] == ["weave", "wood"]
    with caplog.at_level(logging.INFO, logger="anomret"):
        append_memory(
            compose_config([*overrides, f"dataset.categories={both}", f"memory.path={appended}"], "append")
        )
    assert "appending 10 image(s) of ['pill']" in caplog.text, "only the new category is encoded"
    result = run(
        compose_config([*overrides, f"dataset.categories={both}", f"memory.path={rebuilt}"]), fit=True
    )

    a, b = load_file(str(appended)), load_file(str(rebuilt))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    meta_a, meta_b = read_bank_metadata(appended), read_bank_metadata(rebuilt)
    assert meta_a == meta_b
    # The appended file is what a run with all three categories expects: reused, not rebuilt or refused.
    built = appended.stat().st_mtime_ns
    again = run(
        compose_config(
            [*overrides, f"dataset.categories={both}", f"memory.path={appended}", "memory.append=true"]
        ),
        fit=True,
    )
    assert appended.stat().st_mtime_ns == built
    assert again.per_category == result.per_category
    assert NormalMemoryBank.load(appended).images_per_category() == {"weave": 10, "wood": 10, "pill": 10}


@pytest.mark.parametrize(
    ("experiment", "k", "rho"),
    [("rad_mvtec", 150, 1), ("rad_visa", 900, 2), ("rad_realiad", 900, 0), ("rad_3dadam", 48, 1)],
)
def test_paper_experiments_compose_with_the_official_constants(compose_config, experiment, k, rho):
    cfg = compose_config([f"+experiment={experiment}"])
    assert (cfg.retrieval.k, cfg.retrieval.rho, cfg.retrieval.cap_k) == (k, rho, False)
    assert cfg.encoder.name == "dinov3_vitb16" and list(cfg.encoder.layers) == [4, 7, 10, 12]
    # Official maps and ground truth: 256 px, 5×5 σ 1 zero-padded blur, masks nearest to 256 and > 0.
    assert (cfg.model.map.size, cfg.model.map.sigma, cfg.model.map.kernel_size) == (256, 1.0, 5)
    assert cfg.model.map.padding == "zeros" and cfg.model.score.top_k_ratio == 0.01
    assert cfg.data.mask_size == 256 and cfg.data.mask_threshold == 0
    assert cfg.memory.source == "train" and cfg.memory.dtype == "fp16"


def test_rad_with_another_memory_kind_is_refused(compose_config):
    from anomret.contracts import ConfigError, Purpose, check_config

    with pytest.raises(ConfigError, match="reads a 'normal' memory but memory=labeled"):
        check_config(compose_config(["+experiment=demo_rad", "memory=labeled"]), Purpose.TRAIN)


def test_rad_with_two_ddp_processes_matches_one_process(tmp_path, data_dir):
    results = {}
    for name, extra in (("single", []), ("ddp", ["trainer=ddp_cpu"])):
        run_dir = tmp_path / name
        run_cli(
            [
                "-m",
                "anomret.train",
                "+experiment=demo_rad",
                "logger=none",
                f"hydra.run.dir={run_dir}",
                *extra,
            ],
            tmp_path,
            data_dir=data_dir,
        )
        results[name] = json.loads((run_dir / "results.json").read_text())
        bank = Path(json.loads((run_dir / "artifacts.json").read_text())["bank"])
        results[name]["bank"] = load_file(bank)
        assert not list(bank.parent.glob(".*.tmp")), "every process's scratch files are removed"
    one, two = results["single"], results["ddp"]
    for category, values in one["categories"].items():
        assert two["categories"][category]["n_images"] == values["n_images"] == 14
        for metric in one["metrics"]:
            assert two["categories"][category][metric] == pytest.approx(values[metric], abs=1e-6)
    assert one["bank"].keys() == two["bank"].keys()
    for name, tensor in one["bank"].items():  # each image once, in dataset order
        torch.testing.assert_close(two["bank"][name], tensor, rtol=0, atol=1e-3)
