"""MRAD retrieval: label lookup by a softmax over similarities to a feature→label memory.

For a query q, keys K and one-hot values V the MRAD paper (Eq. 1, 7, 8) defines

    Y(q) = softmax(q·Kᵀ / τ) · V

The function below computes exactly that, streamed over chunks of queries and keys with an online
log-sum-exp, so peak memory is ``query_chunk × key_chunk`` similarities whatever the bank size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.checks import integer_at_least, number_in
from anomret.retrieval.spatial import exact_matmul


def softmax_retrieve(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    tau: float = 1.0,
    *,
    query_chunk: int = 4096,
    key_chunk: int = 16384,
) -> Tensor:
    """Return ``softmax(query · keysᵀ / tau) · values``.

    Args:
        query: ``[..., D]`` query features (normalise them first if the method asks for cosines).
        keys: ``[M, D]`` memory keys.
        values: ``[M, C]`` memory values (one-hot labels for MRAD).
        tau: softmax temperature (MRAD: 1).
        query_chunk: queries processed at once.
        key_chunk: keys processed at once; the softmax is accumulated across key chunks.

    Returns:
        ``[..., C]`` retrieved values in float32 (float64 if the inputs are float64).
    """
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query dim {query.shape[-1]} != key dim {keys.shape[-1]}")
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys but {values.shape[0]} values")
    if keys.shape[0] == 0:
        raise ValueError("cannot retrieve from an empty memory")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")

    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    lead_shape = query.shape[:-1]
    flat = query.reshape(-1, query.shape[-1])
    out = torch.empty(flat.shape[0], values.shape[-1], dtype=dtype, device=query.device)
    with exact_matmul():  # IEEE float32 whatever the run's precision policy lets other matmuls do
        _accumulate(flat, keys, values, tau, out, query_chunk, key_chunk)
    return out.reshape(*lead_shape, values.shape[-1])


def _accumulate(
    flat: Tensor, keys: Tensor, values: Tensor, tau: float, out: Tensor, query_chunk: int, key_chunk: int
) -> None:
    dtype = out.dtype
    for q_start in range(0, flat.shape[0], query_chunk):
        q = flat[q_start : q_start + query_chunk].to(dtype)
        running_max = torch.full((q.shape[0], 1), float("-inf"), dtype=dtype, device=q.device)
        running_sum = torch.zeros((q.shape[0], 1), dtype=dtype, device=q.device)
        accumulator = torch.zeros((q.shape[0], values.shape[-1]), dtype=dtype, device=q.device)
        for k_start in range(0, keys.shape[0], key_chunk):
            k = keys[k_start : k_start + key_chunk].to(device=q.device, dtype=dtype)
            v = values[k_start : k_start + key_chunk].to(device=q.device, dtype=dtype)
            logits = q @ k.T / tau
            new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
            # Rescale what was accumulated under the old maximum (exp(-inf) = 0 on the first chunk).
            rescale = torch.exp(running_max - new_max)
            weights = torch.exp(logits - new_max)
            running_sum = running_sum * rescale + weights.sum(dim=1, keepdim=True)
            accumulator = accumulator * rescale + weights @ v
            running_max = new_max
        out[q_start : q_start + q.shape[0]] = accumulator / running_sum


@dataclass
class SoftmaxRetriever:
    """Configured MRAD retrieval: L2-normalise the queries, then :func:`softmax_retrieve`.

    Keys are stored normalised in the memory bank, so the logits are cosine similarities / τ.
    """

    kind: ClassVar[str] = "softmax"
    tau: float = 1.0
    normalize_query: bool = True
    query_chunk: int = 4096
    key_chunk: int = 16384

    def __post_init__(self) -> None:
        number_in(self.tau, "retrieval.tau", 0.0, low_open=True)
        integer_at_least(self.query_chunk, "retrieval.query_chunk", 1)
        integer_at_least(self.key_chunk, "retrieval.key_chunk", 1)

    def __call__(self, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        if self.normalize_query:
            query = F.normalize(query.float(), dim=-1)
        return softmax_retrieve(
            query, keys, values, self.tau, query_chunk=self.query_chunk, key_chunk=self.key_chunk
        )


def similarity_dropout_mask(raw_similarity: Tensor, drop_ratio: float) -> Tensor:
    """MRAD-FT's similarity dropout: True where an entry is dropped from the softmax.

    Per query row ``i``, entries with ``raw_ij > quantile(raw_i, 1 − drop_ratio)`` (linear
    interpolation, strict ``>``) are dropped: the top ``drop_ratio`` most similar memory entries. This
    is the official code's rule (``torch.quantile`` on the raw cosine); ties at the threshold are kept,
    so every row keeps at least its minimum and the softmax never sees an all ``−inf`` row.

    Args:
        raw_similarity: ``[Q, M]`` raw (unprojected) cosine similarities.
        drop_ratio: fraction of entries to drop per row, ``0 ≤ drop_ratio < 1`` (0 drops nothing).
    """
    if not 0 <= drop_ratio < 1:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    if raw_similarity.ndim != 2:
        raise ValueError(f"raw_similarity must be [queries, memory], got shape {tuple(raw_similarity.shape)}")
    if raw_similarity.shape[1] == 0:
        raise ValueError("cannot drop entries from an empty memory")
    if drop_ratio == 0:
        return torch.zeros_like(raw_similarity, dtype=torch.bool)
    threshold = torch.quantile(raw_similarity, 1.0 - drop_ratio, dim=-1, keepdim=True)
    return raw_similarity > threshold


def projected_retrieve(
    query_raw: Tensor,
    keys_raw: Tensor,
    query_proj: Tensor,
    keys_proj: Tensor,
    values: Tensor,
    *,
    tau: float = 1.0,
    drop_ratio: float | None = None,
    query_chunk: int = 2048,
) -> Tensor:
    """MRAD-FT retrieval: ``softmax(q_proj · K_projᵀ / τ + M_ρ(q_raw, K_raw)) · V`` (paper Eq. 10–11).

    The logits are plain dot products of the projected vectors (not re-normalised, as in the official
    code). With ``drop_ratio`` the similarity dropout mask is computed on the *raw* cosine
    ``q_raw · K_rawᵀ`` (both L2-normalised here) and applied to the projected logits as ``−inf``.
    Differentiable w.r.t. ``query_proj`` and ``keys_proj`` (the training path). Peak memory is
    ``query_chunk × M`` similarities; MRAD's memories are a few thousand entries, so whole rows fit.

    Args:
        query_raw: ``[..., C]`` unprojected queries (only used for the dropout mask).
        keys_raw: ``[M, C]`` unprojected memory keys (only used for the dropout mask).
        query_proj: ``[..., D]`` projected queries, same leading shape as ``query_raw``.
        keys_proj: ``[M, D]`` projected memory keys.
        values: ``[M, K]`` memory values (one-hot labels).
        tau: softmax temperature (MRAD: 1).
        drop_ratio: fraction of most (raw-)similar entries dropped per query; ``None`` = no dropout
            (test time). Official: 0.2 for patches, 0.05 for images.
        query_chunk: queries processed at once.

    Returns:
        ``[..., K]`` retrieved values in the dtype of ``query_proj`` (float32 at least).
    """
    if query_proj.shape[-1] != keys_proj.shape[-1]:
        raise ValueError(
            f"projected query dim {query_proj.shape[-1]} != projected key dim {keys_proj.shape[-1]}"
        )
    if keys_proj.ndim != 2 or keys_proj.shape[0] != values.shape[0]:
        raise ValueError(f"{tuple(keys_proj.shape)} projected keys but {tuple(values.shape)} values")
    if keys_proj.shape[0] == 0:
        raise ValueError("cannot retrieve from an empty memory")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be positive, got {query_chunk}")
    if drop_ratio is not None:
        if query_raw.shape[:-1] != query_proj.shape[:-1]:
            raise ValueError(
                f"raw queries {tuple(query_raw.shape)} and projected queries {tuple(query_proj.shape)} "
                "must share their leading shape"
            )
        if query_raw.shape[-1] != keys_raw.shape[-1] or keys_raw.shape[0] != keys_proj.shape[0]:
            raise ValueError(
                f"raw queries {tuple(query_raw.shape)} vs raw keys {tuple(keys_raw.shape)} "
                f"(projected keys {tuple(keys_proj.shape)})"
            )

    dtype = torch.float64 if query_proj.dtype == torch.float64 else torch.float32
    lead_shape = query_proj.shape[:-1]
    flat_proj = query_proj.reshape(-1, query_proj.shape[-1]).to(dtype)
    keys_proj = keys_proj.to(device=flat_proj.device, dtype=dtype)
    values = values.to(device=flat_proj.device, dtype=dtype)
    if drop_ratio is not None:
        flat_raw = F.normalize(query_raw.reshape(-1, query_raw.shape[-1]).to(dtype), dim=-1)
        keys_raw = F.normalize(keys_raw.to(device=flat_proj.device, dtype=dtype), dim=-1)
    chunks = []
    with exact_matmul():  # IEEE float32 whatever the run's precision policy lets the heads do
        for start in range(0, flat_proj.shape[0], query_chunk):
            logits = flat_proj[start : start + query_chunk] @ keys_proj.T / tau
            if drop_ratio is not None:
                raw = flat_raw[start : start + query_chunk] @ keys_raw.T
                logits = logits.masked_fill(similarity_dropout_mask(raw, drop_ratio), float("-inf"))
            chunks.append(torch.softmax(logits, dim=-1) @ values)
    out = torch.cat(chunks) if chunks else flat_proj.new_empty(0, values.shape[-1])
    return out.reshape(*lead_shape, values.shape[-1])
