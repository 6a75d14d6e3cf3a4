"""Every ``conf/encoder`` file builds (random weights, on the meta device: shapes without the compute) and
returns the layers it names as grids of its own size; a new encoder config is covered by default."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anomret.config import config_dir

ENCODERS = sorted(path.stem for path in (config_dir() / "encoder").glob("*.yaml"))


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_config_builds_and_returns_its_layers(name):
    cfg = OmegaConf.load(config_dir() / "encoder" / f"{name}.yaml")
    cfg.pretrained = None
    with torch.device("meta"):
        encoder = instantiate(cfg)
        side = encoder.image_size
        features = encoder(torch.empty(2, 3, side, side))
    grid = side // encoder.patch_size
    assert sorted(features.patches) == sorted(cfg.layers) == list(encoder.layers)
    assert features.cls.shape == (2, encoder.cls_dim)
    for layer, patches in features.patches.items():
        assert patches.shape == (2, grid, grid, encoder.patch_dim), layer
    assert encoder.preprocess.crop == side and not any(p.requires_grad for p in encoder.parameters())
