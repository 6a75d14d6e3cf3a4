"""MRAD-FT and MRAD-CLIP on the synthetic data with the tiny CLIP: the method pinned, the runs end to end.

One demo run per method is trained once per module (``trained`` fixture) and reused by the tests that
need a checkpoint; everything else builds the real components from the composed configs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from anomret.assembly import Assembly, build, build_model
from anomret.config import config_dir
from anomret.contracts import ConfigError, Purpose
from anomret.memory.store import BankError
from anomret.models.checkpoint import CheckpointError, load_checkpoint
from anomret.models.mrad_clip import MRADCLIP
from anomret.models.mrad_ft import MRADFT
from anomret.models.official_checkpoint import official_state_dicts
from anomret.pipeline import run

from .cli import run_cli, unexpected_lines


def _compose(root: Path, data_dir: Path, overrides: list[str], config_name: str = "config") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[
                f"paths.root_dir={root}",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={root / 'run'}",
                "logger=none",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.callbacks = None
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["categories"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """The two demos trained once: run directories, checkpoints and the log of the CLIP run."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, extra in (("ft", []), ("clip", ["trainer.max_epochs=2"])):
        cfg = _compose(
            root, data_dir, [f"+experiment=demo_mrad_{name}", f"paths.output_dir={root / name}", *extra]
        )
        run(cfg, fit=True)
        runs[name] = root / name
    return root, runs


@pytest.fixture
def parts(tmp_path, data_dir):
    """Real components of a composed demo run, with the bank built: ``(cfg, model, datamodule)``."""

    def _build(overrides: list[str]):
        cfg = _compose(tmp_path, data_dir, overrides)
        lightning.seed_everything(0)
        assembled = Assembly.build(cfg, Purpose.TRAIN)
        datamodule = assembled.datamodule()
        assembled.attach_memory(assembled.trainer(), datamodule)
        return cfg, assembled.model, datamodule

    return _build


def _first_batch(datamodule) -> dict:
    return next(iter(datamodule.aux_dataloader()))


# ----------------------------------------------------------------------------------- the method
def test_identity_heads_with_zero_bias_score_exactly_as_mrad_tf(parts):
    # out_dim 64 ≥ both input sizes (patch 64, image 32), so the identity map exists.
    _, ft, datamodule = parts(["+experiment=demo_mrad_ft", "model.head_init=identity", "model.out_dim=64"])
    _, tf, _ = parts(["+experiment=demo_mrad_tf", "features.enabled=true"])
    assert all(float(p.bias.detach().abs().max()) == 0 for p in (ft.heads.patch.query, ft.heads.image.key))
    batch = _first_batch(datamodule)
    ft.eval()
    ft._bank_to_device()
    with torch.no_grad():
        features = ft.features(batch)
        got, expected = ft.score(features), tf.score(features)
    torch.testing.assert_close(got.patch_scores, expected.patch_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.image_retrieval, expected.image_retrieval, rtol=0, atol=1e-6)
    # Trained (non-identity) heads do move the scores: the comparison above can fail.
    with torch.no_grad():
        ft.heads.patch.query.weight.mul_(3).add_(0.1)
    ft._projected = None
    with torch.no_grad():
        moved = ft.score(features).patch_scores
    assert (moved - expected.patch_scores).abs().max() > 1e-3


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}


@pytest.mark.parametrize("stage", ["ft", "clip"])
def test_one_step_trains_only_heads_or_prompts_and_lowers_the_loss(parts, stage):
    # ft_epochs=0 starts in the CLIP stage (heads frozen); ft_epochs=1 trains the heads first.
    _, model, datamodule = parts(
        [
            "+experiment=demo_mrad_clip",
            f"model.ft_epochs={1 if stage == 'ft' else 0}",
            "data.shuffle_aux=false",
        ]
    )
    batch = _first_batch(datamodule)
    loss_of = model.ft_loss if stage == "ft" else model.clip_loss
    with torch.no_grad():
        model._bank_to_device()
        before_loss = float(loss_of(model.features(batch), batch)[0])
    encoder, heads, prompts = _snapshot(model.encoder), _snapshot(model.heads), _snapshot(model.prompts)
    text_before = {n: b.clone() for n, b in model.text.state_dict().items()}

    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=datamodule.aux_dataloader())

    assert not _changed(encoder, model.encoder), "the frozen encoder (and its text tower) moved"
    assert all(torch.equal(text_before[n], b) for n, b in model.text.state_dict().items())
    if stage == "ft":
        assert _changed(heads, model.heads) == set(heads), "every head parameter learns in the FT stage"
        assert not _changed(prompts, model.prompts), "prompts do not learn in the FT stage"
    else:
        assert not _changed(heads, model.heads), "the heads are frozen in the CLIP stage"
        # Untrained heads find no anomalous region in this batch: the anomalous prototype is the zero
        # vector, so only that map's weight has no gradient; everything else of the prompts learns.
        assert _changed(prompts, model.prompts) >= set(prompts) - {"prompt_bias.anomalous.weight"}
    model._projected = None
    with torch.no_grad():
        after_loss = float(loss_of(model.features(batch), batch)[0])
    assert after_loss < before_loss


