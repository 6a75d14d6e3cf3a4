"""Pure functions shared by the encoders: token grids, neighbour averaging, precision, config values."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# fp32: IEEE float32 matmuls (the official code's numbers); tf32: float32 tensors with TF32 tensor-core
# matmuls on GPUs that have them; bf16 / fp16: autocast.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def tokens_to_grid(tokens: Tensor, height: int, width: int) -> Tensor:
    """``[B, h*w, C]`` row-major patch tokens → ``[B, h, w, C]``."""
    batch, count, channels = tokens.shape
    if count != height * width:
        raise ValueError(f"{count} patch tokens do not form a {height}x{width} grid")
    return tokens.reshape(batch, height, width, channels)


def neighbor_average(grid: Tensor, kernels: Sequence[int]) -> Tensor:
    """Mean over ``kernels`` of k×k average pools of a ``[B, h, w, C]`` grid.

    Stride 1, zero padding ``k // 2`` counted in the average (``count_include_pad=True``), so border
    cells are damped towards zero exactly as MRAD's reference implementation does. Kernel 1 is the
    identity; ``[1, 3, 5]`` is MRAD's setting.
    """
    if not kernels:
        raise ValueError("neighbor_average needs at least one kernel size")
    if any(k < 1 or k % 2 == 0 for k in kernels):
        raise ValueError(f"kernel sizes must be odd and positive, got {list(kernels)}")
    channels_first = grid.permute(0, 3, 1, 2)
    pooled = [
        channels_first
        if k == 1
        else F.avg_pool2d(channels_first, k, stride=1, padding=k // 2, count_include_pad=True)
        for k in kernels
    ]
    return torch.stack(pooled).mean(0).permute(0, 2, 3, 1).contiguous()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block only."""
    previous = torch.get_float32_matmul_precision()
    if previous == precision:
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The encoder's arithmetic: autocast for ``bf16``/``fp16`` (``fp16`` on CUDA only), TF32 matmuls for
    ``tf32``, IEEE float32 matmuls for ``fp32``.

    The float32 matmul precision is set inside the block whatever the process-wide setting (the run's
    precision policy), so an encoder's outputs depend on its own ``precision`` alone, which is part of its
    fingerprint: banks and stored features never mix two arithmetics under one name.
    """
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    with matmul_precision("highest" if precision == "fp32" else "high"):
        if precision in ("fp32", "tf32"):
            yield
            return
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def plain(value: Any) -> Any:
    """Hydra containers (DictConfig/ListConfig) → plain dicts/lists, recursively, for library calls."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def as_kernels(neighbor_kernels: Sequence[int] | None) -> tuple[int, ...] | None:
    if neighbor_kernels is None:
        return None
    kernels = tuple(int(k) for k in neighbor_kernels)
    if not kernels:
        return None
    if any(k < 1 or k % 2 == 0 for k in kernels):
        raise ValueError(f"neighbor_kernels must be odd and positive, got {list(kernels)}")
    return kernels
