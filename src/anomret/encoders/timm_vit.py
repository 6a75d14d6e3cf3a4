"""Multi-layer patch features from a timm Vision Transformer (DINOv3, DINOv2, any timm ViT/EVA).

One ``forward_intermediates`` call returns the chosen blocks' outputs, optionally through the model's
final norm (RAD applies the final LayerNorm to every intermediate block); prefix tokens (CLS and
registers) are split off by timm and only the CLS of the last requested block is kept.

``layers`` are **1-based block numbers**, as for every anomret encoder (layer ``l`` is the output of the
``l``-th transformer block): DINOv3 ViT-B/16's ``[4, 7, 10, 12]`` are the RAD paper's layers, the
official code's 0-based indices ``3, 6, 9, 11``. They are turned into timm's 0-based indices here only.

DINOv3 RoPE periods: Meta's checkpoint stores the RoPE ``periods`` buffer rounded to bf16 and the
official code loads it, while timm drops it from the checkpoint and recomputes the periods in fp32,
which moves every block's tokens by about 1e-3 (relative). With ``rope_periods="checkpoint"`` (the
default) the encoder uses the values of Meta's file (key ``rope_embed.periods``) when the weights
file holds them, else timm's fp32 periods rounded to bf16 (what Meta's file holds);
``rope_periods="fp32"`` keeps timm's fp32 periods.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import Tensor, nn

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

ROPE_PERIODS = ("checkpoint", "fp32")
# Meta's DINOv3 state dict key of the RoPE periods (timm's checkpoint filter drops it).
META_ROPE_PERIODS_KEY = "rope_embed.periods"
# What ``rope_periods`` resolved to, as recorded in fingerprints.
PERIODS_FROM_CHECKPOINT = "checkpoint"
PERIODS_FP32_ROUNDED_BF16 = "fp32_rounded_bf16"
PERIODS_FP32 = "fp32"


class PatchEmbedding(Protocol):
    @property
    def patch_size(self) -> int | tuple[int, int]: ...


class TimmViT(Protocol):
    """What the encoder reads of a timm model of the ViT family (``VisionTransformer``, ``Eva``: DINOv2,
    DINOv3, EVA, ...); the blocks' outputs come from timm's own ``forward_intermediates``."""

    @property
    def blocks(self) -> nn.Sequential | nn.ModuleList: ...

    @property
    def patch_embed(self) -> PatchEmbedding: ...

    @property
    def embed_dim(self) -> int: ...

    def forward_intermediates(
        self,
        x: Tensor,
        *,
        indices: list[int],
        norm: bool,
        output_fmt: str,
        intermediates_only: Literal[True],
        return_prefix_tokens: bool,
        stop_early: bool,
    ) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
        """One output per block in ``indices``: ``(tokens, prefix tokens)`` with ``return_prefix_tokens``."""
        ...


class TimmViTEncoder(Encoder):
    """A frozen timm ViT returning patch grids of several blocks and the CLS token.

    Args:
        model_name: timm architecture, e.g. ``vit_base_patch16_dinov3``.
        layers: 1-based block numbers whose outputs become ``Features.patches`` (keyed by the same numbers).
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
        rope_periods: DINOv3 RoPE periods: ``checkpoint`` (Meta's bf16 values from the weights file,
            or timm's fp32 periods rounded to bf16 when the file has none) or ``fp32`` (timm's own).
            Ignored by models without DINOv3 RoPE.
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
        rope_periods: str = "checkpoint",
    ) -> None:
        super().__init__()
        if rope_periods not in ROPE_PERIODS:
            raise ValueError(f"rope_periods must be one of {ROPE_PERIODS}, got {rope_periods!r}")
        self.name = name or model_name
        self.model_name = model_name
        self._set_input(image_size, resize, mean, std, interpolation)
        self.norm = bool(norm)
        self.neighbor_kernels = as_kernels(neighbor_kernels)
        self.precision = check_precision(precision)
        self.model_kwargs: dict[str, Any] = plain(dict(model_kwargs or {}))
        self.weights = resolve_weights(pretrained, encoder_name=self.name, seed=seed)
        self._weights_path: str | None = None
        # timm's factory is typed as returning any nn.Module; model_name names a ViT-family model.
        self.model = cast(TimmViT, self._build(cache_dir))
        self.rope_periods = self._set_rope_periods(rope_periods)

        depth = len(self.model.blocks)
        self.layers = tuple(sorted({int(i) for i in layers}))
        if not self.layers or self.layers[0] < 1 or self.layers[-1] > depth:
            raise ValueError(
                f"encoder.layers must be 1-based block numbers in [1, {depth}] ({self.name} has {depth} "
                f"blocks), got {list(layers)}"
            )
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
            self._weights_path = str(path)
            log.info("encoder %s: loading %s weights from %s", self.name, self.model_name, path)
            # timm's own loader applies the architecture's checkpoint filter (e.g. Meta's DINOv3 key
            # names, position-embedding resampling to img_size) and reads torch files weights_only.
            return timm.create_model(
                self.model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )

    def _set_rope_periods(self, choice: str) -> str | None:
        """Pin the DINOv3 RoPE periods as ``choice`` says; what they are now (``None``: no such RoPE)."""
        rope = getattr(self.model, "rope", None)
        if not isinstance(rope, RotaryEmbeddingDinoV3):
            return None
        if choice == "fp32":
            return PERIODS_FP32
        stored = (
            None
            if self._weights_path is None
            else read_weights_tensor(self._weights_path, META_ROPE_PERIODS_KEY)
        )
        if stored is None:
            # timm's fp32 schedule (built on the CPU, also when the model sits on the meta device).
            pin_rope_periods(rope, rope._compute_periods().to(torch.bfloat16).float())
            return PERIODS_FP32_ROUNDED_BF16
        needed = rope.get_buffer("periods").shape
        if stored.shape != needed:
            raise ValueError(
                f"encoder {self.name}: {self._weights_path} holds {META_ROPE_PERIODS_KEY} of shape "
                f"{tuple(stored.shape)} but {self.model_name} needs {tuple(needed)}; the file is "
                "for another architecture (check encoder.model_name and encoder.model_kwargs)"
            )
        log.info(
            "encoder %s: RoPE periods from %s (%s)", self.name, self._weights_path, META_ROPE_PERIODS_KEY
        )
        pin_rope_periods(rope, stored.float())
        return PERIODS_FROM_CHECKPOINT

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
            # timm's registry gives plain URL strings ((url, filename) pairs come from custom configs).
            assert isinstance(cfg.url, str)
            return str(fetch_url_file(cfg.url, tag=full_name, encoder_name=self.name, cache_dir=cache_dir))
        raise WeightsUnavailableError(f"encoder {self.name}: timm tag {full_name} has no download source")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Features:
        side = self.grid_size
        with autocast(self.precision, images.device):
            outputs = self.model.forward_intermediates(
                images,
                indices=[layer - 1 for layer in self.layers],  # timm counts blocks from 0
                norm=self.norm,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=self.num_prefix_tokens > 0,
                stop_early=True,  # blocks after the last requested one never run
            )
        patches: dict[int, Tensor] = {}
        cls = None
        for layer, output in zip(self.layers, outputs, strict=True):
            # (tokens, prefix tokens) pairs exactly when return_prefix_tokens (num_prefix_tokens > 0)
            tokens, prefix = output if isinstance(output, tuple) else (output, None)
            grid = tokens_to_grid(tokens.float(), side, side)
            if layer == self.layers[-1]:
                # CLS sits first among the prefix tokens (then registers); without one, mean-pool.
                if self.has_cls_token:
                    assert prefix is not None  # a CLS token is a prefix token
                    cls = prefix[:, 0].float()
                else:
                    cls = grid.mean(dim=(1, 2))
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
            "layer_indexing": "1-based block number",
            "norm": self.norm,
            "neighbor_kernels": list(self.neighbor_kernels) if self.neighbor_kernels else None,
            "precision": self.precision,
            "model_kwargs": self.model_kwargs,
            "rope_periods": self.rope_periods,
            "preprocess": plain(asdict(self.preprocess)),
        }


