"""``python -m anomret.predict +experiment=NAME memory.path=BANK input=DIR``: score your own images.

Writes ``predictions.csv`` (image score per image), ``maps/*.npy`` (anomaly maps) and
``overlays/*.png`` to the run directory; no labels or masks are needed.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anomret.config import config_dir
from anomret.pipeline import predict


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
