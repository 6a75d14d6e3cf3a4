"""The query–key similarity statistics of the MRAD paper (§3.1.1, appendix C.1), for MRAD-TF and MRAD-FT.

For every patch query ``q`` of the evaluation set, ``s_anom(q) = [softmax(q·Kᵀ/τ)·V]₁`` is the retrieval
weight it gives the anomalous keys of the patch memory (``s_norm = 1 − s_anom``). Queries are labelled by
their image's mask on the patch grid with the bank's own rule (a cell is anomalous when the mask covers it
entirely, normal when it does not touch it; boundary cells are left out). Then

    A_qA_k = mean s_anom over anomalous queries     N_qA_k = mean s_anom over normal queries
    A_qN_k = 1 − A_qA_k                             N_qN_k = 1 − N_qA_k

TF uses the raw cosine retrieval, FT the trained projections of a checkpoint (``ckpt_path=``, no dropout).
The paper's claim is ``N_qN_k > A_qN_k`` and ``A_qA_k > N_qA_k``, with larger margins after fine-tuning.

    python -m anomret.analysis.similarity +experiment=mrad_ft_mvtec ckpt_path=.../last.ckpt
    python -m anomret.analysis.similarity +experiment=mrad_tf_mvtec memory.path=BANK   # TF only

writes ``similarity.csv`` (per category and overall), ``similarity.md`` and ``similarity.png`` to the run
directory; ``-m dataset=mvtec,btad,mpdd,isic`` gives the paper's per-dataset figure, one job each.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig
from torch import Tensor

from anomret.assembly import instantiate_all
from anomret.contracts import ConfigError, Purpose
from anomret.data.batch import Batch
from anomret.distributed import all_gather
from anomret.files import atomic_path, write_text_atomic
from anomret.memory.labeled import patch_cell_labels
from anomret.models.mrad_ft import MRADFT
from anomret.models.mrad_tf import MRADTF
from anomret.pipeline import prepare_run

log = logging.getLogger(__name__)

RELATIONS = ("A_qA_k", "N_qA_k", "A_qN_k", "N_qN_k")


@dataclass
class SimilarityStatistics:
    """Running sums of ``s_anom`` over anomalous and normal queries (one setting, one group of images)."""

    anomalous_sum: float = 0.0
    anomalous_count: int = 0
    normal_sum: float = 0.0
    normal_count: int = 0

    def update(self, s_anom: Tensor, anomalous: Tensor, normal: Tensor) -> None:
        """Add queries: ``s_anom`` and the bool labels ``anomalous`` / ``normal``, all of one shape."""
        if not (s_anom.shape == anomalous.shape == normal.shape):
            raise ValueError(
                f"s_anom {tuple(s_anom.shape)}, anomalous {tuple(anomalous.shape)} and normal "
                f"{tuple(normal.shape)} must have one shape"
            )
        if bool((anomalous & normal).any()):
            raise ValueError("a query cannot be both anomalous and normal")
        values = s_anom.detach().double()
        self.anomalous_sum += float(values[anomalous].sum())
        self.anomalous_count += int(anomalous.sum())
        self.normal_sum += float(values[normal].sum())
        self.normal_count += int(normal.sum())

    def merge(self, other: SimilarityStatistics) -> SimilarityStatistics:
        return SimilarityStatistics(
            self.anomalous_sum + other.anomalous_sum,
            self.anomalous_count + other.anomalous_count,
            self.normal_sum + other.normal_sum,
            self.normal_count + other.normal_count,
        )

    def values(self) -> dict[str, float]:
        """The four relations (NaN where a group has no query)."""
        nan = float("nan")
        a_a = self.anomalous_sum / self.anomalous_count if self.anomalous_count else nan
        n_a = self.normal_sum / self.normal_count if self.normal_count else nan
        return {"A_qA_k": a_a, "N_qA_k": n_a, "A_qN_k": 1 - a_a, "N_qN_k": 1 - n_a}


@dataclass
class SimilarityReport:
    """Statistics per setting (``TF``, ``FT``) and category."""

    dataset: str
    per_category: dict[str, dict[str, SimilarityStatistics]] = field(default_factory=dict)

    def add(
        self, setting: str, categories: list[str], s_anom: Tensor, anomalous: Tensor, normal: Tensor
    ) -> None:
        by_category = self.per_category.setdefault(setting, {})
        for row, category in enumerate(categories):
            by_category.setdefault(category, SimilarityStatistics()).update(
                s_anom[row], anomalous[row], normal[row]
            )

    def overall(self, setting: str) -> SimilarityStatistics:
        total = SimilarityStatistics()
        for statistics in self.per_category[setting].values():
            total = total.merge(statistics)
        return total

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for setting, by_category in self.per_category.items():
            groups = [*sorted(by_category.items()), ("all", self.overall(setting))]
            for category, statistics in groups:
                values = statistics.values()
                rows.append(
                    {
                        "dataset": self.dataset,
                        "setting": setting,
                        "category": category,
                        **values,
                        "margin_A": values["A_qA_k"] - values["N_qA_k"],
                        "margin_N": values["N_qN_k"] - values["A_qN_k"],
                        "anomalous_queries": statistics.anomalous_count,
                        "normal_queries": statistics.normal_count,
                    }
                )
        return rows

    def write(self, directory: Path) -> dict[str, Path]:
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        paths = {"csv": write_text_atomic(directory / "similarity.csv", buffer.getvalue())}
        header = [
            "setting",
            "category",
            *RELATIONS,
            "margin_A",
            "margin_N",
            "anomalous_queries",
            "normal_queries",
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            cells = [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in header]
            lines.append("| " + " | ".join(cells) + " |")
        title = f"Query–key similarity statistics on {self.dataset} (patch queries, MRAD §3.1.1)\n\n"
        paths["md"] = write_text_atomic(directory / "similarity.md", title + "\n".join(lines) + "\n")
        paths["png"] = self.plot(directory / "similarity.png")
        return paths

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = list(self.per_category)
        order = ("N_qN_k", "A_qN_k", "A_qA_k", "N_qA_k")  # the paper's Figure 2 order
        figure, axes = plt.subplots(figsize=(2.2 + 2.4 * len(settings), 3.6))
        width = 0.8 / len(order)
        for index, relation in enumerate(order):
            heights = [self.overall(setting).values()[relation] for setting in settings]
            positions = [s + (index - (len(order) - 1) / 2) * width for s in range(len(settings))]
            axes.bar(positions, heights, width, label=relation.replace("_", ""))
        axes.set_xticks(range(len(settings)), [f"{s} ({self.dataset})" for s in settings])
        axes.set_ylabel("mean similarity score")
        axes.set_ylim(0, 1)
        axes.legend(ncols=2, fontsize=8)
        axes.set_title("query-key similarity, patch level")
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120)
        plt.close(figure)
        return path


class SimilarityPass(LightningModule):
    """One pass over the evaluation images under the run's Trainer: each image's ``s_anom`` sums, TF (and FT
    with trained heads), gathered over processes with each image once, in dataset order."""

    def __init__(self, model: MRADTF, fine_tuned: bool) -> None:
        super().__init__()
        self.model = model  # registered: the Trainer moves it to the device
        self.fine_tuned = fine_tuned
        self.per_image: dict[int, tuple[str, dict[str, SimilarityStatistics]]] = {}

    def on_predict_start(self) -> None:
        self.model.bank = self.model.labeled_bank.to(self.device)
        self.per_image = {}

    @torch.no_grad()
    def predict_step(self, batch: Batch, batch_idx: int) -> None:
        model = self.model
        bank = model.labeled_bank
        queries = model.features(batch).patches[model.layer]
        anomalous, normal = patch_cell_labels(batch.mask, (queries.shape[1], queries.shape[2]))
        settings = {"TF": model.retriever(queries, bank.patch_keys, bank.patch_values)[..., 1]}
        if self.fine_tuned:
            assert isinstance(model, MRADFT)  # fine_tuned is set for MRAD-FT models only
            settings["FT"] = model.heads.patch_scores(queries, model.projected_memory(), dropout=False)
        for row, (index, category) in enumerate(zip(batch.index.tolist(), batch.category, strict=True)):
            statistics = {}
            for setting, s_anom in settings.items():
                statistics[setting] = SimilarityStatistics()
                statistics[setting].update(s_anom[row].cpu(), anomalous[row].cpu(), normal[row].cpu())
            self.per_image.setdefault(index, (category, statistics))

    def report(self, dataset: str) -> SimilarityReport:
        merged: dict[int, tuple[str, dict[str, SimilarityStatistics]]] = {}
        for share in all_gather(self.per_image):
            for index, entry in share.items():
                merged.setdefault(index, entry)  # an image a padded sampler repeats counts once
        report = SimilarityReport(dataset)
        for index in sorted(merged):
            category, statistics = merged[index]
            for setting, values in statistics.items():
                by_category = report.per_category.setdefault(setting, {})
                by_category[category] = by_category.get(category, SimilarityStatistics()).merge(values)
        return report


def similarity_analysis(cfg: DictConfig) -> SimilarityReport:
    """TF (and, with a trained checkpoint, FT) statistics of ``cfg.dataset`` against the run's bank."""
    parts = prepare_run(cfg, Purpose.ANALYSE)
    model = parts.model
    if not isinstance(model, MRADTF):
        raise ConfigError(f"the similarity analysis is defined for the MRAD methods, not {model.method}")
    datamodule = parts.datamodule()
    parts.attach_memory()
    parts.fit_or_restore()
    fine_tuned = isinstance(model, MRADFT)
    analysis = SimilarityPass(model, fine_tuned)
    trainer = parts.trainer(
        [], [c for c in instantiate_all(cfg.get("callbacks")) if isinstance(c, ProgressBar)]
    )
    trainer.predict(analysis, dataloaders=datamodule.test_dataloader(), return_predictions=False)
    report = analysis.report(cfg.dataset.name)
    if trainer.is_global_zero:
        paths = report.write(Path(cfg.paths.output_dir))
        log.info("features: %s", model.extractor.describe())
        log.info("similarity statistics written to %s", ", ".join(str(p) for p in paths.values()))
        print(paths["md"].read_text())
    return report
