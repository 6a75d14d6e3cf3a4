"""Official MRAD checkpoint files → projection heads and prompt learner, exactly, or a clear refusal."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from anomret.encoders.clip import CLIPEncoder
from anomret.encoders.clip_text import CLIPTextEncoder
from anomret.models.official_checkpoint import (
    OfficialCheckpointError,
    load_official_checkpoint,
    official_state_dicts,
)
from anomret.models.projections import MRADProjectionHeads
from anomret.models.prompts import MRADPromptLearner

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"
PATCH_DIM, IMAGE_DIM, OUT_DIM = 12, 8, 10
WIDTH, EMBED, N_CTX, DEEP = 64, 32, 12, 3  # tiny text tower: width 64, embed 32, 4 blocks


@pytest.fixture(scope="module")
def text() -> CLIPTextEncoder:
    kwargs = OmegaConf.to_container(OmegaConf.load(CONF / "tiny_clip.yaml"), resolve=True)
    kwargs.pop("_target_")
    return CLIPEncoder(**kwargs).text_encoder()


def _official(text: CLIPTextEncoder, *, clip: bool = True, n_ctx: int = N_CTX) -> dict:
    """A checkpoint in the official layout (train.py's torch.save dict), random tensors."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    def linear(name, out_dim, in_dim):
        return {f"{name}.weight": rand(out_dim, in_dim), f"{name}.bias": rand(out_dim)}

    checkpoint = {
        "image_proj": {**linear("mlp1", OUT_DIM, IMAGE_DIM), **linear("mlp2", OUT_DIM, IMAGE_DIM)},
        "patch_proj": {**linear("fc.0", OUT_DIM, PATCH_DIM), **linear("fc.1", OUT_DIM, PATCH_DIM)},
    }
    if not clip:
        return checkpoint
    x = " ".join(["X"] * n_ctx)
    ids = text.tokenize([f"{x} object.", f"{x} damaged object."]).int()
    learner = {
        "ctx_pos": rand(1, 1, n_ctx, WIDTH),
        "ctx_neg": rand(1, 1, n_ctx, WIDTH),
        **{f"compound_prompts_text.{i}": rand(4, WIDTH) for i in range(DEEP)},
        # Vestigial modules of the official learner (never called) ...
        **{
            k: v
            for i in range(DEEP)
            for k, v in linear(f"compound_prompt_projections.{i}", 896, WIDTH).items()
        },
        **linear("mlp.c_fc", 4 * WIDTH, WIDTH),
        **linear("mlp.c_proj", WIDTH, 4 * WIDTH),
        # ... and buffers derived from the frozen tower.
        "token_prefix_pos": rand(1, 1, 1, WIDTH),
        "token_suffix_pos": rand(1, 1, 77 - 1 - n_ctx, WIDTH),
        "token_prefix_neg": rand(1, 1, 1, WIDTH),
        "token_suffix_neg": rand(1, 1, 77 - 1 - n_ctx, WIDTH),
        "tokenized_prompts_pos": ids[:1].reshape(1, 1, 77),
        "tokenized_prompts_neg": ids[1:].reshape(1, 1, 77),
    }
    checkpoint["prompt_learner"] = learner
    checkpoint["prompt_proj"] = {**linear("mlp1", WIDTH, EMBED), **linear("mlp2", WIDTH, EMBED)}
    return checkpoint


def _modules(text, **learner_kwargs):
    torch.manual_seed(1)
    heads = MRADProjectionHeads(PATCH_DIM, IMAGE_DIM, OUT_DIM)
    prompts = MRADPromptLearner(text, **{"deep_layers": DEEP, **learner_kwargs})
    return heads, prompts


def _save(tmp_path: Path, checkpoint: dict, name: str = "mrad_clip_final.pth") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_clip_checkpoint_loads_exactly(tmp_path, text):
    checkpoint = _official(text)
    heads, prompts = _modules(text)
    report = load_official_checkpoint(_save(tmp_path, checkpoint), heads=heads, prompts=prompts)

    pairs = {
        ("patch_proj", "fc.0"): heads.patch.query,
        ("patch_proj", "fc.1"): heads.patch.key,
        ("image_proj", "mlp1"): heads.image.query,
        ("image_proj", "mlp2"): heads.image.key,
        ("prompt_proj", "mlp1"): prompts.prompt_bias.normal,
        ("prompt_proj", "mlp2"): prompts.prompt_bias.anomalous,
    }
    for (section, name), linear in pairs.items():
        assert torch.equal(linear.weight, checkpoint[section][f"{name}.weight"])
        assert torch.equal(linear.bias, checkpoint[section][f"{name}.bias"])
    official = checkpoint["prompt_learner"]
    assert torch.equal(prompts.ctx_normal, official["ctx_pos"][0, 0])
    assert torch.equal(prompts.ctx_anomalous, official["ctx_neg"][0, 0])
    for i in range(DEEP):
        assert torch.equal(prompts.deep_prompts[i], official[f"compound_prompts_text.{i}"])

    assert len(report.mapped) == 8 + 4 + 2 + DEEP
    assert report.mapped["patch_proj.fc.1.weight"] == "heads.patch.key.weight"
    assert report.mapped["prompt_learner.ctx_neg"] == "prompts.ctx_anomalous"
    assert "vestigial" in report.ignored["prompt_learner.mlp.c_fc.weight"]
    assert "prompt_learner.compound_prompt_projections.0.weight" in report.ignored
    assert "prompt_learner.token_suffix_neg" in report.ignored
    assert "prompt_learner.tokenized_prompts_pos" in report.ignored
    assert report.skipped == []


def test_round_trip_through_the_official_layout(tmp_path, text):
    heads, prompts = _modules(text)
    exported = official_state_dicts(heads, prompts)
    assert exported["prompt_learner"]["ctx_pos"].shape == (1, 1, N_CTX, WIDTH)
    fresh_heads, fresh_prompts = _modules(text)
    for module in (fresh_heads, fresh_prompts):
        for parameter in module.parameters():
            parameter.data.zero_()
    load_official_checkpoint(_save(tmp_path, exported), heads=fresh_heads, prompts=fresh_prompts)
    for a, b in ((heads, fresh_heads), (prompts, fresh_prompts)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name


def test_sections_without_a_module_are_skipped(tmp_path, text):
    checkpoint = _official(text)
    heads, _ = _modules(text)
    report = load_official_checkpoint(_save(tmp_path, checkpoint), heads=heads)  # CLIP file read as FT
    assert report.skipped == ["prompt_learner", "prompt_proj"]
    assert torch.equal(heads.image.key.bias, checkpoint["image_proj"]["mlp2.bias"])
    # An FT file has no prompts to give.
    _, prompts = _modules(text)
    with pytest.raises(OfficialCheckpointError, match="MRAD-FT checkpoint has no prompts"):
        load_official_checkpoint(_save(tmp_path, _official(text, clip=False), "ft.pth"), prompts=prompts)


def test_mismatches_are_listed_and_nothing_is_copied(tmp_path, text):
    checkpoint = _official(text, n_ctx=6)  # trained with 6 context tokens
    checkpoint["patch_proj"]["fc.2.weight"] = torch.zeros(OUT_DIM, PATCH_DIM)  # unknown key
    checkpoint["image_proj"]["mlp1.weight"] = torch.zeros(OUT_DIM, IMAGE_DIM + 1)  # wrong shape
    del checkpoint["image_proj"]["mlp2.bias"]  # missing
    checkpoint["extra"] = {}
    heads, prompts = _modules(text)
    before = {name: t.clone() for name, t in heads.state_dict().items()}
    with pytest.raises(OfficialCheckpointError) as error:
        load_official_checkpoint(_save(tmp_path, checkpoint), heads=heads, prompts=prompts)
    message = str(error.value)
    for expected in (
        "unknown sections ['extra']",
        "patch_proj.fc.2.weight: no counterpart",
        "image_proj.mlp1.weight: shape (10, 9)",
        "heads.image.key.bias: not in the checkpoint",
        "prompt_learner.ctx_pos: shape (1, 1, 6, 64)",
        "a different context length",
        "prompt tokens differ",
    ):
        assert expected in message, expected
    assert all(torch.equal(t, before[name]) for name, t in heads.state_dict().items())  # all or nothing


def test_prompt_text_and_bias_source_must_match(tmp_path, text):
    path = _save(tmp_path, _official(text))
    heads, good = _modules(text, normal_template="good {}")
    with pytest.raises(
        OfficialCheckpointError, match="tokenized_prompts_pos: the checkpoint's prompt tokens differ"
    ):
        load_official_checkpoint(path, heads=heads, prompts=good)
    _, static = _modules(text, bias_source="none")
    with pytest.raises(OfficialCheckpointError, match=r"model\.prompts\.bias_source=dual"):
        load_official_checkpoint(path, prompts=static)
    _, anomaly_only = _modules(text, bias_source="anomaly")
    with pytest.raises(
        OfficialCheckpointError, match=r"prompt_proj\.mlp1\.weight: no counterpart.*no normal bias"
    ):
        load_official_checkpoint(path, prompts=anomaly_only)
    _, fewer_deep = _modules(text, deep_layers=2)
    with pytest.raises(OfficialCheckpointError, match=r"compound_prompts_text\.2: no counterpart"):
        load_official_checkpoint(path, prompts=fewer_deep)


def test_files_are_never_unpickled(tmp_path, text):
    heads, _ = _modules(text)
    checkpoint = _official(text, clip=False)
    checkpoint["args"] = argparse.Namespace(lr=4e-4)
    with pytest.raises(OfficialCheckpointError, match="refusing to unpickle"):
        load_official_checkpoint(_save(tmp_path, checkpoint), heads=heads)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pth", heads=heads)
    with pytest.raises(ValueError, match="modules to load into"):
        load_official_checkpoint(_save(tmp_path, _official(text, clip=False)))
