"""Training losses of MRAD-FT and MRAD-CLIP, as the official code computes them.

MRAD's segmentation outputs are already probabilities (retrieved label averages, or a softmax over
the two text prototypes), so the focal and dice losses take probabilities, not logits:

- ``focal_loss``: the focal loss of the AnomalyCLIP/MRAD code (γ = 2, no class weighting, the one-hot
  target clamped to ``[smooth/(C−1), 1 − smooth]`` and ``smooth`` added to ``p_t``);
- ``dice_loss``: ``1 − mean_b (2ΣP·g + 1)/(ΣP + Σg + 1)`` on one channel;
- ``image_retrieval_loss``: cross-entropy of the retrieved 2-vector divided by 0.07. The retrieved
  vector is a probability vector already; the official code still applies this softmax on top.

MRAD-FT trains ``focal + dice(P₁, g) + CE``; the CLIP stage ``focal + dice(P₁, g) + dice(P₀, 1 − g)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _class_target(target: Tensor, num_classes: int) -> Tensor:
    """Integer class map from a bool/int (or integral float) mask, checked to be in range."""
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise ValueError("target must hold class indices (binarise soft masks first, e.g. mask > 0.5)")
    labels = target.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"target values must be class indices in [0, {num_classes}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Mean over pixels of ``−(1 − p_t)^γ · log p_t`` with ``p_t = Σ_c onehot_c · P_c + smooth``.

    Args:
        probs: ``[B, C, H, W]`` class probabilities (no nonlinearity is applied).
        target: ``[B, H, W]`` class indices (bool or integer; a binary mask for MRAD).
        gamma: focusing exponent (2).
        smooth: label smoothing of the one-hot target and offset of ``p_t`` (1e-5).
    """
    if probs.ndim != 4:
        raise ValueError(f"probs must be [B, C, H, W], got shape {tuple(probs.shape)}")
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError(f"focal loss needs at least 2 classes, got {num_classes}")
    if target.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"target {tuple(target.shape)} must be [B, H, W] matching probs {tuple(probs.shape)}"
        )
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative, got {gamma}")
    if not 0 <= smooth <= 1:
        raise ValueError(f"smooth must be in [0, 1], got {smooth}")
    one_hot = F.one_hot(_class_target(target, num_classes), num_classes).to(probs.dtype)  # [B, H, W, C]
    if smooth:
        one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    p_t = (one_hot * probs.movedim(1, -1)).sum(-1) + smooth
    return (-((1 - p_t) ** gamma) * p_t.log()).mean()


def dice_loss(probs: Tensor, target: Tensor) -> Tensor:
    """``1 − mean_b (2 Σ P·g + 1) / (Σ P + Σ g + 1)`` over one channel.

    Args:
        probs: ``[B, H, W]`` probabilities of one class (MRAD: the anomalous channel, or the normal
            channel against ``1 − g`` in the CLIP stage).
        target: ``[B, H, W]`` binary mask of that class.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} must match")
    if probs.ndim < 2:
        raise ValueError(f"probs must have a batch dimension, got shape {tuple(probs.shape)}")
    flat = probs.reshape(probs.shape[0], -1)
    truth = target.reshape(target.shape[0], -1).to(flat.dtype)
    dice = (2 * (flat * truth).sum(1) + 1) / (flat.sum(1) + truth.sum(1) + 1)
    return 1 - dice.mean()


def image_retrieval_loss(retrieved: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Cross-entropy of ``retrieved / temperature`` against the image labels (MRAD-FT's image loss).

    Args:
        retrieved: ``[B, 2]`` retrieved normal/anomalous probabilities.
        labels: ``[B]`` image labels (0 normal, 1 anomalous).
        temperature: logit temperature (0.07).
    """
    if retrieved.ndim != 2:
        raise ValueError(f"retrieved must be [B, classes], got shape {tuple(retrieved.shape)}")
    if labels.shape != retrieved.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B] for retrieved {tuple(retrieved.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return F.cross_entropy(retrieved / temperature, _class_target(labels, retrieved.shape[1]))


def segmentation_loss(probs: Tensor, mask: Tensor, *, normal_dice: bool = False) -> Tensor:
    """``focal(P, g) + dice(P₁, g)`` (MRAD-FT), plus ``dice(P₀, 1 − g)`` with ``normal_dice`` (CLIP stage).

    Args:
        probs: ``[B, 2, H, W]`` normal/anomalous probabilities.
        mask: ``[B, H, W]`` binary ground truth.
        normal_dice: add the dice loss of the normal channel against the inverted mask.
    """
    if probs.ndim != 4 or probs.shape[1] != 2:
        raise ValueError(f"probs must be [B, 2, H, W], got shape {tuple(probs.shape)}")
    target = _class_target(mask, 2)
    loss = focal_loss(probs, target) + dice_loss(probs[:, 1], target)
    if normal_dice:
        loss = loss + dice_loss(probs[:, 0], 1 - target)
    return loss
