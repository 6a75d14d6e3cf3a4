"""MRAD-FT's learnable retrieval metric: separate query/key projections per memory level.

The paper (Eq. 10–11) replaces ``Q·Kᵀ`` by ``(Q W_q)(K W_k)ᵀ``; the official code uses two separate
``nn.Linear`` layers with bias (PyTorch default init) per level — patch 1024 → 768, image 768 → 768 —
and takes the plain dot product of the projected vectors (no re-normalisation), softmax with τ = 1.
During training the top ``ρ`` most similar entries by the *raw* cosine are dropped from each softmax
(ρ_seg = 20 %, ρ_cls = 5 %); at test time nothing is dropped.

The memory's keys are fixed, so at test time their projections can be computed once
(:meth:`MRADProjectionHeads.project_keys`) instead of per query batch as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomret.retrieval.softmax import projected_retrieve


class QueryKeyProjection(nn.Module):
    """Two separate linear maps (with bias): ``query`` for the queries, ``key`` for the memory keys.

    Args:
        in_dim: feature dimension of queries and keys.
        out_dim: dimension of the space the dot product is taken in.
        identity: start from the identity map (see :meth:`identity_`) instead of PyTorch's default init.
    """

    def __init__(self, in_dim: int, out_dim: int, *, identity: bool = False) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.query = nn.Linear(in_dim, out_dim)
        self.key = nn.Linear(in_dim, out_dim)
        if identity:
            self.identity_()

    @torch.no_grad()
    def identity_(self) -> QueryKeyProjection:
        """Set both maps to the identity (zero bias), so projected dot products equal the raw ones.

        With ``out_dim > in_dim`` the map embeds the input in the first ``in_dim`` coordinates (an
        isometry); ``out_dim < in_dim`` cannot preserve dot products and is refused.
        """
        if self.out_dim < self.in_dim:
            raise ValueError(
                f"no identity map from {self.in_dim} to {self.out_dim} dimensions: needs out_dim >= in_dim"
            )
        for linear in (self.query, self.key):
            linear.weight.copy_(torch.eye(self.out_dim, self.in_dim))
            linear.bias.zero_()
        return self

    def forward(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        return self.query(queries), self.key(keys)


class LabeledMemory(Protocol):
    """What the heads read from a memory bank (e.g. :class:`~anomret.memory.labeled.LabeledMemoryBank`)."""

    image_keys: Tensor  # [N, D] L2-normalised
    image_values: Tensor  # [N, 2]
    patch_keys: Tensor  # [M, C] L2-normalised
    patch_values: Tensor  # [M, 2]


@dataclass
class ProjectedMemory:
    """A memory with its keys' projections computed once (test time: the key maps are fixed)."""

    image_keys: Tensor
    image_keys_proj: Tensor
    image_values: Tensor
    patch_keys: Tensor
    patch_keys_proj: Tensor
    patch_values: Tensor


