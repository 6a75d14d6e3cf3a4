"""The precision policy: one override switches the encoder's arithmetic and the float32 matmul precision,
and retrieval stays IEEE float32 whatever the policy lets other matmuls do."""

from __future__ import annotations

import logging

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from anomret.config import config_dir
from anomret.encoders.postprocess import autocast
from anomret.precision import PrecisionPolicy
from anomret.retrieval.softmax import softmax_retrieve
from anomret.retrieval.spatial import global_topk

ENCODERS = sorted(path.stem for path in (config_dir() / "encoder").glob("*.yaml"))
PAPER_EXPERIMENTS = sorted(
    path.stem
    for path in (config_dir() / "experiment").glob("*.yaml")
    if path.stem.startswith(("mrad_", "rad_"))
)


@pytest.fixture
def restore_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(previous)


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize(("policy", "arithmetic"), [("exact", "fp32"), ("tf32", "tf32"), ("fast", "bf16")])
def test_one_override_sets_every_encoders_arithmetic(encoder, policy, arithmetic):
    cfg = _compose([f"encoder={encoder}", f"precision={policy}"])
    assert cfg.encoder.precision == arithmetic
    assert PrecisionPolicy.from_config(cfg.precision_policy).name == policy


@pytest.mark.parametrize("encoder", ENCODERS)
def test_an_encoder_config_read_on_its_own_is_fp32(encoder):
    assert OmegaConf.load(config_dir() / "encoder" / f"{encoder}.yaml").precision == "fp32"


def test_default_is_exact_and_an_explicit_encoder_precision_still_wins():
    cfg = _compose([])
    policy = cfg.precision_policy
    assert (policy.name, cfg.encoder.precision, policy.matmul) == ("exact", "fp32", "highest")
    assert _compose(["encoder.precision=bf16"]).encoder.precision == "bf16"


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_experiments_run_exact_unless_told_otherwise(experiment):
    assert _compose([f"+experiment={experiment}"]).precision_policy.name == "exact"
    assert _compose([f"+experiment={experiment}", "precision=fast"]).encoder.precision == "bf16"


def test_apply_sets_the_float32_matmul_precision(restore_matmul_precision):
    PrecisionPolicy(name="fast", encoder="bf16", matmul="high").apply()
    assert torch.get_float32_matmul_precision() == "high"
    PrecisionPolicy().apply()
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize(
    "node", [{"encoder": "fp8"}, {"matmul": "tf32"}, {"name": "exact", "autocast": "bf16"}]
)
def test_bad_policy_values_are_refused_by_name(node):
    with pytest.raises(ValueError, match="precision"):
        PrecisionPolicy.from_config(node)


def test_record_says_what_the_run_used():
    record = PrecisionPolicy(name="fast", encoder="bf16", matmul="high").record("bf16")
    assert record == {
        "policy": "fast",
        "encoder": "bf16",
        "float32_matmul": "high",
        "retrieval": "fp32 (IEEE)",
    }


@pytest.mark.parametrize(("precision", "inside"), [("fp32", "highest"), ("tf32", "high"), ("bf16", "high")])
def test_encoder_arithmetic_ignores_the_process_setting(restore_matmul_precision, precision, inside):
    for outside in ("highest", "high"):
        torch.set_float32_matmul_precision(outside)
        with autocast(precision, torch.device("cpu")):
            assert torch.get_float32_matmul_precision() == inside
        assert torch.get_float32_matmul_precision() == outside


def test_retrieval_matmuls_are_ieee_float32_under_a_tf32_policy(restore_matmul_precision, monkeypatch):
    seen = []
    matmul = torch.Tensor.__matmul__

    def spy(self, other):
        seen.append(torch.get_float32_matmul_precision())
        return matmul(self, other)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    torch.set_float32_matmul_precision("high")
    softmax_retrieve(torch.randn(5, 8), torch.randn(7, 8), torch.eye(7)[:, :2])
    global_topk(torch.randn(3, 8), torch.randn(9, 8), 2)
    assert seen and set(seen) == {"highest"}


def test_lightnings_tf32_hint_is_settled_by_the_policy_even_verbose(restore_matmul_precision, caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    PrecisionPolicy().apply()  # exact: IEEE float32 on purpose
    with caplog.at_level(logging.INFO):
        rank_zero_info("You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly ...")
        rank_zero_info("another line")
    assert "Tensor Cores" not in caplog.text and "another line" in caplog.text
