"""Configs that cannot make a valid run fail before anything is built, in one line that says how to fix it."""

from __future__ import annotations

import pytest

from anomret.assembly import Assembly
from anomret.contracts import ConfigError, Purpose, check_config


def test_default_and_demo_configs_are_valid(compose_config):
    check_config(compose_config([]), Purpose.TRAIN)
    check_config(compose_config(["+experiment=demo"]), Purpose.TRAIN)


def test_model_and_memory_of_different_kinds_are_refused(compose_config):
    cfg = compose_config(["+experiment=demo", "memory=normal"])
    with pytest.raises(ConfigError, match=r"reads a 'labeled' memory but memory=normal.*method=mrad_tf"):
        check_config(cfg, Purpose.TRAIN)


def test_a_retrieval_the_method_cannot_call_is_refused_before_anything_is_built(compose_config):
    # Once a raw TypeError ("'SpatialRetrieval' object is not callable") after the bank was built.
    with pytest.raises(ConfigError, match=r"mrad_tf uses 'softmax' retrieval but retrieval=spatial"):
        check_config(compose_config(["+experiment=demo", "retrieval=spatial"]), Purpose.TRAIN)


def test_feature_store_needs_a_directory(compose_config):
    with pytest.raises(ConfigError, match=r"features.dir"):
        check_config(
            compose_config(["+experiment=demo", "features.enabled=true", "features.dir=null"]), Purpose.TRAIN
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+model.top_k_ration=0.1",
            r"model.top_k_ration is not a setting of MRADTF \(did you mean model.score.top_k_ratio\?\)",
        ),
        (
            "+model.top_k_ratio=0.1",
            r"model.top_k_ratio is not a setting of MRADTF \(did you mean model.score.top_k_ratio\?\)",
        ),
        (
            "+model.map.sigmaa=2",
            r"model.map.sigmaa is not a setting of MRADTF \(did you mean model.map.sigma\?\)",
        ),
        ("+memory.apend=true", r"memory.apend is not a setting of LabeledMemorySettings"),
        (
            "+retrieval.tauu=2",
            r"retrieval.tauu is not a setting of SoftmaxRetriever \(did you mean retrieval.tau\?\)",
        ),
    ],
)
def test_a_mistyped_setting_is_named_with_the_closest_real_one(compose_config, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(["+experiment=demo", override]), Purpose.TRAIN)


def test_nested_option_groups_are_checked_too(compose_config):
    with pytest.raises(
        ConfigError, match=r"model.prompts.bias_sourc is not a setting of MRADCLIP.*bias_source"
    ):
        check_config(
            compose_config(["+experiment=demo_mrad_clip", "+model.prompts.bias_sourc=none"]), Purpose.TRAIN
        )


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
        ("model.score.top_k_ratio=0", r"model.score.top_k_ratio must be a number in \(0, 1\]"),
        ("model.score.top_k_ratio=1.5", r"model.score.top_k_ratio must be a number in \(0, 1\]"),
        ("model.score.retrieval_weight=-0.1", r"model.score.retrieval_weight must be a number in \[0, 1\]"),
        ("model.map.sigma=-1", r"model.map.sigma must be a number >= 0, got -1"),
        ("model.map.size=0", r"model.map.size must be an integer >= 1, got 0"),
        ("+model.map.kernel_size=4", r"model.map.kernel_size must be odd"),
        ("retrieval.tau=0", r"retrieval.tau must be a number > 0, got 0"),
        ("retrieval.key_chunk=0", r"retrieval.key_chunk must be an integer >= 1"),
        ("evaluation.aupro_fpr_limit=0", r"evaluation.aupro_fpr_limit must be a number in \(0, 1\]"),
        (
            "evaluation.aupro_num_thresholds=0",
            r"evaluation.aupro_num_thresholds must be an integer >= 1 or null",
        ),
    ],
)
def test_values_are_checked_when_the_parts_are_built(compose_config, override, message):
    with pytest.raises(ValueError, match=message):
        Assembly.build(compose_config(["+experiment=demo", override]), Purpose.TRAIN)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", r"data.batch_size must be an integer >= 1, got 0"),
        ("data.eval_batch_size=0", r"data.eval_batch_size must be an integer >= 1 or null"),
        ("data.num_workers=-1", r"data.num_workers must be an integer >= 0, got -1"),
        ("data.mask_threshold=1.5", r"data.mask_threshold must be a number in \[0, 1\)"),
    ],
)
def test_loader_settings_are_checked_with_the_data(compose_config, override, message):
    parts = Assembly.build(compose_config(["+experiment=demo", override]), Purpose.TRAIN)
    with pytest.raises(ValueError, match=message):
        parts.datamodule()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retrieval.k=0", r"retrieval.k must be an integer >= 1 or null \(every memory image"),
        ("retrieval.rho=-1", r"retrieval.rho must be an integer >= 0 or null \(the whole grid"),
        ("retrieval.tile=0", r"retrieval.tile must be an integer >= 1, got 0"),
        ("memory.shots=0", r"memory.shots must be an integer >= 1 or null \(every train image\)"),
        ("memory.layers=[7]", r"memory.layers=\[7\] must be a non-empty subset of the encoder's layers"),
    ],
)
def test_rad_values_are_checked_when_the_parts_are_built(compose_config, override, message):
    with pytest.raises(ValueError, match=message):
        parts = Assembly.build(compose_config(["+experiment=demo_rad", override]), Purpose.TRAIN)
        parts.settings.build_settings(parts.encoder)


