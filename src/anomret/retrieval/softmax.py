"""MRAD retrieval: label lookup by a softmax over similarities to a feature→label memory.

For a query q, keys K and one-hot values V the MRAD paper (Eq. 1, 7, 8) defines

    Y(q) = softmax(q·Kᵀ / τ) · V

The function below computes exactly that, streamed over chunks of queries and keys with an online
log-sum-exp, so peak memory is ``query_chunk × key_chunk`` similarities whatever the bank size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
    return out.reshape(*lead_shape, values.shape[-1])


@dataclass
class SoftmaxRetriever:
    """Configured MRAD retrieval: L2-normalise the queries, then :func:`softmax_retrieve`.

    Keys are stored normalised in the memory bank, so the logits are cosine similarities / τ.
    """

    tau: float = 1.0
    normalize_query: bool = True
    query_chunk: int = 4096
    key_chunk: int = 16384

    def __call__(self, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        if self.normalize_query:
            query = F.normalize(query.float(), dim=-1)
        return softmax_retrieve(
            query, keys, values, self.tau, query_chunk=self.query_chunk, key_chunk=self.key_chunk
        )
