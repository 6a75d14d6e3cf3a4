"""Runs shared by the entry points: get or build the memory, attach it, fit if the method trains, test.

Everything a run produces lands in Hydra's run directory: the resolved ``config.yaml``,
``results.json``, ``results.csv`` (per category and mean), ``artifacts.json`` (bank, checkpoint and
feature store used), ``overlays/``, ``checkpoints/`` (methods that train) and the logger files.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from anomret.callbacks import PredictionWriter
from anomret.checks import integer_at_least
from anomret.data.datamodule import check_loader_settings
from anomret.data.dataset import AnomalyDataset, collate_items
from anomret.data.folder import image_folder_samples, input_base, readable_samples
from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder
from anomret.features.store import FeatureStore
from anomret.files import write_text_atomic
from anomret.launch import DistributedJob, use_job_command_for_ddp
from anomret.memory.base import MemoryBank, MemorySettings
from anomret.memory.build import MemoryPass
from anomret.memory.cache import bank_identity, decide_bank, plan_bank
from anomret.memory.store import BankError, check_bank, read_bank_metadata
from anomret.memory.writers import agreed, bank_writers_lock, start_processes
from anomret.metrics.results import EvaluationResult
from anomret.models.base import RetrievalModule
from anomret.models.checkpoint import load_checkpoint, restore

log = logging.getLogger(__name__)

# Frozen encoders stay in eval mode during the fit pass on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
# The memory pass feeds a bank builder and returns nothing on purpose.
warnings.filterwarnings("ignore", message=r"predict returned None", category=UserWarning)
# Test metrics are gathered and computed once for all processes (GatheredEvaluation): no reduction to ask for.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('test/", category=UserWarning)


class ConfigError(ValueError):
    """A composed config that cannot make a valid run."""


def build(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a constructor's own error (its message says what to fix)
    instead of Hydra's wrapper around it."""
    try:
        return instantiate(config, *args, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError, RuntimeError)):
            raise error.__cause__ from None
        raise


def instantiate_loggers(config: DictConfig | None) -> list[Logger]:
    if not config:
        return []
    return [build(entry) for entry in config.values() if entry is not None and "_target_" in entry]


def instantiate_callbacks(config: DictConfig | None) -> list[lightning.Callback]:
    if not config:
        return []
    return [build(entry) for entry in config.values() if entry is not None and "_target_" in entry]


def validate_config(cfg: DictConfig, *, fits: bool = True) -> None:
    """Refuse combinations of groups that cannot run together, before anything is built.

    ``fits``: the run may train (``anomret.train``); settings that only matter to training (DDP's
    unused-parameter detection) are not asked of an evaluation or a prediction.
    """
    model_class = get_class(cfg.model._target_)
    memory_class = get_class(cfg.memory._target_)
    needed, given = getattr(model_class, "memory_kind", ""), getattr(memory_class, "kind", "")
    if needed and needed != given:
        raise ConfigError(
            f"model {model_class.method} needs memory kind '{needed}' but memory={given} was composed. "
            f"Fix: choose the method as a whole (method={model_class.method}) or set memory= to a '{needed}' memory."
        )
    required_retrieval = getattr(model_class, "retrieval_target", None)
    if required_retrieval and cfg.retrieval._target_ != required_retrieval:
        raise ConfigError(
            f"model {model_class.method} uses retrieval {required_retrieval}, not {cfg.retrieval._target_}. "
            f"Fix: use method={model_class.method}, which sets model, memory and retrieval together."
        )
    required_encoder = getattr(model_class, "encoder_target", None)
    if required_encoder and cfg.encoder._target_ != required_encoder:
        raise ConfigError(
            f"model {model_class.method} needs an encoder of type {required_encoder.rsplit('.', 1)[-1]} "
            f"(it uses the text tower), but the encoder is {cfg.encoder._target_}. "
            "Fix: encoder=clip_vit_l14_336 (or tiny_clip for tests)."
        )
    strategy = str((cfg.get("trainer") or {}).get("strategy", ""))
    if (
        fits
        and getattr(model_class, "ddp_find_unused_parameters", False)
        and strategy.endswith("_find_unused_parameters_false")
    ):
        raise ConfigError(
            f"model {model_class.method} trains different parameters in different epochs, which DDP must be "
            f"told about, but trainer.strategy={strategy} turns that off. "
            f"Fix: trainer.strategy={strategy.removesuffix('_false')}_true (or plain ddp)."
        )
    aux = cfg.get("aux_dataset") or {}
    if getattr(model_class, "needs_aux_masks", False) and aux and aux.get("require_masks") is not True:
        raise ConfigError(
            f"model {model_class.method} builds its memory (and trains) from pixel masks, but "
            f"aux_dataset={aux.get('name')} does not require them (require_masks={aux.get('require_masks')}). Fix: use an auxiliary dataset with masks "
            "(aux_dataset=visa or mvtec) and leave aux_dataset.require_masks=true."
        )
    features = cfg.get("features") or {}
    if features.get("enabled") and not features.get("dir"):
        raise ConfigError("features.enabled=true needs features.dir (where encoder outputs are cached)")


