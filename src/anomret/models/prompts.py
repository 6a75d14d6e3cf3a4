"""MRAD-CLIP's prompt side: region priors → dynamic biases → learnable prompts → cosine classifier.

Following the official code (which builds on AnomalyCLIP's object-agnostic prompt learner):

1. :func:`region_priors`: threshold the MRAD-FT patch retrieval at 0.5; the mean of the L2-normalised
   projected patch tokens inside the anomalous region and outside it give ``[normal, anomalous]``
   prototypes (a zero vector for an empty region; no gradient through the threshold);
2. :class:`PromptBias`: two separate ``Linear`` layers turn the prototypes into per-image biases;
3. :class:`MRADPromptLearner`: 12 learnable context tokens per state, the same bias added to all of
   them, templates ``"{}"`` / ``"damaged {}"`` with the class word ``"object"`` (the paper writes
   "good object"), deep prompts (4 tokens replaced in text blocks 2–9) and the frozen text tower
   (:class:`~anomret.encoders.clip_text.CLIPTextEncoder`) → L2-normalised text features ``[B, 2, D]``;
4. :func:`cosine_classifier`: ``softmax(cos(z, t) / 0.07)`` over {normal, anomalous} per patch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from anomret.encoders.clip_text import CLIPTextEncoder

BIAS_SOURCES = ("none", "cls", "anomaly", "dual")


class PromptBias(nn.Module):
    """Per-state linear maps from region prototypes ``[B, 2, D]`` to context biases ``[B, 2, W]``.

    Args:
        dim: prototype dimension (the projected token space, 768 for ViT-L/14).
        out_dim: bias dimension, the text tower's width (default ``dim``; 768 for ViT-L/14).
        normal: keep the normal-state map; without it the normal bias is zero (the "anomaly prior
            only" ablation), and no unused parameter is left behind.
    """

    def __init__(self, dim: int = 768, out_dim: int | None = None, *, normal: bool = True) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        if dim < 1 or out_dim < 1:
            raise ValueError(f"dimensions must be positive, got dim={dim}, out_dim={out_dim}")
        self.dim, self.out_dim = int(dim), int(out_dim)
        self.normal = nn.Linear(dim, out_dim) if normal else None
        self.anomalous = nn.Linear(dim, out_dim)

    def forward(self, prototypes: Tensor) -> Tensor:
        if prototypes.ndim != 3 or prototypes.shape[1:] != (2, self.dim):
            raise ValueError(f"prototypes must be [B, 2, {self.dim}], got shape {tuple(prototypes.shape)}")
        anomalous = self.anomalous(prototypes[:, 1])
        normal = torch.zeros_like(anomalous) if self.normal is None else self.normal(prototypes[:, 0])
        return torch.stack([normal, anomalous], dim=1)


def region_priors(
    patch_probs: Tensor, tokens: Tensor, threshold: float = 0.5, *, normalize: bool = True
) -> Tensor:
    """``[normal, anomalous]`` region prototypes ``[B, 2, D]`` from a patch anomaly map.

    The anomalous region is ``patch_probs > threshold``, the normal region its complement; each
    prototype is the mean of the tokens in its region (not re-normalised), a zero vector when the
    region is empty. The threshold is a hard decision: no gradient reaches ``patch_probs``.

    Args:
        patch_probs: ``[B, h, w]`` anomalous probability per patch (MRAD-FT's retrieval).
        tokens: ``[B, h, w, D]`` projected patch tokens (``Features.projected``).
        threshold: anomalous-region threshold (0.5).
        normalize: L2-normalise each token before averaging, as the official code does.
    """
    if tokens.ndim != 4 or patch_probs.shape != tokens.shape[:3]:
        raise ValueError(
            f"patch_probs {tuple(patch_probs.shape)} must be [B, h, w] matching tokens {tuple(tokens.shape)}"
        )
    if normalize:
        tokens = F.normalize(tokens, dim=-1)
    anomalous = (patch_probs.detach() > threshold).to(tokens.dtype)
    regions = torch.stack([1 - anomalous, anomalous], dim=1)  # [B, 2, h, w]
    sums = torch.einsum("brhw,bhwd->brd", regions, tokens)
    counts = regions.sum(dim=(2, 3)).clamp(min=1).unsqueeze(-1)  # an empty region sums to 0: stays 0
    return sums / counts


def cosine_classifier(tokens: Tensor, text: Tensor, temperature: float = 0.07) -> Tensor:
    """Per-patch state probabilities ``softmax(cos(z, t_s) / temperature)`` → ``[B, h, w, S]``.

    Args:
        tokens: ``[B, h, w, D]`` patch tokens (normalised here).
        text: ``[B, S, D]`` each image's own text features (or ``[S, D]`` shared; normalised here).
        temperature: 0.07.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if text.ndim == 2:
        text = text.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    if (
        tokens.ndim != 4
        or text.ndim != 3
        or text.shape[0] != tokens.shape[0]
        or text.shape[-1] != tokens.shape[-1]
    ):
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must be [B, h, w, D] and text {tuple(text.shape)} [B, S, D]"
        )
    logits = torch.einsum("bhwd,bsd->bhws", F.normalize(tokens, dim=-1), F.normalize(text, dim=-1))
    return torch.softmax(logits / temperature, dim=-1)


class MRADPromptLearner(nn.Module):
    """Learnable normal/anomalous prompts with per-image biases, encoded by the frozen text tower.

    The text tower is used but not owned: it is not registered as a submodule, so this module's
    parameters and state dict hold only the learnable tensors (context, deep prompts, bias maps),
    and the tower moves with the encoder it belongs to.

    Args:
        text: the frozen CLIP text tower.
        n_ctx: learnable context tokens per state (12).
        deep_length: tokens replaced by each deep prompt (4).
        deep_layers: number of deep prompts (official depth 9 → 8), in blocks ``deep_start …``.
        deep_start: 1-based text block receiving the first deep prompt (2).
        class_name: the object-agnostic class word ("object").
        normal_template / anomalous_template: state templates; official ``"{}"`` / ``"damaged {}"``
            (the paper: ``"good {}"``). A "." is appended, as in the official prompts.
        bias_source: ``"dual"`` (normal and anomalous region priors, default), ``"anomaly"`` (anomalous
            prior only, zero normal bias), ``"cls"`` (the image's class token for both states) or
            ``"none"`` (static prompts) — the paper's Table 2 ablation.
        prior_dim: dimension of the priors / class token (default: the tower's output dimension).
        init_std: std of the normal init of context and deep prompts (0.02).
        round_deep_prompts: round deep prompts to fp16 before use, as the official code does.
    """

    text: CLIPTextEncoder  # a plain attribute, not a submodule (see above)
    # Buffers: the prompts' token ids and the frozen embeddings around the context slots.
    token_ids: Tensor
    prefix: Tensor
    suffix: Tensor

    def __init__(
        self,
        text: CLIPTextEncoder,
        n_ctx: int = 12,
        deep_length: int = 4,
        deep_layers: int = 8,
        deep_start: int = 2,
        class_name: str = "object",
        normal_template: str = "{}",
        anomalous_template: str = "damaged {}",
        bias_source: str = "dual",
        prior_dim: int | None = None,
        init_std: float = 0.02,
        round_deep_prompts: bool = True,
    ) -> None:
        super().__init__()
        if bias_source not in BIAS_SOURCES:
            raise ValueError(f"bias_source must be one of {BIAS_SOURCES}, got {bias_source!r}")
        if n_ctx < 1 or deep_length < 0 or deep_layers < 0:
            raise ValueError(
                f"need n_ctx >= 1, deep_length >= 0, deep_layers >= 0; got {n_ctx}, {deep_length}, {deep_layers}"
            )
        if deep_layers and not (deep_start >= 1 and deep_start + deep_layers - 1 <= text.depth):
            raise ValueError(
                f"{deep_layers} deep prompts from block {deep_start} do not fit the tower's {text.depth} blocks"
            )
        for name, template in (
            ("normal_template", normal_template),
            ("anomalous_template", anomalous_template),
        ):
            if template.count("{}") != 1:
                raise ValueError(f"{name} must contain one '{{}}' for the class word, got {template!r}")
        object.__setattr__(self, "text", text)  # used, not owned (see the class docstring)
        self.n_ctx = int(n_ctx)
        self.deep_start = int(deep_start)
        self.bias_source = bias_source
        self.round_deep_prompts = bool(round_deep_prompts)
        self.prompts = [
            f"{' '.join(['X'] * n_ctx)} {template.format(class_name)}."
            for template in (normal_template, anomalous_template)
        ]
        token_ids = text.tokenize(self.prompts)
        placeholder = int(text.tokenize("X")[0, 1])
        eot = token_ids.argmax(dim=-1)
        if not bool((token_ids[:, 1 : 1 + n_ctx] == placeholder).all()) or bool((eot <= n_ctx).any()):
            raise ValueError(
                f"{n_ctx} context tokens and the templates do not fit the text context: {self.prompts}"
            )
        with torch.no_grad():
            embeddings = text.embed(token_ids)
        # Frozen token embeddings around the context slots: derived from the tower, not saved.
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx :].clone(), persistent=False)

        width = text.width
        self.ctx_normal = nn.Parameter(torch.empty(n_ctx, width))
        self.ctx_anomalous = nn.Parameter(torch.empty(n_ctx, width))
        self.deep_prompts = nn.ParameterList(
            nn.Parameter(torch.empty(deep_length, width)) for _ in range(deep_layers)
        )
        for parameter in [self.ctx_normal, self.ctx_anomalous, *self.deep_prompts]:
            nn.init.normal_(parameter, std=init_std)
        prior_dim = text.embed_dim if prior_dim is None else int(prior_dim)
        self.prior_dim = prior_dim
        self.prompt_bias = (
            None if bias_source == "none" else PromptBias(prior_dim, width, normal=bias_source != "anomaly")
        )

    # ------------------------------------------------------------------------------------ biases
    def biases(self, priors: Tensor | None = None, cls_token: Tensor | None = None) -> Tensor | None:
        """Context biases ``[B, 2, W]`` for this learner's ``bias_source`` (``None`` for static prompts).

        Args:
            priors: ``[B, 2, D]`` region prototypes from :func:`region_priors` ("dual", "anomaly").
            cls_token: ``[B, D]`` the image's class token ("cls"; L2-normalised here).
        """
        if self.prompt_bias is None:
            return None
        if self.bias_source == "cls":
            if cls_token is None:
                raise ValueError("bias_source 'cls' needs the images' class tokens (cls_token=[B, D])")
            if cls_token.ndim != 2:
                raise ValueError(f"cls_token must be [B, D], got shape {tuple(cls_token.shape)}")
            prototypes = F.normalize(cls_token, dim=-1).unsqueeze(1).expand(-1, 2, -1)
        else:
            if priors is None:
                raise ValueError(f"bias_source {self.bias_source!r} needs region priors (priors=[B, 2, D])")
            prototypes = priors
        return self.prompt_bias(prototypes.to(self.ctx_normal.dtype))

    # ------------------------------------------------------------------------------- prompts/text
    def prompt_embeddings(self, bias: Tensor | None = None) -> Tensor:
        """Input token embeddings ``[B, 2, L, W]``: SOS, context (+ bias on every token), template."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous]).unsqueeze(0)  # [1, 2, n, W]
        if bias is not None:
            if bias.ndim != 3 or bias.shape[1:] != (2, ctx.shape[-1]):
                raise ValueError(f"bias must be [B, 2, {ctx.shape[-1]}], got shape {tuple(bias.shape)}")
            ctx = ctx + bias.unsqueeze(2)
        count = ctx.shape[0]
        prefix = self.prefix.unsqueeze(0).expand(count, -1, -1, -1)
        suffix = self.suffix.unsqueeze(0).expand(count, -1, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2)

    def text_features(self, bias: Tensor | None = None, batch_size: int | None = None) -> Tensor:
        """L2-normalised ``[normal, anomalous]`` text features ``[B, 2, D]``.

        Without a bias the prompts are the same for every image: they are encoded once and repeated
        ``batch_size`` times (default 1).
        """
        embeddings = self.prompt_embeddings(bias)
        count, states, length, width = embeddings.shape
        token_ids = self.token_ids.unsqueeze(0).expand(count, -1, -1).reshape(count * states, length)
        deep = list(self.deep_prompts)
        if self.round_deep_prompts:
            deep = [prompt.half().to(prompt.dtype) for prompt in deep]
        features = self.text.encode(
            embeddings.reshape(count * states, length, width), token_ids, deep, deep_start=self.deep_start
        )
        features = F.normalize(features.reshape(count, states, -1), dim=-1)
        if bias is None and batch_size is not None:
            features = features.expand(batch_size, -1, -1)
        return features

    def forward(
        self, priors: Tensor | None = None, cls_token: Tensor | None = None, batch_size: int | None = None
    ) -> Tensor:
        """Per-image text features ``[B, 2, D]`` from the images' priors (or class tokens)."""
        bias = self.biases(priors, cls_token)
        if bias is None and batch_size is None:
            given = priors if priors is not None else cls_token
            batch_size = given.shape[0] if given is not None else None
        return self.text_features(bias, batch_size)
