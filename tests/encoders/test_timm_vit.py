"""TimmViTEncoder: tiny random timm ViTs (plain and DINOv3-family with registers), weights, fingerprints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from anomret.encoders.timm_vit import TimmViTEncoder

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"
TINY_DINOV3 = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def tiny_dinov3(**overrides) -> TimmViTEncoder:
    kwargs = {
        "model_name": "vit_base_patch16_dinov3",
        "layers": [1, 3, 4],
        "image_size": 64,
        "model_kwargs": TINY_DINOV3,
    }
    kwargs.update(overrides)
    return TimmViTEncoder(**kwargs)


def test_tiny_vit_config_builds_fast_and_returns_grids():
    encoder = instantiate(OmegaConf.load(CONF / "tiny_vit.yaml"))
    features = encoder(torch.randn(8, 3, 64, 64))
    assert encoder.layers == (2, 4)
    assert encoder.grid_size == 8
    assert features.cls.shape == (8, 64)
    assert set(features.patches) == {2, 4}
    assert all(grid.shape == (8, 8, 8, 64) for grid in features.patches.values())
    assert features.projected == {}
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # Lightning calls this; a frozen extractor must stay in eval mode
    assert not encoder.model.training


def test_dinov3_layers_norm_and_registers_match_manual_block_iteration():
    encoder = tiny_dinov3()
    model = encoder.model
    assert model.num_prefix_tokens == 5  # CLS + 4 registers, as DINOv3
    images = torch.randn(2, 3, 64, 64)
    features = encoder(images)

    with torch.no_grad():
        x = model.patch_embed(images)
        x, rope = model._pos_embed(x)
        x = model.norm_pre(x)
        outputs = {}
        for index, block in enumerate(model.blocks):
            x = block(x, rope=rope)
            outputs[index] = model.norm(x)
    for layer in (1, 3, 4):  # block numbers count from 1: layer l is the output of blocks[l - 1]
        expected = outputs[layer - 1][:, 5:].reshape(2, 4, 4, 32)  # registers dropped, row-major grid
        torch.testing.assert_close(features.patches[layer], expected)
    torch.testing.assert_close(features.cls, outputs[3][:, 0])
    # A grid built from the wrong token offset (registers kept) would not match.
    assert not torch.allclose(features.patches[4], outputs[3][:, 1:17].reshape(2, 4, 4, 32))


def test_layer_order_is_normalised_and_out_of_range_rejected():
    assert tiny_dinov3(layers=[4, 1, 3, 3]).layers == (1, 3, 4)
    for outside in ([0], [5]):
        with pytest.raises(ValueError, match=r"1-based block numbers in \[1, 4\]"):
            tiny_dinov3(layers=outside)


def test_random_weights_are_announced_and_seeded(caplog):
    with caplog.at_level(logging.WARNING):
        first = tiny_dinov3()
    assert "RANDOM weights" in caplog.text and first.name in caplog.text
    images = torch.randn(1, 3, 64, 64)
    again = tiny_dinov3()
    other = tiny_dinov3(seed=1)
    torch.testing.assert_close(first(images).cls, again(images).cls)
    assert not torch.allclose(first(images).cls, other(images).cls)
    assert first.fingerprint() == again.fingerprint()
    assert first.fingerprint()["weights"] == {"kind": "random", "seed": 0}
    assert json.loads(json.dumps(first.fingerprint())) == first.fingerprint()  # JSON-native, stored in banks
    assert other.fingerprint() != first.fingerprint()


def test_global_rng_is_untouched_by_construction():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_dinov3(seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded_and_fingerprinted(tmp_path, suffix, caplog):
    source = tiny_dinov3(seed=3)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = tiny_dinov3(pretrained=str(path), seed=0)
    assert "RANDOM" not in caplog.text
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images).patches[4], source(images).patches[4])
    weights = loaded.fingerprint()["weights"]
    assert weights["kind"] == "file" and weights["path"] == str(path.resolve())
    assert weights["size"] == path.stat().st_size and len(weights["sha256_head_tail"]) == 64


def test_fingerprint_follows_layers_image_size_and_weights(tmp_path):
    base = tiny_dinov3().fingerprint()
    assert tiny_dinov3(layers=[4]).fingerprint() != base
    assert tiny_dinov3(image_size=96).fingerprint() != base
    assert tiny_dinov3(neighbor_kernels=[1, 3]).fingerprint() != base
    path = tmp_path / "w.safetensors"
    save_file(dict(tiny_dinov3().model.state_dict()), str(path))
    from_file = tiny_dinov3(pretrained=str(path)).fingerprint()
    assert from_file != base and from_file["weights"]["kind"] == "file"


def test_image_size_changes_grid_and_must_divide_by_patch():
    encoder = tiny_dinov3(image_size=96)
    assert encoder.grid_size == 6
    assert encoder(torch.randn(1, 3, 96, 96)).patches[1].shape == (1, 6, 6, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_dinov3(image_size=70)


def test_neighbor_kernels_are_applied_to_every_grid():
    images = torch.randn(1, 3, 64, 64)
    raw = tiny_dinov3()(images)
    smoothed = tiny_dinov3(neighbor_kernels=[1, 3, 5])(images)
    from anomret.encoders.postprocess import neighbor_average

    for layer in raw.patches:
        torch.testing.assert_close(smoothed.patches[layer], neighbor_average(raw.patches[layer], [1, 3, 5]))
    torch.testing.assert_close(smoothed.cls, raw.cls)  # CLS is a global token: never smoothed


def test_missing_file_and_unknown_tag_are_errors():
    from anomret.encoders.weights import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        tiny_dinov3(pretrained="/nonexistent/weights.safetensors")
    with pytest.raises(WeightsUnavailableError, match="unknown timm tag 'nope'"):
        tiny_dinov3(pretrained="nope")


def test_bf16_autocast_on_cpu_returns_fp32_features():
    features = tiny_dinov3(precision="bf16")(torch.randn(1, 3, 64, 64))
    assert features.cls.dtype == torch.float32 and features.patches[3].dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        tiny_dinov3(precision="int8")


# --- DINOv3 RoPE periods: Meta's checkpoint values (bf16), not timm's fp32 recomputation ---------

HEAD_PERIODS = 4  # head dim 16 (embed 32, 2 heads) -> 16 / 4 periods


def _timm_fp32_periods() -> torch.Tensor:
    # DINOv3's schedule: base 100, exponents 2 k / (head_dim / 2), computed in fp32.
    return 100.0 ** (2.0 * torch.arange(HEAD_PERIODS, dtype=torch.float32) / (16 // 2))


def _official_rope(periods: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Meta's RopePositionEmbedding.forward (normalize_coords="separate"), as [sin, cos] concatenated."""
    coords_h = torch.arange(0.5, height, dtype=torch.float32) / height
    coords_w = torch.arange(0.5, width, dtype=torch.float32) / width
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * torch.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _write_meta_checkpoint(path: Path, source: TimmViTEncoder, periods: torch.Tensor) -> None:
    """Meta's raw DINOv3 state-dict layout (dinov3_vitb16_pretrain_lvd1689m-*.pth) of ``source``."""
    state = {}
    for key, value in source.model.state_dict().items():
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        state[key] = value.clone()
    state["mask_token"] = torch.zeros(1, source.model.embed_dim)
    state["rope_embed.periods"] = periods.to(torch.bfloat16)  # as Meta's file stores it
    torch.save(state, path)


