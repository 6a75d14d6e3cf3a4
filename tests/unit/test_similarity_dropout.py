"""Similarity dropout (MRAD-FT) and projected retrieval against literal computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anomret.retrieval.softmax import projected_retrieve, similarity_dropout_mask, softmax_retrieve


def _linear_quantile(row: list[float], q: float) -> float:
    """numpy's / torch's default 'linear' quantile, written out."""
    ordered = sorted(row)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_mask_hand_worked_case():
    # Five entries, drop 20%: q = 0.8 → position 3.2 of [0.1, 0.2, 0.3, 0.4, 0.9] → 0.4 + 0.2·0.5 = 0.5.
    raw = torch.tensor([[0.3, 0.9, 0.1, 0.4, 0.2]], dtype=torch.float64)
    assert similarity_dropout_mask(raw, 0.2).tolist() == [[False, True, False, False, False]]
    # Drop 40%: q = 0.6 → position 2.4 → 0.3 + 0.4·0.1 = 0.34: 0.4 and 0.9 go.
    assert similarity_dropout_mask(raw, 0.4).tolist() == [[False, True, False, True, False]]


def test_mask_matches_literal_loop_per_row():
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(7, 23, generator=gen, dtype=torch.float64) * 2 - 1
    for ratio in (0.05, 0.2, 0.15, 0.5, 0.99):
        mask = similarity_dropout_mask(raw, ratio)
        for i, row in enumerate(raw.tolist()):
            threshold = _linear_quantile(row, 1 - ratio)
            expected = [value > threshold for value in row]
            assert mask[i].tolist() == expected, (ratio, i)


def test_threshold_is_strict_and_ties_are_kept():
    raw = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0]])
    mask = similarity_dropout_mask(raw, 0.5)
    assert not mask[0].any()  # every entry equals the quantile: nothing is strictly above it
    # Row 2: q = 0.5 → position 1.5 of [0, 0, 1, 1] → 0.5: both 1.0 entries dropped, zeros kept.
    assert mask[1].tolist() == [True, True, False, False]


def test_zero_ratio_drops_nothing_and_bad_ratios_are_rejected():
    raw = torch.randn(4, 9)
    assert not similarity_dropout_mask(raw, 0.0).any()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"drop_ratio must be in \[0, 1\)"):
            similarity_dropout_mask(raw, bad)
    with pytest.raises(ValueError, match="queries, memory"):
        similarity_dropout_mask(torch.randn(2, 3, 4), 0.2)


def _problem(seed: int = 0, q_shape=(2, 3, 4), c: int = 12, d: int = 6, m: int = 31):
    gen = torch.Generator().manual_seed(seed)
    query_raw = F.normalize(torch.randn(*q_shape, c, generator=gen, dtype=torch.float64), dim=-1)
    keys_raw = F.normalize(torch.randn(m, c, generator=gen, dtype=torch.float64), dim=-1)
    query_proj = torch.randn(*q_shape, d, generator=gen, dtype=torch.float64)
    keys_proj = torch.randn(m, d, generator=gen, dtype=torch.float64)
    values = F.one_hot(torch.randint(0, 2, (m,), generator=gen), 2).double()
    return query_raw, keys_raw, query_proj, keys_proj, values


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_without_dropout_equals_softmax_retrieve(tau):
    query_raw, keys_raw, query_proj, keys_proj, values = _problem()
    got = projected_retrieve(query_raw, keys_raw, query_proj, keys_proj, values, tau=tau, query_chunk=5)
    expected = softmax_retrieve(query_proj, keys_proj, values, tau)
    assert got.shape == (2, 3, 4, 2)
    torch.testing.assert_close(got, expected)


def test_dropout_matches_literal_loop_and_any_chunking():
    query_raw, keys_raw, query_proj, keys_proj, values = _problem(seed=1)
    ratio = 0.2
    flat_raw = query_raw.reshape(-1, query_raw.shape[-1])
    flat_proj = query_proj.reshape(-1, query_proj.shape[-1])
    expected = []
    for qr, qp in zip(flat_raw.tolist(), flat_proj.tolist(), strict=True):
        raw = [sum(a * b for a, b in zip(qr, k, strict=True)) for k in keys_raw.tolist()]
        threshold = _linear_quantile(raw, 1 - ratio)
        logits = [sum(a * b for a, b in zip(qp, k, strict=True)) for k in keys_proj.tolist()]
        kept = [math.exp(lg) if r <= threshold else 0.0 for lg, r in zip(logits, raw, strict=True)]
        total = sum(kept)
        expected.append(
            [sum(w * v[c] for w, v in zip(kept, values.tolist(), strict=True)) / total for c in (0, 1)]
        )
    expected = torch.tensor(expected, dtype=torch.float64).reshape(2, 3, 4, 2)
    for chunk in (1, 7, 2048):
        got = projected_retrieve(
            query_raw, keys_raw, query_proj, keys_proj, values, drop_ratio=ratio, query_chunk=chunk
        )
        torch.testing.assert_close(got, expected)


def test_mask_uses_the_raw_cosine_not_the_projection():
    # Key 0 is the raw nearest neighbour but the projection scores it lowest: dropout removes it anyway.
    query_raw = torch.tensor([[1.0, 0.0]])
    keys_raw = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.6, 0.8]])
    query_proj = torch.tensor([[1.0]])
    keys_proj = torch.tensor([[-5.0], [0.0], [0.0], [0.0], [0.0]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    with_drop = projected_retrieve(query_raw, keys_raw, query_proj, keys_proj, values, drop_ratio=0.2)
    assert with_drop[0, 1].item() == 0.0  # the only anomalous key was dropped
    no_drop = projected_retrieve(query_raw, keys_raw, query_proj, keys_proj, values)
    assert no_drop[0, 1].item() == pytest.approx(math.exp(-5) / (math.exp(-5) + 4))
    # Raw keys of any scale: the mask is computed on cosines.
    scaled = projected_retrieve(query_raw * 3, keys_raw * 7, query_proj, keys_proj, values, drop_ratio=0.2)
    torch.testing.assert_close(scaled, with_drop)


def test_differentiable_in_both_projections():
    query_raw, keys_raw, query_proj, keys_proj, values = _problem(seed=2)
    query_proj.requires_grad_(True)
    keys_proj.requires_grad_(True)
    out = projected_retrieve(
        query_raw, keys_raw, query_proj, keys_proj, values, drop_ratio=0.2, query_chunk=4
    )
    out[..., 1].sum().backward()
    assert query_proj.grad is not None and query_proj.grad.abs().sum() > 0
    assert keys_proj.grad is not None and keys_proj.grad.abs().sum() > 0
    assert torch.isfinite(query_proj.grad).all() and torch.isfinite(keys_proj.grad).all()
    assert torch.autograd.gradcheck(
        lambda q, k: projected_retrieve(query_raw[:1, :1], keys_raw, q, k, values, drop_ratio=0.2),
        (query_proj.detach()[:1, :1].requires_grad_(), keys_proj.detach().requires_grad_()),
    )


def test_rows_sum_to_one_and_bad_inputs_are_rejected():
    query_raw, keys_raw, query_proj, keys_proj, values = _problem(seed=3)
    out = projected_retrieve(query_raw, keys_raw, query_proj, keys_proj, values, drop_ratio=0.5)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    assert projected_retrieve(query_raw.float(), keys_raw, query_proj.float(), keys_proj, values).dtype == (
        torch.float32
    )
    with pytest.raises(ValueError, match="projected query dim"):
        projected_retrieve(query_raw, keys_raw, query_proj[..., :3], keys_proj, values)
    with pytest.raises(ValueError, match="empty memory"):
        projected_retrieve(query_raw, keys_raw[:0], query_proj, keys_proj[:0], values[:0])
    with pytest.raises(ValueError, match="raw queries"):
        projected_retrieve(query_raw[..., :5], keys_raw, query_proj, keys_proj, values, drop_ratio=0.2)
    with pytest.raises(ValueError, match="tau"):
        projected_retrieve(query_raw, keys_raw, query_proj, keys_proj, values, tau=0.0)