def feature_store(cfg: DictConfig, encoder: Encoder) -> FeatureStore | None:
    features = cfg.get("features") or {}
    if not features.get("enabled"):
        return None
    store = FeatureStore(
        features.dir, encoder.fingerprint(), encoder.preprocess, features.get("dtype", "fp16")
    )
    log.info("encoder outputs are cached in the %s", store.describe())
    return store


def build_model(cfg: DictConfig, encoder: Encoder) -> RetrievalModule:
    # Built objects are passed to a partial, not to instantiate(): Hydra would merge them into the
    # config and turn dataclasses back into config nodes.
    return instantiate(cfg.model, _partial_=True)(
        encoder=encoder, retrieval=build(cfg.retrieval), evaluator=build(cfg.evaluation)
    )


# Lightning's DDP strategies that have a registered ``<name>_find_unused_parameters_true`` twin.
_DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def build_trainer(
    cfg: DictConfig,
    loggers: list[Logger],
    callbacks: list[lightning.Callback],
    trained: RetrievalModule | None = None,
) -> lightning.Trainer:
    """The configured Trainer. ``trained``: the model this trainer will fit, if any; a method that trains
    different parameters in different epochs (MRAD-CLIP) gets DDP's unused-parameter detection."""
    overrides: dict[str, Any] = {}
    strategy = cfg.trainer.get("strategy")
    if (
        trained is not None
        and getattr(trained, "ddp_find_unused_parameters", False)
        and strategy in _DDP_STRATEGIES
    ):
        overrides["strategy"] = f"{strategy}_find_unused_parameters_true"
        log.info(
            "%s trains different parameters in different epochs: trainer.strategy=%s",
            trained.method,
            overrides["strategy"],
        )
    return build(cfg.trainer, logger=loggers or False, callbacks=callbacks, **overrides)


def bank_info(path: Path, bank: MemoryBank) -> dict[str, Any]:
    metadata = {"kind": bank.kind, **bank.metadata}
    # Absolute: artifacts.json and checkpoints name the bank for runs started from any directory.
    return {"path": str(Path(path).resolve()), "kind": bank.kind, "identity": bank_identity(metadata)}


def memory_source(cfg: DictConfig, settings: MemorySettings) -> Any:
    """The dataset config of the memory (and training) images: ``memory.source`` chooses the aux_dataset
    (MRAD: another dataset's labelled test split) or the evaluation dataset's own train split (RAD)."""
    if settings.source == "train":
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        return {**dataset, "split": "train", "require_masks": False}
    return cfg.aux_dataset


class _MemoryPasses:
    """Runs memory passes (calling it with samples returns the bank built from them); on leaving the
    block, the builders are closed, which removes the scratch files of kinds that build into them
    (``streams_build``). Leave it only once every process is past the write that reads them."""

    def __init__(
        self,
        settings: MemorySettings,
        model: RetrievalModule,
        datamodule: Any,
        trainer: lightning.Trainer,
        metadata: dict[str, Any],
    ) -> None:
        self.settings, self.model, self.datamodule, self.trainer = settings, model, datamodule, trainer
        self.metadata = metadata
        self.builders: list[Any] = []

    def __call__(self, samples: Any) -> MemoryBank:
        builder = self.settings.builder(self.model.encoder)
        self.builders.append(builder)
        memory_pass = MemoryPass(self.model.extractor, builder)
        loader = self.datamodule.memory_dataloader(samples)
        self.trainer.predict(memory_pass, dataloaders=loader, return_predictions=False)
        return builder.build({**self.metadata, **self.settings.describe_source(samples)})

    def __enter__(self) -> _MemoryPasses:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for builder in self.builders:
            close = getattr(builder, "close", None)
            if close is not None:
                close()


