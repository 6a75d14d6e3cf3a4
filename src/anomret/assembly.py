"""One assembly of a run: a composed config becomes its parts here, and nowhere else.

    config ─► checked (every need a method declares, every option name, what the entry point needs)
           ─► memory settings, checkpoint, encoder, feature store, model        (:meth:`Assembly.build`)
           ─► data, trainer                                                       (on demand)
           ─► bank: built, reused or loaded, then attached; trained parts restored or fitted

Every entry point (train, eval, predict, append, the similarity analysis, the model package behind export
and serve) builds its parts through :class:`Assembly`, so a check added here holds for all of them, and
every refusal happens before any compute. Devices are Lightning's business: parts are moved by a Trainer.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import lightning
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from anomret.config import resolved_dict
from anomret.data.batch import collate_items
from anomret.data.datamodule import AnomalyDataModule, check_loader_settings
from anomret.data.dataset import AnomalyDataset
from anomret.data.samples import SampleTable
from anomret.decisions.calibration import check_calibration, held_out_images, without
from anomret.encoders.base import Encoder
from anomret.features.memory_tier import TieredFeatures, tiered_features
from anomret.features.store import FeatureStore
from anomret.memory.base import MemoryBank, MemorySettings
from anomret.memory.build import MemoryPass
from anomret.memory.cache import bank_identity, decide_bank, plan_bank
from anomret.memory.placement import RowPlacement
from anomret.memory.store import BankError, check_bank, read_bank_metadata
from anomret.memory.writers import agreed, bank_writers_lock, start_processes
from anomret.models.base import MethodNeeds, RetrievalModule
from anomret.models.checkpoint import load_checkpoint, restore
from anomret.precision import PrecisionPolicy

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A composed config that cannot make a valid run."""


class Purpose(Enum):
    """What an entry point does with the parts (which decides what it needs)."""

    TRAIN = "train"  # build or reuse the bank, fit the trained parts, test
    EVAL = "eval"  # a saved bank (and checkpoint), test
    PREDICT = "predict"  # a saved bank (and checkpoint), unlabelled images
    APPEND = "append"  # extend (or build) a RAD bank, nothing else
    ANALYSE = "analysis.similarity"  # a saved bank (and checkpoint), statistics over the test images
    EXPORT = "export"  # a saved bank (and checkpoint) checked and written into a model package
    SERVE = "serve"  # a model package scoring in-memory images (anomret.load, anomret.serve)

    @property
    def builds_bank(self) -> bool:
        return self in (Purpose.TRAIN, Purpose.APPEND)

    @property
    def evaluates(self) -> bool:
        return self in (Purpose.TRAIN, Purpose.EVAL)

    @property
    def scores_unlabelled(self) -> bool:
        return self in (Purpose.PREDICT, Purpose.EXPORT, Purpose.SERVE)


# ------------------------------------------------------------------------------------------ building
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


def memory_source(cfg: DictConfig, settings: MemorySettings) -> Any:
    """The dataset config of the memory (and training) images: ``memory.source`` chooses the aux_dataset
    (MRAD: another dataset's labelled test split) or the evaluation dataset's own train split (RAD)."""
    if settings.source == "train":
        return {**resolved_dict(cfg.dataset), "split": "train", "require_masks": False}
    return cfg.aux_dataset


def bank_info(path: Path, bank: MemoryBank) -> dict[str, Any]:
    metadata = {"kind": bank.kind, **bank.metadata}
    # Absolute: artifacts.json and checkpoints name the bank for runs started from any directory.
    return {"path": str(Path(path).resolve()), "kind": bank.kind, "identity": bank_identity(metadata)}


# ------------------------------------------------------------------------------------------ checking
def _method_class(cfg: DictConfig) -> type[RetrievalModule]:
    target = str(cfg.model.get("_target_", ""))
    try:
        model_class = get_class(target)
    except Exception as error:  # Hydra raises ImportError or ValueError for a bad target
        raise ConfigError(f"model._target_={target!r} is not an importable class ({error})") from None
    if not (isinstance(model_class, type) and issubclass(model_class, RetrievalModule)):
        raise ConfigError(f"model._target_={target} is not an anomret method (a RetrievalModule)")
    return model_class


def _class_of(node: Any) -> type | None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return None
    try:
        return get_class(str(target))
    except Exception:  # reported by instantiate itself, with Hydra's message
        return None


