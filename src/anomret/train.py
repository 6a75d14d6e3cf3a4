"""``python -m anomret.train +experiment=NAME``: build the memory (and train heads), then evaluate.

The task returns the mean of ``optimized_metric`` so Hydra sweepers (e.g. Optuna) can optimise it.
"""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig

from anomret.cli import answer_help, user_errors
from anomret.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def train(cfg: DictConfig) -> float:
    from anomret.contracts import Purpose, check_config

    check_config(cfg, Purpose.TRAIN)  # a wrong setting is refused before torch is imported
    from anomret.pipeline import run  # the heavy imports, only once a run starts

    result = run(cfg, fit=True)
    value = result.mean.get(cfg.get("optimized_metric") or "", math.nan)
    return float(value) if value is not None else math.nan


def main() -> None:
    with user_errors():
        answer_help(__doc__, "train")
        train()


if __name__ == "__main__":
    main()
