"""``python -m anomret.append +experiment=NAME memory.path=BANK dataset.categories=[...]``.

Adds the normal images of new categories (every memory-source image the bank lacks) to an existing RAD
bank without encoding its images again: the incremental onboarding of the RAD paper. The result is the
bank a build from all the images would give (same rows, fingerprint and identity), so runs that name
it with ``memory.path`` reuse it. The same happens inside a run with ``memory.append=true``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anomret.cli import answer_help, user_errors
from anomret.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="append")
def append(cfg: DictConfig) -> None:
    from anomret.contracts import Purpose, check_config

    check_config(cfg, Purpose.APPEND)  # a wrong setting is refused before torch is imported
    from anomret.pipeline import append_memory  # the heavy imports, only once a run starts

    append_memory(cfg)


def main() -> None:
    with user_errors():
        answer_help(__doc__, "append")
        append()


if __name__ == "__main__":
    main()
