import math

import pytest
import torch

from anomret.retrieval import SoftmaxRetriever, softmax_retrieve


def _dense(query, keys, values, tau):
    return torch.softmax(query.double() @ keys.double().T / tau, dim=-1) @ values.double()


@pytest.mark.parametrize("tau", [1.0, 0.07])
def test_matches_dense_softmax_for_any_chunking(tau):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 5, 16, generator=gen)
    keys = torch.nn.functional.normalize(torch.randn(37, 16, generator=gen), dim=-1)
    values = torch.nn.functional.one_hot(torch.randint(0, 2, (37,), generator=gen), 2).float()
    expected = _dense(query, keys, values, tau)
    for query_chunk, key_chunk in [(4096, 16384), (4, 5), (1, 1), (7, 36)]:
        got = softmax_retrieve(query, keys, values, tau, query_chunk=query_chunk, key_chunk=key_chunk)
        assert got.shape == (3, 5, 2)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_hand_worked_case():
    # Two keys, similarity 1 and 0 with tau=1: weights e/(e+1) and 1/(e+1).
    query = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # first key anomalous
    anomalous = softmax_retrieve(query, keys, values)[0, 1].item()
    assert anomalous == pytest.approx(math.e / (math.e + 1), rel=1e-6)


def test_large_logits_stay_finite():
    # With tau=0.01 the logits reach 100; a naive exp overflows float32, the streamed max does not.
    query = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.99, 0.141]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = softmax_retrieve(query, keys, values, tau=0.01, key_chunk=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _dense(query, keys, values, 0.01), rtol=1e-5, atol=1e-7)


def test_rows_sum_to_one_and_retriever_normalises():
    gen = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(10, 8, generator=gen), dim=-1)
    values = torch.nn.functional.one_hot(torch.arange(10) % 2, 2).float()
    query = torch.randn(6, 8, generator=gen)
    out = SoftmaxRetriever()(query * 50, keys, values)  # scale must not matter after normalisation
    torch.testing.assert_close(
        out, softmax_retrieve(torch.nn.functional.normalize(query, dim=-1), keys, values)
    )
    torch.testing.assert_close(out.sum(-1), torch.ones(6))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="empty memory"):
        softmax_retrieve(torch.randn(2, 4), torch.empty(0, 4), torch.empty(0, 2))
    with pytest.raises(ValueError, match="dim"):
        softmax_retrieve(torch.randn(2, 4), torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="tau"):
        softmax_retrieve(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2), tau=0)
