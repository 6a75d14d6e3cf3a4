"""One run, shared by ``anomret.train`` and ``anomret.eval``: compose components, fit, test, report.

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
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

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


def build(cfg: DictConfig, *, fit: bool) -> tuple[Any, Any, lightning.Trainer, list[Logger]]:
    """Instantiate encoder, datamodule, model, loggers and trainer from a composed config."""
    encoder = instantiate(cfg.encoder)
    # Built objects are passed to partials, not to instantiate(): Hydra would merge them into the
    # config and turn dataclasses back into config nodes.
    datamodule = instantiate(cfg.data, _partial_=True)(
        dataset=cfg.dataset, aux_dataset=cfg.aux_dataset if fit else None, preprocess=encoder.preprocess
    )
    model = instantiate(cfg.model, _partial_=True)(
        encoder=encoder,
        memory=instantiate(cfg.memory),
        retrieval=instantiate(cfg.retrieval),
        evaluator=instantiate(cfg.evaluation),
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_callbacks(cfg.get("callbacks"))
    )
    return datamodule, model, trainer, loggers


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
                if trainer.interrupted:
                    raise RuntimeError("the fit pass was interrupted; nothing was saved, rerun to rebuild")
        else:
            bank = cfg.memory.get("path")
            if not bank:
                raise ValueError(
                    "anomret.eval needs a memory bank: pass memory.path=/path/to/bank.safetensors "
                    "(anomret.train prints and records the path of the bank it builds in artifacts.json)"
                )
            model.load_memory(bank)
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