def test_meta_checkpoint_rope_periods_are_used(tmp_path):
    source = tiny_dinov3(seed=3)
    stored = torch.tensor([1.5, 4.0, 12.0, 40.0])  # exactly representable in bf16, unlike the schedule
    path = tmp_path / "dinov3_vitb16_pretrain_lvd1689m-test.pth"
    _write_meta_checkpoint(path, source, stored)

    loaded = tiny_dinov3(pretrained=str(path))
    rope = loaded.model.rope
    assert rope.periods.dtype == torch.float32
    torch.testing.assert_close(rope.periods, stored, rtol=0, atol=0)
    torch.testing.assert_close(rope.get_embed(shape=[4, 4]), _official_rope(stored, 4, 4), rtol=0, atol=0)
    assert loaded.fingerprint()["rope_periods"] == "checkpoint"
    # The rest of Meta's file went through timm's key conversion: every weight matches the source.
    for key, value in source.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    # The periods survive a dtype cast of the model, where timm would recompute its own.
    loaded.model.to(torch.bfloat16)
    torch.testing.assert_close(rope.periods, stored, rtol=0, atol=0)


def test_without_stored_periods_the_fp32_schedule_is_rounded_to_bf16(tmp_path):
    expected = _timm_fp32_periods().to(torch.bfloat16).float()
    assert not torch.equal(expected, _timm_fp32_periods())  # the rounding is visible at these sizes
    random = tiny_dinov3()
    torch.testing.assert_close(random.model.rope.periods, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        random.model.rope.get_embed(shape=[4, 4]), _official_rope(expected, 4, 4), rtol=0, atol=0
    )
    path = tmp_path / "timm_format.safetensors"  # timm's hub copy holds no periods buffer
    save_file(dict(random.model.state_dict()), str(path))
    from_file = tiny_dinov3(pretrained=str(path))
    torch.testing.assert_close(from_file.model.rope.periods, expected, rtol=0, atol=0)
    assert (
        random.fingerprint()["rope_periods"] == from_file.fingerprint()["rope_periods"] == "fp32_rounded_bf16"
    )


