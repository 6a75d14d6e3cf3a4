"""The run's memory bank: reused from the cache, extended, built by a memory pass, or loaded from a file.

Writers of one bank exclude each other (:mod:`anomret.memory.writers`): the lock is held from reading the
file to opening what was decided, and under DDP rank 0's decision is every process's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning
from omegaconf import DictConfig

from anomret.config import resolved_dict
from anomret.contracts import ConfigError
from anomret.data.samples import SampleTable
from anomret.encoders.base import Encoder
from anomret.memory.base import MemoryBank, MemorySettings
from anomret.memory.build import MemoryPass
from anomret.memory.cache import bank_identity, decide_bank, plan_bank
from anomret.memory.store import BankError, check_bank, read_bank_metadata
from anomret.memory.writers import agreed, bank_writers_lock, start_processes
from anomret.models.base import RetrievalModule

log = logging.getLogger(__name__)


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
