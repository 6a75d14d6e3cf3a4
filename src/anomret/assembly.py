"""One assembly of a run: a composed config becomes its parts here, and nowhere else.

    config ─► checked (every need a method declares, every option name, what the entry point needs)
           ─► memory settings, checkpoint, encoder, feature store, model        (:meth:`Assembly.build`)
           ─► data, trainer                                                       (on demand)
           ─► bank: built, reused or loaded, then attached; trained parts restored or fitted

Every entry point (train, eval, predict, append, the similarity analysis, the model package behind export
and serve) builds its parts through :class:`Assembly`, so a check added to :mod:`anomret.contracts` holds
for all of them, and every refusal happens before any compute; the bank comes from :mod:`anomret.banks`.
Devices are Lightning's business: parts are moved by a Trainer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from anomret.banks import get_or_build_bank, load_saved_bank, memory_source
from anomret.contracts import ConfigError, Purpose, check_config
from anomret.data.batch import collate_items
from anomret.data.datamodule import AnomalyDataModule, check_loader_settings
from anomret.data.dataset import AnomalyDataset
from anomret.data.samples import SampleTable
from anomret.decisions.calibration import held_out_images, without
from anomret.encoders.base import Encoder
from anomret.features.memory_tier import TieredFeatures, tiered_features
from anomret.features.store import FeatureStore
from anomret.memory.base import MemorySettings
from anomret.memory.placement import RowPlacement
from anomret.models.base import RetrievalModule
from anomret.models.checkpoint import load_checkpoint, restore
from anomret.precision import PrecisionPolicy

log = logging.getLogger(__name__)


def build(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a constructor's own error (its message says what to fix)
    instead of Hydra's wrapper around it."""
    try:
        return instantiate(config, *args, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError, RuntimeError)):
            raise error.__cause__ from None
        raise


def instantiate_all(config: DictConfig | None) -> list[Any]:
    """Every entry of a ``logger=`` or ``callbacks=`` group that names a ``_target_``."""
    if not config:
        return []
    return [build(entry) for entry in config.values() if entry is not None and "_target_" in entry]


# Lightning's DDP strategies that have a registered ``<name>_find_unused_parameters_true`` twin.
_DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