# ---------------------------------------------------------------------------------- end to end
def test_demos_write_small_checkpoints_that_eval_reproduces(trained, data_dir):
    root, runs = trained
    for name, run_dir in runs.items():
        path = run_dir / "checkpoints" / "last.ckpt"
        checkpoint = load_checkpoint(path)
        keys = list(checkpoint["state_dict"])
        assert keys and not [k for k in keys if k.startswith(("encoder.", "text."))], keys
        expected = {"ft": ("heads.",), "clip": ("heads.", "prompts.")}[name]
        assert {k.split(".")[0] + "." for k in keys if k.startswith(("heads.", "prompts."))} == set(expected)
        assert checkpoint["method"] == f"mrad_{name}" and checkpoint["bank"]["identity"]
        # Trained state + Adam moments of a few thousand numbers: far below the encoder's weights.
        assert path.stat().st_size < 400_000, path.stat().st_size

        eval_dir = root / f"{name}_eval"
        cfg = _compose(
            root,
            data_dir,
            [f"+experiment=demo_mrad_{name}", f"ckpt_path={path}", f"paths.output_dir={eval_dir}"],
            "eval",
        )
        run(cfg, fit=False)
        assert _results(eval_dir) == _results(run_dir), name


def test_later_epochs_read_every_feature_from_the_store(tmp_path, data_dir, caplog):
    cfg = _compose(tmp_path, data_dir, ["+experiment=demo_mrad_ft", "trainer.max_epochs=2"])
    with caplog.at_level(logging.INFO, logger="anomret"):
        run(cfg, fit=True)
    # The memory pass encodes the 42 auxiliary images once (the bank is built from the store's rounded
    # features); both epochs then read them, and the test pass encodes the 42 evaluation images.
    assert "epoch 1: 0 image(s) encoded, 42 read from the feature store" in caplog.text
    assert "epoch 2: 0 image(s) encoded, 42 read from the feature store" in caplog.text
    assert "features: 84 image(s) encoded, 84 read from the feature store" in caplog.text


def test_official_checkpoint_files_are_evaluated_without_training(trained, data_dir, tmp_path):
    root, runs = trained
    cfg = _compose(
        root,
        data_dir,
        ["+experiment=demo_mrad_clip", f"ckpt_path={runs['clip'] / 'checkpoints' / 'last.ckpt'}"],
        "eval",
    )
    encoder = build(cfg.encoder)
    model = build_model(cfg, encoder)
    model.load_state_dict(load_checkpoint(cfg.ckpt_path)["state_dict"])
    official = tmp_path / "mrad_clip_final.pth"
    torch.save(official_state_dicts(model.heads, model.prompts), official)

    out = tmp_path / "official"
    cfg = _compose(
        root,
        data_dir,
        ["+experiment=demo_mrad_clip", f"model.official_checkpoint={official}", f"paths.output_dir={out}"],
    )
    run(cfg, fit=True)  # the bank is reused from the cache; nothing trains
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "artifacts.json").read_text())["checkpoint"] is None
    assert _results(out) == _results(runs["clip"])

    # An MRAD-FT file has no prompts: refused for MRAD-CLIP, loaded by MRAD-FT.
    ft_file = tmp_path / "mrad_ft_final.pth"
    torch.save(official_state_dicts(model.heads), ft_file)
    with pytest.raises(ValueError, match="prompt_learner: missing"):
        build_model(
            _compose(root, data_dir, ["+experiment=demo_mrad_clip", f"model.official_checkpoint={ft_file}"]),
            encoder,
        )
    ft = build_model(
        _compose(root, data_dir, ["+experiment=demo_mrad_ft", f"model.official_checkpoint={ft_file}"]),
        encoder,
    )
    assert isinstance(ft, MRADFT) and not ft.trains
    assert torch.equal(ft.heads.patch.key.weight, model.heads.patch.key.weight)