def _keyword_names(cls: type) -> set[str] | None:
    """The keyword arguments ``cls`` accepts, following ``**kwargs`` up the class hierarchy; ``None`` when
    some constructor takes arbitrary keywords that cannot be traced."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
    return None


def _options(node: DictConfig, cls: type, prefix: str) -> tuple[set[str], list[str]]:
    """The option names ``cls`` knows under ``prefix`` (nested groups included), and the unknown keys."""
    accepted = _keyword_names(cls)
    if accepted is None:
        return set(), []
    known, unknown = {f"{prefix}.{name}" for name in accepted}, []
    groups: dict[str, type] = getattr(cls, "option_groups", {})
    for key in node:
        name = str(key)
        if name.startswith("_"):
            continue
        if name not in accepted:
            unknown.append(f"{prefix}.{name}")
            continue
        child = node.get(name)
        child_class = _class_of(child) or groups.get(name)
        if isinstance(child, DictConfig) and child_class is not None:
            child_known, child_unknown = _options(child, child_class, f"{prefix}.{name}")
            known |= child_known
            unknown += child_unknown
    return known, unknown


def check_option_names(cfg: DictConfig, groups: tuple[str, ...] = ("model", "memory", "retrieval")) -> None:
    """Refuse, by name, a setting that no constructor takes (``+model.top_k_ration=0.1``)."""
    problems = []
    for group in groups:
        node = cfg.get(group)
        cls = _class_of(node)
        if cls is None:
            continue
        known, unknown = _options(node, cls, group)
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            if not close:  # a nested option typed at the top (model.top_k_ratio → model.score.top_k_ratio)
                leaf = name.rsplit(".", 1)[-1]
                close = [k for k in sorted(known) if k.endswith(f".{leaf}")][:1]
            hint = f"did you mean {close[0]}?" if close else f"{group} options: {', '.join(sorted(known))}"
            problems.append(f"{name} is not a setting of {cls.__name__} ({hint})")
    if problems:
        raise ConfigError("; ".join(problems))


def _latest_train_run(cfg: DictConfig) -> Path | None:
    """The newest ``train`` run directory of this task whose artifacts name a bank (for a hint)."""
    try:
        runs = Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "train"
        found = sorted(runs.glob("*/artifacts.json"), key=lambda path: path.stat().st_mtime)
    except (OSError, ValueError, KeyError):
        return None
    return found[-1].parent if found else None


def _command(purpose: Purpose, extra: list[str]) -> str:
    """The command the user ran (as Hydra saw its overrides), plus ``extra``."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra run (a config composed by hand)
        pass
    kept = [
        o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in {e.split("=", 1)[0] for e in extra}
    ]
    return " ".join(["python -m", f"anomret.{purpose.value}", *kept, *extra])


def _missing_model_files(cfg: DictConfig, purpose: Purpose, method: str, needs: MethodNeeds) -> None:
    """A run that reads a saved model needs its bank and, for trained methods, its checkpoint: say at once
    everything that is missing, with the command that gives it."""
    ckpt_path = cfg.get("ckpt_path")
    official = (cfg.model.get("official_checkpoint") or None) if needs.trains else None
    missing_checkpoint = needs.trains and not ckpt_path and not official
    # A checkpoint names the bank it was trained with; an official checkpoint file does not.
    missing_bank = not (cfg.memory.get("path") or ckpt_path)
    if not (missing_checkpoint or missing_bank):
        return
    run_dir = _latest_train_run(cfg)
    if missing_checkpoint:
        what = "its trained parts (ckpt_path=) and the bank they were trained with"
        fix = "ckpt_path=RUN/checkpoints/last.ckpt (the checkpoint names its bank)"
        if run_dir is not None and (run_dir / "checkpoints" / "last.ckpt").exists():
            fix = f"ckpt_path={(run_dir / 'checkpoints' / 'last.ckpt').resolve()}"
    else:
        what = "a memory bank (memory.path=)"
        fix = "memory.path=BANK (anomret.train records the bank it built in the run's artifacts.json)"
        bank = _bank_of_run(run_dir)
        if bank is not None:
            fix = f"memory.path={bank}"
    raise ConfigError(
        f"anomret.{purpose.value} of {method} needs {what}. "
        f"Run: {_command(purpose, [fix])}"
        + ("" if run_dir is not None else f" (train one first: {_command(Purpose.TRAIN, [])})")
    )


def _bank_of_run(run_dir: Path | None) -> str | None:
    if run_dir is None:
        return None
    try:
        import json

        bank = json.loads((run_dir / "artifacts.json").read_text()).get("bank")
    except (OSError, ValueError):
        return None
    return str(bank) if bank and Path(bank).exists() else None


