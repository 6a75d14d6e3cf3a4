"""Where the Hydra configs live, from a clone or from an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path


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
