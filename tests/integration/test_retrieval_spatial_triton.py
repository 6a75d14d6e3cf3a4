"""The Triton kernel of the windowed patch 1-NN against a literal per-position loop.

Without a GPU the kernel runs through Triton's interpreter, which must be switched on before the kernel is
defined; each test therefore scores its cases in a fresh ``TRITON_INTERPRET=1`` subprocess. Shapes are
tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from spatial_reference import literal_spatial_scores

import anomret
from anomret.retrieval import spatial_knn_scores

pytest.importorskip("triton", reason="triton is not installed: spatial_knn_scores has only its torch path")

ATOL = 2e-6  # as the torch path's tests, against float64

_INTERPRETED_RUN = """
import sys, torch
from anomret.retrieval.spatial import spatial_knn_scores
from anomret.retrieval.spatial_triton import INTERPRETED

assert INTERPRETED, "TRITON_INTERPRET=1 did not reach the kernel"
views = {
    "whole": lambda bank: bank,
    "every_other_image": lambda bank: bank[::2],
    "every_other_channel": lambda bank: bank[..., ::2],
}
results = []
for case in torch.load(sys.argv[1]):
    bank = views[case["view"]](case["bank"])
    if case["loader"]:
        rows, bank = bank, lambda index, rows=bank: rows[index]
    results.append(
        spatial_knn_scores(
            case["query"], bank, case["neighbors"], case["rho"], backend="triton", **case["chunks"]
        )
    )
torch.save(results, sys.argv[2])
"""


def _case(query, bank, neighbors, rho, *, view="whole", loader=False, **chunks) -> dict:
    return {
        "query": query,
        "bank": bank,
        "neighbors": neighbors,
        "rho": rho,
        "view": view,
        "loader": loader,
        "chunks": chunks,
    }


def _interpreted(cases: list[dict], tmp_path: Path) -> list[torch.Tensor]:
    """``spatial_knn_scores(..., backend="triton")`` of every case, through Triton's interpreter."""
    torch.save(cases, tmp_path / "cases.pt")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": str(Path(anomret.__file__).parents[1]),
    }
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_RUN, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(tmp_path / "out.pt")


def _random(batch: int, n_bank: int, h: int, w: int, dim: int, seed: int, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, h, w, dim, generator=gen)
    bank = torch.randn(n_bank, h, w, dim, generator=gen)
    if dtype == torch.int8:
        bank = (bank * 40).round().clamp(-127, 127)
    return query, bank.to(dtype), gen


def _check(got: torch.Tensor, expected: np.ndarray, what: str) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape, what
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ATOL, err_msg=what)


def test_kernel_matches_literal_loop_for_every_window(tmp_path):
    # A non-square grid; ρ = 0 (same position), 1, 2 and ρ beyond the grid (unconstrained 1-NN).
    query, bank, _ = _random(2, 6, 3, 5, 40, seed=1)
    neighbors = torch.tensor([[4, 0, 4], [1, 5, 2]])  # a repeated neighbour changes nothing
    rhos = [0, 1, 2, 9]
    results = _interpreted([_case(query, bank, neighbors, rho) for rho in rhos], tmp_path)
    for rho, got in zip(rhos, results, strict=True):
        _check(got, literal_spatial_scores(query, bank, neighbors, rho), f"{rho=}")


def test_kernel_blocks_of_neighbours_and_channels(tmp_path):
    # K = 70 spans two neighbour blocks and D = 72 two channel blocks, both partial; fp16 and fp32 rows.
    query, bank, gen = _random(1, 5, 4, 3, 72, seed=2)
    many = torch.randint(0, 5, (1, 70), generator=gen)
    fp16_got, fp32_got = _interpreted(
        [_case(query, bank, many, 1), _case(query, bank.float(), many, 1)], tmp_path
    )
    _check(fp16_got, literal_spatial_scores(query, bank, many, 1), "fp16")
    _check(fp32_got, literal_spatial_scores(query, bank.float(), many, 1), "fp32")


def test_kernel_window_wider_than_a_block_of_slots(tmp_path):
    # A 9×8 grid with ρ beyond it: every reference position is seen by 72 query patches, two slot blocks.
    query, bank, _ = _random(1, 3, 9, 8, 16, seed=3)
    neighbors = torch.tensor([[2, 0]])
    (got,) = _interpreted([_case(query, bank, neighbors, 9)], tmp_path)
    _check(got, literal_spatial_scores(query, bank, neighbors, 9), "72-slot window")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_kernel_reads_other_stored_dtypes(dtype, tmp_path):
    # int8 rows are read without their per-vector scales, which cosine ignores.
    query, bank, _ = _random(2, 5, 3, 4, 24, seed=4, dtype=dtype)
    neighbors = torch.tensor([[0, 3, 1], [4, 4, 2]])
    (got,) = _interpreted([_case(query, bank, neighbors, 1)], tmp_path)
    _check(got, literal_spatial_scores(query, bank, neighbors, 1), str(dtype))


