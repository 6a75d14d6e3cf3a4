"""Configs that cannot make a valid run fail before anything is built."""

from __future__ import annotations

import pytest

from anomret.pipeline import ConfigError, validate_config


def test_default_and_demo_configs_are_valid(compose_config):
    validate_config(compose_config([]))
    validate_config(compose_config(["+experiment=demo"]))


def test_model_and_memory_of_different_kinds_are_refused(compose_config):
    cfg = compose_config(["+experiment=demo", "memory._target_=anomret.memory.base.MemorySettings"])
    with pytest.raises(ConfigError, match=r"needs memory kind 'labeled'.*method=mrad_tf"):
        validate_config(cfg)


def test_feature_store_needs_a_directory(compose_config):
    with pytest.raises(ConfigError, match=r"features.dir"):
        validate_config(compose_config(["+experiment=demo", "features.enabled=true", "features.dir=null"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("memory.max_patch_entries=-1", r"memory.max_patch_entries must be a positive integer or null"),
        ("memory.max_image_entries=0", r"memory.max_image_entries must be a positive integer or null"),
        ("memory.layer=7", r"memory.layer=7 is not extracted by the encoder"),
    ],
)
def test_memory_settings_are_checked_before_the_memory_pass(compose_config, tmp_path, override, message):
    from anomret.pipeline import run

    with pytest.raises(ValueError, match=message):
        run(compose_config(["+experiment=demo", override]), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors")), "nothing was built"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.top_k_ratio=0", r"model.top_k_ratio must be a number in \(0, 1\]"),
        ("model.top_k_ratio=1.5", r"model.top_k_ratio must be a number in \(0, 1\]"),
        ("model.image_score_weight=-0.1", r"model.image_score_weight must be a number in \[0, 1\]"),
    ],
)
def test_model_values_are_checked_at_construction(compose_config, tmp_path, override, message):
    from anomret.pipeline import run

    with pytest.raises(ValueError, match=message):
        run(compose_config(["+experiment=demo", override]), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors"))


def test_bad_evaluation_source_fails_before_the_bank_is_built(compose_config, tmp_path):
    from anomret.pipeline import run

    with pytest.raises(Exception, match=r"nope"):
        run(compose_config(["+experiment=demo", "dataset.categories=[weave,nope]"]), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors"))
