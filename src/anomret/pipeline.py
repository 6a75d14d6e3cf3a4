"""What the entry points run, once the assembly has built the parts: the order of the steps and the outputs.

Everything a run produces lands in Hydra's run directory: the resolved ``config.yaml``,
``results.json``, ``results.csv`` (per category and mean), ``image_scores.csv`` (per test image),
``artifacts.json`` (bank, checkpoint, feature store and thresholds used), ``overlays/``, the report page
``report.html``, ``checkpoints/`` (methods that train), with a ``calibration=`` also ``thresholds.json``
and ``predictions.csv`` (the decision on every test image), and the logger files. The parts themselves
(encoder, store, model, data, checkpoint, bank) come from :mod:`anomret.assembly`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from anomret.assembly import Assembly, instantiate_all
from anomret.callbacks import OverlayWriter, PredictionWriter
from anomret.checks import integer_at_least
from anomret.config import sweep_job_config
from anomret.contracts import Purpose, check_config
from anomret.data.folder import image_folder_samples, input_base, readable_samples
from anomret.decisions.calibration import calibrate
from anomret.decisions.record import ANOMALOUS
from anomret.decisions.writers import write_evaluation_decisions
from anomret.files import write_text_atomic
from anomret.launch import DistributedJob, use_job_command_for_ddp
from anomret.memory.base import AppendableSettings
from anomret.metrics.results import EvaluationResult
from anomret.output import configure_output
from anomret.reporting.page import log_page_artifact, write_run_page

log = logging.getLogger(__name__)


def prepare_run(cfg: DictConfig, purpose: Purpose) -> Assembly:
    """Seed, write the resolved config to the run directory, and assemble the run's parts."""
    configure_output(verbose=bool(cfg.get("verbose", False)))
    use_job_command_for_ddp()
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return Assembly.build(cfg, purpose)


def run(cfg: DictConfig, *, fit: bool) -> EvaluationResult:
    """Get or build the memory, attach it, fit if the method trains (and ``fit``), test, write results."""
    with DistributedJob():
        return _run(cfg, Purpose.TRAIN if fit else Purpose.EVAL)


def _run(cfg: DictConfig, purpose: Purpose) -> EvaluationResult:
    parts = prepare_run(cfg, purpose)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = parts.datamodule()  # every source is read and checked before any compute
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    trainer = parts.trainer(loggers, callbacks)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        info = parts.attach_memory(trainer, datamodule)
        checkpoint_file = parts.fit_or_restore(trainer, datamodule)
        model = parts.model
        thresholds = calibrate(parts, trainer, datamodule.test_samples)
        if thresholds is not None:
            model._evaluation().evaluator.set_thresholds(thresholds.image, thresholds.pixel)
            for overlays in (c for c in callbacks if isinstance(c, OverlayWriter)):
                overlays.pixel_threshold = thresholds.pixel  # the predicted defect outlined too
        log.info("scoring the %s test images of %s", len(datamodule.test_samples or []), cfg.dataset.name)
        # verbose=False: Lightning's flat metric dump is replaced by the per-category table below.
        trainer.test(model, datamodule=datamodule, verbose=False)
        if model.test_results is None:
            raise RuntimeError("the test pass did not finish; no results were written")
        result = model.test_results
        log.info("features: %s", model.extractor.describe())
        result.settings.setdefault("run", {}).update({"method": model.method, "dataset": cfg.dataset.name})
        if thresholds is not None:
            result.settings["thresholds"] = thresholds.to_dict()
        result.settings["precision"] = parts.precision.record(getattr(parts.encoder, "precision", "fp32"))
        if trainer.is_global_zero:
            artifacts = {
                "bank": info["path"],
                "bank_identity": info["identity"],
                "checkpoint": None if checkpoint_file is None else str(Path(checkpoint_file).resolve()),
                "features": None if parts.store is None else str(Path(parts.store.directory).resolve()),
                "thresholds": None,
            }
            if thresholds is not None:
                artifacts["thresholds"] = str(thresholds.save(output_dir / "thresholds.json").resolve())
                write_evaluation_decisions(output_dir / "predictions.csv", result.images, thresholds)
            write_outputs(result, output_dir, loggers, artifacts, str(cfg.get("report_figures", "auto")))
            console = Console()  # a pipe or log gets 80 columns (COLUMNS), which the table fits
            title = f"{cfg.task_name}: {cfg.dataset.name} ({model.method})"
            console.print(result.rich_table(title=title, width=console.width))
            log.info("results written to %s (report page: report.html)", output_dir)
            if purpose is Purpose.TRAIN:
                log.info("evaluate it again with: %s", _eval_command(cfg, info, checkpoint_file))
        return result
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                # Several runs in one process (tests, multirun) must not merge into one W&B run.
                import wandb

                wandb.finish()


