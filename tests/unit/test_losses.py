"""MRAD's focal, dice and image losses against hand-worked numbers and literal loops."""

from __future__ import annotations

import math

import pytest
import torch

from anomret.losses import dice_loss, focal_loss, image_retrieval_loss, segmentation_loss


def test_focal_hand_worked_case():
    # Two pixels: P = (0.2, 0.8) with target 1, P = (0.6, 0.4) with target 0.
    probs = torch.tensor([[[[0.2, 0.6]], [[0.8, 0.4]]]], dtype=torch.float64)  # [1, 2, 1, 2]
    target = torch.tensor([[[1, 0]]])
    s = 1e-5
    # One-hot clamped to [s, 1 − s]: p_t = s·0.2 + (1 − s)·0.8 + s and (1 − s)·0.6 + s·0.4 + s.
    pt1 = s * 0.2 + (1 - s) * 0.8 + s
    pt2 = (1 - s) * 0.6 + s * 0.4 + s
    expected = (-((1 - pt1) ** 2) * math.log(pt1) - (1 - pt2) ** 2 * math.log(pt2)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-12)
    # Without smoothing: the textbook focal loss with α = 1.
    plain = (-(0.2**2) * math.log(0.8) - 0.4**2 * math.log(0.6)) / 2
    assert focal_loss(probs, target, smooth=0.0).item() == pytest.approx(plain, rel=1e-12)
    # γ = 0 is the cross-entropy of the (smoothed) probabilities.
    assert focal_loss(probs, target.bool(), gamma=0.0).item() == pytest.approx(
        -(math.log(pt1) + math.log(pt2)) / 2, rel=1e-12
    )


def test_focal_matches_literal_loop_with_three_classes():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64), dim=1)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    s, gamma = 1e-3, 1.5
    total, count = 0.0, 0
    for b in range(2):
        for y in range(4):
            for x in range(5):
                p_t = s
                for c in range(3):
                    hot = 1.0 if c == target[b, y, x] else 0.0
                    hot = min(max(hot, s / 2), 1 - s)  # clamp to [s/(C−1), 1 − s]
                    p_t += hot * probs[b, c, y, x].item()
                total += -((1 - p_t) ** gamma) * math.log(p_t)
                count += 1
    assert focal_loss(probs, target, gamma=gamma, smooth=s).item() == pytest.approx(total / count, rel=1e-12)


def test_dice_hand_worked_case():
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    # Sample 1: ΣPg = 1.5, ΣP = 1.75, Σg = 2 → 4 / 4.75; sample 2 (empty, nothing predicted): 1 / 1.
    expected = 1 - (4 / 4.75 + 1.0) / 2
    assert dice_loss(probs, target).item() == pytest.approx(expected, rel=1e-12)
    assert dice_loss(target.double(), target).item() == pytest.approx(0.0, abs=1e-12)


def test_image_retrieval_loss_hand_worked_case():
    retrieved = torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    # CE of logits r / 0.07: −log softmax = log(1 + exp(−(r_y − r_other)/0.07)).
    expected = (math.log1p(math.exp(-0.4 / 0.07)) + math.log1p(math.exp(0.8 / 0.07))) / 2
    assert image_retrieval_loss(retrieved, labels).item() == pytest.approx(expected, rel=1e-12)
    assert image_retrieval_loss(retrieved, labels.bool(), temperature=1.0).item() == pytest.approx(
        (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(0.8))) / 2, rel=1e-12
    )


def test_segmentation_loss_composes_the_official_terms():
    gen = torch.Generator().manual_seed(1)
    anomalous = torch.rand(2, 6, 6, generator=gen, dtype=torch.float64)
    probs = torch.stack([1 - anomalous, anomalous], dim=1)
    mask = torch.rand(2, 6, 6, generator=gen) > 0.7
    ft = focal_loss(probs, mask) + dice_loss(anomalous, mask.double())
    assert segmentation_loss(probs, mask).item() == pytest.approx(ft.item(), rel=1e-12)
    clip = ft + dice_loss(1 - anomalous, 1 - mask.double())
    assert segmentation_loss(probs, mask.float(), normal_dice=True).item() == pytest.approx(
        clip.item(), rel=1e-12
    )


def test_losses_are_differentiable_and_reject_bad_input():
    probs = torch.full((1, 2, 3, 3), 0.5, requires_grad=True)
    loss = segmentation_loss(probs, torch.zeros(1, 3, 3), normal_dice=True)
    loss.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        focal_loss(probs, torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="class indices"):
        focal_loss(probs, torch.full((1, 3, 3), 0.5))
    with pytest.raises(ValueError, match="class indices"):
        focal_loss(probs, torch.full((1, 3, 3), 2))
    with pytest.raises(ValueError, match="must match"):
        dice_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"labels"):
        image_retrieval_loss(torch.zeros(2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        image_retrieval_loss(torch.zeros(2, 2), torch.zeros(2), temperature=0)
