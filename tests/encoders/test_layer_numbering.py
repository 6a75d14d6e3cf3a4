"""One layer numbering for every encoder: layer ``l`` is the output of the ``l``-th transformer block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"


def _block_outputs(encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's patch tokens, computed by walking the blocks by hand (index 0 = the first block)."""
    if hasattr(encoder.model, "visual"):  # open_clip: token order [CLS, patches], ln_post on intermediates
        visual = encoder.model.visual
        tokens = visual._embeds(images)
        outputs = []
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
            outputs.append(visual.ln_post(tokens)[:, 1:])
        return outputs
    model = encoder.model  # timm: [prefix tokens, patches], the final norm on intermediates
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(model.norm(tokens)[:, model.num_prefix_tokens :])
    return outputs


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("tiny_clip", {"vv_blocks": None, "patch_stream": "original", "neighbor_kernels": None}),
        ("tiny_vit", {}),
    ],
)
def test_the_same_layer_number_selects_the_same_block_in_clip_and_timm_encoders(config, overrides):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{config}.yaml"), {"layers": [1, 2, 3, 4], **overrides})
    encoder = instantiate(cfg)
    images = torch.randn(
        2, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        features = encoder(images)
        blocks = _block_outputs(encoder, images)
    side = encoder.grid_size
    assert sorted(features.patches) == [1, 2, 3, 4] and len(blocks) == 4
    for layer in (1, 2, 3, 4):
        expected = blocks[layer - 1].reshape(2, side, side, -1)
        torch.testing.assert_close(features.patches[layer], expected)
    for outside in ([0], [5]):
        with pytest.raises(InstantiationException, match=r"1-based block numbers in \[1, 4\]"):
            instantiate(OmegaConf.merge(cfg, {"layers": outside}))
