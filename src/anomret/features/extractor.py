"""The one place where features are computed: a batch in, ``Features`` out, through the store if any.

A :class:`~anomret.data.batch.Batch` holds the decoded images of the entries the feature store does not
have (``image``, at batch positions ``fresh``) and the stored features of the others (``stored``, at
positions ``cached``). Only the fresh images go through the encoder; their
features are written to the store, so the next epoch, evaluation or sweep job reads them instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from anomret.data.batch import Batch
from anomret.encoders.base import Encoder, Features
from anomret.features.store import FeatureStore, features_to_tensors


def features_from_stacked(tensors: Mapping[str, Tensor]) -> Features:
    """Batched ``Features`` from collated named tensors (``cls``, ``patches.<layer>``, ``projected.<layer>``)."""
    return Features(
        cls=tensors["cls"],
        patches={int(n.split(".", 1)[1]): t for n, t in tensors.items() if n.startswith("patches.")},
        projected={int(n.split(".", 1)[1]): t for n, t in tensors.items() if n.startswith("projected.")},
    )


def _merge(parts: list[tuple[Tensor, Features]], size: int) -> Features:
    """Interleave the features of disjoint batch positions back into batch order."""
    if len(parts) == 1:
        return parts[0][1]

    def combine(select: Any) -> Tensor:
        first = select(parts[0][1])
        out = first.new_empty((size, *first.shape[1:]))
        for positions, features in parts:
            out[positions] = select(features).to(out.dtype)
        return out

    template = parts[0][1]
    return Features(
        cls=combine(lambda f: f.cls),
        patches={layer: combine(lambda f, layer=layer: f.patches[layer]) for layer in template.patches},
        projected={layer: combine(lambda f, layer=layer: f.projected[layer]) for layer in template.projected},
    )


class FeatureExtractor:
    """Frozen encoder + optional feature store → ``Features`` of a batch, on the encoder's device."""

    def __init__(self, encoder: Encoder, store: FeatureStore | None = None) -> None:
        self.encoder = encoder
        self.store = store
        self.encoded = 0  # images that went through the encoder
        self.reused = 0  # images whose features were read from the store

    def describe(self) -> str:
        if self.store is None:
            return f"{self.encoded} image(s) encoded (feature store off: features.enabled=true caches them)"
        return f"{self.encoded} image(s) encoded, {self.reused} read from the feature store"

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Features:
        size = len(batch)
        parts: list[tuple[Tensor, Features]] = []
        images = batch.image
        if images is not None and images.shape[0] > 0:
            features = self.encoder(images)
            self.encoded += images.shape[0]
            if self.store is not None:
                # Round fresh features as stored ones are, so a run gives the same numbers whether or
                # not the store already had its images.
                features = features.to(self.store.dtype).to(torch.float32)
                keys = batch.feature_key
                if keys is None:
                    raise ValueError("a batch read with a feature store must carry the feature keys")
                for row, position in enumerate(batch.fresh.tolist()):
                    self.store.write(keys[position], features_to_tensors(features, row))
            parts.append((batch.fresh, features))
        if batch.stored is not None:
            parts.append((batch.cached, features_from_stacked(batch.stored)))
            self.reused += len(batch.cached)
        if not parts:
            raise ValueError("the batch holds neither images nor stored features")
        if sum(len(positions) for positions, _ in parts) != size:
            raise ValueError("the batch's images and stored features do not cover every item")
        return _merge(parts, size)