def get_or_build_bank(
    settings: MemorySettings, model: RetrievalModule, datamodule: Any, trainer: lightning.Trainer
) -> tuple[MemoryBank, dict[str, Any]]:
    """The run's bank: a matching cached (or named) one, else built by a memory pass and saved.

    With ``memory.append`` (kinds that support it), a named bank holding part of this run's images is
    extended with the missing ones instead of being refused. The bank's writers' lock is held from reading
    the file to opening what was decided, and rank 0's decision is every process's
    (:mod:`anomret.memory.writers`).
    """
    store = model.extractor.store
    samples = settings.select(datamodule.aux_samples)
    plan = plan_bank(
        settings,
        model.encoder,
        samples,
        datamodule.aux_spec.name,
        feature_dtype=None if store is None else store.dtype_name,
    )
    model.check_memory_size(len(samples))  # e.g. K larger than the memory: refused before any compute
    start_processes(trainer)  # DDP: the processes share rank 0's reading of the bank
    leader = trainer.is_global_zero
    with (
        bank_writers_lock(plan.path, settings, leader),
        _MemoryPasses(settings, model, datamodule, trainer, plan.metadata) as memory_pass,
    ):
        decision = agreed(lambda: decide_bank(settings, plan, samples), leader)
        bank = None
        if decision.action == "append":
            added = SampleTable([samples[position] for position in decision.missing])
            log.info("appending %d image(s) of %s to memory bank %s", len(added), added.categories, plan.path)
            part = memory_pass(added)
            if leader:
                settings.write_appended(plan.path, plan.metadata, added, part)
        elif decision.action == "build":
            log.info("building memory bank %s (%s)", plan.path, decision.reason)
            bank = memory_pass(samples)
            if leader:
                bank.save(plan.path)
        # Every process opens the file rank 0 settled on, while the lock keeps other writers off it; kinds
        # whose built bank reads the memory pass's scratch files (streams_build) open the saved file too.
        trainer.strategy.barrier()
        if bank is None or settings.streams_build:
            bank = settings.open(plan.path)
        trainer.strategy.barrier()
        verb = {"reuse": "reusing", "append": "extended", "build": "built"}[decision.action]
        log.info("%s memory bank %s: %s", verb, plan.path, bank.summary())
    return bank, bank_info(plan.path, bank)


def load_saved_bank(
    settings: MemorySettings, encoder: Encoder, entry_point: str, checkpoint: dict[str, Any] | None
) -> tuple[MemoryBank, dict[str, Any]]:
    """The bank of ``memory.path`` (or the one the checkpoint names), refused if another encoder built it."""
    path = settings.path
    if not path and checkpoint is not None:
        path = ((checkpoint.get("bank") or {}).get("path")) or None
        if path:
            log.info("using the memory bank the checkpoint was trained with: %s", path)
    if not path:
        raise ConfigError(
            f"anomret.{entry_point} needs a memory bank: pass memory.path=/path/to/bank.safetensors "
            "(anomret.train prints and records the path of the bank it builds in artifacts.json)"
        )
    stored_kind = read_bank_metadata(path).get("kind")
    if stored_kind != settings.kind:
        raise BankError(
            f"memory bank {path} is a '{stored_kind}' bank but memory={settings.kind} was composed. Fix: "
            f"evaluate it with the method that built it, or point memory.path at a '{settings.kind}' bank."
        )
    bank = settings.open(path)
    check_bank(path, encoder.fingerprint(), bank.metadata.get("build", {}))  # raises for another encoder
    log.info("loaded memory bank %s: %s", path, bank.summary())
    return bank, bank_info(Path(path), bank)


def prepare_run(cfg: DictConfig, *, fits: bool = False) -> Path:
    use_job_command_for_ddp()
    lightning.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    validate_config(cfg, fits=fits)
    return output_dir


