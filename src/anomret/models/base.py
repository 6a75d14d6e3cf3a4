"""The base of every retrieval method: frozen encoder, features, maps, test/predict loops, evaluation.

A method subclasses :class:`RetrievalModule`, declares what it needs from the rest of a run
(:class:`MethodNeeds`: memory kind, retrieval kind, trained parts, auxiliary masks, a text tower) and
supplies :meth:`~RetrievalModule.score` (features → patch scores and, optionally, an image-level score);
a method that trains also supplies ``training_step`` and ``configure_optimizers``. The run checks every
declared need against the composed config before anything is built (:mod:`anomret.contracts`).
Everything else is here, once:

- features come from one :class:`~anomret.features.FeatureExtractor` (through the feature store when
  enabled), never from a second encoder call;
- patch scores become anomaly maps (``model.map``: upsample + blur) and image scores (``model.score``:
  ``w · image_retrieval + (1 − w) · TopKMean(map)``, or the top-k mean alone for methods without an
  image-level score);
- the test pass evaluates per category, gathered across processes under DDP;
- the memory bank is attached from outside (the run builds or loads it) and follows the module's device;
- checkpoints hold only the trainable state plus the identities of the encoder and the bank, never the
  frozen backbone.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightning import LightningModule
from torch import Tensor
from torch.nn.modules.module import _IncompatibleKeys

from anomret.data.batch import Batch
from anomret.encoders.base import Encoder, Features
from anomret.features.extractor import FeatureExtractor
from anomret.features.store import FeatureStore
from anomret.maps import AnomalyMapper, ImageScorer
from anomret.memory.base import MemoryBank
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.metrics.gathered import GatheredEvaluation
from anomret.metrics.results import EvaluationResult
from anomret.needs import MethodNeeds

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "anomret"


@dataclass
class MethodOutput:
    """What a method's :meth:`RetrievalModule.score` returns."""

    patch_scores: Tensor  # [B, h, w] anomaly score per patch (higher = more anomalous)
    image_retrieval: Tensor | None = None  # [B] image-level score from the memory, if the method has one


@dataclass
class ScoredBatch:
    patch_scores: Tensor  # [B, h, w]
    anomaly_map: Tensor  # [B, H, W]
    image_score: Tensor  # [B]
    map_score: Tensor  # [B] TopKMean of the map
    image_retrieval: Tensor | None  # [B] or None