class MRADProjectionHeads(nn.Module):
    """The two learnable MRAD-FT projections and the retrievals that use them.

    Args:
        patch_dim: dimension of the patch queries and keys (ViT-L/14: 1024, before ``visual.proj``).
        image_dim: dimension of the image (class-token) queries and keys (768).
        out_dim: projected dimension of both levels (768).
        patch_drop_ratio: similarity dropout of the patch retrieval during training (ρ_seg = 0.2;
            the official code notes 0.15 when the target is VisA).
        image_drop_ratio: similarity dropout of the image retrieval during training (ρ_cls = 0.05).
        tau: softmax temperature (1).
        query_chunk: queries per retrieval chunk (memory ``query_chunk × M``).
        identity: start both projections from the identity (MRAD-TF's retrieval), for tests.
    """

    def __init__(
        self,
        patch_dim: int = 1024,
        image_dim: int = 768,
        out_dim: int = 768,
        patch_drop_ratio: float = 0.2,
        image_drop_ratio: float = 0.05,
        tau: float = 1.0,
        query_chunk: int = 2048,
        *,
        identity: bool = False,
    ) -> None:
        super().__init__()
        for name, ratio in (("patch_drop_ratio", patch_drop_ratio), ("image_drop_ratio", image_drop_ratio)):
            if not 0 <= ratio < 1:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.patch = QueryKeyProjection(patch_dim, out_dim, identity=identity)
        self.image = QueryKeyProjection(image_dim, out_dim, identity=identity)
        self.patch_drop_ratio = float(patch_drop_ratio)
        self.image_drop_ratio = float(image_drop_ratio)
        self.tau = float(tau)
        self.query_chunk = int(query_chunk)

    @torch.no_grad()
    def project_keys(self, bank: LabeledMemory) -> ProjectedMemory:
        """Project the bank's keys once, for retrievals with frozen heads (test, MRAD-CLIP's priors)."""
        device = self.patch.key.weight.device
        image_keys, patch_keys = bank.image_keys.to(device), bank.patch_keys.to(device)
        return ProjectedMemory(
            image_keys=image_keys,
            image_keys_proj=self.image.key(image_keys.to(self.image.key.weight.dtype)),
            image_values=bank.image_values.to(device),
            patch_keys=patch_keys,
            patch_keys_proj=self.patch.key(patch_keys.to(self.patch.key.weight.dtype)),
            patch_values=bank.patch_values.to(device),
        )

    def retrieve_patches(
        self, queries: Tensor, bank: LabeledMemory | ProjectedMemory, *, dropout: bool | None = None
    ) -> Tensor:
        """Normal/anomalous probabilities ``[B, h, w, 2]`` of patch tokens ``[B, h, w, C]``.

        Args:
            queries: patch tokens (not necessarily normalised: they are L2-normalised here).
            bank: the memory, or its :meth:`project_keys` result (then no gradient reaches ``key``).
            dropout: apply the training-time similarity dropout; ``None`` = when in training mode.
        """
        if queries.ndim != 4:
            raise ValueError(f"patch queries must be [B, h, w, C], got shape {tuple(queries.shape)}")
        return self._retrieve(self.patch, "patch", queries, bank, self.patch_drop_ratio, dropout)

    def retrieve_images(
        self, queries: Tensor, bank: LabeledMemory | ProjectedMemory, *, dropout: bool | None = None
    ) -> Tensor:
        """Normal/anomalous probabilities ``[B, 2]`` of image features ``[B, D]`` (see ``retrieve_patches``)."""
        if queries.ndim != 2:
            raise ValueError(f"image queries must be [B, D], got shape {tuple(queries.shape)}")
        return self._retrieve(self.image, "image", queries, bank, self.image_drop_ratio, dropout)

    def patch_scores(
        self, queries: Tensor, bank: LabeledMemory | ProjectedMemory, *, dropout: bool | None = None
    ) -> Tensor:
        """Anomalous probability per patch, ``[B, h, w]``."""
        return self.retrieve_patches(queries, bank, dropout=dropout)[..., 1]

    def image_scores(
        self, queries: Tensor, bank: LabeledMemory | ProjectedMemory, *, dropout: bool | None = None
    ) -> Tensor:
        """Anomalous probability per image, ``[B]``."""
        return self.retrieve_images(queries, bank, dropout=dropout)[..., 1]

    def _retrieve(
        self,
        projection: QueryKeyProjection,
        level: str,
        queries: Tensor,
        bank: LabeledMemory | ProjectedMemory,
        drop_ratio: float,
        dropout: bool | None,
    ) -> Tensor:
        keys = getattr(bank, f"{level}_keys")
        values = getattr(bank, f"{level}_values")
        if queries.shape[-1] != projection.in_dim or keys.shape[-1] != projection.in_dim:
            raise ValueError(
                f"{level} queries {tuple(queries.shape)} / keys {tuple(keys.shape)} do not match the "
                f"{level} projection's input dimension {projection.in_dim}"
            )
        queries = F.normalize(queries.to(projection.query.weight.dtype), dim=-1)
        if isinstance(bank, ProjectedMemory):
            if torch.is_grad_enabled() and any(p.requires_grad for p in projection.key.parameters()):
                raise RuntimeError(
                    f"cached {level} key projections carry no gradient to the key map: pass the bank "
                    "itself while training, or freeze the heads (requires_grad_(False))"
                )
            keys_proj = getattr(bank, f"{level}_keys_proj")
        else:
            keys_proj = projection.key(keys.to(projection.key.weight.dtype))
        apply = self.training if dropout is None else dropout
        return projected_retrieve(
            queries,
            keys,
            projection.query(queries),
            keys_proj,
            values,
            tau=self.tau,
            drop_ratio=drop_ratio if apply else None,
            query_chunk=self.query_chunk,
        )
