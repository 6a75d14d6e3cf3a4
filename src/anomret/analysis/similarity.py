"""``python -m anomret.analysis.similarity +experiment=NAME ckpt_path=CKPT``: the MRAD paper's query-key statistics.

For every patch query of the evaluation set, the retrieval weight it gives the anomalous keys of the patch
memory, averaged over anomalous and normal queries (A_qA_k, N_qA_k, A_qN_k, N_qN_k), for MRAD-TF and, with a
trained checkpoint, MRAD-FT (:mod:`anomret.analysis.statistics`)::

    python -m anomret.analysis.similarity +experiment=mrad_ft_mvtec ckpt_path=.../last.ckpt
    python -m anomret.analysis.similarity +experiment=mrad_tf_mvtec memory.path=BANK   # TF only

writes ``similarity.csv``, ``similarity.md`` and ``similarity.png`` to the run directory.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anomret.cli import answer_help, user_errors
from anomret.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def similarity(cfg: DictConfig) -> None:
    from anomret.contracts import Purpose, check_config

    check_config(cfg, Purpose.ANALYSE)  # a wrong setting is refused before torch is imported
    from anomret.analysis.statistics import similarity_analysis  # the heavy imports, only once a run starts

    similarity_analysis(cfg)


def main() -> None:
    with user_errors():
        answer_help(__doc__, "analysis.similarity")
        similarity()


if __name__ == "__main__":
    main()