def run(cfg: DictConfig, *, fit: bool) -> EvaluationResult:
    """Get or build the memory, attach it, fit if the method trains (and ``fit``), test, write results."""
    with DistributedJob():
        return _run(cfg, fit=fit)


def _run(cfg: DictConfig, *, fit: bool) -> EvaluationResult:
    output_dir = prepare_run(cfg, fits=fit)
    settings: MemorySettings = build(cfg.memory)  # cheap checks first
    encoder = build(cfg.encoder)
    store = feature_store(cfg, encoder)
    # The model first: data.mask_size follows model.map_size, whose own message names the setting to fix.
    model = build_model(cfg, encoder)
    model.set_feature_store(store)
    datamodule = instantiate(cfg.data, _partial_=True)(
        dataset=cfg.dataset,
        aux_dataset=memory_source(cfg, settings) if fit else None,
        preprocess=encoder.preprocess,
        feature_store=store,
    )
    ckpt_path = cfg.get("ckpt_path")
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
    # Every source is read and checked before any compute: a bad evaluation set fails in seconds.
    datamodule.prepare_data()
    datamodule.setup("test")
    if fit:
        datamodule.setup("fit")
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(
        cfg,
        loggers,
        instantiate_callbacks(cfg.get("callbacks")),
        trained=model if fit and model.trains else None,
    )
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if fit:
            bank, info = get_or_build_bank(settings, model, datamodule, trainer)
        else:
            bank, info = load_saved_bank(settings, encoder, "eval", checkpoint)
        model.attach_memory(bank, info)
        checkpoint_file = _fit_or_restore(model, datamodule, trainer, checkpoint, ckpt_path, output_dir, fit)
        # verbose=False: Lightning's flat metric dump is replaced by the per-category table below.
        trainer.test(model, datamodule=datamodule, verbose=False)
        if model.test_results is None:
            raise RuntimeError("the test pass did not finish; no results were written")
        result = model.test_results
        log.info("features: %s", model.extractor.describe())
        result.settings.setdefault("run", {}).update({"method": model.method, "dataset": cfg.dataset.name})
        if trainer.is_global_zero:
            artifacts = {
                "bank": info["path"],
                "bank_identity": info["identity"],
                "checkpoint": None if checkpoint_file is None else str(Path(checkpoint_file).resolve()),
                "features": None if store is None else str(Path(store.directory).resolve()),
            }
            write_outputs(result, output_dir, loggers, artifacts)
            console = Console(
                width=max(Console().width, 120)
            )  # log files are not terminals: keep columns whole
            console.print(result.rich_table(title=f"{cfg.task_name}: {cfg.dataset.name} ({model.method})"))
            log.info("results written to %s", output_dir)
            if fit:
                log.info(
                    "memory bank: %s (evaluate it again with python -m anomret.eval ... memory.path=%s)",
                    info["path"],
                    info["path"],
                )
        return result
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                # Several runs in one process (tests, multirun) must not merge into one W&B run.
                import wandb

                wandb.finish()


def _fit_or_restore(
    model: RetrievalModule,
    datamodule: Any,
    trainer: lightning.Trainer,
    checkpoint: dict[str, Any] | None,
    ckpt_path: str | None,
    output_dir: Path,
    fit: bool,
) -> str | None:
    """Train the method's heads (train entry point) or load them (``ckpt_path``); returns the checkpoint used."""
    if checkpoint is not None:
        restore(model, checkpoint, ckpt_path)
        return str(ckpt_path)
    if not model.trains:
        return None
    if not fit:
        raise ConfigError(
            f"{model.method} has trained parts: pass ckpt_path=/path/to/last.ckpt (anomret.train writes it to "
            "the run's checkpoints/ folder and records it in artifacts.json)"
        )
    trainer.fit(model, datamodule=datamodule)
    path = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    log.info("checkpoint (trained parts only): %s", path)
    return str(path)


def write_outputs(
    result: EvaluationResult, output_dir: Path, loggers: list[Logger], artifacts: dict[str, Any]
) -> None:
    result.write_json(output_dir / "results.json")
    result.write_csv(output_dir / "results.csv")
    write_text_atomic(output_dir / "artifacts.json", json.dumps(artifacts, indent=2))
    columns = ["category", *result.metrics, "n_images", "n_anomalous"]
    rows = [
        [category, *[values.get(m) for m in result.metrics], *result.counts[category].values()]
        for category, values in result.per_category.items()
    ]
    rows.append(["mean", *[result.mean.get(m) for m in result.metrics], None, None])
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="results/per_category", columns=columns, data=rows)
            for metric, value in result.mean.items():
                logger.experiment.summary[f"mean/{metric}"] = value