def _task_overrides() -> list[str]:
    """The overrides of the running Hydra job (none outside one)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _eval_command(cfg: DictConfig, info: dict[str, Any], checkpoint_file: str | None) -> str:
    """``python -m anomret.eval`` with this run's overrides and the files that reproduce its model."""
    overrides = [o for o in _task_overrides() if not o.startswith(("memory.path=", "ckpt_path="))]
    # A checkpoint names its bank; a method without trained parts is its bank.
    model_files = (
        [f"ckpt_path={Path(checkpoint_file).resolve()}"]
        if checkpoint_file
        else [f"memory.path={info['path']}"]
    )
    return " ".join(["python -m anomret.eval", *overrides, *model_files])


def _draws_figures(setting: str) -> bool:
    """``report_figures``: always, never, or auto (single runs; a sweep's jobs leave them to the sweep page)."""
    if setting != "auto":
        return setting == "always"
    return sweep_job_config() is None


def write_outputs(
    result: EvaluationResult,
    output_dir: Path,
    loggers: list[Logger],
    artifacts: dict[str, Any],
    report_figures: str = "auto",
) -> None:
    result.write_json(output_dir / "results.json")
    result.write_csv(output_dir / "results.csv")
    result.write_image_scores(output_dir / "image_scores.csv")
    write_text_atomic(output_dir / "artifacts.json", json.dumps(artifacts, indent=2))
    try:
        page = write_run_page(output_dir, figures=_draws_figures(report_figures))
    except Exception:  # the results are written: a page that fails must not fail the run
        log.exception("the report page could not be written; python -m anomret.report %s retries", output_dir)
        page = None
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
            if page is not None:
                log_page_artifact(logger.experiment, page)


def predict(cfg: DictConfig) -> Path:
    """Score unlabelled images (``input=FILE_OR_FOLDER``) with a saved bank; returns predictions.csv."""
    integer_at_least(cfg.get("show_top", 10), "show_top", 0)
    if cfg.get("package"):
        from anomret.package import with_package

        cfg = with_package(cfg, _task_overrides())  # the package's model, verified before anything runs
    check_config(cfg, Purpose.PREDICT)  # settings first: they cost nothing to check
    # Unreadable files are found (whole-file checks) and skipped before any compute.
    samples = readable_samples(image_folder_samples(cfg.input), cfg.input)
    parts = prepare_run(cfg, Purpose.PREDICT)
    output_dir = Path(cfg.paths.output_dir)
    loader = parts.prediction_loader(samples)
    parts.attach_memory()
    parts.fit_or_restore()
    writer = PredictionWriter(
        str(output_dir), parts.encoder.preprocess, str(input_base(cfg.input)), **cfg.predict
    )
    progress = [c for c in instantiate_all(cfg.get("callbacks")) if isinstance(c, ProgressBar)]
    trainer = parts.trainer([], [writer, *progress])
    writer.thresholds = calibrate(parts, trainer)
    if writer.thresholds is None:
        log.info(
            "no thresholds: scores only (no labels or masks). A model package (package=DIR) or "
            "calibration.thresholds=RUN/thresholds.json gives decisions"
        )
    log.info("predicting %d images from %s", len(samples), cfg.input)
    trainer.predict(parts.model, dataloaders=loader, return_predictions=False)

    title = f"highest image scores of {len(writer.rows)} (all in predictions.csv)"
    if writer.thresholds is not None:
        flagged = sum(row["label"] == ANOMALOUS for row in writer.rows)
        title += f"; {flagged} anomalous at threshold {writer.thresholds.image:.6g}"
    table = Table(title=title)
    columns = ("image", "image_score", *(("label",) if writer.thresholds is not None else ()))
    for column in columns:
        table.add_column(column, justify="right" if column == "image_score" else "left")
    for row in sorted(writer.rows, key=lambda r: r["image_score"], reverse=True)[: cfg.get("show_top", 10)]:
        cells = [writer.relative(row["image_path"]), f"{row['image_score']:.4f}"]
        table.add_row(*cells, *((row["label"],) if writer.thresholds is not None else ()))
    Console(width=max(Console().width, 120)).print(table)
    log.info("predictions written to %s", output_dir)
    return output_dir / "predictions.csv"


def append_memory(cfg: DictConfig) -> Path:
    """Extend the bank at ``memory.path`` with the memory-source images it lacks (no test pass).

    Only the missing images are encoded; the extended bank equals one built from all the images at
    once. A missing file is built whole. Returns the bank's path.
    """
    parts = prepare_run(cfg, Purpose.APPEND)
    assert isinstance(parts.settings, AppendableSettings)  # check_config refuses other kinds
    parts.settings.append = True
    datamodule = parts.datamodule()
    trainer = parts.trainer([], instantiate_all(cfg.get("callbacks")))
    info = parts.attach_memory(trainer, datamodule)
    if trainer.is_global_zero:
        write_text_atomic(
            Path(cfg.paths.output_dir) / "artifacts.json",
            json.dumps({"bank": info["path"], "bank_identity": info["identity"]}, indent=2),
        )
    return Path(info["path"])
