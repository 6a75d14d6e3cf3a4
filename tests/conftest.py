"""Shared fixtures: the synthetic data (generated once per session) and composed Hydra configs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from anomret.config import config_dir

# Never wait on a network that is not there; never talk to a W&B server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is the integration tier (``make test-fast`` leaves it out)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast tier is pure functions and small components: a test that starts a process belongs to
    the integration tier (tests/integration, or ``@pytest.mark.integration``)."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"{request.node.nodeid} starts a process: move it to tests/integration or mark it "
            "@pytest.mark.integration"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(autouse=True)
def _empty_feature_memory() -> None:
    """Each test starts with an empty in-memory feature tier, as a new process does (the tier lives for
    the process, so runs in one test still share it, as the jobs of a sweep do)."""
    from anomret.features.memory_tier import feature_memory

    feature_memory().clear()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding both synthetic domains, generated once for the whole session."""
    from anomret.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("data")
    ensure_synthetic(root / "synthetic")
    return root


@pytest.fixture
def compose_config(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    """Compose a real config (as the entry points do) with every path under ``tmp_path``."""

    def _compose(overrides: list[str], config_name: str = "config") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(
                config_name,
                overrides=[
                    f"paths.root_dir={tmp_path}",
                    f"paths.data_dir={data_dir}",
                    f"paths.output_dir={tmp_path / 'run'}",
                    *overrides,
                ],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False
            cfg.callbacks.progress_bar = None
            del cfg["hydra"]  # as in a real run: the task sees its config without the hydra node
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
