"""MRAD-CLIP: MRAD-FT's retrieval priors injected into learnable CLIP prompts (MRAD paper §3.3).

Training runs as the official code does, in one fit of ``ft_epochs + clip_epochs`` epochs (1 + 5):

1. the **FT stage** (epochs ``< ft_epochs``): MRAD-FT's loss on the projection heads, at a constant lr;
2. the **CLIP stage**: the heads are frozen; per image, the FT patch retrieval (with the training-time
   similarity dropout) thresholded at 0.5 pools the projected patch tokens into normal and anomalous
   prototypes, two ``Linear`` layers turn them into biases added to the 12 learnable context tokens of
   each state, the frozen text tower (deep prompts in blocks 2–9) gives per-image text features, and a
   cosine classifier at 0.07 gives per-patch probabilities. Loss ``focal + dice(P₁, g) + dice(P₀, 1 − g)``;
   only prompts and bias layers learn.

One Adam optimiser holds heads and prompts: Adam's state (moments and step count) is per parameter and a
parameter without a gradient is skipped, so it is exactly the official pair of optimisers (heads in the FT
stage, prompts in the CLIP stage) at the same lr and betas.

Inference: map = the text branch's anomalous probability (the FT retrieval only enters through the
priors); image score ``0.7·r + 0.3·TopKMean(map)`` with ``r`` the FT image retrieval.

The bias source is the paper's Table 2 ablation: ``dual`` (default), ``anomaly``, ``cls`` or ``none``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from inspect import signature
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from anomret.data.batch import Batch
from anomret.encoders.base import Encoder, Features
from anomret.losses import segmentation_loss
from anomret.maps import AnomalyMapper, ImageScorer
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.models.base import MethodOutput
from anomret.models.mrad_ft import MRADFT, upsample_probabilities
from anomret.models.projections import ProjectedMemory
from anomret.models.prompts import MRADPromptLearner, cosine_classifier, region_priors
from anomret.needs import MethodNeeds
from anomret.retrieval.softmax import SoftmaxRetriever

if TYPE_CHECKING:
    from anomret.encoders.clip_text import CLIPTextEncoder

log = logging.getLogger(__name__)


class MRADCLIP(MRADFT):
    """MRAD-CLIP on the method base (see the module docstring).

    Args:
        encoder, retrieval, map, score, evaluator, official_checkpoint and the training options: see
            :class:`~anomret.models.mrad_ft.MRADFT` (``lr_schedule`` defaults to ``constant`` here, as
            the official MRAD-CLIP pipeline).
        prompts: the prompt learner's options (``model.prompts``: ``n_ctx``, ``deep_length``,
            ``deep_layers``, ``deep_start``, ``class_name``, the templates, ``bias_source``,
            ``round_deep_prompts``), see :class:`~anomret.models.prompts.MRADPromptLearner`.
        ft_epochs: epochs of the FT stage (1); the CLIP stage runs for the rest of ``trainer.max_epochs``.
        prior_threshold: anomalous-region threshold of the FT patch retrieval (0.5).
        text_temperature: temperature of the cosine classifier (0.07).
    """

    method = "mrad_clip"
    # Each stage leaves a part unused (prompts in the FT stage, heads in the CLIP stage).
    needs = MethodNeeds(
        memory="labeled",
        retrieval="softmax",
        trains=True,
        aux_masks=True,
        text_tower=True,
        unused_parameters=True,
    )
    option_groups: ClassVar[dict[str, type]] = {"prompts": MRADPromptLearner}
    # The text tower is the encoder's own (shared weights): frozen, left out of checkpoints.
    frozen_prefixes = ("encoder.", "text.")

    def __init__(
        self,
        encoder: Encoder,
        retrieval: SoftmaxRetriever,
        map: AnomalyMapper,
        score: ImageScorer | None = None,
        evaluator: CategoryEvaluator | None = None,
        prompts: Mapping[str, Any] | None = None,
        ft_epochs: int = 1,
        prior_threshold: float = 0.5,
        text_temperature: float = 0.07,
        lr_schedule: str = "constant",
        official_checkpoint: str | None = None,
        **ft_options: Any,
    ) -> None:
        text_encoder = getattr(encoder, "text_encoder", None)
        if not callable(text_encoder):
            raise ValueError(
                f"MRAD-CLIP needs a CLIP encoder with its text tower (encoder=clip_vit_l14_336 or tiny_clip), "
                f"got {type(encoder).__name__}. Fix: choose a CLIP encoder, or use method=mrad_ft."
            )
        super().__init__(encoder, retrieval, map, score, evaluator, lr_schedule=lr_schedule, **ft_options)
        if ft_epochs < 0:
            raise ValueError(f"model.ft_epochs must be >= 0, got {ft_epochs}")
        if not 0 < prior_threshold < 1:
            raise ValueError(f"model.prior_threshold must be in (0, 1), got {prior_threshold}")
        if text_temperature <= 0:
            raise ValueError(f"model.text_temperature must be positive, got {text_temperature}")
        self.ft_epochs = int(ft_epochs)
        self.prior_threshold = float(prior_threshold)
        self.text_temperature = float(text_temperature)
        options = dict(prompts or {})
        deep_start = int(
            options.get("deep_start", signature(MRADPromptLearner).parameters["deep_start"].default)
        )
        # Registered (not only held by the prompt learner) so its buffers follow the module's device.
        text: CLIPTextEncoder = text_encoder(deep_start=deep_start)
        self.text = text
        self.prompts = MRADPromptLearner(text, prior_dim=encoder.cls_dim, **options)
        if official_checkpoint:
            self.load_official(official_checkpoint)

    def official_modules(self) -> dict[str, Any]:
        return {"heads": self.heads, "prompts": self.prompts}

    # ----------------------------------------------------------------------------------- scoring
    def text_probabilities(
        self, features: Features, memory: ProjectedMemory, *, dropout: bool
    ) -> tuple[Tensor, Tensor]:
        """Per-patch ``[normal, anomalous]`` probabilities ``[B, h, w, 2]`` of the text branch, and the
        FT patch retrieval ``[B, h, w]`` its priors come from."""
        tokens = features.projected.get(self.layer)
        if tokens is None:
            raise ValueError(
                f"MRAD-CLIP needs the projected patch tokens of layer {self.layer} "
                "(encoder.project_patches=true)"
            )
        with torch.no_grad():  # the threshold is a hard decision: no gradient reaches the heads
            retrieved = self.heads.patch_scores(features.patches[self.layer], memory, dropout=dropout)
        priors = region_priors(retrieved, tokens, self.prior_threshold)
        text = self.prompts(priors=priors, cls_token=features.cls, batch_size=tokens.shape[0])
        return cosine_classifier(tokens, text, self.text_temperature), retrieved

    def score(self, features: Features) -> MethodOutput:
        memory = self.projected_memory()
        probs, _ = self.text_probabilities(features, memory, dropout=False)
        image = self.heads.image_scores(features.cls, memory, dropout=False)
        return MethodOutput(patch_scores=probs[..., 1], image_retrieval=image)

    # ---------------------------------------------------------------------------------- training
    @property
    def in_clip_stage(self) -> bool:
        return self.current_epoch >= self.ft_epochs

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.in_clip_stage and any(p.requires_grad for p in self.heads.parameters()):
            # Frozen from here on: their key projections are computed once for the CLIP stage.
            self.heads.requires_grad_(False)
            self._projected = None
            log.info("epoch %d: CLIP stage, projection heads frozen", self.current_epoch + 1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The stage's idle part keeps no gradient, so Adam leaves it exactly as it is, also under DDP with
        # unused-parameter detection (which may hand it zero gradients that Adam's momentum would turn
        # into a step).
        idle = self.heads if self.in_clip_stage else self.prompts
        for parameter in idle.parameters():
            parameter.grad = None

    def clip_loss(self, features: Features, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``focal(P, g) + dice(P₁, g) + dice(P₀, 1 − g)`` of the text branch (the CLIP stage)."""
        masks = batch.binary_masks
        probs, _ = self.text_probabilities(features, self.projected_memory(), dropout=True)
        loss = segmentation_loss(
            upsample_probabilities(probs, (masks.shape[-2], masks.shape[-1])), masks, normal_dice=True
        )
        return loss, {"text": loss.detach()}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features = self.features(batch)
        if self.in_clip_stage:
            loss, parts = self.clip_loss(features, batch)
        else:
            loss, parts = self.ft_loss(features, batch)
        self._log_training(loss, parts, len(batch))
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.heads.parameters(), *self.prompts.parameters()]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.max_epochs is not None and self.trainer.max_epochs <= self.ft_epochs:
            log.warning(
                "MRAD-CLIP: trainer.max_epochs=%d leaves no CLIP stage after %d FT epoch(s); the prompts "
                "stay at their initialisation",
                self.trainer.max_epochs,
                self.ft_epochs,
            )
