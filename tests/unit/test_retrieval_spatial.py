"""RAD retrieval against literal loops: global top-K by CLS cosine and the windowed patch 1-NN."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from spatial_reference import literal_spatial_scores

from anomret.retrieval import (
    global_topk,
    multilayer_spatial_knn_scores,
    spatial,
    spatial_knn_scores,
)
from anomret.retrieval.spatial import GlobalTopK, exact_matmul, layer_weights

# (tile, neighbor_chunk, query_chunk): chunk sizes that do not divide K or B, tiles that do not divide 5×7.
_CHUNKINGS = [(1, 32, 1), (1, 2, 2), (2, 1, 3), (3, 2, 1), (4, 5, 2)]


@pytest.mark.parametrize("rho", [0, 1, 2, 9])
@pytest.mark.parametrize("n_neighbors", [1, 3, 6])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_literal_loop_fp16_bank(rho, n_neighbors, batch):
    gen = torch.Generator().manual_seed(rho * 100 + n_neighbors * 10 + batch)
    query = torch.randn(batch, 5, 7, 8, generator=gen)
    bank = torch.randn(6, 5, 7, 8, generator=gen).half()
    neighbors = torch.stack([torch.randperm(6, generator=gen)[:n_neighbors] for _ in range(batch)])
    expected = literal_spatial_scores(query, bank, neighbors, rho)
    for tile, neighbor_chunk, query_chunk in _CHUNKINGS:
        got = spatial_knn_scores(
            query, bank, neighbors, rho, tile=tile, neighbor_chunk=neighbor_chunk, query_chunk=query_chunk
        )
        assert got.shape == (batch, 5, 7) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, atol=2e-6, err_msg=f"{tile=} {neighbor_chunk=}")


@pytest.mark.parametrize("shape", [(4, 4), (1, 6), (6, 1), (3, 8)])
def test_float64_query_is_exact_on_other_grids(shape):
    gen = torch.Generator().manual_seed(7)
    h, w = shape
    query = torch.randn(2, h, w, 5, generator=gen, dtype=torch.float64)
    bank = torch.randn(4, h, w, 5, generator=gen, dtype=torch.float64)
    neighbors = torch.tensor([[3, 0], [1, 1]])  # a repeated neighbour changes nothing
    for rho in (0, 1, 3):
        expected = literal_spatial_scores(query, bank, neighbors, rho)
        for tile in (1, 2, 5):
            got = spatial_knn_scores(query, bank, neighbors, rho, tile=tile, neighbor_chunk=1)
            assert got.dtype == torch.float64
            np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def _border_case(match_at: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query all e1; the bank image is -e1 everywhere (cosine -1) except e1 at ``match_at``."""
    query = torch.zeros(1, 4, 4, 2)
    query[..., 0] = 1
    bank = torch.zeros(1, 4, 4, 2)
    bank[..., 0] = -1
    bank[0, match_at[0], match_at[1]] = torch.tensor([1.0, 0.0])
    return query, bank


@pytest.mark.parametrize("tile", [1, 2, 3])
def test_window_border_is_clipped_not_padded(tile):
    # The exact match at (0, 2): positions within L∞ distance 1 find it (score 0); all others see only
    # cosine -1 (score 2). Zero padding at the border would let a padded cosine 0 win (score 1).
    query, bank = _border_case((0, 2))
    got = spatial_knn_scores(query, bank, torch.tensor([[0]]), rho=1, tile=tile)[0]
    expected = torch.full((4, 4), 2.0)
    expected[0:2, 1:4] = 0.0
    torch.testing.assert_close(got, expected)
    assert got[0, 0] == 2.0  # corner: best match two columns away, just outside the window
    assert got[1, 1] == 0.0  # diagonal, just inside the window
    # rho = 0: only the same position.
    same = spatial_knn_scores(query, bank, torch.tensor([[0]]), rho=0, tile=tile)[0]
    expected0 = torch.full((4, 4), 2.0)
    expected0[0, 2] = 0.0
    torch.testing.assert_close(same, expected0)


def test_window_reaches_across_corner():
    query, bank = _border_case((3, 3))
    got = spatial_knn_scores(query, bank, torch.tensor([[0]]), rho=2)[0]
    assert got[1, 1] == 0.0  # (3, 3) is at L∞ distance 2 from (1, 1)
    assert got[0, 1] == 2.0 and got[1, 0] == 2.0  # distance 3: outside


def test_large_rho_is_unconstrained_nearest_neighbour():
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 3, 5, 6, generator=gen)
    bank = torch.randn(4, 3, 5, 6, generator=gen)
    neighbors = torch.tensor([[0, 2], [3, 1]])
    q = torch.nn.functional.normalize(query.reshape(2, 15, 6), dim=-1)
    r = torch.nn.functional.normalize(bank.reshape(4, 15, 6), dim=-1)
    expected = torch.stack([1 - (q[b] @ r[neighbors[b]].reshape(-1, 6).T).amax(dim=1) for b in range(2)])
    for rho in (4, 100):
        torch.testing.assert_close(spatial_knn_scores(query, bank, neighbors, rho).reshape(2, 15), expected)