# ------------------------------------------------------------------------------ errors up front
def test_mismatched_or_missing_checkpoints_are_refused_saying_what_differs(trained, data_dir, tmp_path):
    root, runs = trained
    ft_ckpt = runs["ft"] / "checkpoints" / "last.ckpt"

    def evaluate(overrides):
        run(
            _compose(root, data_dir, [f"paths.output_dir={tmp_path / 'eval'}", *overrides], "eval"), fit=False
        )

    # Another encoder: its bank is refused first (the checkpoint names its bank) ...
    with pytest.raises(BankError, match=r"built by another encoder .*differs in weights"):
        evaluate(["+experiment=demo_mrad_ft", f"ckpt_path={ft_ckpt}", "encoder.seed=1"])
    # ... and with a bank of that encoder, the checkpoint itself.
    seed_bank = tmp_path / "seed1.safetensors"
    run(
        _compose(tmp_path, data_dir, ["+experiment=demo", f"memory.path={seed_bank}", "encoder.seed=1"]),
        fit=True,
    )
    with pytest.raises(CheckpointError, match=r"trained on encoder tiny_clip .*differ in: .*weights"):
        evaluate(
            ["+experiment=demo_mrad_ft", f"ckpt_path={ft_ckpt}", "encoder.seed=1", f"memory.path={seed_bank}"]
        )
    with pytest.raises(CheckpointError, match=r"trained for mrad_ft.*method=mrad_ft"):
        evaluate(["+experiment=demo_mrad_clip", f"ckpt_path={ft_ckpt}"])
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(["+experiment=demo_mrad_ft", f"ckpt_path={tmp_path / 'nothing.ckpt'}"])
    with pytest.raises(ConfigError, match="ckpt_path="):
        evaluate(["+experiment=demo_mrad_ft", f"memory.path={load_checkpoint(ft_ckpt)['bank']['path']}"])
    # Another bank (a subsampled memory) than the heads were trained with.
    other_bank = tmp_path / "other.safetensors"
    run(
        _compose(
            tmp_path,
            data_dir,
            ["+experiment=demo", f"memory.path={other_bank}", "memory.max_patch_entries=20"],
        ),
        fit=True,
    )
    with pytest.raises(CheckpointError, match=r"trained with memory bank .*other\.safetensors"):
        evaluate(["+experiment=demo_mrad_ft", f"ckpt_path={ft_ckpt}", f"memory.path={other_bank}"])
    assert not (tmp_path / "eval" / "results.json").exists()


def test_clip_only_model_and_maskless_auxiliary_data_fail_before_any_compute(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"mrad_clip runs the CLIP text tower.*encoder=clip_vit_l14_336"):
        run(_compose(tmp_path, data_dir, ["+experiment=demo_mrad_clip", "encoder=tiny_vit"]), fit=True)
    with pytest.raises(
        ConfigError, match=r"mrad_ft builds its memory .* from pixel masks.*require_masks=False"
    ):
        run(
            _compose(tmp_path, data_dir, ["+experiment=demo_mrad_ft", "aux_dataset.require_masks=false"]),
            fit=True,
        )
    ddp_without_detection = ["trainer=ddp_cpu", "trainer.strategy=ddp_find_unused_parameters_false"]
    with pytest.raises(ConfigError, match=r"Fix: trainer.strategy=ddp_find_unused_parameters_true"):
        run(_compose(tmp_path, data_dir, ["+experiment=demo_mrad_clip", *ddp_without_detection]), fit=True)
    assert not (tmp_path / ".cache").exists(), "nothing was encoded or cached"
    # The model refuses a non-CLIP encoder on its own too (used outside the pipeline).
    cfg = _compose(tmp_path, data_dir, ["+experiment=demo_mrad_clip", "encoder=tiny_vit"])
    with pytest.raises(ValueError, match="needs a CLIP encoder with its text tower"):
        build_model(cfg, build(cfg.encoder))
    assert MRADCLIP.needs.text_tower


def test_similarity_analysis_of_a_trained_checkpoint(trained, data_dir):
    from anomret.analysis.statistics import similarity_analysis

    root, runs = trained
    out = root / "similarity"
    ckpt = runs["ft"] / "checkpoints" / "last.ckpt"
    cfg = _compose(
        root, data_dir, ["+experiment=demo_mrad_ft", f"ckpt_path={ckpt}", f"paths.output_dir={out}"], "eval"
    )
    report = similarity_analysis(cfg)
    assert set(report.per_category) == {"TF", "FT"}
    for setting in ("TF", "FT"):
        overall = report.overall(setting)
        # 42 test images on a 16×16 grid: every interior cell is a query of one group.
        assert 0 < overall.anomalous_count < overall.normal_count <= 42 * 16 * 16
    assert report.overall("TF").values() != report.overall("FT").values()
    assert {p.name for p in out.iterdir()} >= {"similarity.csv", "similarity.md", "similarity.png"}
    with pytest.raises(ConfigError, match=r"needs its trained parts \(ckpt_path=\)"):
        similarity_analysis(
            _compose(
                root,
                data_dir,
                ["+experiment=demo_mrad_ft", f"memory.path={load_checkpoint(ckpt)['bank']['path']}"],
                "eval",
            )
        )
    # As a user types it: the same table, and nothing but the run's own lines on the way.
    typed = run_cli(
        ["-m", "anomret.analysis.similarity", "+experiment=demo_mrad_ft", f"ckpt_path={ckpt}"],
        root,
        data_dir=data_dir,
    )
    assert not unexpected_lines(typed.stdout + typed.stderr), unexpected_lines(typed.stdout + typed.stderr)
    (written,) = (root / "logs" / "demo_mrad_ft").glob("*/*/similarity.csv")
    assert written.read_text() == (out / "similarity.csv").read_text()


