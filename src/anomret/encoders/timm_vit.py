"""Multi-layer patch features from a timm Vision Transformer (DINOv3, DINOv2, any timm ViT/EVA).

One ``forward_intermediates`` call returns the chosen blocks' outputs, optionally through the model's
final norm (RAD applies the final LayerNorm to every intermediate block); prefix tokens (CLS and
registers) are split off by timm and only the CLS of the last requested block is kept.

``layers`` are **0-based block indices** (timm's and RAD's convention): DINOv3 ViT-B/16's
``[3, 6, 9, 11]`` are the outputs of the 4th, 7th, 10th and 12th blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import timm
import torch
from torch import Tensor

from anomret.encoders.base import Encoder, Features
from anomret.encoders.postprocess import (
    as_kernels,
    autocast,
    check_precision,
    neighbor_average,
    plain,
    tokens_to_grid,
)
from anomret.encoders.weights import (
    WeightsSource,
    WeightsUnavailableError,
    fetch_hub_file,
    fetch_url_file,
    resolve_weights,
    seeded,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TimmViTEncoder(Encoder):
    """A frozen timm ViT returning patch grids of several blocks and the CLS token.

    Args:
        model_name: timm architecture, e.g. ``vit_base_patch16_dinov3``.
        layers: 0-based block indices whose outputs become ``Features.patches``.
        image_size: side of the square network input (the centre crop).
        pretrained: a timm tag (``lvd1689m``, or a hub repo id ``timm/<arch>.<tag>``), a local weights
            file, or ``None`` for seeded random weights (logged as a warning).
        name: short name for logs and fingerprints (default: ``model_name``).
        resize: side of the square resize before the crop (default: ``image_size``, no crop).
        mean: normalisation mean.
        std: normalisation std.
        interpolation: resize interpolation (``bilinear``, ``bicubic``).
        norm: pass every intermediate through the model's final norm (RAD: yes).
        neighbor_kernels: odd kernel sizes for :func:`neighbor_average` on each grid; ``None`` = off.
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` autocast; features come back as fp32.
        seed: seed for random initialisation (also random parts of pretrained builds).
        cache_dir: Hugging Face hub cache to read (and download) tagged weights.
        model_kwargs: extra ``timm.create_model`` arguments (tests build tiny models with them).
    """

    def __init__(
        self,
        model_name: str,
        layers: Sequence[int],
        image_size: int,
        pretrained: str | None = None,
        *,
        name: str | None = None,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        norm: bool = True,
        neighbor_kernels: Sequence[int] | None = None,
        precision: str = "fp32",
        seed: int = 0,
        cache_dir: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name or model_name
        self.model_name = model_name
        self._set_input(image_size, resize, mean, std, interpolation)
        self.norm = bool(norm)
        self.neighbor_kernels = as_kernels(neighbor_kernels)
        self.precision = check_precision(precision)
        self.model_kwargs: dict[str, Any] = plain(dict(model_kwargs or {}))
        self.weights = resolve_weights(pretrained, encoder_name=self.name, seed=seed)
        self.model = self._build(cache_dir)

        depth = len(self.model.blocks)
        self.layers = tuple(sorted({int(i) for i in layers}))
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= depth:
            raise ValueError(f"layers must be 0-based block indices in [0, {depth - 1}], got {list(layers)}")
        patch = self.model.patch_embed.patch_size
        self._set_patch_size(patch)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.has_cls_token = getattr(self.model, "cls_token", None) is not None
        self.cls_dim = self.patch_dim = int(self.model.embed_dim)
        self._weights_identity = self.weights.identity()
        self.freeze()

    def _build(self, cache_dir: str | None) -> torch.nn.Module:
        kwargs: dict[str, Any] = {"num_classes": 0, **self.model_kwargs, "img_size": self.image_size}
        source = self.weights
        with seeded(source.seed):
            if source.is_random:
                return timm.create_model(self.model_name, pretrained=False, **kwargs)
            path = source.value if source.kind == "file" else self._fetch_tag(str(source.value), cache_dir)
            log.info("encoder %s: loading %s weights from %s", self.name, self.model_name, path)
            # timm's own loader applies the architecture's checkpoint filter (e.g. Meta's DINOv3 key
            # names, position-embedding resampling to img_size) and reads torch files weights_only.
            return timm.create_model(
                self.model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )

    def _fetch_tag(self, tag: str, cache_dir: str | None) -> str:
        if "/" in tag:  # an explicit hub repo id
            return str(
                fetch_hub_file(tag, _TIMM_WEIGHT_FILES, tag=tag, encoder_name=self.name, cache_dir=cache_dir)
            )
        full_name = f"{self.model_name}.{tag}"
        try:
            cfg = timm.models.get_pretrained_cfg(full_name)
        except RuntimeError as error:
            cfg = None
            reason = str(error)
        else:
            reason = "no pretrained config"
        if cfg is None:
            known = timm.list_pretrained(f"{self.model_name}.*")
            raise WeightsUnavailableError(
                f"encoder {self.name}: unknown timm tag '{tag}' for {self.model_name} ({reason}); known: {known}"
            )
        if cfg.hf_hub_id:
            files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _TIMM_WEIGHT_FILES
            return str(
                fetch_hub_file(
                    cfg.hf_hub_id, files, tag=full_name, encoder_name=self.name, cache_dir=cache_dir
                )
            )
        if cfg.url:
            return str(fetch_url_file(cfg.url, tag=full_name, encoder_name=self.name, cache_dir=cache_dir))
        raise WeightsUnavailableError(f"encoder {self.name}: timm tag {full_name} has no download source")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Features:
        side = self.grid_size
        with autocast(self.precision, images.device):
            outputs = self.model.forward_intermediates(
                images,
                indices=list(self.layers),
                norm=self.norm,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=self.num_prefix_tokens > 0,
                stop_early=True,  # blocks after the last requested one never run
            )
        patches: dict[int, Tensor] = {}
        cls = None
        for layer, output in zip(self.layers, outputs, strict=True):
            tokens, prefix = output if self.num_prefix_tokens > 0 else (output, None)
            grid = tokens_to_grid(tokens.float(), side, side)
            if layer == self.layers[-1]:
                # CLS sits first among the prefix tokens (then registers); without one, mean-pool.
                cls = prefix[:, 0].float() if self.has_cls_token else grid.mean(dim=(1, 2))
            if self.neighbor_kernels is not None:
                grid = neighbor_average(grid, self.neighbor_kernels)
            patches[layer] = grid
        assert cls is not None
        return Features(cls=cls, patches=patches)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "encoder": type(self).__name__,
            "name": self.name,
            "model_name": self.model_name,
            "weights": self._weights_identity,
            "image_size": self.image_size,
            "layers": list(self.layers),
            "layer_indexing": "0-based block index",
            "norm": self.norm,
            "neighbor_kernels": list(self.neighbor_kernels) if self.neighbor_kernels else None,
            "precision": self.precision,
            "model_kwargs": self.model_kwargs,
            "preprocess": plain(asdict(self.preprocess)),
        }


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TimmViTEncoder", "WeightsSource"]
