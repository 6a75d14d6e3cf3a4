"""Triton kernel for RAD's windowed patch 1-NN, the GPU path of ``spatial_knn_scores``.

Work split. One program takes one query image, one reference grid position p' and a block of that image's
neighbours. The query patches that can see p' (its window, at most ``(2ρ + 1)²`` of them) are compared in
one ``tl.dot`` with the neighbours' patches at p', which are read straight from the bank through the
neighbour index (any strides: a whole bank on the device, or a compact tensor of a batch's rows with
remapped indices, is read in place and never copied). Each program keeps, per query patch, the best
cosine over its block and folds it into the running best with an atomic max; a max does not depend on
the order of the updates, so the result is deterministic. Every stored neighbour row is read from
memory once, and nothing is ever gathered into a work buffer.

Precision: fp32 accumulation throughout, and products as exact as fp32's.

- fp16 and int8 rows are exact in fp16 and go to the fp16 tensor cores as stored (cosine ignores a
  positive per-vector scale, so int8 rows are used without their scales). The normalised query is split
  into two fp16 halves, ``hi = fp16(2^12 q)`` and ``lo = fp16(2^12 q - hi)`` (the power of two keeps
  ``lo`` clear of fp16's subnormals), so ``hi + lo`` holds ``2^12 q`` to about ``2^-22`` of its length;
  both halves are multiplied with the same rows, products exact in fp32. A cosine is then off by at most
  about ``2.4e-7`` plus fp32 round-off. Each block of 64 channels is summed on the tensor cores and the
  blocks are added in fp32 on the CUDA cores, so the tensor cores' truncating accumulation only ever
  acts on short sums.
- fp32 and bf16 rows (not exact in fp16) use an IEEE fp32 dot on the CUDA cores.

The inverse norm of every row is accumulated in fp32 from the same loads. ``TRITON_INTERPRET=1`` (set
before triton is imported) runs the kernel on CPU tensors through Triton's interpreter, which computes the
same fp16-products-fp32-sums; the tests use it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# Rows read straight into the kernel; other dtypes are cast to float32 first.
BANK_DTYPES = (torch.float16, torch.int8, torch.bfloat16, torch.float32)
_SPLIT_DTYPES = (torch.float16, torch.int8)  # exact in fp16: tensor-core path
_SPLIT_SCALE = 4096.0  # 2^12: exact to apply and to undo
_EPS = 1e-12  # as F.normalize: a zero vector has cosine 0 with everything


@triton.jit
def _window_max_kernel(
    query_hi,  # [B, h·w, D]: fp16 high half of 2^12 q (SPLIT) or the fp32 unit query
    query_lo,  # [B, h·w, D]: fp16 low half (SPLIT; unused otherwise)
    bank,  # [N, h, w, D] stored rows, any strides
    stride_n,
    stride_y,
    stride_x,
    stride_d,
    neighbors,  # [B, K] int64 row indices into bank
    stride_nb,
    stride_nk,
    best,  # [B, h·w] fp32 running best cosine, updated in place
    h,
    w,
    dim,
    n_neighbors,
    rho,
    window_h,  # min(2ρ + 1, h): the window's rows once clipped to the grid
    window_w,
    n_slot_blocks,
    n_k_blocks,
    eps,
    inv_scale,  # 2^-12: undoes the halves' scaling (SPLIT)
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Neighbour blocks vary fastest, so the programs sharing one query window run together.
    pid = tl.program_id(0)
    k_block = pid % n_k_blocks
    rest = pid // n_k_blocks
    slot_block = rest % n_slot_blocks
    rest = rest // n_slot_blocks
    ref = rest % (h * w)
    image = (rest // (h * w)).to(tl.int64)
    ref_y = ref // w
    ref_x = ref % w

    # The query patches that see p': a window_h × window_w box, moved inside the grid at the border so
    # that every slot is a real position; slots beyond ρ (only at the border) are masked out.
    top = tl.minimum(tl.maximum(ref_y - rho, 0), h - window_h)
    left = tl.minimum(tl.maximum(ref_x - rho, 0), w - window_w)
    slots = slot_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_y = top + slots // window_w
    query_x = left + slots % window_w
    in_window = (
        (slots < window_h * window_w) & (tl.abs(query_y - ref_y) <= rho) & (tl.abs(query_x - ref_x) <= rho)
    )
    query_pos = query_y * w + query_x
    query_rows = (image * h * w + query_pos) * dim

    ks = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < n_neighbors
    rows = tl.load(neighbors + image * stride_nb + ks * stride_nk, mask=k_ok, other=0).to(tl.int64)
    row_start = bank + rows * stride_n + ref_y * stride_y + ref_x * stride_x

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < dim
        stored = tl.load(
            row_start[:, None] + ds[None, :] * stride_d, mask=k_ok[:, None] & d_ok[None, :], other=0
        )
        exact = stored.to(tl.float32)
        sum_sq += tl.sum(exact * exact, axis=1)
        q_offsets = query_rows[:, None] + ds[None, :]
        q_mask = in_window[:, None] & d_ok[None, :]
        if SPLIT:
            # Tensor cores may truncate as they accumulate, so each channel block gets a fresh sum, added
            # to the total on the CUDA cores (rounded): the truncation stays the size of one block's
            # partial dot, not of the whole cosine. The scaling also keeps the add from being fused back.
            keys = tl.trans(stored.to(tl.float16))
            block = tl.dot(tl.load(query_lo + q_offsets, mask=q_mask, other=0), keys)
            block = tl.dot(tl.load(query_hi + q_offsets, mask=q_mask, other=0), keys, block)
            acc += block * inv_scale
        else:
            q = tl.load(query_hi + q_offsets, mask=q_mask, other=0)
            acc = tl.dot(q, tl.trans(exact), acc, input_precision="ieee")

    inv_norm = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sum_sq), eps))
    cosine = tl.where(k_ok[None, :], acc * inv_norm[None, :], float("-inf"))
    tl.atomic_max(best + image * h * w + query_pos, tl.max(cosine, axis=1), mask=in_window)


INTERPRETED = isinstance(_window_max_kernel, InterpretedFunction)


def _block(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


class WindowMax:
    """The running best windowed cosine ``[B, h·w]`` of a batch of queries, folded in bank by bank.

    Args:
        unit_query: ``[B, h, w, D]`` float32 query patches, already L2-normalised.
        rho: L∞ window radius, at most ``max(h, w) - 1``.
    """

    def __init__(self, unit_query: Tensor, rho: int) -> None:
        batch, self.h, self.w, self.dim = unit_query.shape
        self.rho = rho
        self.unit = unit_query.reshape(batch, self.h * self.w, self.dim).contiguous()
        self.best = torch.full((batch, self.h * self.w), -torch.inf, device=unit_query.device)
        self._halves: tuple[Tensor, Tensor] | None = None

    def halves(self) -> tuple[Tensor, Tensor]:
        if self._halves is None:
            scaled = self.unit * _SPLIT_SCALE
            hi = scaled.half()
            self._halves = hi, (scaled - hi.float()).half()
        return self._halves

    def fold(
        self,
        bank: Tensor,
        neighbors: Tensor,
        first: int = 0,
        *,
        block_k: int | None = None,
        num_warps: int = 4,
    ) -> None:
        """Fold in the neighbours ``[n, K]`` (rows of ``bank``, on its device) of queries ``first..first+n``.

        ``block_k`` (neighbours per program, a power of two from 16) and ``num_warps`` are launch
        settings, chosen for the paper's shapes without a GPU measurement; ``bench_spatial.py
        --candidates`` compares others.
        """
        if bank.dtype not in BANK_DTYPES:
            bank = bank.float()
        split = bank.dtype in _SPLIT_DTYPES
        hi, lo = self.halves() if split else (self.unit, self.unit)
        n_queries, n_neighbors = neighbors.shape
        stop = first + n_queries
        window_h, window_w = min(2 * self.rho + 1, self.h), min(2 * self.rho + 1, self.w)
        block_m = _block(window_h * window_w, 16, 64)
        block_k = block_k or _block(n_neighbors, 16, 64)
        n_slot_blocks = triton.cdiv(window_h * window_w, block_m)
        n_k_blocks = triton.cdiv(n_neighbors, block_k)
        grid = (n_queries * self.h * self.w * n_slot_blocks * n_k_blocks,)
        with torch.cuda.device(bank.device) if bank.is_cuda else contextlib.nullcontext():
            _window_max_kernel[grid](
                hi[first:stop],
                lo[first:stop],
                bank,
                *bank.stride(),
                neighbors,
                *neighbors.stride(),
                self.best[first:stop],
                self.h,
                self.w,
                self.dim,
                n_neighbors,
                self.rho,
                window_h,
                window_w,
                n_slot_blocks,
                n_k_blocks,
                _EPS,
                1 / _SPLIT_SCALE,
                SPLIT=split,
                BLOCK_M=block_m,
                BLOCK_K=block_k,
                BLOCK_D=_block(self.dim, 16, 64),
                num_warps=num_warps,
            )

    def scores(self) -> Tensor:
        """``1 - best`` as ``[B, h, w]`` float32."""
        return (1 - self.best).view(-1, self.h, self.w)