def test_kernel_zero_vectors_have_cosine_zero(tmp_path):
    query, bank, _ = _random(2, 3, 3, 4, 16, seed=5)
    query[0, 1, 2] = 0
    bank[:, 0] = 0  # a whole row of zero patches in every bank image
    bank[1] = 0
    neighbors = torch.tensor([[1, 1], [0, 1]])  # query 0 sees only the all-zero image
    (got,) = _interpreted([_case(query, bank, neighbors, 1)], tmp_path)
    _check(got, literal_spatial_scores(query, bank, neighbors, 1), "zero vectors")
    assert torch.equal(got[0], torch.ones(3, 4))


def test_kernel_reads_strided_compact_and_loaded_banks(tmp_path):
    # A strided tensor is read in place; a compact tensor of a batch's rows with remapped indices scores
    # as the whole bank; a loader's rows arrive in chunks that do not divide K or B.
    query, wide, _ = _random(3, 10, 3, 4, 32, seed=6)
    neighbors = torch.tensor([[0, 3, 4], [4, 1, 2], [2, 2, 0]])
    rows = wide[::2]
    used = neighbors.unique()
    compact, remapped = rows[used].clone(), torch.searchsorted(used, neighbors)
    cases = [
        _case(query, wide, neighbors, 1, view="every_other_image"),
        _case(query, compact, remapped, 1),
        _case(query, rows.clone(), neighbors, 1, loader=True, neighbor_chunk=2, query_chunk=2),
        _case(query[..., ::2].contiguous(), wide, neighbors * 2, 2, view="every_other_channel"),
    ]
    strided, from_compact, loaded, channel_strided = _interpreted(cases, tmp_path)
    expected = literal_spatial_scores(query, rows, neighbors, 1)
    _check(strided, expected, "strided images")
    _check(from_compact, expected, "compact rows")
    _check(loaded, expected, "loader")
    _check(
        channel_strided,
        literal_spatial_scores(query[..., ::2], wide[..., ::2], neighbors * 2, 2),
        "strided channels",
    )


def test_backend_is_checked():
    from anomret.retrieval.spatial_triton import INTERPRETED

    query, bank = torch.randn(1, 3, 3, 8), torch.randn(2, 3, 3, 8).half()
    neighbors = torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match="backend must be"):
        spatial_knn_scores(query, bank, neighbors, 1, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float64 queries"):
        spatial_knn_scores(query.double(), bank, neighbors, 1, backend="triton")
    if not INTERPRETED:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            spatial_knn_scores(query, bank, neighbors, 1, backend="triton")
    # On CPU, "auto" is the torch path.
    assert torch.equal(
        spatial_knn_scores(query, bank, neighbors, 1),
        spatial_knn_scores(query, bank, neighbors, 1, backend="torch"),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8, torch.float32], ids=str)
def test_kernel_on_gpu_matches_literal_loop(dtype):
    query, bank, gen = _random(2, 9, 4, 6, 80, seed=7, dtype=dtype)
    neighbors = torch.randint(0, 9, (2, 70), generator=gen)
    for rho in (0, 1, 2, 9):
        expected = literal_spatial_scores(query, bank, neighbors, rho)
        for backend in ("auto", "triton"):
            got = spatial_knn_scores(query.cuda(), bank.cuda(), neighbors.cuda(), rho, backend=backend)
            _check(got.cpu(), expected, f"{dtype} {rho=} {backend=}")
        # A bank left on the host is moved in chunks.
        _check(
            spatial_knn_scores(query.cuda(), bank, neighbors, rho, neighbor_chunk=32).cpu(), expected, "host"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu_at_paper_shape_matches_float64():
    # Half the bank is the queries plus noise (cosines near 0.95, as between real normal patches): a sum
    # accumulated with truncation over all 768 channels would be off by about 2e-6 there.
    gen = torch.Generator().manual_seed(8)
    query = torch.randn(2, 28, 28, 768, generator=gen)
    near = query.repeat(10, 1, 1, 1) + 0.3 * torch.randn(20, 28, 28, 768, generator=gen)
    bank = torch.cat([near, torch.randn(20, 28, 28, 768, generator=gen)]).half()
    neighbors = torch.stack([torch.arange(0, 40, 2), torch.arange(1, 40, 2)])
    for rho in (1, 2):
        expected = spatial_knn_scores(query.double(), bank, neighbors, rho)
        assert expected.min() < 0.1  # the near rows are found
        got = spatial_knn_scores(query.cuda(), bank.cuda(), neighbors.cuda(), rho)
        np.testing.assert_allclose(got.cpu().numpy(), expected.numpy(), rtol=0, atol=ATOL)