def _drop_frozen_parts(module: RetrievalModule, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """``state_dict`` post hook: the frozen parts leave the state dict the module just wrote."""
    for key in [k for k in state if k.startswith(prefix) and module._is_frozen(k[len(prefix) :])]:
        del state[key]


class RetrievalModule(LightningModule):
    """Shared loops of the retrieval methods (see the module docstring).

    Args:
        encoder: the frozen encoder (``encoder=`` group).
        map: patch scores → anomaly maps (``model.map``: size, blur).
        score: anomaly map (and image-level retrieval) → image score (``model.score``).
        evaluator: per-category metrics (``evaluation=`` group); ``None`` for runs that only predict.
    """

    method: ClassVar[str] = ""
    needs: ClassVar[MethodNeeds]
    # State that is frozen and rebuilt from its config, so checkpoints leave it out.
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("encoder.",)
    # Constructor arguments that are built objects, not settings: never saved as hyper-parameters.
    built_arguments: ClassVar[tuple[str, ...]] = ("encoder", "retrieval", "evaluator", "map", "score")
    # Nested option groups (``model.<name>.*``) and the class whose keyword arguments they are.
    option_groups: ClassVar[dict[str, type]] = {}

    def __init__(
        self,
        encoder: Encoder,
        map: AnomalyMapper,
        score: ImageScorer | None = None,
        evaluator: CategoryEvaluator | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.extractor = FeatureExtractor(encoder)
        self.mapper = map
        self.scorer = score or ImageScorer()
        self.evaluation = None if evaluator is None else GatheredEvaluation(evaluator)
        # Checkpoints hold the trained state only: the frozen parts are rebuilt from their config.
        self.register_state_dict_post_hook(_drop_frozen_parts)
        self.bank: MemoryBank | None = None
        self.bank_info: dict[str, Any] | None = None
        self.test_results: EvaluationResult | None = None

    @property
    def trains(self) -> bool:
        """True when a fit pass trains parts of this module (a method with trained parts, not loaded)."""
        return self.needs.trains

    # ----------------------------------------------------------------------------- memory, store
    def set_feature_store(self, store: FeatureStore | None) -> None:
        self.extractor.store = store

    def memory_dims(self, bank: MemoryBank) -> dict[str, int]:
        """Feature sizes the bank's keys must have for this encoder (checked when attached)."""
        return {}

    def attach_memory(self, bank: MemoryBank, info: dict[str, Any]) -> None:
        """Use ``bank``; ``info`` (path, kind, identity) is recorded in checkpoints and artifacts."""
        if bank.kind != self.needs.memory:
            raise ValueError(
                f"{self.method} needs a '{self.needs.memory}' memory bank, got a '{bank.kind}' bank"
            )
        bank.check_compatible(self.memory_dims(bank))
        self.bank = bank
        self.bank_info = info
        self.on_memory_attached()

    def check_memory_size(self, n_images: int) -> None:
        """Refuse, before the memory pass, a memory of ``n_images`` the method cannot use."""

    def on_memory_attached(self) -> None:
        """Hook for methods that derive state from the bank (e.g. cached key projections)."""

    def _bank_to_device(self) -> None:
        if self.bank is None:
            raise RuntimeError(f"{self.method}: no memory bank attached (the run builds or loads one first)")
        self.bank = self.bank.to(self.device)

    def on_fit_start(self) -> None:
        self._bank_to_device()

    def on_test_start(self) -> None:
        self._bank_to_device()
        self._evaluation().reset()
        self.test_results = None

    def _evaluation(self) -> GatheredEvaluation:
        if self.evaluation is None:
            raise RuntimeError(f"{self.method} was built without an evaluator: it can predict, not test")
        return self.evaluation

    def on_predict_start(self) -> None:
        self._bank_to_device()

    # ----------------------------------------------------------------------------------- scoring
    @abstractmethod
    def score(self, features: Features) -> MethodOutput:
        """The method: features of a batch → patch scores (and an image-level score, if any)."""

    def features(self, batch: Batch) -> Features:
        return self.extractor(batch)

    def combine(self, output: MethodOutput) -> ScoredBatch:
        anomaly_map = self.mapper(output.patch_scores)
        image_score, map_score = self.scorer(anomaly_map, output.image_retrieval)
        return ScoredBatch(output.patch_scores, anomaly_map, image_score, map_score, output.image_retrieval)

    def forward(self, batch: Batch) -> ScoredBatch:
        return self.combine(self.score(self.features(batch)))

    # ----------------------------------------------------------------------------- test, predict
    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        with torch.no_grad():
            scored = self(batch)
        masks = batch.mask
        if masks.shape[-2:] != scored.anomaly_map.shape[-2:]:
            raise ValueError(
                f"masks are {tuple(masks.shape[-2:])} but anomaly maps {tuple(scored.anomaly_map.shape[-2:])}: "
                "set data.mask_size to the model's map size (model.map.size)"
            )
        self._evaluation().update(
            batch.index,
            batch.category,
            scored.image_score,
            batch.label,
            scored.anomaly_map,
            masks,
            image_paths=batch.image_path,
        )
        return {"anomaly_map": scored.anomaly_map, "image_score": scored.image_score}

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        with torch.no_grad():
            scored = self(batch)
        out = {"anomaly_map": scored.anomaly_map, "image_score": scored.image_score}
        if scored.image_retrieval is not None:
            out["image_retrieval"] = scored.image_retrieval
        out["map_score"] = scored.map_score
        return out

    def on_test_epoch_end(self) -> None:
        self.test_results = self._evaluation().compute()
        logged = {}
        for category, values in {**self.test_results.per_category, "mean": self.test_results.mean}.items():
            for metric, value in values.items():
                if value == value:  # skip NaN (undefined for this category)
                    logged[f"test/{category}/{metric}"] = float(value)
        # Every process holds the same (gathered) numbers: nothing to reduce.
        self.log_dict(logged, sync_dist=False, rank_zero_only=True)

    def configure_optimizers(self) -> Any:
        return None  # training-free methods; trained ones override this

    # ------------------------------------------------------------------------------- checkpoints
    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this module is only valid with: method, encoder and bank."""
        return {"method": self.method, "encoder": self.encoder.fingerprint(), "bank": self.bank_info}

    def _is_frozen(self, key: str) -> bool:
        return key.startswith(self.frozen_prefixes)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not self._is_frozen(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not fit {type(self).__name__}: missing {missing}, "
                f"unexpected {list(result.unexpected_keys)}"
            )
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.identity()
