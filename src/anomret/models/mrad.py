"""MRAD-TF: zero-shot anomaly detection by retrieval from a labelled auxiliary memory (no training).

``MRADScorer`` is the plain ``nn.Module`` that computes (encoder → retrieval → maps → scores);
``MRADTF`` is the thin LightningModule around it: its fit pass builds the memory bank from the
auxiliary source, its test pass scores and evaluates the target dataset per category.

Scores (MRAD paper Eq. 7–9, official code constants):
- patch: ``softmax(q_patch · K_patchᵀ / τ) · V_patch``, anomalous channel, on the patch grid;
- map: bilinear upsampling to the input size, Gaussian blur (σ=4);
- image: ``w · Y_cls + (1 − w) · TopKMean(map)`` with ``w = 0.7`` (official code); the paper's
  unweighted sum ranks images identically to ``w = 0.5``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn

from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder, Features
from anomret.maps import AnomalyMapper, top_k_mean
from anomret.memory.labeled import LabeledMemoryBank, LabeledMemorySettings
from anomret.memory.store import BankStatus, check_bank, data_fingerprint, digest
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.metrics.report import EvaluationResult
from anomret.retrieval.softmax import SoftmaxRetriever

log = logging.getLogger(__name__)


@dataclass
class ScorerOutput:
    patch_scores: Tensor  # [B, h, w] anomalous probability per patch
    anomaly_map: Tensor  # [B, H, W]
    image_score: Tensor  # [B]
    image_retrieval: Tensor  # [B] Y_cls, the image-level retrieved anomalous probability
    map_score: Tensor  # [B] TopKMean of the map


class MRADScorer(nn.Module):
    """Frozen encoder + labelled memory → patch scores, anomaly maps and image scores."""

    def __init__(
        self,
        encoder: Encoder,
        retriever: SoftmaxRetriever,
        mapper: AnomalyMapper,
        image_score_weight: float = 0.7,
        top_k_ratio: float = 0.01,
        layer: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= image_score_weight <= 1:
            raise ValueError(f"image_score_weight must be in [0, 1], got {image_score_weight}")
        self.encoder = encoder
        self.retriever = retriever
        self.mapper = mapper
        self.image_score_weight = image_score_weight
        self.top_k_ratio = top_k_ratio
        self.layer = max(encoder.layers) if layer is None else layer
        if self.layer not in encoder.layers:
            raise ValueError(
                f"layer {self.layer} is not extracted by encoder {encoder.name} ({encoder.layers})"
            )
        self.bank: LabeledMemoryBank | None = None

    @torch.no_grad()
    def encode(self, images: Tensor) -> Features:
        return self.encoder(images)

    def set_bank(self, bank: LabeledMemoryBank) -> None:
        self.bank = bank.to(self.encoder.device)

    def retrieve(self, features: Features) -> tuple[Tensor, Tensor]:
        """Anomalous probabilities: per patch ``[B, h, w]`` and per image ``[B]``."""
        if self.bank is None:
            raise RuntimeError("no memory bank: run the fit pass or load a bank first")
        bank = self.bank
        patch = self.retriever(features.patches[self.layer], bank.patch_keys, bank.patch_values)[..., 1]
        image = self.retriever(features.cls, bank.image_keys, bank.image_values)[..., 1]
        return patch, image

    def forward(self, images: Tensor) -> ScorerOutput:
        features = self.encode(images)
        patch_scores, image_retrieval = self.retrieve(features)
        anomaly_map = self.mapper(patch_scores)
        map_score = top_k_mean(anomaly_map, self.top_k_ratio)
        weight = self.image_score_weight
        image_score = weight * image_retrieval + (1 - weight) * map_score
        return ScorerOutput(patch_scores, anomaly_map, image_score, image_retrieval, map_score)


class MRADTF(LightningModule):
    """MRAD-TF as a LightningModule: ``fit`` builds the memory, ``test`` scores and evaluates.

    Args:
        encoder: frozen encoder (``encoder=`` config group).
        memory: bank construction and caching settings (``memory=labeled``).
        retrieval: the retrieval function (``retrieval=softmax``).
        evaluator: per-category metrics (``evaluation`` config).
        map_size: side of the anomaly maps (MRAD: the 518 px input size).
        map_sigma: Gaussian blur σ in map pixels (MRAD: 4).
        image_score_weight: weight of the image-level retrieval in the image score (code: 0.7).
        top_k_ratio: fraction of map pixels averaged for the map's image score (1 %).
        layer: encoder block whose patch grid is retrieved (default: the last extracted one).
    """

    method = "mrad_tf"

    def __init__(
        self,
        encoder: Encoder,
        memory: LabeledMemorySettings,
        retrieval: SoftmaxRetriever,
        evaluator: CategoryEvaluator,
        map_size: int,
        map_sigma: float = 4.0,
        image_score_weight: float = 0.7,
        top_k_ratio: float = 0.01,
        layer: int | None = None,
    ) -> None:
        super().__init__()
        # logger=False: the run logs its whole resolved config once; this would log a subset again.
        self.save_hyperparameters(ignore=["encoder", "memory", "retrieval", "evaluator"], logger=False)
        self.automatic_optimization = False
        self.scorer = MRADScorer(
            encoder, retrieval, AnomalyMapper(map_size, map_sigma), image_score_weight, top_k_ratio, layer
        )
        self.memory = memory
        self.evaluator = evaluator
        self.test_results: EvaluationResult | None = None
        self.bank_path = None
        self._bank_metadata: dict[str, Any] | None = None
        self._builder = None

    @property
    def encoder(self) -> Encoder:
        return self.scorer.encoder

    # ----------------------------------------------------------------------------------- memory
    def memory_identity(self, aux_samples: SampleTable, source: str) -> dict[str, Any]:
        """Bank metadata: what built it (encoder) and from what (data + settings)."""
        return {
            "method": self.method,
            "source": source,
            "encoder": self.encoder.fingerprint(),
            "build": {
                "data": data_fingerprint(aux_samples),
                "layer": self.scorer.layer,
                **self.memory.build_settings(),
            },
        }

    def prepare_memory(self, aux_samples: SampleTable, source: str) -> bool:
        """Load a matching cached bank; return False when the fit pass must build one."""
        metadata = self.memory_identity(aux_samples, source)
        identity = digest([metadata["encoder"], metadata["build"]])
        self.bank_path = self.memory.resolve_path(f"{self.method}-{source}-{self.encoder.name}", identity)
        self._bank_metadata = metadata
        check = check_bank(self.bank_path, metadata["encoder"], metadata["build"])
        if check.status is BankStatus.MATCH and not self.memory.rebuild:
            bank = LabeledMemoryBank.load(self.bank_path)
            self.scorer.set_bank(bank)
            log.info("reusing memory bank %s: %s", self.bank_path, bank.summary())
            return True
        if check.status is BankStatus.STALE:
            log.info("memory bank %s is stale (%s): rebuilding it", self.bank_path, check.reason)
        return False

    def load_memory(self, path: str) -> None:
        """Load a bank for evaluation, refusing one built by another encoder."""
        bank = LabeledMemoryBank.load(path)
        check_bank(path, self.encoder.fingerprint(), bank.metadata.get("build", {}))  # raises on mismatch
        self.scorer.set_bank(bank)
        self.bank_path = path
        log.info("loaded memory bank %s: %s", path, bank.summary())

    def on_fit_start(self) -> None:
        if self._bank_metadata is None:
            datamodule = self.trainer.datamodule
            self.prepare_memory(datamodule.aux_samples, datamodule.aux_spec.name)
        self._builder = self.memory.builder()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        features = self.scorer.encode(batch["image"])
        self._builder.add(features.cls, features.patches[self.scorer.layer], batch["mask"], batch["label"])

    def on_train_epoch_end(self) -> None:
        bank = self._builder.build(self._bank_metadata)
        self._builder = None
        self.scorer.set_bank(bank)
        if self.trainer.is_global_zero:
            bank.save(self.bank_path)
        log.info("built memory bank %s: %s", self.bank_path, bank.summary())

    def configure_optimizers(self) -> None:
        return None  # nothing trains in MRAD-TF

    # ------------------------------------------------------------------------------------- test
    def _bank_to_device(self) -> None:
        # A cached bank is loaded before the Trainer moves the model; follow it to its device.
        if self.scorer.bank is not None:
            self.scorer.set_bank(self.scorer.bank)

    def on_test_start(self) -> None:
        self._bank_to_device()
        self.evaluator.reset()
        self.test_results = None

    def on_predict_start(self) -> None:
        self._bank_to_device()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        output = self.scorer(batch["image"])
        masks = batch["mask"]
        if masks.shape[-2:] != output.anomaly_map.shape[-2:]:
            raise ValueError(
                f"masks are {tuple(masks.shape[-2:])} but anomaly maps {tuple(output.anomaly_map.shape[-2:])}: "
                "set data.mask_size to the model's map_size"
            )
        self.evaluator.update(
            batch["category"], output.image_score, batch["label"], output.anomaly_map, masks
        )
        return {"anomaly_map": output.anomaly_map, "image_score": output.image_score}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        output = self.scorer(batch["image"])
        return {
            "anomaly_map": output.anomaly_map,
            "image_score": output.image_score,
            "image_retrieval": output.image_retrieval,
            "map_score": output.map_score,
        }

    def on_test_epoch_end(self) -> None:
        self.test_results = self.evaluator.compute()
        logged = {}
        for category, values in {**self.test_results.per_category, "mean": self.test_results.mean}.items():
            for metric, value in values.items():
                if value == value:  # skip NaN (undefined for this category)
                    logged[f"test/{category}/{metric}"] = float(value)
        self.log_dict(logged, sync_dist=False)