class RecordingLoader:
    """A bank read through ``__getitem__``, as a memory-mapped file would be; records every request."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.requests: list[list[int]] = []

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        assert isinstance(index, torch.Tensor) and index.dtype == torch.int64
        self.requests.append(index.tolist())
        return self.rows[index]


def test_loader_bank_reads_only_requested_rows_in_bounded_chunks():
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(3, 4, 5, 8, generator=gen)
    rows = torch.randn(20, 4, 5, 8, generator=gen).half()
    neighbors = torch.tensor([[1, 4, 7], [4, 9, 2], [15, 1, 0]])
    loader = RecordingLoader(rows)
    got = spatial_knn_scores(query, loader, neighbors, rho=1, neighbor_chunk=2, query_chunk=2)
    requested = [i for request in loader.requests for i in request]
    assert set(requested) == set(neighbors.flatten().tolist())
    assert len(requested) == neighbors.numel()  # each (query, neighbour) pair read once
    assert max(len(request) for request in loader.requests) <= 2 * 2
    torch.testing.assert_close(got, spatial_knn_scores(query, rows, neighbors, rho=1))
    np.testing.assert_allclose(got.numpy(), literal_spatial_scores(query, rows, neighbors, 1), atol=2e-6)


def test_callable_and_numpy_and_strided_banks_agree():
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(2, 3, 3, 4, generator=gen)
    wide = torch.randn(10, 3, 3, 4, generator=gen)
    neighbors = torch.tensor([[0, 3], [4, 1]])
    expected = spatial_knn_scores(query, wide[::2].contiguous(), neighbors, rho=1)
    strided = wide[::2]  # not contiguous: read row by row
    assert not strided.is_contiguous()
    torch.testing.assert_close(spatial_knn_scores(query, strided, neighbors, rho=1), expected)
    calls = []
    torch.testing.assert_close(
        spatial_knn_scores(query, lambda i: calls.append(i) or strided[i], neighbors, rho=1), expected
    )
    assert calls
    array = strided.numpy().copy()
    torch.testing.assert_close(spatial_knn_scores(query, array, neighbors, rho=1), expected)


def test_spatial_bad_inputs_are_rejected():
    query = torch.randn(2, 4, 4, 8)
    bank = torch.randn(5, 4, 4, 8)
    neighbors = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        spatial_knn_scores(query, bank, torch.tensor([[0, 5], [1, 2]]), 1)
    with pytest.raises(ValueError, match="same encoder, layer and image size"):
        spatial_knn_scores(query, torch.randn(5, 3, 4, 8), neighbors, 1)
    with pytest.raises(ValueError, match="same encoder, layer and image size"):
        spatial_knn_scores(query, RecordingLoader(torch.randn(5, 4, 4, 6)), neighbors, 1)
    with pytest.raises(ValueError, match="non-negative integer"):
        spatial_knn_scores(query, bank, neighbors, -1)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        spatial_knn_scores(query, bank, neighbors[:1], 1)
    with pytest.raises(ValueError, match="integer bank indices"):
        spatial_knn_scores(query, bank, neighbors.float(), 1)
    with pytest.raises(ValueError, match=r"\[B, h, w, D\]"):
        spatial_knn_scores(query[0], bank, neighbors, 1)


def test_multilayer_is_the_weighted_mean_of_layers():
    gen = torch.Generator().manual_seed(8)
    queries = {3: torch.randn(2, 4, 4, 6, generator=gen), 11: torch.randn(2, 4, 4, 6, generator=gen)}
    banks = {3: torch.randn(5, 4, 4, 6, generator=gen), 11: torch.randn(5, 4, 4, 6, generator=gen).half()}
    neighbors = torch.tensor([[0, 4], [2, 1]])
    per_layer = {layer: spatial_knn_scores(queries[layer], banks[layer], neighbors, 1) for layer in queries}
    torch.testing.assert_close(
        multilayer_spatial_knn_scores(queries, banks, neighbors, 1), (per_layer[3] + per_layer[11]) / 2
    )
    torch.testing.assert_close(
        multilayer_spatial_knn_scores(queries, banks, neighbors, 1, weights={3: 3.0, 11: 1.0}),
        0.75 * per_layer[3] + 0.25 * per_layer[11],
    )
    with pytest.raises(ValueError, match=r"no patch features for layers \[11\]"):
        multilayer_spatial_knn_scores(queries, {3: banks[3]}, neighbors, 1)
    with pytest.raises(ValueError, match="non-negative"):
        layer_weights([3, 11], [1.0, -1.0])
    with pytest.raises(ValueError, match="2 layers"):
        layer_weights([3, 11], [1.0])


class _BrokenKernels:
    """Stands in for the kernel module of a broken triton install: every launch fails."""

    BANK_DTYPES = (torch.float16,)

    class WindowMax:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("no C compiler to build the launcher")


def test_a_kernel_that_fails_at_first_launch_falls_back_to_the_torch_path(monkeypatch):
    def broken_where_it_applies(query, bank, backend):
        if backend == "torch" or (backend == "auto" and spatial._KernelHealth.failure is not None):
            return None
        return _BrokenKernels

    monkeypatch.setattr(spatial, "_kernel_applies", broken_where_it_applies)
    monkeypatch.setattr(spatial._KernelHealth, "succeeded", False)
    monkeypatch.setattr(spatial._KernelHealth, "failure", None)
    gen = torch.Generator().manual_seed(9)
    query, bank = torch.randn(2, 3, 4, 8, generator=gen), torch.randn(3, 3, 4, 8, generator=gen).half()
    neighbors = torch.tensor([[0, 2], [1, 1]])
    with pytest.warns(RuntimeWarning, match="no C compiler.*torch path from now on"):
        got = spatial_knn_scores(query, bank, neighbors, 1)
    assert isinstance(spatial._KernelHealth.failure, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls go straight to the torch path
        torch.testing.assert_close(spatial_knn_scores(query, bank, neighbors, 1), got)
    torch.testing.assert_close(got, spatial_knn_scores(query, bank, neighbors, 1, backend="torch"))
    # Forced, the kernel's error is the caller's to see.
    with pytest.raises(RuntimeError, match="no C compiler"):
        spatial_knn_scores(query, bank, neighbors, 1, backend="triton")


# ----------------------------------------------------------------------------- global top-K


def _brute_force_topk(query: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Sort every bank image by (-cosine, index) in float64."""
    q = torch.nn.functional.normalize(query.double(), dim=-1)
    r = torch.nn.functional.normalize(bank.double(), dim=-1)
    sim = (q @ r.T).tolist()
    return torch.tensor([sorted(range(len(row)), key=lambda n, row=row: (-row[n], n))[:k] for row in sim])


