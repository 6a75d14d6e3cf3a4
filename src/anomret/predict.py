"""``python -m anomret.predict +experiment=NAME memory.path=BANK input=DIR``: score your own images.

Writes ``predictions.csv`` (image score per image), ``maps/<relative path>.npy`` (anomaly maps) and
``overlays/<relative path>.png`` to the run directory; no labels or masks are needed. Unreadable files
in the input are reported and skipped.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anomret.cli import answer_help, user_errors
from anomret.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def predict_images(cfg: DictConfig) -> None:
    from anomret.contracts import Purpose, check_config

    if not cfg.get("package"):  # a package's config is checked once the package is read
        check_config(cfg, Purpose.PREDICT)  # a wrong setting is refused before torch is imported
    from anomret.pipeline import predict  # the heavy imports, only once a run starts

    predict(cfg)


def main() -> None:
    with user_errors():
        answer_help(__doc__, "predict")
        predict_images()


if __name__ == "__main__":
    main()