def predict(cfg: DictConfig) -> Path:
    """Score unlabelled images (``input=FILE_OR_FOLDER``) with a saved bank; returns predictions.csv."""
    output_dir = prepare_run(cfg)
    loader_settings = check_loader_settings(
        cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.num_workers, cfg.data.get("mask_size")
    )
    integer_at_least(cfg.get("show_top", 10), "show_top", 0)
    # Unreadable files are found (whole-file checks) and skipped before any compute.
    samples = readable_samples(image_folder_samples(cfg.input), cfg.input)
    encoder = build(cfg.encoder)
    store = feature_store(cfg, encoder)
    model = build_model(cfg, encoder)
    model.set_feature_store(store)
    settings: MemorySettings = build(cfg.memory)
    ckpt_path = cfg.get("ckpt_path")
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
    bank, info = load_saved_bank(settings, encoder, "predict", checkpoint)
    model.attach_memory(bank, info)
    loader = DataLoader(
        AnomalyDataset(samples, encoder.preprocess, loader_settings["mask_size"], feature_store=store),
        batch_size=loader_settings["eval_batch_size"],
        num_workers=loader_settings["num_workers"],
        collate_fn=collate_items,
    )
    writer = PredictionWriter(str(output_dir), encoder.preprocess, str(input_base(cfg.input)), **cfg.predict)
    progress = [c for c in instantiate_callbacks(cfg.get("callbacks")) if isinstance(c, ProgressBar)]
    trainer = build_trainer(cfg, [], [writer, *progress])
    _fit_or_restore(model, None, trainer, checkpoint, ckpt_path, output_dir, fit=False)
    log.info("predicting %d images from %s", len(samples), cfg.input)
    trainer.predict(model, dataloaders=loader, return_predictions=False)

    table = Table(title=f"highest image scores of {len(writer.rows)} (all in predictions.csv)")
    for column in ("image", "image_score"):
        table.add_column(column, justify="right" if column == "image_score" else "left")
    for row in sorted(writer.rows, key=lambda r: r["image_score"], reverse=True)[: cfg.get("show_top", 10)]:
        table.add_row(writer.relative(row["image_path"]), f"{row['image_score']:.4f}")
    Console(width=max(Console().width, 120)).print(table)
    log.info("predictions written to %s", output_dir)
    return output_dir / "predictions.csv"


def append_memory(cfg: DictConfig) -> Path:
    """Extend the bank at ``memory.path`` with the memory-source images it lacks (no test pass).

    Only the missing images are encoded; the extended bank equals one built from all the images at
    once. A missing file is built whole. Returns the bank's path.
    """
    output_dir = prepare_run(cfg)
    settings: MemorySettings = build(cfg.memory)
    if not settings.path:
        raise ConfigError("anomret.append needs memory.path=/path/to/bank.safetensors (the bank to extend)")
    if not settings.supports_append:
        raise ConfigError(
            f"memory={settings.kind} banks cannot be appended to; use a normal-image memory (method=rad)"
        )
    settings.append = True
    encoder = build(cfg.encoder)
    store = feature_store(cfg, encoder)
    datamodule = instantiate(cfg.data, _partial_=True)(
        dataset=cfg.dataset,
        aux_dataset=memory_source(cfg, settings),
        preprocess=encoder.preprocess,
        feature_store=store,
    )
    model = build_model(cfg, encoder)
    model.set_feature_store(store)
    datamodule.prepare_data()
    datamodule.setup("fit")
    trainer = build_trainer(cfg, [], instantiate_callbacks(cfg.get("callbacks")))
    _, info = get_or_build_bank(settings, model, datamodule, trainer)
    if trainer.is_global_zero:
        write_text_atomic(
            output_dir / "artifacts.json",
            json.dumps({"bank": info["path"], "bank_identity": info["identity"]}, indent=2),
        )
    return Path(info["path"])