def test_bad_evaluation_source_fails_when_the_data_is_read(compose_config):
    parts = Assembly.build(
        compose_config(["+experiment=demo", "dataset.categories=[weave,nope]"]), Purpose.TRAIN
    )
    with pytest.raises(Exception, match=r"nope"):
        parts.datamodule()


def test_ddp_training_of_mrad_clip_looks_for_unused_parameters(compose_config):
    # MRAD-CLIP leaves the prompts unused in its FT stage and the heads in its CLIP stage: DDP training must
    # look for unused parameters; an evaluation or a prediction trains nothing and runs under plain DDP.
    cfg = compose_config(["+experiment=demo_mrad_clip", "trainer=ddp_cpu"])
    assert (
        Assembly.build(cfg, Purpose.TRAIN).trainer().strategy._ddp_kwargs.get("find_unused_parameters")
        is True
    )
    evaluation = compose_config(["+experiment=demo_mrad_clip", "trainer=ddp_cpu", "ckpt_path=last.ckpt"])
    check_config(evaluation, Purpose.EVAL)
    explicit_off = compose_config(
        ["+experiment=demo_mrad_clip", "trainer=ddp_cpu", "trainer.strategy=ddp_find_unused_parameters_false"]
    )
    with pytest.raises(ConfigError, match=r"Fix: trainer.strategy=ddp_find_unused_parameters_true"):
        check_config(explicit_off, Purpose.TRAIN)


def test_appending_to_a_bank_of_a_kind_that_cannot_grow_is_refused_with_a_fix_that_works(
    compose_config, tmp_path
):
    overrides = ["+experiment=demo", f"memory.path={tmp_path / 'bank.safetensors'}"]
    with pytest.raises(
        ConfigError, match=r"anomret.append extends RAD's normal-image banks.*run anomret.train"
    ) as info:
        check_config(compose_config(overrides, "append"), Purpose.APPEND)
    assert "method=mrad_tf" not in str(info.value)
    with pytest.raises(ConfigError, match=r"anomret.append needs memory.path="):
        check_config(compose_config(["+experiment=demo_rad"], "append"), Purpose.APPEND)


def test_evaluating_a_trained_method_names_every_missing_file_at_once(compose_config):
    # Once: first "needs memory.path", then, once given, "needs ckpt_path".
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(["+experiment=demo_mrad_ft"], "eval"), Purpose.EVAL)
    message = str(info.value)
    assert "needs its trained parts (ckpt_path=) and the bank they were trained with" in message
    assert "Run: python -m anomret.eval" in message and "ckpt_path=" in message
    assert "\n" not in message
    # A checkpoint names its bank: nothing else is missing.
    check_config(compose_config(["+experiment=demo_mrad_ft", "ckpt_path=x.ckpt"], "eval"), Purpose.EVAL)
    with pytest.raises(ConfigError, match=r"needs a memory bank \(memory.path=\)"):
        check_config(compose_config(["+experiment=demo"], "eval"), Purpose.EVAL)
    with pytest.raises(ConfigError, match=r"needs its trained parts"):
        check_config(
            compose_config(["+experiment=demo_mrad_clip", "memory.path=bank.safetensors"], "predict"),
            Purpose.PREDICT,
        )


def test_the_missing_checkpoint_hint_names_the_latest_train_run(compose_config, tmp_path):
    run_dir = tmp_path / "logs" / "demo_mrad_ft" / "train" / "2026-01-01"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "artifacts.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"ckpt_path={run_dir.resolve()}/checkpoints/last.ckpt"):
        check_config(compose_config(["+experiment=demo_mrad_ft"], "eval"), Purpose.EVAL)


def test_the_similarity_analysis_is_refused_for_rad(compose_config):
    with pytest.raises(ConfigError, match=r"similarity analysis reads MRAD's labelled memory"):
        check_config(compose_config(["+experiment=demo_rad", "memory.path=b"], "eval"), Purpose.ANALYSE)


def test_a_method_class_without_declared_needs_or_a_report_setting_out_of_range_is_refused(compose_config):
    with pytest.raises(ConfigError, match="declares no needs: a method class sets needs = MethodNeeds"):
        check_config(
            compose_config(["+experiment=demo", "model._target_=anomret.models.base.RetrievalModule"]),
            Purpose.TRAIN,
        )
    with pytest.raises(ConfigError, match="report_figures must be auto, always or never, got 'sometimes'"):
        check_config(compose_config(["+experiment=demo", "report_figures=sometimes"]), Purpose.TRAIN)
