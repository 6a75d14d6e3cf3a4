"""The entry points end to end on the synthetic data: train, eval, bank caching, multirun, loggers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from anomret.memory.store import BankError, read_bank_metadata
from anomret.metrics.evaluator import METRIC_KEYS
from anomret.pipeline import run

from .cli import run_cli
from .wandb_records import read_offline_run

SYNTHETIC_A = ["weave", "wood", "pill"]


def test_demo_command_runs_the_whole_path(tmp_path, data_dir):
    out = run_cli(
        ["-m", "anomret.train", "+experiment=demo", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        data_dir=data_dir,
    )
    run_dir = tmp_path / "run"

    results = json.loads((run_dir / "results.json").read_text())
    assert results["metrics"] == list(METRIC_KEYS)
    assert sorted(results["categories"]) == sorted(SYNTHETIC_A)
    for values in [*results["categories"].values(), results["mean"]]:
        for metric in METRIC_KEYS:
            assert 0.0 <= values[metric] <= 1.0
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [row["category"] for row in rows] == [*results["categories"], "mean"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    for category in SYNTHETIC_A:
        assert len(list((run_dir / "overlays" / category).glob("*.png"))) >= 2
    assert (run_dir / "csv" / "metrics.csv").is_file()
    bank = Path(json.loads((run_dir / "artifacts.json").read_text())["bank"])
    assert bank.is_file() and bank.parent == tmp_path / ".cache" / "banks"
    # The rich table is printed with the mean row.
    assert "mean" in out.stdout and "I-AUROC" in out.stdout


def test_named_bank_is_reused_never_silently_replaced_and_refused_for_another_encoder(
    compose_config, tmp_path
):
    bank = tmp_path / "bank.safetensors"
    first = run(compose_config(["+experiment=demo", f"memory.path={bank}"]), fit=True)
    built = bank.stat().st_mtime_ns

    again = run(compose_config(["+experiment=demo", f"memory.path={bank}"]), fit=True)
    assert bank.stat().st_mtime_ns == built, "a matching bank must be reused, not rebuilt"
    assert again.per_category == first.per_category

    # Other settings: the named file is the user's, so it is refused, not overwritten (a sweep's job 0
    # would otherwise record a bank that job 1 replaced).
    with pytest.raises(BankError, match=r"never replaced silently.*memory\.rebuild=true"):
        run(
            compose_config(["+experiment=demo", f"memory.path={bank}", "memory.max_patch_entries=10"]),
            fit=True,
        )
    assert bank.stat().st_mtime_ns == built

    overrides = [
        "+experiment=demo",
        f"memory.path={bank}",
        "memory.max_patch_entries=10",
        "memory.rebuild=true",
    ]
    run(compose_config(overrides), fit=True)
    assert read_bank_metadata(bank)["build"]["max_patch_entries"] == 10
    assert bank.stat().st_mtime_ns != built

    with pytest.raises(BankError, match="another encoder"):
        run(compose_config(["+experiment=demo", f"memory.path={bank}", "encoder.seed=1"]), fit=True)
    assert read_bank_metadata(bank)["build"]["max_patch_entries"] == 10, "the refused bank is left intact"


def test_cached_banks_are_named_by_what_built_them(compose_config, tmp_path):
    run(compose_config(["+experiment=demo"]), fit=True)
    run(compose_config(["+experiment=demo", "memory.max_patch_entries=5"]), fit=True)
    banks = sorted((tmp_path / ".cache" / "banks").glob("*.safetensors"))
    assert len(banks) == 2
    # Named by kind, source and encoder, not by method: MRAD-TF/FT/CLIP share the labelled bank.
    assert all(b.name.startswith("labeled-synthetic_b-tiny_clip-") for b in banks)


def test_eval_reproduces_train_results_from_the_saved_bank(compose_config, tmp_path):
    bank = tmp_path / "bank.safetensors"
    trained = run(compose_config(["+experiment=demo", f"memory.path={bank}"]), fit=True)
    evaluated = run(
        compose_config(["+experiment=demo", f"memory.path={bank}"], config_name="eval"), fit=False
    )
    for category, values in trained.per_category.items():
        for metric, value in values.items():
            assert evaluated.per_category[category][metric] == pytest.approx(value, abs=1e-9)
    with pytest.raises(ValueError, match=r"memory\.path"):
        run(compose_config(["+experiment=demo"], config_name="eval"), fit=False)
    with pytest.raises(BankError, match="another encoder"):
        run(compose_config(["+experiment=demo", f"memory.path={bank}", "encoder.seed=1"], "eval"), fit=False)


def test_eval_cli_on_a_saved_bank(compose_config, tmp_path, data_dir):
    bank = tmp_path / "bank.safetensors"
    run(compose_config(["+experiment=demo", f"memory.path={bank}"]), fit=True)
    run_cli(
        [
            "-m",
            "anomret.eval",
            "+experiment=demo",
            f"memory.path={bank}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    assert (tmp_path / "eval" / "results.json").is_file()


def test_multirun_sweep_writes_one_result_per_job(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "anomret.train",
            "-m",
            "+experiment=demo",
            "model.score.retrieval_weight=0.5,1.0",
            f"hydra.sweep.dir={sweep}",
            "logger=none",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    weights = []
    for job in jobs:
        assert (job / "results.json").is_file()
        weights.append(float((job / "config.yaml").read_text().split("retrieval_weight:")[1].split()[0]))
    assert weights == [0.5, 1.0]


def test_wandb_offline_run_records_metrics_table_and_images(compose_config, tmp_path):
    cfg = compose_config(["+experiment=demo", "logger=wandb", "logger.wandb.offline=true"])
    result = run(cfg, fit=True)
    run_dirs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    logged = read_offline_run(run_dirs[0])

    for category in SYNTHETIC_A:
        values = logged.logged(f"test/{category}/image_auroc")
        assert values and values[-1] == pytest.approx(result.per_category[category]["image_auroc"], abs=1e-6)
        images = logged.logged(f"overlays/{category}")
        assert images or logged.logged(f"overlays/{category}/filenames")
    assert logged.summary["mean/pixel_auroc"] == pytest.approx(result.mean["pixel_auroc"])
    table_path = logged.files_dir / logged.logged("results/per_category/path")[-1]
    table = json.loads(table_path.read_text())
    assert table["columns"][0] == "category" and len(table["data"]) == len(SYNTHETIC_A) + 1
    image_files = list((logged.files_dir / "media" / "images").rglob("*.png"))
    assert len(image_files) >= len(SYNTHETIC_A)
    assert logged.config["model"]["score"]["retrieval_weight"] == 0.7


def test_missing_dataset_root_names_the_prepare_command(compose_config, tmp_path):
    cfg = compose_config(["+experiment=demo", "dataset=mvtec", f"dataset.root={tmp_path / 'nowhere'}"])
    from anomret.data.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match=r"python -m anomret\.prepare mvtec"):
        run(cfg, fit=True)
    assert not (tmp_path / "run" / "results.json").exists()


def test_bank_built_under_one_config_is_bit_identical_when_rebuilt(compose_config, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(compose_config(["+experiment=demo", f"memory.path={first}"]), fit=True)
    run(compose_config(["+experiment=demo", f"memory.path={second}"]), fit=True)
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_artifacts_name_absolute_paths_when_the_root_is_the_working_directory(
    compose_config, tmp_path, monkeypatch
):
    # The default root is "."; the bank a run names must be found again from any other directory.
    monkeypatch.chdir(tmp_path)
    run(compose_config(["+experiment=demo", "paths.root_dir=.", "features.enabled=true"]), fit=True)
    artifacts = json.loads((tmp_path / "run" / "artifacts.json").read_text())
    for key in ("bank", "features"):
        assert Path(artifacts[key]).is_absolute() and Path(artifacts[key]).exists(), key
    assert Path(artifacts["bank"]).parent == tmp_path / ".cache" / "banks"
