"""open_clip ViT image encoder with an optional V-V ("surgery") attention stream.

The original CLIP stream ``h`` runs exactly as open_clip computes it: every block is called as
open_clip's own ``ResidualAttentionBlock``. In the dual-path blocks (``vv_blocks``, 1-based and
inclusive) a second stream ``s`` is carried beside it:

    o_vv = out_proj(softmax(v vᵀ · d^-½) v),   v = value projection of ln_1(h)   (same weights)
    s ← s + o_vv                                (no FFN on this stream)
    h ← block(h)                                (h + attn(ln_1(h)); h + mlp(ln_2(h)))

Both attentions read the *original* stream ``h``; ``s`` starts as the input of the first dual block.
This is the dual path of MRAD's and AnomalyCLIP's reference code (blocks 2–24 in MRAD, 6–24 in
AnomalyCLIP). open_clip is never patched: the encoder walks ``visual.transformer.resblocks`` itself.

``layers`` are **1-based block numbers** (CLIP's "layer 24" is the output of the 24th block), the
convention of the MRAD/AnomalyCLIP code and of every anomret encoder (timm ones included).

Features:
- ``cls``: the original stream's CLS after the last block, ``@ visual.proj`` (``cls_ln_post`` decides
  whether ``ln_post`` comes first: the MRAD code skips it, standard CLIP applies it), ``[B, D]``;
- ``patches[l]``: layer-``l`` tokens of ``patch_stream`` (``vv`` or ``original``), through ``ln_post``
  when ``patch_ln_post``, CLS removed, ``[B, g, g, width]`` — not L2-normalised;
- ``projected[l]``: the same ``@ visual.proj``, ``[B, g, g, D]`` (when ``project_patches``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_checkpoint
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
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
    WeightsUnavailableError,
    fetch_hub_file,
    fetch_url_file,
    resolve_weights,
    seeded,
)

if TYPE_CHECKING:
    from anomret.encoders.clip_text import CLIPTextEncoder

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TEXT_ATTRIBUTES = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")


@dataclass
class CLIPStreams:
    """Raw token streams of one visual forward (CLS first, no ``ln_post``).

    Attributes:
        final: original stream after the last block, ``[B, 1+N, width]``.
        original: block number -> original-stream tokens after that block.
        vv: block number -> V-V stream tokens after that block (only blocks at or after the V-V start).
    """

    final: Tensor
    original: dict[int, Tensor]
    vv: dict[int, Tensor]


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resize_position_embedding(embedding: Tensor, grid: int, mode: str = "bilinear") -> Tensor:
    """Resize a ``[1 + g0², C]`` CLIP position embedding to ``[1 + grid², C]``, CLS position kept.

    ``bilinear`` is what MRAD's reference code does at 518 px; ``bicubic`` is open_clip's own helper.
    """
    cls_position, patch_positions = embedding[:1], embedding[1:]
    old = math.isqrt(patch_positions.shape[0])
    if old * old != patch_positions.shape[0]:
        raise ValueError(f"position embedding with {patch_positions.shape[0]} patch positions is not square")
    if old == grid:
        return embedding
    square = patch_positions.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square.float(), size=(grid, grid), mode=mode, align_corners=False)
    resized = resized.to(embedding.dtype).permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([cls_position, resized], dim=0)


def vv_attention(block: ResidualAttentionBlock, h: Tensor) -> Tensor:
    """V-V self-attention of a CLIP block on stream ``h``: ``out_proj(softmax(v vᵀ · d^-½) v)``.

    Uses the block's own ``ln_1``, value projection (the last third of ``in_proj``) and ``out_proj``.
    """
    attention: nn.MultiheadAttention = block.attn
    width = attention.embed_dim
    heads = attention.num_heads
    bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
    values = F.linear(block.ln_1(h), attention.in_proj_weight[2 * width :], bias)
    batch, tokens, _ = values.shape
    values = values.view(batch, tokens, heads, width // heads).transpose(1, 2)
    # scaled_dot_product_attention's default scale is head_dim^-½, the same scale CLIP's q·k uses.
    mixed = F.scaled_dot_product_attention(values, values, values)
    return attention.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


class CLIPEncoder(Encoder):
    """A frozen open_clip ViT with the original and (optionally) V-V streams.

    Args:
        arch: open_clip model name (``ViT-L-14-336``, ``ViT-B-16``).
        layers: 1-based block numbers whose tokens become ``Features.patches``.
        image_size: network input side; the position embedding is resized once at load.
        pretrained: an open_clip tag (``openai``), a local weights file, or ``None`` (random, logged).
        name: short name for logs and fingerprints (default: ``arch``).
        resize: side of the square resize before the centre crop (default: ``image_size``).
        mean: normalisation mean (OpenAI CLIP's by default).
        std: normalisation std.
        interpolation: image resize interpolation (MRAD: bicubic).
        vv_blocks: ``[first, last]`` 1-based inclusive range of dual-path blocks; ``None`` = no V-V.
        patch_stream: ``vv`` or ``original``: which stream ``patches``/``projected`` come from.
        cls_ln_post: apply ``ln_post`` to the CLS before ``proj`` (MRAD code: no; standard CLIP: yes).
        patch_ln_post: apply ``ln_post`` to patch tokens (MRAD code: yes).
        project_patches: also return ``projected`` grids (tokens ``@ visual.proj``).
        pos_embed_interpolation: ``bilinear`` (MRAD code) or ``bicubic`` (open_clip) position resize.
        quick_gelu: QuickGELU activations (OpenAI weights need them); ``None`` = what the tag says.
        keep_text: keep the text tower (MRAD-CLIP needs it; image-only users can drop it).
        neighbor_kernels: odd kernel sizes for :func:`neighbor_average` on the grids; ``None`` = off.
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` autocast; features come back as fp32.
        seed: seed for random initialisation.
        cache_dir: Hugging Face hub cache to read (and download) tagged weights.
        model_kwargs: deep-merged into the open_clip model config (tests build tiny models with it).
    """

    text_tower = True

    def __init__(
        self,
        arch: str,
        layers: Sequence[int],
        image_size: int,
        pretrained: str | None = None,
        *,
        name: str | None = None,
        resize: int | None = None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        interpolation: str = "bicubic",
        vv_blocks: Sequence[int] | None = None,
        patch_stream: str = "original",
        cls_ln_post: bool = True,
        patch_ln_post: bool = True,
        project_patches: bool = True,
        pos_embed_interpolation: str = "bilinear",
        quick_gelu: bool | None = None,
        keep_text: bool = True,
        neighbor_kernels: Sequence[int] | None = None,
        precision: str = "fp32",
        seed: int = 0,
        cache_dir: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name or arch
        self.arch = arch
        self._set_input(image_size, resize, mean, std, interpolation)
        self.model_kwargs: dict[str, Any] = plain(dict(model_kwargs or {}))
        self.cls_ln_post = bool(cls_ln_post)
        self.patch_ln_post = bool(patch_ln_post)
        self.project_patches = bool(project_patches)
        if pos_embed_interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"pos_embed_interpolation must be bilinear or bicubic, got {pos_embed_interpolation!r}"
            )
        self.pos_embed_interpolation = pos_embed_interpolation
        self.neighbor_kernels = as_kernels(neighbor_kernels)
        self.precision = check_precision(precision)
        self.weights = resolve_weights(pretrained, encoder_name=self.name, seed=seed)

        self.model = self._build(quick_gelu, cache_dir)
        if not keep_text:
            for attribute in _TEXT_ATTRIBUTES:
                setattr(self.model, attribute, None)
        self.keep_text = bool(keep_text)
        visual = self.model.visual
        self._check_supported(visual)

        patch = visual.patch_size
        self._set_patch_size(patch)
        self._resize_positions(visual)

        self.depth = len(visual.transformer.resblocks)
        self.vv_blocks = self._check_vv_blocks(vv_blocks)
        if patch_stream not in ("vv", "original"):
            raise ValueError(f"patch_stream must be 'vv' or 'original', got {patch_stream!r}")
        if patch_stream == "vv" and self.vv_blocks is None:
            raise ValueError("patch_stream 'vv' needs vv_blocks")
        self.patch_stream = patch_stream
        self.layers = tuple(sorted({int(layer) for layer in layers}))
        if not self.layers or self.layers[0] < 1 or self.layers[-1] > self.depth:
            raise ValueError(
                f"encoder.layers must be 1-based block numbers in [1, {self.depth}] ({self.name} has "
                f"{self.depth} blocks), got {list(layers)}"
            )
        if patch_stream == "vv" and self.vv_blocks is not None and self.layers[0] < self.vv_blocks[0]:
            raise ValueError(
                f"V-V tokens exist from block {self.vv_blocks[0]} on; layers {list(self.layers)}"
            )

        self.patch_dim = int(visual.transformer.width)
        self.cls_dim = self.projected_dim = int(visual.output_dim)
        self._weights_identity = self.weights.identity()
        self.freeze()

    # ----------------------------------------------------------------------------------- building
    def _model_config(self, quick_gelu: bool | None, tag_config: Mapping[str, Any]) -> dict[str, Any]:
        base = open_clip.get_model_config(self.arch)
        if base is None:
            raise ValueError(
                f"unknown open_clip architecture {self.arch!r}; known: {open_clip.list_models()}"
            )
        config = _deep_merge(base, self.model_kwargs)
        tag_quick_gelu = tag_config.get("quick_gelu")
        if quick_gelu is None:
            quick_gelu = bool(
                tag_quick_gelu if tag_quick_gelu is not None else config.get("quick_gelu", False)
            )
        elif tag_quick_gelu is not None and bool(tag_quick_gelu) != quick_gelu:
            log.warning(
                "encoder %s: quick_gelu=%s but weights '%s' were trained with quick_gelu=%s",
                self.name,
                quick_gelu,
                self.weights.value,
                tag_quick_gelu,
            )
        config["quick_gelu"] = quick_gelu
        self.quick_gelu = quick_gelu
        # The model is built at its native resolution so that checkpoints load unchanged; the
        # position embedding is then resized once to ``image_size`` (see ``_resize_positions``).
        if config.get("custom_text") or "hf_model_name" in config.get("text_cfg", {}):
            raise ValueError(f"{self.arch}: only models with open_clip's built-in text tower are supported")
        config.pop("custom_text", None)
        return config

    def _build(self, quick_gelu: bool | None, cache_dir: str | None) -> open_clip.CLIP:
        source = self.weights
        tag_config: dict[str, Any] = {}
        path = None
        if source.kind == "tag":
            tag_config = open_clip.get_pretrained_cfg(self.arch, str(source.value))
            if not tag_config:
                raise WeightsUnavailableError(
                    f"encoder {self.name}: unknown open_clip tag '{source.value}' for {self.arch}; "
                    f"known: {open_clip.list_pretrained_tags_by_model(self.arch)}"
                )
            path = self._fetch_tag(str(source.value), tag_config, cache_dir)
        elif source.kind == "file":
            path = str(source.value)
        config = self._model_config(quick_gelu, tag_config)
        with seeded(source.seed):
            model = open_clip.CLIP(**config)
        if path is not None:
            log.info("encoder %s: loading %s weights from %s", self.name, self.arch, path)
            try:
                load_checkpoint(model, path, strict=True, weights_only=True)
            except Exception as error:
                raise WeightsUnavailableError(
                    f"encoder {self.name}: cannot load {path} into {self.arch} ({type(error).__name__}: {error}). "
                    "Expected an open_clip state dict (.safetensors/.bin/.pth); OpenAI TorchScript .pt "
                    "archives are not read (weights_only) — use the hub's open_clip files instead."
                ) from error
        return model.eval()

    def _fetch_tag(self, tag: str, tag_config: Mapping[str, Any], cache_dir: str | None) -> str:
        label = f"{self.arch}/{tag}"
        hub = tag_config.get("hf_hub", "")
        if hub:
            repo_id, filename = hub.rstrip("/"), ""
            if not hub.endswith("/"):
                repo_id, filename = hub.rsplit("/", 1)
            files = _OPEN_CLIP_WEIGHT_FILES if not filename else (filename,)
            if filename.endswith("open_clip_pytorch_model.bin"):
                files = ("open_clip_model.safetensors", filename)
            return str(fetch_hub_file(repo_id, files, tag=label, encoder_name=self.name, cache_dir=cache_dir))
        if tag_config.get("url"):
            return str(
                fetch_url_file(tag_config["url"], tag=label, encoder_name=self.name, cache_dir=cache_dir)
            )
        raise WeightsUnavailableError(f"encoder {self.name}: tag {label} has no download source")

    def _check_supported(self, visual: nn.Module) -> None:
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(f"{self.arch}: only open_clip VisionTransformer towers are supported")
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError(f"{self.arch}: CLS-token pooling without attentional pooling is required")
        for block in visual.transformer.resblocks:
            if type(block) is not ResidualAttentionBlock or not block.attn.batch_first:
                raise ValueError(
                    f"{self.arch}: V-V attention needs open_clip's standard ResidualAttentionBlock"
                )

    def _resize_positions(self, visual: VisionTransformer) -> None:
        grid = self.image_size // self.patch_size
        resized = resize_position_embedding(
            visual.positional_embedding.data, grid, self.pos_embed_interpolation
        )
        visual.positional_embedding = nn.Parameter(resized, requires_grad=False)
        visual.image_size = (self.image_size, self.image_size)
        visual.grid_size = (grid, grid)

    def _check_vv_blocks(self, vv_blocks: Sequence[int] | None) -> tuple[int, int] | None:
        if vv_blocks is None:
            return None
        bounds = tuple(int(b) for b in vv_blocks)
        if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1] <= self.depth:
            raise ValueError(
                f"vv_blocks must be [first, last] with 1 <= first <= last <= {self.depth}, got {bounds}"
            )
        return bounds[0], bounds[1]

    # ----------------------------------------------------------------------------------- forward
    def streams(self, images: Tensor, layers: Sequence[int] | None = None) -> CLIPStreams:
        """Run the visual tower once, keeping both streams at ``layers`` (default: ``self.layers``)."""
        visual = self.model.visual
        wanted = set(self.layers if layers is None else layers)
        h = visual._embeds(images)  # conv1, CLS, position embedding, ln_pre: open_clip's own code
        s = None
        original: dict[int, Tensor] = {}
        vv: dict[int, Tensor] = {}
        for number, block in enumerate(visual.transformer.resblocks, start=1):
            if self.vv_blocks is not None and self.vv_blocks[0] <= number <= self.vv_blocks[1]:
                # Out-of-place update: stored layers never alias the live stream.
                s = (h if s is None else s) + block.ls_1(vv_attention(block, h))
            h = block(h)
            if number in wanted:
                original[number] = h
                if s is not None:
                    vv[number] = s
        return CLIPStreams(final=h, original=original, vv=vv)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Features:
        visual = self.model.visual
        side = self.grid_size
        with autocast(self.precision, images.device):
            streams = self.streams(images)
            cls = streams.final[:, 0]
            if self.cls_ln_post:
                cls = visual.ln_post(cls)
            cls = cls @ visual.proj
            source = streams.vv if self.patch_stream == "vv" else streams.original
            patches: dict[int, Tensor] = {}
            projected: dict[int, Tensor] = {}
            for layer in self.layers:
                tokens = source[layer]
                if self.patch_ln_post:
                    tokens = visual.ln_post(tokens)
                grid = tokens_to_grid(tokens[:, 1:], side, side)
                patches[layer] = grid
                if self.project_patches:
                    projected[layer] = grid @ visual.proj
        patches = {k: self._post(v) for k, v in patches.items()}
        projected = {k: self._post(v) for k, v in projected.items()}
        return Features(cls=cls.float(), patches=patches, projected=projected)

    def _post(self, grid: Tensor) -> Tensor:
        grid = grid.float()
        return grid if self.neighbor_kernels is None else neighbor_average(grid, self.neighbor_kernels)

    def text_encoder(self, deep_start: int = 2) -> CLIPTextEncoder:
        """The text tower of the same model, as a :class:`~anomret.encoders.clip_text.CLIPTextEncoder`."""
        from anomret.encoders.clip_text import CLIPTextEncoder

        return CLIPTextEncoder.from_encoder(self, deep_start=deep_start)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "encoder": type(self).__name__,
            "name": self.name,
            "arch": self.arch,
            "weights": self._weights_identity,
            "quick_gelu": self.quick_gelu,
            "image_size": self.image_size,
            "layers": list(self.layers),
            "layer_indexing": "1-based block number",
            "vv_blocks": list(self.vv_blocks) if self.vv_blocks else None,
            "patch_stream": self.patch_stream,
            "cls_ln_post": self.cls_ln_post,
            "patch_ln_post": self.patch_ln_post,
            "pos_embed_interpolation": self.pos_embed_interpolation,
            "neighbor_kernels": list(self.neighbor_kernels) if self.neighbor_kernels else None,
            "precision": self.precision,
            "model_kwargs": self.model_kwargs,
            "preprocess": plain(asdict(self.preprocess)),
        }
