"""neighbor_average and the small helpers every encoder shares."""

from __future__ import annotations

import pytest
import torch

from anomret.encoders.postprocess import as_kernels, autocast, neighbor_average, plain, tokens_to_grid


def test_neighbor_average_zero_padding_damps_borders():
    grid = torch.ones(1, 5, 5, 2)
    out = neighbor_average(grid, [1, 3, 5])
    corner = (1 + 4 / 9 + 9 / 25) / 3  # zero padding counted: 4 of 9 and 9 of 25 cells are real
    torch.testing.assert_close(out[0, 0, 0], torch.full((2,), corner))
    torch.testing.assert_close(out[0, 2, 2], torch.ones(2))  # centre: every window inside the grid
    assert out.shape == grid.shape


def test_neighbor_average_matches_explicit_window_means():
    grid = torch.randn(2, 6, 7, 3)
    out = neighbor_average(grid, [1, 3])
    padded = torch.nn.functional.pad(grid.permute(0, 3, 1, 2), (1, 1, 1, 1))
    i, j = 0, 4  # a border cell
    window = padded[:, :, i : i + 3, j : j + 3].sum(dim=(2, 3)) / 9
    torch.testing.assert_close(out[:, i, j], (grid[:, i, j] + window) / 2)
    torch.testing.assert_close(neighbor_average(grid, [1]), grid)


@pytest.mark.parametrize("kernels", [[], [2], [0, 3]])
def test_neighbor_average_rejects_bad_kernels(kernels):
    with pytest.raises(ValueError):
        neighbor_average(torch.zeros(1, 3, 3, 1), kernels)


def test_as_kernels_and_plain():
    assert as_kernels(None) is None and as_kernels([]) is None
    assert as_kernels([1, 3, 5]) == (1, 3, 5)
    with pytest.raises(ValueError):
        as_kernels([4])
    from omegaconf import OmegaConf

    assert plain(OmegaConf.create({"a": [1, {"b": 2}]})) == {"a": [1, {"b": 2}]}


def test_tokens_to_grid_is_row_major():
    tokens = torch.arange(6.0).reshape(1, 6, 1)
    grid = tokens_to_grid(tokens, 2, 3)
    assert grid[0, 1, 0, 0] == 3  # token j sits at row j // w, column j % w
    with pytest.raises(ValueError):
        tokens_to_grid(tokens, 2, 2)


def test_fp16_autocast_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"), autocast("fp16", torch.device("cpu")):
        pass
