"""Where the Hydra configs live, from a clone or from an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    """The ``conf/`` directory: ``$ANOMRET_CONFIG_DIR``, the copy inside the package, or the clone's.

    A wheel carries the configs as ``anomret/conf``; an editable install or a plain clone uses the
    repository's top-level ``conf/``.
    """
    override = os.environ.get("ANOMRET_CONFIG_DIR")
    candidates = [Path(override)] if override else []
    package = Path(__file__).resolve().parent
    candidates += [package / "conf", package.parents[1] / "conf"]
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "anomret's Hydra configs were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Reinstall the package, or set ANOMRET_CONFIG_DIR to a conf/ directory."
    )


def resolved_dict(node: DictConfig) -> dict[str, Any]:
    """A config mapping, interpolations resolved, as plain dicts and lists."""
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)  # a DictConfig converts to a dict
    # omegaconf types keys as any of its key types; a config's keys are option names.
    return cast(dict[str, Any], values)


def _join_nonempty(separator: str, *parts: Any) -> str:
    """``${anomret.join:/,a,b}``: the non-empty parts joined (a W&B run name without a trailing ``/``)."""
    return str(separator).join(str(part) for part in parts if part not in (None, ""))


def _sweep_group(mode: Any, task_name: str) -> str:
    """``task_name/<sweep directory name>`` for the jobs of one multirun, ``task_name`` for a single run.

    The sweep directory is read only in a multirun: a config composed outside a run has no job name, so
    its (unused) sweep directory would not resolve.
    """
    if not str(getattr(mode, "name", mode)).upper().endswith("MULTIRUN"):
        return str(task_name)
    from hydra.core.hydra_config import HydraConfig

    return f"{task_name}/{Path(str(HydraConfig.get().sweep.dir)).name}"


def sweep_job_config() -> Any | None:
    """Hydra's config of the running job when it is a job of a multirun; ``None`` in a single run or
    outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    config = HydraConfig.get()
    return config if config.mode == RunMode.MULTIRUN else None


# Used by conf/logger/wandb.yaml; registered on import, before any config is composed or resolved.
OmegaConf.register_new_resolver("anomret.join", _join_nonempty, replace=True)
OmegaConf.register_new_resolver("anomret.sweep_group", _sweep_group, replace=True)
