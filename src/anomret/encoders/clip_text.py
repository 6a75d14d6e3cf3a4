"""The frozen CLIP text tower, driven by learnable prompt embeddings and deep prompts.

A prompt learner (MRAD-CLIP, AnomalyCLIP) owns the learnable tensors; this component only runs
the frozen tower on them:

1. ``prompt_embeddings [P, L, W]`` (token embeddings with learnable context tokens spliced in)
   plus the position embedding;
2. the causal text blocks; before block ``deep_start + j`` (1-based) runs, positions ``1..n`` —
   the ``n`` tokens right after SOS — are **replaced** by ``deep_prompts[j]`` (``[n, W]``, shared by
   all prompts). MRAD's code: 8 deep prompts of 4 tokens in blocks 2..9;
3. ``ln_final``, the EOT token (argmax of the token ids), ``@ text_projection`` → ``[P, D]``.

The tower's weights never receive gradients; the prompt tensors passed in do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

if TYPE_CHECKING:
    from anomret.encoders.clip import CLIPEncoder


class CLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower with deep-prompt replacement.

    Args:
        clip_model: an open_clip ``CLIP`` model with its text tower (shared, not copied).
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(arch)``).
        deep_start: 1-based block number that receives the first deep prompt.
    """

    attn_mask: Tensor  # a buffer: the causal mask of the text blocks

    def __init__(
        self, clip_model: open_clip.CLIP, tokenizer: Callable[[list[str]], Tensor], deep_start: int = 2
    ) -> None:
        super().__init__()
        if getattr(clip_model, "transformer", None) is None:
            raise ValueError("this CLIP model has no text tower (built with keep_text=False)")
        self.transformer = clip_model.transformer
        self.token_embedding = clip_model.token_embedding
        self.ln_final = clip_model.ln_final
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection = clip_model.text_projection
        self.pool_type = clip_model.text_pool_type
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.tokenizer = tokenizer
        self.context_length = int(clip_model.context_length)
        self.width = int(self.transformer.width)
        self.depth = len(self.transformer.resblocks)
        if not 1 <= deep_start <= self.depth:
            raise ValueError(f"deep_start must be a block number in [1, {self.depth}], got {deep_start}")
        self.deep_start = int(deep_start)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_encoder(cls, encoder: CLIPEncoder, deep_start: int = 2) -> CLIPTextEncoder:
        """The text tower of a :class:`~anomret.encoders.clip.CLIPEncoder`'s model."""
        model = encoder.model
        tokenizer = open_clip.get_tokenizer(encoder.arch, context_length=int(model.context_length))
        return cls(model, tokenizer, deep_start=deep_start)

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        # Frozen tower: dropout-free eval mode whatever the owning module asks for.
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        projection = self.text_projection
        return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids ``[P, context_length]`` (SOS … EOT, zero padded)."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).to(self.attn_mask.device)

    def embed(self, token_ids: Tensor) -> Tensor:
        """Frozen token embeddings ``[P, L, W]`` of ``token_ids``, to splice learnable context into."""
        return self.token_embedding(token_ids)

    def encode(
        self,
        prompt_embeddings: Tensor,
        token_ids: Tensor,
        deep_prompts: Sequence[Tensor] | None = None,
        deep_start: int | None = None,
    ) -> Tensor:
        """Text features ``[P, D]`` (not normalised) of prompt embeddings.

        Args:
            prompt_embeddings: ``[P, L, W]`` input token embeddings (before the position embedding).
            token_ids: ``[P, L]`` token ids; the EOT position is their argmax.
            deep_prompts: per-block ``[n, W]`` tensors replacing positions ``1..n``.
            deep_start: 1-based block of the first deep prompt (default: the constructor's).
        """
        if prompt_embeddings.shape[:2] != token_ids.shape:
            raise ValueError(
                f"prompt embeddings {tuple(prompt_embeddings.shape)} vs token ids {tuple(token_ids.shape)}"
            )
        start = self.deep_start if deep_start is None else int(deep_start)
        deep = list(deep_prompts or [])
        if deep and not (start >= 1 and start + len(deep) - 1 <= self.depth):
            raise ValueError(
                f"{len(deep)} deep prompts from block {start} exceed the {self.depth} text blocks"
            )
        x = prompt_embeddings + self.positional_embedding.to(prompt_embeddings.dtype)
        count = x.shape[0]
        for number, block in enumerate(self.transformer.resblocks, start=1):
            index = number - start
            if 0 <= index < len(deep):
                tokens = deep[index]
                n = tokens.shape[0]
                if tokens.shape[-1] != x.shape[-1] or n + 1 >= x.shape[1]:
                    raise ValueError(f"deep prompt {index} has shape {tuple(tokens.shape)}")
                tokens = tokens.to(x.dtype).unsqueeze(0).expand(count, -1, -1)
                x = torch.cat([x[:, :1], tokens, x[:, 1 + n :]], dim=1)
            x = block(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        pooled = text_global_pool(x, token_ids, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def encode_text(self, texts: str | Sequence[str]) -> Tensor:
        """Plain prompts (no learnable tokens): the same as open_clip's ``encode_text``."""
        token_ids = self.tokenize(texts)
        return self.encode(self.embed(token_ids), token_ids)
