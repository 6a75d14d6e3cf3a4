"""Sweeps beyond the basic launcher: W&B names per job, submitit (local), Optuna, and missing plugins."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from anomret.config import config_dir
from anomret.plugins import PLUGINS, MissingPluginError, check_hydra_plugins, required_plugins

from .cli import run_cli
from .wandb_records import finished_records


def _offline_run_record(run_dir: Path) -> wandb_internal_pb2.RunRecord:
    """The run record (name, group, job type, tags) of an offline ``wandb/offline-run-*`` directory."""
    log_file = next(run_dir.glob("run-*.wandb"))
    for raw in finished_records(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {log_file}")


# ------------------------------------------------------------------------------------------ W&B names
def _wandb_settings(compose_config, overrides: list[str]) -> dict[str, object]:
    cfg = compose_config(["+experiment=demo", "logger=wandb", *overrides])
    return OmegaConf.to_container(cfg.logger.wandb, resolve=True)


def test_wandb_names_each_sweep_job_after_its_overrides_and_groups_the_sweep(compose_config, tmp_path):
    sweep = [
        "hydra.mode=MULTIRUN",
        "hydra.job.name=train",
        f"hydra.sweep.dir={tmp_path / 'logs' / 'demo' / 'train-multirun' / '2026-01-02_03-04-05_000006'}",
    ]
    noise = ["data.num_workers=0", f"paths.cache_dir={tmp_path}/cache", "logger.wandb.offline=true"]
    jobs = [
        _wandb_settings(
            compose_config,
            [*sweep, *noise, f"model.score.retrieval_weight={w}", "model.score.top_k_ratio=0.02"],
        )
        for w in (0.5, 1.0)
    ]
    assert [job["name"] for job in jobs] == [
        "demo/model.score.retrieval_weight=0.5,model.score.top_k_ratio=0.02",
        "demo/model.score.retrieval_weight=1.0,model.score.top_k_ratio=0.02",
    ]
    assert {job["group"] for job in jobs} == {"demo/2026-01-02_03-04-05_000006"}
    assert {job["job_type"] for job in jobs} == {"mrad_tf"}
    assert jobs[0]["tags"] == ["demo", "mrad_tf", "synthetic"]


def test_wandb_name_of_a_single_run_falls_back_to_the_task_name(compose_config):
    single = _wandb_settings(compose_config, ["logger.wandb.offline=true"])
    assert single["name"] == "demo" and single["group"] == "demo"
    tuned = _wandb_settings(compose_config, ["model.score.top_k_ratio=0.05"])
    assert tuned["name"] == "demo/model.score.top_k_ratio=0.05" and tuned["group"] == "demo"


# ------------------------------------------------------------------------------------------- plugins
def test_plugins_of_the_command_line_are_found():
    argv = ["+experiment=demo", "hydra/launcher=submitit_local", "++hydra/sweeper=optuna", "seed=1,2", "-m"]
    assert [(arg, plugin.package) for arg, plugin in required_plugins(argv)] == [
        ("hydra/launcher=submitit_local", "hydra-submitit-launcher"),
        ("++hydra/sweeper=optuna", "hydra-optuna-sweeper"),
    ]
    assert [p.package for _, p in required_plugins(["+hparams_search=mrad_tf_optuna"])] == [
        "hydra-optuna-sweeper"
    ]
    assert (
        required_plugins(["hydra/launcher=basic", "hydra/sweeper=basic", "model.score.top_k_ratio=0.1"]) == []
    )


def test_installed_plugins_pass():
    check_hydra_plugins(
        ["hydra/launcher=submitit_slurm", "hydra/sweeper=optuna", "+hparams_search=demo_optuna"]
    )
    check_hydra_plugins(["+experiment=demo", "hydra/launcher=basic"])


@pytest.mark.parametrize(
    ("argument", "module", "package", "extra"),
    [
        (
            "hydra/launcher=submitit_slurm",
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
            "hydra-submitit-launcher",
            "cluster",
        ),
        ("hydra/launcher=slurm_gpu", "submitit", "hydra-submitit-launcher", "cluster"),
        ("hydra/sweeper=optuna", "optuna", "hydra-optuna-sweeper", "hpo"),
        (
            "+hparams_search=mrad_tf_optuna",
            "hydra_plugins.hydra_optuna_sweeper._impl",
            "hydra-optuna-sweeper",
            "hpo",
        ),
    ],
)
def test_a_missing_plugin_names_the_package_to_install(monkeypatch, argument, module, package, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled module looks like to import
    with pytest.raises(MissingPluginError) as error:
        check_hydra_plugins(["+experiment=demo", argument, "seed=1,2"])
    message = str(error.value)
    assert message.startswith(f"{argument} needs the Hydra plugin package {package}")
    assert f"pip install {package} (or pip install 'anomret[{extra}]')" in message


def test_a_plugin_that_is_not_installed_at_all():
    with pytest.raises(
        MissingPluginError, match=r"hydra/sweeper=nevergrad .*pip install hydra-nevergrad-sweeper"
    ):
        check_hydra_plugins(["hydra/sweeper=nevergrad"])


def test_every_preset_is_known_and_the_extras_exist():
    presets = {p.stem for p in (config_dir() / "hydra" / "launcher").glob("*.yaml")}
    assert presets and all(("hydra/launcher", name) in PLUGINS for name in presets)
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for plugin in PLUGINS.values():
        if plugin.extra:
            assert any(req.startswith(plugin.package) for req in extras[plugin.extra])


# ----------------------------------------------------------------------------------- end-to-end sweeps
def test_submitit_local_sweep_with_wandb_offline_and_the_report(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "anomret.train",
            "-m",
            "+experiment=demo",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=20",
            "hydra.launcher.cpus_per_task=1",
            "model.score.retrieval_weight=0.5,1.0",
            f"hydra.sweep.dir={sweep}",
            "logger=wandb",
            "logger.wandb.offline=true",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert all((job / "results.json").is_file() for job in jobs)
    assert list((sweep / ".submitit").iterdir()), "the jobs ran through submitit"

    records = [_offline_run_record(next((job / "wandb").glob("offline-run-*"))) for job in jobs]
    assert [r.display_name for r in records] == [
        "demo/model.score.retrieval_weight=0.5",
        "demo/model.score.retrieval_weight=1.0",
    ]
    assert {r.run_group for r in records} == {f"demo/{sweep.name}"}
    assert {r.job_type for r in records} == {"mrad_tf"}

    run_cli(["-m", "anomret.report", str(sweep), "--no-plots"], tmp_path, data_dir=data_dir)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [(r["job"], r["model.score.retrieval_weight"], r["status"]) for r in rows] == [
        ("0", "0.5", "finished"),
        ("1", "1.0", "finished"),
    ]


def test_optuna_demo_search_runs_three_trials(tmp_path, data_dir):
    sweep = tmp_path / "optuna"
    run_cli(
        [
            "-m",
            "anomret.train",
            "+experiment=demo",
            "+hparams_search=demo_optuna",
            f"hydra.sweep.dir={sweep}",
            "logger=none",
        ],
        tmp_path,
        data_dir=data_dir,
    )
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1", "2"]
    searched = []
    for trial in trials:
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        values = dict(line.split("=", 1) for line in overrides if line.startswith("model."))
        assert 0.001 <= float(values["model.score.top_k_ratio"]) <= 0.1
        assert 0.0 <= float(values["model.score.retrieval_weight"]) <= 1.0
        assert (trial / "results.json").is_file()
        searched.append(values["model.score.retrieval_weight"])
    assert len(set(searched)) == 3, "each trial tries another point"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.score.top_k_ratio", "model.score.retrieval_weight"}
    assert 0.0 <= best["best_value"] <= 1.0
