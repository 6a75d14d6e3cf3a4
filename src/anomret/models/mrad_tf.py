"""MRAD-TF: zero-shot anomaly detection by retrieval from a labelled auxiliary memory (no training).

Scores (MRAD paper Eq. 7–9, official code constants):

- patch: ``softmax(q_patch · K_patchᵀ / τ) · V_patch``, anomalous channel, on the patch grid of the block
  the bank was built from;
- image-level retrieval: the same over the CLS keys;
- map and image score (the method base): bilinear upsampling, Gaussian blur (σ = 4), and
  ``w · Y_cls + (1 − w) · TopKMean(map)`` with ``w = 0.7`` (official code); the paper's unweighted sum
  ranks images identically to ``w = 0.5``.
"""

from __future__ import annotations

from torch import Tensor

from anomret.encoders.base import Encoder, Features
from anomret.maps import AnomalyMapper, ImageScorer
from anomret.memory.base import MemoryBank
from anomret.memory.labeled import LabeledMemoryBank
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.models.base import MethodOutput, RetrievalModule
from anomret.needs import MethodNeeds
from anomret.retrieval.softmax import SoftmaxRetriever


class MRADTF(RetrievalModule):
    """MRAD-TF on the method base: the labelled bank is built by the memory pass, nothing trains.

    Args:
        encoder, map, score, evaluator: see :class:`~anomret.models.base.RetrievalModule`.
        retrieval: the retrieval function (``retrieval=softmax``).
    """

    method = "mrad_tf"
    # The labelled bank (and MRAD-FT/CLIP training) read the auxiliary images' pixel masks.
    needs = MethodNeeds(memory="labeled", retrieval="softmax", aux_masks=True)

    def __init__(
        self,
        encoder: Encoder,
        retrieval: SoftmaxRetriever,
        map: AnomalyMapper,
        score: ImageScorer | None = None,
        evaluator: CategoryEvaluator | None = None,
    ) -> None:
        super().__init__(encoder, map, score, evaluator)
        # logger=False: the run logs its whole resolved config once; this would log a subset again.
        self.save_hyperparameters(ignore=list(self.built_arguments), logger=False)
        self.retriever = retrieval

    @property
    def labeled_bank(self) -> LabeledMemoryBank:
        """The attached bank: a labelled one (``attach_memory`` accepts only banks of that kind)."""
        bank = self.bank
        if bank is None:
            raise RuntimeError(
                f"{self.method}: no labelled memory bank attached (the run builds or loads one first)"
            )
        if not isinstance(bank, LabeledMemoryBank):
            raise TypeError(f"{self.method} reads a labelled memory bank, got {type(bank).__name__}")
        return bank

    @property
    def layer(self) -> int:
        layer = None if self.bank is None else self.labeled_bank.layer
        if layer is None:
            raise RuntimeError("no labelled memory bank attached")
        return layer

    def memory_dims(self, bank: MemoryBank) -> dict[str, int]:
        return {"image": self.encoder.cls_dim, "patch": self.encoder.patch_dim}

    def retrieve(self, features: Features) -> tuple[Tensor, Tensor]:
        """Anomalous probabilities: per patch ``[B, h, w]`` and per image ``[B]``."""
        bank = self.labeled_bank
        patch = self.retriever(features.patches[self.layer], bank.patch_keys, bank.patch_values)[..., 1]
        image = self.retriever(features.cls, bank.image_keys, bank.image_values)[..., 1]
        return patch, image

    def score(self, features: Features) -> MethodOutput:
        patch, image = self.retrieve(features)
        return MethodOutput(patch_scores=patch, image_retrieval=image)
