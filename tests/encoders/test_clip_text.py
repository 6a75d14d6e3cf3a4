"""CLIPTextEncoder: parity with open_clip, deep-prompt replacement, gradients only to prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from anomret.encoders.clip import CLIPEncoder
from anomret.encoders.clip_text import CLIPTextEncoder

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"


@pytest.fixture(scope="module")
def encoder() -> CLIPEncoder:
    kwargs = OmegaConf.to_container(OmegaConf.load(CONF / "tiny_clip.yaml"), resolve=True)
    kwargs.pop("_target_")
    return CLIPEncoder(**kwargs)


@pytest.fixture(scope="module")
def text(encoder: CLIPEncoder) -> CLIPTextEncoder:
    return encoder.text_encoder()


def test_plain_prompts_match_open_clip_encode_text(encoder, text):
    prompts = ["object.", "damaged object."]
    with torch.no_grad():
        ours = text.encode_text(prompts)
        theirs = encoder.model.encode_text(text.tokenize(prompts))
    assert ours.shape == (2, 32) and text.embed_dim == 32 and text.context_length == 77
    torch.testing.assert_close(ours, theirs)


def test_token_ids_end_with_eot_as_argmax(text):
    ids = text.tokenize("X X X X object.")
    assert ids.shape == (1, 77)
    eot = int(ids.argmax(-1))
    assert eot == 7 and ids[0, eot + 1 :].eq(0).all()  # SOS, 4×X, object, ., EOT


def test_deep_prompts_replace_positions_after_sos(text):
    ids = text.tokenize(["X X X X object.", "X X X X damaged object."])
    embeddings = text.embed(ids)
    deep = [torch.randn(4, text.width) for _ in range(3)]
    with torch.no_grad():
        plain = text.encode(embeddings, ids)
        prompted = text.encode(embeddings, ids, deep)
        assert not torch.allclose(plain, prompted, atol=1e-4)
        # Replaced before block 1 runs: whatever the inputs at positions 1..4 were no longer matters...
        changed = embeddings.clone()
        changed[:, 1:5] += torch.randn_like(changed[:, 1:5])
        first = text.encode(embeddings, ids, deep, deep_start=1)
        assert torch.equal(text.encode(changed, ids, deep, deep_start=1), first)
        # ...while position 5 (the class word) still does, and from block 2 on position 1..4 inputs count.
        changed_word = embeddings.clone()
        changed_word[:, 5] += 10.0
        assert (text.encode(changed_word, ids, deep, deep_start=1) - first).abs().max() > 1e-5
        assert (text.encode(changed, ids, deep, deep_start=2) - prompted).abs().max() > 1e-5


def test_deep_prompts_match_manual_block_loop(encoder, text):
    ids = text.tokenize(["X X X X object."])
    embeddings = text.embed(ids)
    deep = [torch.randn(2, text.width) for _ in range(2)]
    model = encoder.model
    with torch.no_grad():
        x = embeddings + model.positional_embedding
        for number, block in enumerate(model.transformer.resblocks, start=1):
            if number in (2, 3):
                x = torch.cat([x[:, :1], deep[number - 2][None], x[:, 3:]], dim=1)
            x = block(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        expected = x[0, ids[0].argmax()] @ model.text_projection
        torch.testing.assert_close(text.encode(embeddings, ids, deep)[0], expected)


def test_too_many_deep_prompts_are_rejected(text):
    ids = text.tokenize(["object."])
    with pytest.raises(ValueError, match="exceed"):
        text.encode(text.embed(ids), ids, [torch.zeros(4, text.width)] * 4)  # blocks 2..5 of 4


class TinyPromptLearner(nn.Module):
    """A minimal AnomalyCLIP-style learner: learnable context per state + shared deep prompts."""

    def __init__(self, text: CLIPTextEncoder, n_ctx: int = 6, depth: int = 3, n_deep: int = 4) -> None:
        super().__init__()
        placeholder = " ".join(["X"] * n_ctx)
        self.register_buffer(
            "ids", text.tokenize([f"{placeholder} object.", f"{placeholder} damaged object."])
        )
        with torch.no_grad():
            self.register_buffer("frozen", text.embed(self.ids))
        self.ctx = nn.Parameter(torch.randn(2, n_ctx, text.width) * 0.02)
        self.deep = nn.ParameterList(
            nn.Parameter(torch.randn(n_deep, text.width) * 0.02) for _ in range(depth)
        )
        self.n_ctx = n_ctx

    def forward(self, text: CLIPTextEncoder) -> torch.Tensor:
        prompts = torch.cat([self.frozen[:, :1], self.ctx, self.frozen[:, 1 + self.n_ctx :]], dim=1)
        return text.encode(prompts, self.ids, list(self.deep))


def test_gradients_reach_prompts_only_and_training_moves_them(encoder, text):
    learner = TinyPromptLearner(text)
    image_feature = encoder(torch.randn(1, 3, 64, 64)).cls
    features = learner(text)
    logits = (
        nn.functional.normalize(image_feature, dim=-1) @ nn.functional.normalize(features, dim=-1).T / 0.07
    )
    loss = nn.functional.cross_entropy(logits, torch.tensor([1]))
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is None for p in text.parameters())
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.deep)

    before = [p.detach().clone() for p in text.parameters()]
    optimiser = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(5):
        optimiser.zero_grad()
        logits = (
            nn.functional.normalize(image_feature, dim=-1) @ nn.functional.normalize(learner(text), dim=-1).T
        )
        loss_now = nn.functional.cross_entropy(logits / 0.07, torch.tensor([1]))
        loss_now.backward()
        optimiser.step()
    assert loss_now < loss
    assert all(torch.equal(a, b) for a, b in zip(before, text.parameters(), strict=True))
    text.train()
    assert not text.training