def check_config(cfg: DictConfig, purpose: Purpose) -> MethodNeeds:
    """Refuse, before anything is built, every pairing of groups the method cannot run with, every unknown
    setting, and what the entry point lacks; returns the method's needs."""
    model_class = _method_class(cfg)
    needs, method = model_class.needs, model_class.method
    check_option_names(cfg)
    memory_class = _class_of(cfg.memory)
    given_memory = getattr(memory_class, "kind", "?")
    appendable = given_memory == needs.memory and getattr(memory_class, "supports_append", False)
    if purpose is Purpose.APPEND and not appendable:
        raise ConfigError(
            f"anomret.append extends RAD's normal-image banks (method=rad); {method}'s '{needs.memory}' memory "
            "is built from the whole auxiliary dataset at once. Fix: run anomret.train with the new data (a "
            "cached bank is rebuilt when its images change; memory.rebuild=true replaces a named one)."
        )
    if given_memory != needs.memory:
        raise ConfigError(
            f"method {method} reads a '{needs.memory}' memory but memory={given_memory} was composed. "
            f"Fix: choose the method as a whole (method={method}) or set memory= to a '{needs.memory}' memory."
        )
    given_retrieval = getattr(_class_of(cfg.retrieval), "kind", "?")
    if given_retrieval != needs.retrieval:
        raise ConfigError(
            f"method {method} uses '{needs.retrieval}' retrieval but retrieval={given_retrieval} was composed. "
            f"Fix: method={method}, which sets model, memory and retrieval together."
        )
    if needs.text_tower:
        encoder_class = _class_of(cfg.encoder)
        if not getattr(encoder_class, "text_tower", False) or not cfg.encoder.get("keep_text", False):
            raise ConfigError(
                f"method {method} runs the CLIP text tower, but the encoder ({cfg.encoder.get('name')}) "
                + (
                    "does not keep it (encoder.keep_text=false)"
                    if getattr(encoder_class, "text_tower", False)
                    else "has none"
                )
                + ". Fix: encoder=clip_vit_l14_336 (or tiny_clip for tests) with encoder.keep_text=true."
            )
    source = cfg.memory.get("source", "aux")
    aux = cfg.get("aux_dataset") or {}
    if (
        purpose.builds_bank
        and needs.aux_masks
        and source == "aux"
        and aux
        and aux.get("require_masks") is not True
    ):
        raise ConfigError(
            f"method {method} builds its memory (and trains) from pixel masks, but aux_dataset={aux.get('name')} "
            f"does not require them (require_masks={aux.get('require_masks')}). Fix: use an auxiliary dataset "
            "with masks (aux_dataset=visa or mvtec) and leave aux_dataset.require_masks=true."
        )
    strategy = str((cfg.get("trainer") or {}).get("strategy", ""))
    if (
        purpose is Purpose.TRAIN
        and needs.unused_parameters
        and strategy.endswith("_find_unused_parameters_false")
    ):
        raise ConfigError(
            f"method {method} trains different parameters in different epochs, which DDP must be told about, "
            f"but trainer.strategy={strategy} turns that off. "
            f"Fix: trainer.strategy={strategy.removesuffix('_false')}_true (or plain ddp)."
        )
    features = cfg.get("features") or {}
    if features.get("enabled") and not features.get("dir"):
        raise ConfigError("features.enabled=true needs features.dir (where encoder outputs are cached)")
    if purpose is Purpose.APPEND and not cfg.memory.get("path"):
        raise ConfigError(
            "anomret.append needs memory.path=/path/to/bank.safetensors (the bank to extend; "
            f"{_command(Purpose.APPEND, ['memory.path=BANK'])})"
        )
    if purpose is Purpose.ANALYSE and needs.memory != "labeled":
        raise ConfigError(
            f"the similarity analysis reads MRAD's labelled memory; method {method} has a '{needs.memory}' "
            "memory. Fix: +experiment=mrad_tf_* or mrad_ft_* (method=mrad_tf / mrad_ft)."
        )
    if purpose in (Purpose.EVAL, Purpose.PREDICT, Purpose.ANALYSE, Purpose.EXPORT, Purpose.SERVE):
        _missing_model_files(cfg, purpose, method, needs)
    check_calibration(cfg)
    return needs


# ------------------------------------------------------------------------------------------- the parts
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
