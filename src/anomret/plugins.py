"""Hydra launcher and sweeper plugins that ship as separate packages: say which one to install.

Without the plugin, Hydra fails with "Could not find 'hydra/launcher/submitit_slurm'" and a list of the
options it does know, which does not say that a ``pip install`` is all that is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PLUGINS", "MissingPluginError", "Plugin", "check_hydra_plugins", "required_plugins"]


@dataclass(frozen=True)
class Plugin:
    """A pip package holding a Hydra plugin, the modules a run imports from it, and anomret's extra for it."""

    package: str
    modules: tuple[str, ...]
    extra: str | None = None

    def install_hint(self) -> str:
        hint = f"pip install {self.package}"
        return f"{hint} (or pip install 'anomret[{self.extra}]')" if self.extra else hint


SUBMITIT = Plugin(
    "hydra-submitit-launcher",
    ("hydra_plugins.hydra_submitit_launcher.submitit_launcher", "submitit"),
    "cluster",
)
OPTUNA = Plugin("hydra-optuna-sweeper", ("hydra_plugins.hydra_optuna_sweeper._impl", "optuna"), "hpo")

# (config group, option) -> plugin; "*" matches every option of the group. anomret's own presets in
# conf/hydra/launcher/ and conf/hparams_search/ are listed with the plugin they build on.
PLUGINS: dict[tuple[str, str], Plugin] = {
    ("hydra/launcher", "submitit_slurm"): SUBMITIT,
    ("hydra/launcher", "submitit_local"): SUBMITIT,
    ("hydra/launcher", "slurm_gpu"): SUBMITIT,
    ("hydra/launcher", "joblib"): Plugin("hydra-joblib-launcher", ("hydra_plugins.hydra_joblib_launcher",)),
    ("hydra/launcher", "ray"): Plugin("hydra-ray-launcher", ("hydra_plugins.hydra_ray_launcher", "ray")),
    ("hydra/launcher", "ray_aws"): Plugin("hydra-ray-launcher", ("hydra_plugins.hydra_ray_launcher", "ray")),
    ("hydra/launcher", "rq"): Plugin("hydra-rq-launcher", ("hydra_plugins.hydra_rq_launcher",)),
    ("hydra/sweeper", "optuna"): OPTUNA,
    ("hydra/sweeper", "ax"): Plugin("hydra-ax-sweeper", ("hydra_plugins.hydra_ax_sweeper",)),
    ("hydra/sweeper", "nevergrad"): Plugin(
        "hydra-nevergrad-sweeper", ("hydra_plugins.hydra_nevergrad_sweeper",)
    ),
    ("hparams_search", "*"): OPTUNA,  # every search in conf/hparams_search/ runs on the Optuna sweeper
}


class MissingPluginError(ImportError):
    """A command line selects a Hydra launcher or sweeper whose plugin package is not installed."""


def _selections(argv: Sequence[str]) -> list[tuple[str, str, str]]:
    """(group, option, the argument as given) for each ``group=option`` override, ``+``/``++`` dropped."""
    found = []
    for argument in argv:
        key, sep, value = argument.partition("=")
        group = key.lstrip("+").strip()
        if sep and group and not group.startswith(("~", "-")):
            found.append((group.removeprefix("/"), value.strip(), argument))
    return found


def required_plugins(argv: Sequence[str]) -> list[tuple[str, Plugin]]:
    """The plugins a command line needs, each with the argument that selects it (in argument order)."""
    needed = []
    for group, option, argument in _selections(argv):
        plugin = PLUGINS.get((group, option)) or PLUGINS.get((group, "*"))
        if plugin is not None and option:
            needed.append((argument, plugin))
    return needed


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else why not."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_hydra_plugins(argv: list[str]) -> None:
    """Raise :class:`MissingPluginError` if an override selects a launcher/sweeper that cannot be imported.

    Looks at ``hydra/launcher=...``, ``hydra/sweeper=...`` and ``hparams_search=...`` arguments (as
    ``sys.argv[1:]`` holds them); anything else, and Hydra's built-in ``basic`` launcher and sweeper, pass.
    """
    for argument, plugin in required_plugins(argv):
        for module in plugin.modules:
            reason = _importable(module)
            if reason is not None:
                raise MissingPluginError(
                    f"{argument} needs the Hydra plugin package {plugin.package}, which cannot be imported "
                    f"({module}: {reason}). Install it into this environment: {plugin.install_hint()}"
                )
