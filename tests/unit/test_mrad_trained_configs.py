"""The MRAD-FT/CLIP recipes compose to the official constants; the paper's values are one named override."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from anomret.config import config_dir


def _cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize(
    ("experiment", "target", "aux"),
    [
        ("mrad_ft_mvtec", "mvtec", "visa"),
        ("mrad_ft_visa", "visa", "mvtec"),
        ("mrad_clip_mvtec", "mvtec", "visa"),
        ("mrad_clip_visa", "visa", "mvtec"),
    ],
)
def test_recipes_train_on_the_other_dataset_with_the_official_constants(experiment, target, aux):
    cfg = _cfg(f"+experiment={experiment}")
    method = experiment.rsplit("_", 1)[0]
    assert cfg.dataset.name == target and cfg.aux_dataset.name == aux
    assert cfg.aux_dataset.split == "test" and cfg.aux_dataset.require_masks is True
    assert cfg.encoder.name == "clip_vit_l14_336" and cfg.encoder.image_size == 518
    assert cfg.model._target_.endswith({"mrad_ft": "MRADFT", "mrad_clip": "MRADCLIP"}[method])
    assert cfg.memory._target_.endswith("LabeledMemorySettings")
    assert cfg.features.enabled is True and cfg.data.batch_size == 8 and cfg.data.shuffle_aux is True
    model = cfg.model
    assert (model.lr, list(model.betas), model.patch_drop_ratio, model.image_drop_ratio) == (
        4e-4,
        [0.5, 0.999],
        0.2,
        0.05,
    )
    assert model.score.retrieval_weight == 0.7 and model.score.top_k_ratio == 0.01 and model.map.sigma == 4.0
    if method == "mrad_ft":
        assert cfg.trainer.max_epochs == 1 and model.lr_schedule == "cosine" and model.min_lr == 1e-6
    else:
        assert cfg.trainer.max_epochs == 6 and model.ft_epochs == 1 and model.lr_schedule == "constant"
        assert (
            model.prompts.n_ctx,
            model.prompts.deep_length,
            model.prompts.deep_layers,
            model.prompts.deep_start,
        ) == (12, 4, 8, 2)
        assert (
            model.prompts.class_name,
            model.prompts.normal_template,
            model.prompts.anomalous_template,
        ) == (
            "object",
            "{}",
            "damaged {}",
        )
        assert (model.prompts.bias_source, model.prior_threshold, model.text_temperature) == (
            "dual",
            0.5,
            0.07,
        )


def test_paper_values_are_named_variants():
    cfg = _cfg("+experiment=mrad_clip_visa", "+variant=[paper_lr,paper_prompts,visa_dropout]")
    assert cfg.model.lr == 5e-4
    assert cfg.model.prompts.normal_template == "good {}"
    assert cfg.model.patch_drop_ratio == 0.15
    assert _cfg("+experiment=mrad_ft_mvtec", "+variant=paper_lr").model.lr == 5e-4
