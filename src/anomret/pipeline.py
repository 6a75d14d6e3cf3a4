"""Runs shared by the entry points: compose components, fit, test and report (train/eval), or predict.

Everything a run produces lands in Hydra's run directory: the resolved ``config.yaml``,
``results.json``, ``results.csv`` (per category and mean), ``overlays/`` and the logger files.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from anomret.callbacks import PredictionWriter
from anomret.data.dataset import AnomalyDataset
from anomret.data.folder import image_folder_samples
from anomret.metrics.report import EvaluationResult

log = logging.getLogger(__name__)

# Frozen encoders stay in eval mode during the fit pass on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


def instantiate_loggers(config: DictConfig | None) -> list[Logger]:
    if not config:
        return []
    return [instantiate(entry) for entry in config.values() if entry is not None and "_target_" in entry]


def instantiate_callbacks(config: DictConfig | None) -> list[lightning.Callback]:
    if not config:
        return []
    return [instantiate(entry) for entry in config.values() if entry is not None and "_target_" in entry]


def build_model(cfg: DictConfig, encoder: Any) -> Any:
    # Built objects are passed to a partial, not to instantiate(): Hydra would merge them into the
    # config and turn dataclasses back into config nodes.
    return instantiate(cfg.model, _partial_=True)(
        encoder=encoder,
        memory=instantiate(cfg.memory),
        retrieval=instantiate(cfg.retrieval),
        evaluator=instantiate(cfg.evaluation),
    )


def build(cfg: DictConfig, *, fit: bool) -> tuple[Any, Any, lightning.Trainer, list[Logger]]:
    """Instantiate encoder, datamodule, model, loggers and trainer from a composed config."""
    encoder = instantiate(cfg.encoder)
    datamodule = instantiate(cfg.data, _partial_=True)(
        dataset=cfg.dataset, aux_dataset=cfg.aux_dataset if fit else None, preprocess=encoder.preprocess
    )
    model = build_model(cfg, encoder)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_callbacks(cfg.get("callbacks"))
    )
    return datamodule, model, trainer, loggers


def saved_bank(cfg: DictConfig, entry_point: str) -> str:
    bank = cfg.memory.get("path")
    if not bank:
        raise ValueError(
            f"anomret.{entry_point} needs a memory bank: pass memory.path=/path/to/bank.safetensors "
            "(anomret.train prints and records the path of the bank it builds in artifacts.json)"
        )
    return bank


def run(cfg: DictConfig, *, fit: bool) -> EvaluationResult:
    """Fit (build the memory, train heads) when ``fit``, then test and write the results."""
    lightning.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    datamodule, model, trainer, loggers = build(cfg, fit=fit)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        datamodule.prepare_data()
        if fit:
            datamodule.setup("fit")
            if not model.prepare_memory(datamodule.aux_samples, datamodule.aux_spec.name):
                trainer.fit(model, datamodule=datamodule)
        else:
            model.load_memory(saved_bank(cfg, "eval"))
        # verbose=False: Lightning's flat metric dump is replaced by the per-category table below.
        trainer.test(model, datamodule=datamodule, verbose=False)
        if model.test_results is None:
            raise RuntimeError("the test pass did not finish; no results were written")
        result = model.test_results
        result.settings.setdefault("run", {}).update(
            {"method": getattr(model, "method", type(model).__name__), "dataset": cfg.dataset.name}
        )
        write_outputs(result, output_dir, loggers, artifacts={"bank": str(model.bank_path)})
        console = Console(width=max(Console().width, 120))  # log files are not terminals: keep columns whole
        console.print(result.rich_table(title=f"{cfg.task_name}: {cfg.dataset.name} ({cfg.model._target_})"))
        log.info("results written to %s", output_dir)
        if fit:
            log.info(
                "memory bank: %s (evaluate it again with python -m anomret.eval ... memory.path=%s)",
                model.bank_path,
                model.bank_path,
            )
        return result
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                # Several runs in one process (tests, multirun) must not merge into one W&B run.
                import wandb

                wandb.finish()


def write_outputs(
    result: EvaluationResult, output_dir: Path, loggers: list[Logger], artifacts: dict[str, str]
) -> None:
    result.write_json(output_dir / "results.json")
    result.write_csv(output_dir / "results.csv")
    (output_dir / "artifacts.json").write_text(json.dumps(artifacts, indent=2))
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
    lightning.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    samples = image_folder_samples(cfg.input)
    encoder = instantiate(cfg.encoder)
    model = build_model(cfg, encoder)
    model.load_memory(saved_bank(cfg, "predict"))
    loader = DataLoader(
        AnomalyDataset(samples, encoder.preprocess, cfg.data.mask_size),
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
    )
    writer = PredictionWriter(str(output_dir), encoder.preprocess, **cfg.predict)
    progress = [c for c in instantiate_callbacks(cfg.get("callbacks")) if isinstance(c, ProgressBar)]
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer, *progress])
    log.info("predicting %d images from %s", len(samples), cfg.input)
    trainer.predict(model, dataloaders=loader, return_predictions=False)

    table = Table(title=f"highest image scores of {len(writer.rows)} (all in predictions.csv)")
    for column in ("image", "image_score"):
        table.add_column(column, justify="right" if column == "image_score" else "left")
    for row in sorted(writer.rows, key=lambda r: r["image_score"], reverse=True)[: cfg.get("show_top", 10)]:
        table.add_row(f"{row['category']}/{Path(row['image_path']).name}", f"{row['image_score']:.4f}")
    Console(width=max(Console().width, 120)).print(table)
    log.info("predictions written to %s", output_dir)
    return output_dir / "predictions.csv"