def test_same_command_same_numbers_whether_the_bank_was_built_or_read_from_the_cache(
    trained, data_dir, tmp_path
):
    """The memory pass of a run that builds its bank used to draw from the global RNG before training, so
    the heads trained on another shuffle than in a run that found the bank cached."""
    root, runs = trained
    again = root / "ft_again"  # the FT fixture run built the bank; this one reads it from the cache
    run(_compose(root, data_dir, ["+experiment=demo_mrad_ft", f"paths.output_dir={again}"]), fit=True)
    assert _results(again) == _results(runs["ft"])
    # The CLIP fixture run read the bank from the cache; in a fresh root this one builds it.
    fresh = tmp_path / "fresh"
    overrides = ["+experiment=demo_mrad_clip", "trainer.max_epochs=2", f"paths.output_dir={fresh / 'clip'}"]
    run(_compose(fresh, data_dir, overrides), fit=True)
    assert list((fresh / ".cache" / "banks").glob("*.safetensors")), "this run built its bank"
    assert _results(fresh / "clip") == _results(runs["clip"])


def test_demo_commands_train_and_eval_reproduces_the_numbers(tmp_path, data_dir):
    """The commands as a user types them (covered in-process by the checkpoint test above)."""
    common = ["+experiment=demo_mrad_ft", "logger=none"]
    run_cli(
        ["-m", "anomret.train", *common, f"hydra.run.dir={tmp_path / 'train'}"], tmp_path, data_dir=data_dir
    )
    ckpt = json.loads((tmp_path / "train" / "artifacts.json").read_text())["checkpoint"]
    assert Path(ckpt).stat().st_size < 400_000
    run_cli(
        ["-m", "anomret.eval", *common, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
        tmp_path,
        data_dir=data_dir,
    )
    assert _results(tmp_path / "eval") == _results(tmp_path / "train")

    # Mistakes with a trained model, each one error line that says what to do.
    def refused(*args: str) -> str:
        result = run_cli(["-m", "anomret.eval", *args], tmp_path, data_dir=data_dir, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.strip()]
        assert line.startswith("error: ")
        return line

    line = refused("+experiment=demo_mrad_clip", "logger=none", f"ckpt_path={ckpt}")
    assert "trained for mrad_ft" in line and "method=mrad_ft" in line
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(Path(ckpt).read_bytes()[:1000])
    assert "is not a readable checkpoint" in refused(*common, f"ckpt_path={truncated}")
    line = refused(*common)  # neither checkpoint nor bank: both named at once, with the command
    assert "needs its trained parts (ckpt_path=) and the bank they were trained with" in line
    assert "Run: python -m anomret.eval +experiment=demo_mrad_ft logger=none ckpt_path=" in line


def test_bias_source_ablation_is_a_config_value(parts, tmp_path, data_dir):
    cfg, dual, datamodule = parts(["+experiment=demo_mrad_clip"])
    batch = _first_batch(datamodule)
    features = dual.features(batch)
    maps = {}
    for source in ("dual", "anomaly", "cls", "none"):
        cfg = _compose(
            tmp_path, data_dir, ["+experiment=demo_mrad_clip", f"model.prompts.bias_source={source}"]
        )
        lightning.seed_everything(0)
        model = build_model(cfg, dual.encoder)
        model.attach_memory(dual.bank, dual.bank_info)
        keys = {k for k in model.state_dict() if k.startswith("prompts.prompt_bias.")}
        expected = {
            "dual": {"normal", "anomalous"},
            "anomaly": {"anomalous"},
            "cls": {"normal", "anomalous"},
            "none": set(),
        }[source]
        assert keys == {f"prompts.prompt_bias.{m}.{p}" for m in expected for p in ("weight", "bias")}
        model.eval()
        with torch.no_grad():
            maps[source] = model.score(features).patch_scores
        assert maps[source].shape == features.patches[4].shape[:3]
    # Same seed, same context tokens: the maps differ only through the biases.
    assert not torch.allclose(maps["dual"], maps["none"]) and not torch.allclose(maps["cls"], maps["none"])
