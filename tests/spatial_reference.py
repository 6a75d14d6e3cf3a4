"""RAD's windowed patch score by its definition, one position at a time, in float64: the reference the
retrieval function and its GPU kernel are checked against."""

from __future__ import annotations

import numpy as np
import torch


def literal_spatial_scores(
    query: torch.Tensor, bank: torch.Tensor, neighbors: torch.Tensor, rho: int
) -> np.ndarray:
    """1 - max cosine over the clipped L∞ window of radius ``rho`` in each neighbour; a zero vector has
    cosine 0 with everything (as F.normalize makes it)."""
    q = query.double().numpy()
    r = bank.double().numpy()
    batch, h, w, _ = q.shape
    out = np.empty((batch, h, w))
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                best = -np.inf
                for n in neighbors[b].tolist():
                    for i2 in range(max(0, i - rho), min(h, i + rho + 1)):
                        for j2 in range(max(0, j - rho), min(w, j + rho + 1)):
                            a, c = q[b, i, j], r[n, i2, j2]
                            norms = max(np.linalg.norm(a), 1e-12) * max(np.linalg.norm(c), 1e-12)
                            best = max(best, float(a @ c) / norms)
                out[b, i, j] = 1 - best
    return out
