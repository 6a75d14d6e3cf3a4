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
        (
            "memory.max_patch_entries=-1",
            r"memory.max_patch_entries must be an integer >= 1 or null \(keep everything\)",
        ),
        (
            "memory.max_image_entries=0",
            r"memory.max_image_entries must be an integer >= 1 or null \(keep everything\)",
        ),
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
        ("model.map_sigma=-1", r"model.map_sigma must be a number >= 0, got -1"),
        ("model.map_size=0", r"model.map_size must be an integer >= 1, got 0"),
        ("+model.map_kernel_size=4", r"model.map_kernel_size must be odd"),
        ("retrieval.tau=0", r"retrieval.tau must be a number > 0, got 0"),
        ("retrieval.key_chunk=0", r"retrieval.key_chunk must be an integer >= 1"),
        ("data.batch_size=0", r"data.batch_size must be an integer >= 1, got 0"),
        ("data.eval_batch_size=0", r"data.eval_batch_size must be an integer >= 1 or null"),
        ("data.num_workers=-1", r"data.num_workers must be an integer >= 0, got -1"),
        ("data.mask_threshold=1.5", r"data.mask_threshold must be a number in \[0, 1\)"),
        ("evaluation.aupro_fpr_limit=0", r"evaluation.aupro_fpr_limit must be a number in \(0, 1\]"),
        (
            "evaluation.aupro_num_thresholds=0",
            r"evaluation.aupro_num_thresholds must be an integer >= 1 or null",
        ),
    ],
)
def test_model_values_are_checked_at_construction(compose_config, tmp_path, override, message):
    from anomret.pipeline import run

    with pytest.raises(ValueError, match=message):
        run(compose_config(["+experiment=demo", override]), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retrieval.k=0", r"retrieval.k must be an integer >= 1 or null \(every memory image"),
        ("retrieval.rho=-1", r"retrieval.rho must be an integer >= 0 or null \(the whole grid"),
        ("retrieval.tile=0", r"retrieval.tile must be an integer >= 1, got 0"),
        ("memory.shots=0", r"memory.shots must be an integer >= 1 or null \(every train image\)"),
    ],
)
def test_rad_values_are_checked_before_the_memory_pass(compose_config, tmp_path, override, message):
    from anomret.pipeline import run

    with pytest.raises(ValueError, match=message):
        run(compose_config(["+experiment=demo_rad", override]), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors"))


def test_bad_evaluation_source_fails_before_the_bank_is_built(compose_config, tmp_path):
    from anomret.pipeline import run

    with pytest.raises(Exception, match=r"nope"):
        run(compose_config(["+experiment=demo", "dataset.categories=[weave,nope]"]), fit=True)
    assert not list(tmp_path.glob(".cache/banks/*.safetensors"))


def test_loader_settings_are_checked_even_when_the_bank_is_cached(compose_config, tmp_path):
    """A cached bank skips the memory pass, whose loader used to be the only check of the batch size."""
    from anomret.pipeline import run

    run(compose_config(["+experiment=demo", "logger=none", "callbacks.overlays=null"]), fit=True)
    assert list(tmp_path.glob(".cache/banks/*.safetensors"))
    with pytest.raises(ValueError, match=r"data.batch_size must be an integer >= 1, got 0"):
        run(compose_config(["+experiment=demo", "logger=none", "data.batch_size=0"]), fit=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.eval_batch_size=0", r"data.eval_batch_size must be an integer >= 1"),
        ("data.num_workers=-2", r"data.num_workers must be an integer >= 0"),
        ("show_top=-1", r"show_top must be an integer >= 0"),
        ("model.map_sigma=-1", r"model.map_sigma must be a number >= 0"),
    ],
)
def test_predict_checks_its_settings_before_reading_the_bank(compose_config, tmp_path, override, message):
    from PIL import Image

    from anomret.pipeline import predict

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    missing = tmp_path / "missing.safetensors"
    overrides = ["+experiment=demo", f"memory.path={missing}", f"input={tmp_path / 'images'}"]
    with pytest.raises(ValueError, match=message):
        predict(compose_config([*overrides, override], config_name="predict"))


def test_ddp_training_of_mrad_clip_looks_for_unused_parameters(compose_config):
    # MRAD-CLIP leaves the prompts unused in its FT stage and the heads in its CLIP stage: DDP training must
    # look for unused parameters; an evaluation or a prediction trains nothing and runs under plain DDP.
    from anomret.pipeline import build, build_model, build_trainer

    cfg = compose_config(["+experiment=demo_mrad_clip", "trainer=ddp_cpu"])
    validate_config(cfg)
    model = build_model(cfg, build(cfg.encoder))
    trainer = build_trainer(cfg, [], [], trained=model)
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True
    assert not build_trainer(cfg, [], []).strategy._ddp_kwargs.get("find_unused_parameters")
    explicit_off = compose_config(
        ["+experiment=demo_mrad_clip", "trainer=ddp_cpu", "trainer.strategy=ddp_find_unused_parameters_false"]
    )
    with pytest.raises(ConfigError, match=r"Fix: trainer.strategy=ddp_find_unused_parameters_true"):
        validate_config(explicit_off)
    validate_config(explicit_off, fits=False)


def test_appending_to_a_bank_of_a_kind_that_cannot_grow_is_refused(compose_config, tmp_path):
    from anomret.pipeline import append_memory

    overrides = ["method=mrad_tf", "+experiment=demo", f"memory.path={tmp_path / 'bank.safetensors'}"]
    cfg = compose_config(overrides, "append")
    with pytest.raises(ConfigError, match=r"memory=labeled banks cannot be appended to"):
        append_memory(cfg)
    assert not (tmp_path / "bank.safetensors").exists()