def test_fp32_option_keeps_timms_periods_even_with_a_meta_checkpoint(tmp_path):
    path = tmp_path / "meta.pth"
    _write_meta_checkpoint(path, tiny_dinov3(), torch.tensor([1.5, 4.0, 12.0, 40.0]))
    for encoder in (tiny_dinov3(rope_periods="fp32"), tiny_dinov3(pretrained=str(path), rope_periods="fp32")):
        torch.testing.assert_close(encoder.model.rope.periods, _timm_fp32_periods(), rtol=0, atol=0)
        assert encoder.fingerprint()["rope_periods"] == "fp32"
    with pytest.raises(ValueError, match="rope_periods"):
        tiny_dinov3(rope_periods="bf16")


def test_rope_periods_choice_changes_features_and_fingerprint():
    images = torch.randn(1, 3, 64, 64)
    rounded, fp32 = tiny_dinov3(), tiny_dinov3(rope_periods="fp32")
    for encoder in (rounded, fp32):
        for block in encoder.model.blocks:
            block.gamma_1.data.fill_(1.0)  # layer scale starts at 1e-5: let attention reach the tokens
            block.attn.qkv.weight.data.mul_(30.0)  # and make it position-sensitive, as trained weights are
    assert (rounded(images).patches[3] - fp32(images).patches[3]).abs().max() > 1e-4
    assert rounded.fingerprint() != fp32.fingerprint()
    assert json.loads(json.dumps(rounded.fingerprint())) == rounded.fingerprint()
    plain_vit = instantiate(OmegaConf.load(CONF / "tiny_vit.yaml"))  # no RoPE: nothing to choose
    assert plain_vit.fingerprint()["rope_periods"] is None


def test_meta_checkpoint_with_periods_of_another_size_is_an_error(tmp_path):
    path = tmp_path / "meta.pth"
    _write_meta_checkpoint(path, tiny_dinov3(), torch.ones(8))
    with pytest.raises(ValueError, match="another architecture"):
        tiny_dinov3(pretrained=str(path))


def test_dinov3_config_reads_periods_from_the_checkpoint():
    config = OmegaConf.load(CONF / "dinov3_vitb16.yaml")
    assert config.rope_periods == "checkpoint"