def pin_rope_periods(rope: RotaryEmbeddingDinoV3, periods: Tensor) -> None:
    """Make a timm DINOv3 RoPE use ``periods`` (fp32 values), now and whenever it rebuilds them.

    timm keeps the periods in a non-persistent buffer that it recomputes in fp32 on initialisation
    and after a dtype cast of the module; both paths go through ``_compute_periods``, so that is
    replaced on this instance as well as the buffer being overwritten.
    """
    fixed = periods.detach().to(device="cpu", dtype=torch.float32).clone()
    needed = rope.get_buffer("periods").shape
    if fixed.shape != needed:
        raise ValueError(f"RoPE periods must have shape {tuple(needed)}, got {tuple(fixed.shape)}")

    def compute_periods(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        return fixed.to(device=device, dtype=dtype)

    rope._compute_periods = compute_periods  # type: ignore[method-assign]  # replaced on this instance only
    rope._init_buffers()  # refills ``periods`` (and the cached embedding of fixed-size models)


def read_weights_tensor(path: str | Path, key: str) -> Tensor | None:
    """One tensor of a weights file (a flat state dict), or ``None`` when the file has no such key.

    safetensors files are read through their header; torch files are memory-mapped (older, non-zip
    files are read whole), always with ``weights_only=True``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key) if key in list(handle.keys()) else None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is unsupported
        state = torch.load(path, map_location="cpu", weights_only=True)
    value = state.get(key) if isinstance(state, Mapping) else None
    return value.detach().clone() if isinstance(value, Tensor) else None


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ROPE_PERIODS",
    "TimmViTEncoder",
    "WeightsSource",
    "pin_rope_periods",
    "read_weights_tensor",
]
