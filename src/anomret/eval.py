"""``python -m anomret.eval +experiment=NAME memory.path=BANK``: evaluate a saved memory bank."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anomret.cli import answer_help, user_errors
from anomret.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def evaluate(cfg: DictConfig) -> None:
    from anomret.contracts import Purpose, check_config

    check_config(cfg, Purpose.EVAL)  # a wrong setting is refused before torch is imported
    from anomret.pipeline import run  # the heavy imports, only once a run starts

    run(cfg, fit=False)


def main() -> None:
    with user_errors():
        answer_help(__doc__, "eval")
        evaluate()


if __name__ == "__main__":
    main()
