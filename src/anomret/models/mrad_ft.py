"""MRAD-FT: MRAD-TF's retrieval with a learned query/key metric, trained on the auxiliary memory source.

The method (MRAD paper §3.2.2, official code constants; see ``models/projections.py``):

- one query and one key ``Linear`` per memory level (patch ``C → D``, image ``D → D``), their plain dot
  product as the retrieval logit (no re-normalisation), τ = 1;
- training on the auxiliary dataset's labelled split (the same images the memory was built from), with
  the similarity dropout (top 20 % patch / 5 % image entries by *raw* cosine set to −inf) as the only
  defence against an image retrieving its own prototypes;
- loss ``focal(P, g) + dice(P₁, g) + CE(r / 0.07, y)`` on the retrieved probabilities, ``P`` upsampled
  bilinearly to the mask size;
- Adam (lr 4e-4, betas (0.5, 0.999)), batch 8, one epoch, per-step cosine decay to 1e-6 (official);
- inference: MRAD-TF's path through the projections; image score ``0.7·r + 0.3·TopKMean(map)``.

The encoder is frozen and the official code has no augmentation, so features come from the feature store
after the first pass over an image (``features.enabled=true`` in ``method=mrad_ft``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.data.batch import Batch
from anomret.encoders.base import Encoder, Features
from anomret.losses import image_retrieval_loss, segmentation_loss
from anomret.maps import AnomalyMapper, ImageScorer
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.models.mrad_tf import MRADTF
from anomret.models.official_checkpoint import load_official_checkpoint
from anomret.models.projections import MRADProjectionHeads, ProjectedMemory
from anomret.needs import MethodNeeds
from anomret.retrieval.softmax import SoftmaxRetriever

log = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "constant")
HEAD_INITS = ("default", "identity")


def upsample_probabilities(probs: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, h, w, 2]`` per-patch probabilities → ``[B, 2, H, W]`` (bilinear, align_corners=False)."""
    return F.interpolate(probs.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


class MRADFT(MRADTF):
    """MRAD-FT on the method base (see the module docstring).

    Args:
        encoder, retrieval, map, score, evaluator: see :class:`~anomret.models.mrad_tf.MRADTF`
            (``retrieval`` is kept for the MRAD-TF comparison).
        out_dim: projected dimension of both levels (``None``: the encoder's image dimension, 768 for
            ViT-L/14 as in the official code).
        patch_drop_ratio / image_drop_ratio: similarity dropout in training (0.2 / 0.05; the official
            code notes 0.15 for the VisA target).
        lr: Adam learning rate (official 4e-4; the paper's 5e-4 is ``model.lr=5e-4``).
        betas: Adam betas ((0.5, 0.999)).
        weight_decay: Adam weight decay (0).
        lr_schedule: ``cosine`` (per-step decay to ``min_lr`` over the run, official MRAD-FT) or
            ``constant``.
        min_lr: end of the cosine schedule (1e-6).
        image_loss_temperature: temperature of the image cross-entropy (0.07).
        head_init: ``default`` (PyTorch's Linear init, official) or ``identity`` (start from MRAD-TF).
        official_checkpoint: an official ``mrad_ft_*.pth`` / ``mrad_clip_*.pth`` file: its heads are
            loaded and used as they are (nothing is trained).
        query_chunk: queries per retrieval chunk.
    """

    method = "mrad_ft"
    needs = MethodNeeds(memory="labeled", retrieval="softmax", trains=True, aux_masks=True)

    def __init__(
        self,
        encoder: Encoder,
        retrieval: SoftmaxRetriever,
        map: AnomalyMapper,
        score: ImageScorer | None = None,
        evaluator: CategoryEvaluator | None = None,
        out_dim: int | None = None,
        patch_drop_ratio: float = 0.2,
        image_drop_ratio: float = 0.05,
        lr: float = 4e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        min_lr: float = 1e-6,
        image_loss_temperature: float = 0.07,
        head_init: str = "default",
        official_checkpoint: str | None = None,
        query_chunk: int = 2048,
    ) -> None:
        super().__init__(encoder, retrieval, map, score, evaluator)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"model.head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if not lr > 0 or not 0 <= min_lr <= lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"model.betas must be two numbers in [0, 1), got {list(betas)}")
        self.heads = MRADProjectionHeads(
            patch_dim=encoder.patch_dim,
            image_dim=encoder.cls_dim,
            out_dim=encoder.cls_dim if out_dim is None else int(out_dim),
            patch_drop_ratio=patch_drop_ratio,
            image_drop_ratio=image_drop_ratio,
            query_chunk=query_chunk,
            identity=head_init == "identity",
        )
        self.lr, self.betas, self.weight_decay = (
            float(lr),
            (float(betas[0]), float(betas[1])),
            float(weight_decay),
        )
        self.lr_schedule, self.min_lr = lr_schedule, float(min_lr)
        self.image_loss_temperature = float(image_loss_temperature)
        self._projected: ProjectedMemory | None = None
        self.official_checkpoint: str | None = None
        if official_checkpoint:
            self.load_official(official_checkpoint)

    def load_official(self, path: str) -> None:
        """Use an official checkpoint's learnable parts as they are: read now (errors before any compute),
        and the run evaluates instead of training (the pipeline fits only modules whose ``trains`` is set)."""
        load_official_checkpoint(path, **self.official_modules())
        self.official_checkpoint = str(path)
        log.info("%s: using the official checkpoint %s (nothing is trained)", self.method, path)

    @property
    def trains(self) -> bool:
        """Heads loaded from an official checkpoint are used as they are: nothing to fit."""
        return self.official_checkpoint is None

    def official_modules(self) -> dict[str, Any]:
        """The modules an official checkpoint's sections are loaded into."""
        return {"heads": self.heads}

    # ----------------------------------------------------------------------------------- scoring
    def on_memory_attached(self) -> None:
        self._projected = None

    def projected_memory(self) -> ProjectedMemory:
        """The bank with its keys projected once by the current (frozen) heads."""
        if self._projected is None:
            self._projected = self.heads.project_keys(self.labeled_bank)
        return self._projected

    def on_test_start(self) -> None:
        super().on_test_start()
        self._projected = None  # the heads may have changed since the last projection

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._projected = None

    def retrieve(self, features: Features) -> tuple[Tensor, Tensor]:
        """Anomalous probabilities per patch ``[B, h, w]`` and per image ``[B]`` (no dropout)."""
        memory = self.projected_memory()
        patch = self.heads.patch_scores(features.patches[self.layer], memory, dropout=False)
        image = self.heads.image_scores(features.cls, memory, dropout=False)
        return patch, image

    # ---------------------------------------------------------------------------------- training
    def ft_loss(self, features: Features, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``focal + dice(P₁, g) + CE(r / 0.07, y)`` with the similarity dropout (the FT stage)."""
        masks = batch.binary_masks
        bank = self.labeled_bank
        patch = self.heads.retrieve_patches(features.patches[self.layer], bank, dropout=True)
        image = self.heads.retrieve_images(features.cls, bank, dropout=True)
        size = (masks.shape[-2], masks.shape[-1])
        segmentation = segmentation_loss(upsample_probabilities(patch, size), masks)
        classification = image_retrieval_loss(image, batch.label, self.image_loss_temperature)
        loss = segmentation + classification
        return loss, {"segmentation": segmentation.detach(), "image": classification.detach()}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, parts = self.ft_loss(self.features(batch), batch)
        self._log_training(loss, parts, len(batch))
        return loss

    def _log_training(self, loss: Tensor, parts: dict[str, Tensor], batch_size: int) -> None:
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=batch_size)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.heads.parameters())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(
            self.trainable_parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        if self.lr_schedule == "constant":
            return optimizer
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=self.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        self._encoded_at_epoch_start = self.extractor.encoded
        self._reused_at_epoch_start = self.extractor.reused

    def on_train_epoch_end(self) -> None:
        # Per-epoch feature counts show the store at work: after the first pass nothing is encoded.
        encoded = self.extractor.encoded - self._encoded_at_epoch_start
        reused = self.extractor.reused - self._reused_at_epoch_start
        self.epoch_feature_counts.append({"encoded": encoded, "reused": reused})
        log.info(
            "epoch %d: %d image(s) encoded, %d read from the feature store",
            self.current_epoch + 1,
            encoded,
            reused,
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.epoch_feature_counts: list[dict[str, int]] = []
        self._projected = None
