"""The run and sweep directories resolve in both modes, relative to where the command runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from anomret.config import config_dir


@pytest.fixture
def composed(monkeypatch):
    for name in ("ANOMRET_ROOT", "ANOMRET_DATA_DIR", "ANOMRET_CACHE_DIR", "ANOMRET_LOG_DIR"):
        monkeypatch.delenv(name, raising=False)
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # as in a fresh process: nothing set yet
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda name, overrides=(): compose(name, overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name, entry", [("config", "train"), ("eval", "eval"), ("predict", "predict")])
def test_sweep_dir_resolves_before_hydra_config_is_set(composed, name, entry):
    """A -m sweep computes hydra.sweep.dir before Hydra's runtime config exists (a bare -m failed)."""
    cfg = composed(name, ["+experiment=demo"])
    with pytest.raises(ValueError, match="HydraConfig was not set"):
        HydraConfig.get()
    OmegaConf.update(cfg, "hydra.job.name", entry)  # Hydra fills it from the entry point's module
    sweep = Path(cfg.hydra.sweep.dir)
    run = Path(cfg.hydra.run.dir)
    assert not sweep.is_absolute() and not run.is_absolute()  # relative to the directory run from
    assert sweep.parts[:3] == ("logs", "demo", f"{entry}-multirun")
    assert run.parts[:3] == ("logs", "demo", entry)
    assert Path(cfg.paths.data_dir) == Path("data") and Path(cfg.paths.bank_dir) == Path(".cache/banks")


def test_environment_moves_every_default(composed, monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMRET_ROOT", str(tmp_path))
    cfg = composed("config")
    OmegaConf.update(cfg, "hydra.job.name", "train")
    assert Path(cfg.hydra.sweep.dir).parent == tmp_path / "logs" / "train" / "train-multirun"
    assert Path(cfg.paths.data_dir) == tmp_path / "data"
    monkeypatch.setenv("ANOMRET_LOG_DIR", str(tmp_path / "elsewhere"))
    cfg = composed("config")
    OmegaConf.update(cfg, "hydra.job.name", "train")
    assert Path(cfg.hydra.run.dir).parents[2] == tmp_path / "elsewhere"
