"""CLIPEncoder: original stream equals open_clip's forward, V-V stream matches a naive reference."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from anomret.encoders.clip import CLIPEncoder
from anomret.encoders.postprocess import neighbor_average
from anomret.encoders.weights import WeightsUnavailableError

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"


def tiny_clip(**overrides) -> CLIPEncoder:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "tiny_clip.yaml"), overrides)
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert kwargs.pop("_target_") == "anomret.encoders.clip.CLIPEncoder"
    return CLIPEncoder(**kwargs)


def naive_vv_stream(
    encoder: CLIPEncoder, images: torch.Tensor, first: int, last: int
) -> dict[int, torch.Tensor]:
    """The dual path written out with explicit per-head matmuls (no SDPA, no shared helper)."""
    visual = encoder.model.visual
    h = visual._embeds(images)
    s = None
    out = {}
    for number, block in enumerate(visual.transformer.resblocks, start=1):
        if first <= number <= last:
            width, heads = block.attn.embed_dim, block.attn.num_heads
            qkv = block.ln_1(h) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
            v = qkv[..., 2 * width :].reshape(h.shape[0], h.shape[1], heads, width // heads).transpose(1, 2)
            weights = torch.softmax(v @ v.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1)
            mixed = (weights @ v).transpose(1, 2).reshape(h.shape)
            s = (h if s is None else s) + block.attn.out_proj(mixed)
        h = block(h)
        if s is not None:
            out[number] = s
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_tiny_clip_config_shapes(images):
    encoder = tiny_clip()
    features = encoder(images)
    assert encoder.layers == (4,) and encoder.vv_blocks == (2, 4) and encoder.grid_size == 8
    assert features.cls.shape == (2, 32)
    assert features.patches[4].shape == (2, 8, 8, 64)
    assert features.projected[4].shape == (2, 8, 8, 32)
    assert encoder.model.visual.transformer.resblocks[0].attn.num_heads == 2  # multi-head reshapes exercised
    assert not any(p.requires_grad for p in encoder.parameters())


def test_original_stream_equals_open_clip_forward(images):
    encoder = tiny_clip(cls_ln_post=True, layers=[2, 3, 4])
    visual = encoder.model.visual
    with torch.no_grad():
        streams = encoder.streams(images)
        reference = visual.forward_intermediates(
            images, indices=[1, 2, 3], intermediates_only=True, output_fmt="NLC"
        )
        expected_cls = encoder.model.encode_image(images)
        features = encoder(images)
    # Same blocks, same inputs: the original stream is bit-identical to open_clip's own.
    for number, expected in zip((2, 3, 4), reference["image_intermediates"], strict=True):
        assert torch.equal(streams.original[number][:, 1:], expected)
    torch.testing.assert_close(features.cls, expected_cls, rtol=1e-6, atol=1e-6)


def test_cls_without_ln_post_is_projected_raw_token(images):
    encoder = tiny_clip()  # cls_ln_post: false, as MRAD's code
    visual = encoder.model.visual
    with torch.no_grad():
        final = visual.transformer(visual._embeds(images))
        expected = final[:, 0] @ visual.proj
    torch.testing.assert_close(encoder(images).cls, expected)
    assert not torch.allclose(expected, encoder.model.encode_image(images))


@pytest.mark.parametrize("vv_blocks", [(2, 4), (3, 4), (1, 3)])
def test_vv_stream_matches_naive_dual_path(images, vv_blocks):
    encoder = tiny_clip(vv_blocks=list(vv_blocks), layers=[4])
    with torch.no_grad():
        streams = encoder.streams(images, layers=[vv_blocks[0], 4])
        expected = naive_vv_stream(encoder, images, *vv_blocks)
    for number, tokens in streams.vv.items():
        torch.testing.assert_close(tokens, expected[number], rtol=1e-5, atol=1e-5)
    # The V-V stream is not the original stream, and the original stream ignores the V-V branch.
    assert not torch.allclose(streams.vv[4], streams.original[4], atol=1e-3)
    plain = tiny_clip(vv_blocks=None, patch_stream="original")
    with torch.no_grad():
        assert torch.equal(plain.streams(images).original[4], streams.original[4])


def test_stored_layers_do_not_alias_the_live_stream(images):
    encoder = tiny_clip(layers=[2, 3, 4])
    features = encoder(images)
    assert not torch.allclose(features.patches[2], features.patches[4])
    assert not torch.allclose(features.patches[3], features.patches[4])


def test_features_are_ln_post_projection_and_neighbor_average_of_vv_tokens(images):
    encoder = tiny_clip()
    visual = encoder.model.visual
    with torch.no_grad():
        tokens = visual.ln_post(encoder.streams(images).vv[4])[:, 1:].reshape(2, 8, 8, 64)
        features = encoder(images)
    torch.testing.assert_close(features.patches[4], neighbor_average(tokens, [1, 3, 5]))
    torch.testing.assert_close(features.projected[4], neighbor_average(tokens @ visual.proj, [1, 3, 5]))
    raw = tiny_clip(neighbor_kernels=None)(images)
    torch.testing.assert_close(raw.patches[4], tokens)
    # Patch tokens are not L2-normalised by the encoder.
    assert not torch.allclose(raw.patches[4].norm(dim=-1), torch.ones(2, 8, 8))


def test_original_patch_stream_for_multi_layer_use(images):
    encoder = tiny_clip(vv_blocks=None, patch_stream="original", layers=[1, 4], neighbor_kernels=None)
    reference = encoder.model.visual.forward_intermediates(
        images, indices=[0, 3], intermediates_only=True, normalize_intermediates=True, output_fmt="NLC"
    )["image_intermediates"]
    features = encoder(images)
    for layer, expected in zip((1, 4), reference, strict=True):
        torch.testing.assert_close(features.patches[layer], expected.reshape(2, 8, 8, 64))


def test_position_embedding_resized_once_keeping_cls(images):
    native = tiny_clip()
    larger = tiny_clip(image_size=96)
    old = native.model.visual.positional_embedding
    new = larger.model.visual.positional_embedding
    assert new.shape == (1 + 12 * 12, 64) and larger.grid_size == 12
    assert torch.equal(new[0], old[0])
    grid = old[1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(new[1:], expected.permute(0, 2, 3, 1).reshape(144, 64))
    bicubic = tiny_clip(image_size=96, pos_embed_interpolation="bicubic").model.visual.positional_embedding
    assert not torch.allclose(bicubic[1:], new[1:])
    # The resized model is still a valid open_clip model: its own forward agrees with ours.
    big_images = torch.randn(1, 3, 96, 96)
    encoder = tiny_clip(image_size=96, cls_ln_post=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(big_images).cls, encoder.model.encode_image(big_images))
    assert encoder(big_images).patches[4].shape == (1, 12, 12, 64)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="vv_blocks"):
        tiny_clip(vv_blocks=[0, 4])
    with pytest.raises(ValueError, match="vv_blocks"):
        tiny_clip(vv_blocks=[3, 5])
    with pytest.raises(ValueError, match="V-V tokens exist from block 3"):
        tiny_clip(vv_blocks=[3, 4], layers=[2, 4])
    with pytest.raises(ValueError, match="needs vv_blocks"):
        tiny_clip(vv_blocks=None)
    with pytest.raises(ValueError, match="1-based"):
        tiny_clip(layers=[0])


def test_fingerprint_follows_settings_and_weights(tmp_path, images):
    base = tiny_clip()
    fingerprint = base.fingerprint()
    assert fingerprint["weights"] == {"kind": "random", "seed": 0}
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert tiny_clip().fingerprint() == fingerprint
    for override in (
        {"vv_blocks": [3, 4]},
        {"cls_ln_post": True},
        {"image_size": 96},
        {"layers": [3, 4]},
        {"seed": 1},
        {"neighbor_kernels": None},
    ):
        assert tiny_clip(**override).fingerprint() != fingerprint, override
    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in base.model.state_dict().items()}, str(path))
    loaded = tiny_clip(pretrained=str(path), seed=9)
    assert loaded.fingerprint()["weights"]["kind"] == "file"
    torch.testing.assert_close(loaded(images).patches[4], base(images).patches[4])


def test_random_weights_warning_and_fast_offline_tag_error(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        tiny_clip()
    assert "tiny_clip uses RANDOM weights" in caplog.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []
    connect = socket.socket.connect
    monkeypatch.setattr(
        socket.socket, "connect", lambda self, address: attempts.append(address) or connect(self, address)
    )
    with pytest.raises(WeightsUnavailableError) as error:
        tiny_clip(pretrained="openai", cache_dir="/nonexistent-cache")
    assert attempts == []  # offline: no connection, so no retry loop to wait for
    assert "ViT-B-16/openai" in str(error.value) and "encoder.pretrained=" in str(error.value)
    with pytest.raises(WeightsUnavailableError, match="unknown open_clip tag 'nope'"):
        tiny_clip(pretrained="nope")


def test_keep_text_false_drops_the_text_tower():
    encoder = tiny_clip(keep_text=False)
    assert encoder.model.transformer is None
    with pytest.raises(ValueError, match="no text tower"):
        encoder.text_encoder()


@pytest.mark.parametrize(
    ("config", "side", "cls_dim", "grids", "projected"),
    [
        ("clip_vit_l14_336", 518, 768, {24: (37, 37, 1024)}, {24: (37, 37, 768)}),
        ("clip_vit_b16", 448, 512, {layer: (28, 28, 768) for layer in (4, 7, 10, 12)}, {}),
        ("dinov3_vitb16", 448, 768, {layer: (28, 28, 768) for layer in (4, 7, 10, 12)}, {}),
        ("dinov2_vitb14", 448, 768, {layer: (32, 32, 768) for layer in (4, 7, 10, 12)}, {}),
    ],
)
def test_paper_configs_have_paper_shapes(config, side, cls_dim, grids, projected):
    """Real architectures, random weights, on the meta device: shapes without the compute."""
    cfg = OmegaConf.load(CONF / f"{config}.yaml")
    cfg.pretrained = None
    with torch.device("meta"):
        encoder = instantiate(cfg)
        features = encoder(torch.empty(1, 3, side, side))
    assert encoder.image_size == side and encoder.preprocess.crop == side
    assert features.cls.shape == (1, cls_dim)
    assert {k: tuple(v.shape[1:]) for k, v in features.patches.items()} == grids
    assert {k: tuple(v.shape[1:]) for k, v in features.projected.items()} == projected
    assert encoder.grid_size == next(iter(grids.values()))[0]


def test_bf16_autocast_on_cpu_stays_close_and_returns_fp32(images):
    reference = tiny_clip()(images)
    low = tiny_clip(precision="bf16")(images)
    assert low.patches[4].dtype == torch.float32 and low.cls.dtype == torch.float32
    torch.testing.assert_close(low.patches[4], reference.patches[4], rtol=0.1, atol=0.1)


def test_openai_tag_is_read_from_hub_cache_offline(monkeypatch, tmp_path, images):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tiny_clip(seed=4)
    repo = (
        tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    )  # open_clip's hub repo for ViT-B-16/openai
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    save_file(
        {k: v.contiguous() for k, v in source.model.state_dict().items()},
        str(snapshot / "open_clip_model.safetensors"),
    )

    loaded = tiny_clip(pretrained="openai", cache_dir=str(tmp_path))
    assert loaded.fingerprint()["weights"] == {"kind": "tag", "tag": "openai"}
    torch.testing.assert_close(loaded(images).patches[4], source(images).patches[4])
