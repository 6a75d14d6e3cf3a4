"""MRAD-CLIP prompt side on the tiny random CLIP: biases, prompts, priors, classifier, gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from anomret.encoders.clip import CLIPEncoder
from anomret.encoders.clip_text import CLIPTextEncoder
from anomret.losses import segmentation_loss
from anomret.models.prompts import MRADPromptLearner, PromptBias, cosine_classifier, region_priors

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"
TINY = {"deep_layers": 3}  # the tiny tower has 4 text blocks: deep prompts in blocks 2..4


@pytest.fixture(scope="module")
def encoder() -> CLIPEncoder:
    kwargs = OmegaConf.to_container(OmegaConf.load(CONF / "tiny_clip.yaml"), resolve=True)
    kwargs.pop("_target_")
    return CLIPEncoder(**kwargs)


@pytest.fixture(scope="module")
def text(encoder: CLIPEncoder) -> CLIPTextEncoder:
    return encoder.text_encoder()


def _learner(text: CLIPTextEncoder, seed: int = 0, **kwargs) -> MRADPromptLearner:
    torch.manual_seed(seed)
    return MRADPromptLearner(text, **{**TINY, **kwargs})


def _priors(seed: int, batch: int = 3, dim: int = 32) -> torch.Tensor:
    return torch.randn(batch, 2, dim, generator=torch.Generator().manual_seed(seed))


def test_layout_matches_the_official_prompt_learner(text):
    learner = _learner(text)
    shapes = {name: tuple(t.shape) for name, t in learner.state_dict().items()}
    assert shapes == {
        "ctx_normal": (12, 64),
        "ctx_anomalous": (12, 64),
        "deep_prompts.0": (4, 64),
        "deep_prompts.1": (4, 64),
        "deep_prompts.2": (4, 64),
        "prompt_bias.normal.weight": (64, 32),
        "prompt_bias.normal.bias": (64,),
        "prompt_bias.anomalous.weight": (64, 32),
        "prompt_bias.anomalous.bias": (64,),
    }
    # The frozen tower is used, not owned: none of its weights are parameters of the learner.
    tower = {id(p) for p in text.parameters()}
    assert not any(id(p) in tower for p in learner.parameters())
    x12 = " ".join(["X"] * 12)
    assert learner.prompts == [f"{x12} object.", f"{x12} damaged object."]
    assert torch.equal(learner.token_ids, text.tokenize(learner.prompts))
    assert 0.015 < float(learner.ctx_normal.detach().std()) < 0.025  # N(0, 0.02)
    good = _learner(text, normal_template="good {}")
    assert good.prompts[0] == f"{x12} good object."
    assert PromptBias().normal.in_features == 768 and PromptBias().anomalous.out_features == 768


def test_prompt_embeddings_add_the_same_bias_to_every_context_token(text):
    learner = _learner(text)
    bias = torch.randn(2, 2, 64)
    embeddings = learner.prompt_embeddings(bias)
    frozen = text.embed(learner.token_ids)
    assert embeddings.shape == (2, 2, 77, 64)
    for b in range(2):
        for state, ctx in enumerate((learner.ctx_normal, learner.ctx_anomalous)):
            torch.testing.assert_close(embeddings[b, state, 1:13], ctx + bias[b, state])
            assert torch.equal(embeddings[b, state, :1], frozen[state, :1])
            assert torch.equal(embeddings[b, state, 13:], frozen[state, 13:])


def test_text_features_match_a_manual_encoding(text):
    learner = _learner(text, seed=1)
    priors = _priors(0)
    with torch.no_grad():
        got = learner(priors)
        bias = torch.stack(
            [learner.prompt_bias.normal(priors[:, 0]), learner.prompt_bias.anomalous(priors[:, 1])], dim=1
        )
        deep = [p.half().float() for p in learner.deep_prompts]
        for b in range(3):
            embeddings = text.embed(learner.token_ids).clone()
            embeddings[0, 1:13] = learner.ctx_normal + bias[b, 0]
            embeddings[1, 1:13] = learner.ctx_anomalous + bias[b, 1]
            expected = F.normalize(text.encode(embeddings, learner.token_ids, deep, deep_start=2), dim=-1)
            torch.testing.assert_close(got[b], expected, rtol=1e-4, atol=1e-5)
    assert got.shape == (3, 2, 32)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, 2))
    assert (got[0] - got[1]).abs().max() > 1e-4  # dynamic prompts: each image its own text


def test_static_prompts_are_the_same_for_every_image(text):
    learner = _learner(text, bias_source="none")
    assert learner.prompt_bias is None and learner.biases(_priors(0)) is None
    with torch.no_grad():
        features = learner(_priors(0))  # priors are ignored, their batch size is kept
        assert features.shape == (3, 2, 32)
        assert torch.equal(features[0], features[1]) and torch.equal(features[0], features[2])
        assert learner(batch_size=2).shape == (2, 2, 32)
        assert (features[0, 0] - features[0, 1]).abs().max() > 1e-4  # normal ≠ anomalous


def test_zero_bias_equals_no_bias(text):
    learner = _learner(text, seed=2)
    with torch.no_grad():
        static = learner.text_features(None, batch_size=2)
        zero = learner.text_features(torch.zeros(2, 2, 64))
    torch.testing.assert_close(zero, static, rtol=1e-5, atol=1e-6)


def test_anomaly_prior_only_leaves_the_normal_prompt_static(text):
    learner = _learner(text, seed=3, bias_source="anomaly")
    assert learner.prompt_bias.normal is None
    priors = _priors(1)
    with torch.no_grad():
        bias = learner.biases(priors)
        assert torch.equal(bias[:, 0], torch.zeros(3, 64))
        torch.testing.assert_close(bias[:, 1], learner.prompt_bias.anomalous(priors[:, 1]))
        features = learner(priors)
        static = learner.text_features(None, batch_size=3)
    torch.testing.assert_close(features[:, 0], static[:, 0], rtol=1e-5, atol=1e-6)
    assert (features[:, 1] - static[:, 1]).abs().max() > 1e-4


def test_class_token_bias_feeds_both_states(text):
    learner = _learner(text, seed=4, bias_source="cls")
    cls_token = torch.randn(2, 32) * 3
    with torch.no_grad():
        bias = learner.biases(cls_token=cls_token)
        unit = F.normalize(cls_token, dim=-1)
        torch.testing.assert_close(bias[:, 0], learner.prompt_bias.normal(unit))
        torch.testing.assert_close(bias[:, 1], learner.prompt_bias.anomalous(unit))
    with pytest.raises(ValueError, match="class tokens"):
        learner.biases(priors=_priors(0))
    with pytest.raises(ValueError, match="region priors"):
        _learner(text, bias_source="dual").biases(cls_token=cls_token)


def test_bad_settings_are_rejected(text):
    with pytest.raises(ValueError, match="bias_source"):
        _learner(text, bias_source="global")
    with pytest.raises(ValueError, match="do not fit"):
        MRADPromptLearner(text)  # 8 deep prompts from block 2 need 9 blocks; the tiny tower has 4
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        _learner(text, anomalous_template="damaged object")
    with pytest.raises(ValueError, match="do not fit the text context"):
        _learner(text, n_ctx=80)
    with pytest.raises(ValueError, match=r"\[B, 2, 64\]"):
        _learner(text).text_features(torch.zeros(2, 3, 64))


def _priors_loop(probs, tokens, threshold, normalize):
    out = torch.zeros(tokens.shape[0], 2, tokens.shape[-1], dtype=tokens.dtype)
    for b in range(tokens.shape[0]):
        members = {0: [], 1: []}
        for y in range(tokens.shape[1]):
            for x in range(tokens.shape[2]):
                token = tokens[b, y, x]
                if normalize:
                    token = token / token.norm()
                members[int(probs[b, y, x] > threshold)].append(token)
        for region, items in members.items():
            if items:  # an empty region stays the zero vector
                out[b, region] = torch.stack(items).mean(0)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_region_priors_match_a_literal_loop_with_empty_regions(normalize):
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    probs = torch.rand(4, 3, 5, generator=gen, dtype=torch.float64)
    probs[1] = 0.2  # no anomalous patch
    probs[2] = 0.9  # no normal patch
    probs[3, 0, 0] = 0.5  # exactly at the threshold: normal (strict >)
    got = region_priors(probs, tokens, 0.5, normalize=normalize)
    torch.testing.assert_close(got, _priors_loop(probs, tokens, 0.5, normalize))
    assert torch.equal(got[1, 1], torch.zeros(6)) and torch.equal(got[2, 0], torch.zeros(6))
    torch.testing.assert_close(region_priors(probs, tokens, 0.7), _priors_loop(probs, tokens, 0.7, True))


def test_region_priors_pass_no_gradient_through_the_threshold():
    probs = torch.rand(2, 3, 3, requires_grad=True)
    tokens = torch.randn(2, 3, 3, 4, requires_grad=True)
    region_priors(probs, tokens).sum().backward()
    assert probs.grad is None
    assert tokens.grad is not None
    with pytest.raises(ValueError, match="matching tokens"):
        region_priors(torch.rand(2, 3, 4), torch.randn(2, 3, 3, 4))


def test_cosine_classifier_matches_its_formula():
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    text = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64)
    got = cosine_classifier(tokens, text)
    assert got.shape == (2, 3, 4, 2)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                z = tokens[b, y, x]
                cos = [float(z @ t / (z.norm() * t.norm())) for t in text[b]]
                exps = [math.exp(c / 0.07) for c in cos]
                expected = [e / sum(exps) for e in exps]
                assert got[b, y, x].tolist() == pytest.approx(expected, rel=1e-10)
    shared = cosine_classifier(tokens, text[0])
    torch.testing.assert_close(shared[0], got[0])
    with pytest.raises(ValueError, match="temperature"):
        cosine_classifier(tokens, text, temperature=0)


def test_gradients_reach_prompts_and_bias_while_the_tower_stays_frozen(encoder, text):
    learner = _learner(text, seed=7)
    features = encoder(torch.randn(2, 3, 64, 64))
    tokens = features.projected[4]  # [2, 8, 8, 32]
    patch_probs = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = patch_probs > 0.6
    tower_before = [p.detach().clone() for p in encoder.model.parameters()]

    def loss_fn():
        text_features = learner(region_priors(patch_probs, tokens))
        probs = cosine_classifier(tokens, text_features).permute(0, 3, 1, 2)
        return segmentation_loss(probs, mask, normal_dice=True)

    loss = loss_fn()
    loss.backward()
    for name, parameter in learner.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in encoder.model.parameters())

    optimiser = torch.optim.Adam(learner.parameters(), lr=4e-4, betas=(0.5, 0.999))
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    optimiser.step()
    for name, parameter in learner.named_parameters():
        assert not torch.equal(parameter, before[name]), name
    assert all(torch.equal(a, b) for a, b in zip(tower_before, encoder.model.parameters(), strict=True))