def test_global_topk_matches_argsort_for_any_chunking():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 16, generator=gen) * 5
    bank = torch.randn(37, 16, generator=gen).half()
    for k in (1, 5, 37):
        expected = _brute_force_topk(query, bank, k)
        for chunk in (65536, 37, 10, 3, 1):
            got = global_topk(query, bank, k, chunk=chunk)
            assert got.dtype == torch.int64 and got.shape == (3, k)
            torch.testing.assert_close(got, expected)
    full = global_topk(query, bank, 37)
    assert sorted(full[0].tolist()) == list(range(37))  # k = N is a permutation


def test_global_topk_breaks_ties_by_lower_index():
    # Exactly representable unit vectors, so equal cosines are exactly equal whatever the chunking.
    e1, e2, diag = [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0.5, 0.5, 0.5]
    bank = torch.tensor([e2, diag, e1, diag, e1, e2, e1, diag])
    query = torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 1.0]])
    expected = torch.tensor([[2, 4, 6, 1, 3, 7, 0, 5], [1, 3, 7, 0, 2, 4, 5, 6]])
    for chunk in (8, 3, 2, 1):
        result = global_topk(query, bank, 8, chunk=chunk, return_similarity=True)
        assert isinstance(result, GlobalTopK)
        torch.testing.assert_close(result.indices, expected)
        torch.testing.assert_close(result.similarity[0], torch.tensor([1, 1, 1, 0.5, 0.5, 0.5, 0, 0]))
        torch.testing.assert_close(global_topk(query, bank, 4, chunk=chunk), expected[:, :4])
    torch.testing.assert_close(expected, _brute_force_topk(query, bank, 8))


def test_global_topk_rejects_k_beyond_the_memory():
    query, bank = torch.randn(2, 8), torch.randn(40, 8)
    message = r"retrieval.k=150 is larger than the memory \(40 images\); lower retrieval.k or add images"
    with pytest.raises(ValueError, match=message):
        global_topk(query, bank, 150)
    with pytest.raises(ValueError, match="at least 1"):
        global_topk(query, bank, 0)
    with pytest.raises(ValueError, match="another encoder"):
        global_topk(query, torch.randn(40, 9), 3)


def test_exact_matmul_restores_the_callers_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with exact_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        global_topk(torch.randn(1, 4), torch.randn(3, 4), 2)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize(("k", "rho"), [(1, 0), (2, 1), (5, 2)])
def test_queries_sharing_a_step_score_as_one_query_per_step(k, rho):
    gen = torch.Generator().manual_seed(k)
    query = torch.randn(7, 5, 6, 8, generator=gen)
    bank = torch.randn(9, 5, 6, 8, generator=gen).half()
    neighbors = torch.stack([torch.randperm(9, generator=gen)[:k] for _ in range(7)])
    grouped = spatial_knn_scores(query, bank, neighbors, rho, backend="torch")  # 32 // K queries a step
    alone = [
        spatial_knn_scores(query[i : i + 1], bank, neighbors[i : i + 1], rho, backend="torch")
        for i in range(7)
    ]
    assert torch.equal(grouped, torch.cat(alone))  # an image's scores never depend on its batch-mates
