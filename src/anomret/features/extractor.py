"""The one place where features are computed: a batch in, ``Features`` out, through the store if any.

A :class:`~anomret.data.batch.Batch` holds the decoded images of the entries the feature store does not
have (``image``, at batch positions ``fresh``) and the stored features of the others (``stored``, at
positions ``cached``). Only the fresh images go through the encoder; their features are written to the
store, so the next epoch, evaluation or sweep job reads them instead. Items with neither are images whose
features the process keeps in memory (:mod:`anomret.features.memory_tier`): they are served here, in
the main process, and every feature that passes through is offered to that tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from anomret.data.batch import Batch
from anomret.data.io import read_image
from anomret.data.transforms import ImageTransform
from anomret.encoders.base import Encoder, Features
from anomret.features.memory_tier import TieredFeatures
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


def _stack(entries: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    """One batch of named tensors on ``device`` in float32 from per-image entries (device or host RAM);
    host rows go through one pinned buffer and one asynchronous copy per tensor name."""
    stacked = {}
    for name in entries[0]:
        parts = [entry[name] for entry in entries]
        if all(part.device == device for part in parts):
            batch = torch.stack(parts)
        else:
            pinned = device.type == "cuda"
            host = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=pinned)
            torch.stack([part.cpu() for part in parts], out=host)
            batch = host.to(device, non_blocking=pinned)
        stacked[name] = batch.float()
    return stacked


class FeatureExtractor:
    """Frozen encoder + optional feature store (and in-memory tier) → ``Features`` of a batch, on the
    encoder's device."""

    def __init__(
        self, encoder: Encoder, store: FeatureStore | None = None, memory: TieredFeatures | None = None
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.memory = memory
        self.encoded = 0  # images that went through the encoder
        self.reused = 0  # images whose features were read from the store (or from memory with the store on)
        self.from_memory = 0  # images whose features the in-memory tier served
        self._transform: ImageTransform | None = None

    def describe(self) -> str:
        in_memory = f" ({self.from_memory} of them from memory)" if self.from_memory else ""
        if self.store is None:
            reused = f", {self.from_memory} reused from memory" if self.from_memory else ""
            return f"{self.encoded} image(s) encoded{reused} (feature store off: features.enabled=true caches them)"
        return f"{self.encoded} image(s) encoded, {self.reused} read from the feature store{in_memory}"

    def _decode(self, paths: list[str]) -> Tensor:
        """Images the tier promised but no longer holds, decoded here as a worker would have."""
        if self._transform is None:
            self._transform = ImageTransform(self.encoder.preprocess)
        return torch.stack([self._transform(read_image(path)) for path in paths])

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Features:
        size = len(batch)
        parts: list[tuple[Tensor, Features]] = []
        images, fresh = batch.image, batch.fresh
        keys = batch.feature_key
        served = sorted(set(range(size)) - set(batch.fresh.tolist()) - set(batch.cached.tolist()))
        if served:
            if self.memory is None or keys is None:
                raise ValueError("the batch holds neither images nor stored features for some items")
            device = next(self.encoder.parameters()).device
            entries = {p: self.memory.get(keys[p], device) for p in served}
            held = {p: entry for p, entry in entries.items() if entry is not None}
            found = list(held)
            lost = [p for p in served if p not in held]
            if found:
                tensors = _stack([held[p] for p in found], device)
                parts.append((torch.tensor(found), features_from_stacked(tensors)))
                self.from_memory += len(found)
                if self.store is not None:
                    self.reused += len(found)
            if lost:
                decoded = self._decode([batch.image_path[p] for p in lost]).to(device)
                images = decoded if images is None else torch.cat([images.to(device), decoded])
                fresh = torch.cat([fresh, torch.tensor(lost, dtype=fresh.dtype)])
        if images is not None and images.shape[0] > 0:
            features = self.encoder(images)
            self.encoded += images.shape[0]
            if self.store is not None:
                # Round fresh features as stored ones are, so a run gives the same numbers whether or
                # not the store already had its images.
                features = features.to(self.store.dtype).to(torch.float32)
                if keys is None:
                    raise ValueError("a batch read with a feature store must carry the feature keys")
                for row, position in enumerate(fresh.tolist()):
                    self.store.write(keys[position], features_to_tensors(features, row))
            self._remember(keys, fresh, features)
            parts.append((fresh, features))
        if batch.stored is not None:
            stored = features_from_stacked(batch.stored)
            self._remember(keys, batch.cached, stored)
            parts.append((batch.cached, stored))
            self.reused += len(batch.cached)
        if not parts:
            raise ValueError("the batch holds neither images nor stored features")
        if sum(len(positions) for positions, _ in parts) != size:
            raise ValueError("the batch's images and stored features do not cover every item")
        return _merge(parts, size)

    def _remember(self, keys: list[str] | None, positions: Tensor, features: Features) -> None:
        if self.memory is None or keys is None:
            return
        for row, position in enumerate(positions.tolist()):
            self.memory.put(keys[position], features_to_tensors(features, row))