@dataclass
class Assembly:
    """The parts of one run, built from its config by :meth:`build` (see the module docstring)."""

    cfg: DictConfig
    purpose: Purpose
    settings: MemorySettings
    encoder: Encoder
    store: FeatureStore | None
    model: RetrievalModule
    checkpoint: dict[str, Any] | None = None
    precision: PrecisionPolicy = field(default_factory=PrecisionPolicy)
    features: TieredFeatures | None = None  # store and in-memory tier, as the datasets read them
    bank_info: dict[str, Any] | None = field(default=None, init=False)

    @classmethod
    def build(cls, cfg: DictConfig, purpose: Purpose) -> Assembly:
        """Check the config, then build the memory settings, checkpoint, encoder, store and model."""
        check_config(cfg, purpose)
        precision = PrecisionPolicy.from_config(cfg.get("precision_policy"))
        precision.apply()  # before anything computes: the one place the float32 matmul precision is set
        settings: MemorySettings = build(cfg.memory)  # cheap checks first
        if hasattr(settings, "placement"):
            RowPlacement.of(settings)  # refuses a bad memory.placement or budget now, not at test time
        ckpt_path = cfg.get("ckpt_path")
        checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
        encoder = build(cfg.encoder)
        store = feature_store(cfg, encoder)
        model = build_model(cfg, encoder, evaluate=not purpose.scores_unlabelled)
        model.set_feature_store(store)
        features = tiered_features((cfg.get("features") or {}).get("memory"), encoder, store)
        model.extractor.memory = features
        return cls(cfg, purpose, settings, encoder, store, model, checkpoint, precision, features)

    @property
    def feature_source(self) -> TieredFeatures | FeatureStore | None:
        """What the datasets read features from: the in-memory tier and the store, or the store alone."""
        return self.features if self.features is not None else self.store

    # ------------------------------------------------------------------------------------- data
    def datamodule(self) -> AnomalyDataModule:
        """The run's data, read and checked (every source, before any compute)."""
        builds = self.purpose.builds_bank
        datamodule = instantiate(self.cfg.data, _partial_=True)(
            dataset=self.cfg.dataset,
            aux_dataset=memory_source(self.cfg, self.settings) if builds else None,
            preprocess=self.encoder.preprocess,
            feature_store=self.feature_source,
        )
        datamodule.prepare_data()
        if self.purpose is not Purpose.APPEND:
            datamodule.setup("test")
        if builds:
            datamodule.setup("fit")
            held_out = held_out_images(self.cfg)
            if held_out is not None and self.settings.source == "train":
                # Calibration images stay out of a memory built from the same split (RAD would retrieve
                # the very image it calibrates on); the bank's identity records the images it holds.
                datamodule.aux_samples = without(datamodule.aux_samples, held_out)
                log.info("%d normal train image(s) held out of the memory for calibration", len(held_out))
        return datamodule

    def prediction_loader(self, samples: SampleTable) -> DataLoader:
        """Images of a sample table in a loader of the run's data settings: unlabelled ones to predict,
        labelled ones to calibrate (their masks binarised as the test masks are)."""
        data = self.cfg.data
        settings = check_loader_settings(
            data.batch_size,
            data.eval_batch_size,
            data.num_workers,
            data.get("mask_size"),
            data.get("mask_threshold", 0.5),
        )
        dataset = AnomalyDataset(
            samples,
            self.encoder.preprocess,
            settings["mask_size"],
            settings["mask_threshold"],
            feature_store=self.feature_source,
        )
        return DataLoader(
            dataset,
            batch_size=settings["eval_batch_size"],
            num_workers=settings["num_workers"],
            collate_fn=collate_items,
        )

    def trainer(
        self, loggers: list[Logger] | None = None, callbacks: list[lightning.Callback] | None = None
    ) -> lightning.Trainer:
        """The configured Trainer; a method that trains different parameters in different epochs
        (MRAD-CLIP) gets DDP's unused-parameter detection when this run fits it."""
        overrides: dict[str, Any] = {}
        strategy = self.cfg.trainer.get("strategy")
        fits = self.purpose is Purpose.TRAIN and self.model.trains
        if fits and self.model.needs.unused_parameters and strategy in _DDP_STRATEGIES:
            overrides["strategy"] = f"{strategy}_find_unused_parameters_true"
            log.info(
                "%s trains different parameters in different epochs: trainer.strategy=%s",
                self.model.method,
                overrides["strategy"],
            )
        return build(self.cfg.trainer, logger=loggers or False, callbacks=callbacks or [], **overrides)

    # ------------------------------------------------------------------------------------ memory
    def attach_memory(
        self, trainer: lightning.Trainer | None = None, datamodule: AnomalyDataModule | None = None
    ) -> dict[str, Any]:
        """Build, reuse or load the run's bank and attach it to the model; returns its path and identity."""
        if self.purpose.builds_bank:
            if trainer is None or datamodule is None:
                raise ValueError("building a bank needs the run's trainer and data")
            bank, info = get_or_build_bank(self.settings, self.model, datamodule, trainer)
        else:
            bank, info = load_saved_bank(self.settings, self.encoder, self.purpose.value, self.checkpoint)
        if hasattr(bank, "placement"):  # where retrieval reads the rows: the memory's settings say
            bank.placement = RowPlacement.of(self.settings)
        self.model.attach_memory(bank, info)
        self.bank_info = info
        return info

    # ------------------------------------------------------------------------------ trained parts
    def fit_or_restore(
        self, trainer: lightning.Trainer | None = None, datamodule: AnomalyDataModule | None = None
    ) -> str | None:
        """Load the trained parts (``ckpt_path``) or, when training, fit them; returns the checkpoint used."""
        ckpt_path = self.cfg.get("ckpt_path")
        if self.checkpoint is not None:
            restore(self.model, self.checkpoint, ckpt_path)
            return str(ckpt_path)
        if not self.model.trains:
            return None
        if self.purpose is not Purpose.TRAIN or trainer is None:
            raise ConfigError(  # check_config says so first; kept for parts assembled by hand
                f"{self.model.method} has trained parts: pass ckpt_path=/path/to/last.ckpt"
            )
        # The same training whatever ran before it in this process (a memory pass, or none when the bank
        # was cached): the shuffling and any other draw start from the run's seed.
        lightning.seed_everything(self.cfg.seed, workers=True, verbose=False)
        trainer.fit(self.model, datamodule=datamodule)
        path = Path(self.cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        save_checkpoint(trainer, path)
        log.info("checkpoint (trained parts only): %s", path)
        return str(path)


def save_checkpoint(trainer: lightning.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to a temporary name, renamed into place: a killed run never leaves a
    checkpoint that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    # The optimiser state is kept (weights_only=False), so a checkpoint can also resume training.
    trainer.save_checkpoint(partial, weights_only=False)
    if trainer.is_global_zero:
        os.replace(partial, path)
    trainer.strategy.barrier()


def feature_store(cfg: DictConfig, encoder: Encoder) -> FeatureStore | None:
    features = cfg.get("features")
    if not features or not features.get("enabled"):
        return None
    store = FeatureStore(
        str(features.dir), encoder.fingerprint(), encoder.preprocess, features.get("dtype", "fp16")
    )
    log.info("encoder outputs are cached in the %s", store.describe())
    return store


def build_model(cfg: DictConfig, encoder: Encoder, *, evaluate: bool = True) -> RetrievalModule:
    """The method, with its encoder, retrieval and (unless it only predicts) evaluator."""
    # Built objects are passed to a partial, not to instantiate(): Hydra would merge them into the
    # config and turn dataclasses back into config nodes. Settings arrive as plain containers, so the
    # hyper-parameters a checkpoint keeps load with weights_only=True.
    try:
        partial = instantiate(cfg.model, _partial_=True, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError, RuntimeError)):
            raise error.__cause__ from None
        raise
    return partial(
        encoder=encoder,
        retrieval=build(cfg.retrieval),
        evaluator=build(cfg.evaluation) if evaluate else None,
    )
