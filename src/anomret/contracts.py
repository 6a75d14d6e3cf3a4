"""What a run needs, checked before anything is built: one check for every entry point.

Each method declares its needs (:class:`~anomret.needs.MethodNeeds`); :func:`check_config` compares
them with the composed groups (memory kind, retrieval kind, a text tower, auxiliary masks, DDP), refuses
settings that no constructor takes (naming the closest real one), and says at once everything an entry
point lacks (a checkpoint and its bank), with the command that gives it. It reads the classes the config
names from their source (:mod:`anomret.class_facts`) and imports no torch, so a wrong setting is an
``error:`` line in under a second; it never builds anything.
"""

from __future__ import annotations

import difflib
import logging
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from anomret.class_facts import ClassFacts, ClassRef, class_facts
from anomret.decisions.settings import check_calibration
from anomret.needs import MethodNeeds

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


# Every method derives from it (named, not imported: importing it imports torch and Lightning).
_METHOD_BASE = "anomret.models.base.RetrievalModule"


def _method_class(cfg: DictConfig) -> ClassFacts:
    target = str(cfg.model.get("_target_", ""))
    try:
        model_class = class_facts(target)
    except Exception as error:  # Hydra raises ImportError or ValueError for a bad target
        raise ConfigError(f"model._target_={target!r} is not an importable class ({error})") from None
    if not model_class.is_a(_METHOD_BASE):
        raise ConfigError(f"model._target_={target} is not an anomret method (a RetrievalModule)")
    return model_class


def _class_of(node: Any) -> ClassFacts | None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return None
    try:
        return class_facts(str(target))
    except Exception:  # reported by instantiate itself, with Hydra's message
        return None


def _options(node: DictConfig, cls: ClassFacts, prefix: str) -> tuple[set[str], list[str]]:
    """The option names ``cls`` knows under ``prefix`` (nested groups included), and the unknown keys."""
    accepted = cls.keywords
    if accepted is None:
        return set(), []
    known, unknown = {f"{prefix}.{name}" for name in accepted}, []
    groups: dict[str, ClassRef] = cls.get("option_groups") or {}
    for key in node:
        name = str(key)
        if name.startswith("_"):
            continue
        if name not in accepted:
            unknown.append(f"{prefix}.{name}")
            continue
        child = node.get(name)
        child_class = _class_of(child) or (class_facts(groups[name].name) if name in groups else None)
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
            problems.append(f"{name} is not a setting of {cls.short_name} ({hint})")
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
    needs, method = model_class.get("needs"), str(model_class.get("method") or model_class.short_name)
    if not isinstance(needs, MethodNeeds):
        raise ConfigError(
            f"model._target_={model_class.name} declares no needs: a method class sets "
            "needs = MethodNeeds(memory=..., retrieval=...) (anomret.needs)"
        )
    check_option_names(cfg)
    memory_class = _class_of(cfg.memory)
    given_memory = memory_class.get("kind", "?") if memory_class else "?"
    appendable = given_memory == needs.memory and bool(memory_class and memory_class.get("supports_append"))
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
    retrieval_class = _class_of(cfg.retrieval)
    given_retrieval = retrieval_class.get("kind", "?") if retrieval_class else "?"
    if given_retrieval != needs.retrieval:
        raise ConfigError(
            f"method {method} uses '{needs.retrieval}' retrieval but retrieval={given_retrieval} was composed. "
            f"Fix: method={method}, which sets model, memory and retrieval together."
        )
    if needs.text_tower:
        encoder_class = _class_of(cfg.encoder)
        has_text_tower = bool(encoder_class and encoder_class.get("text_tower"))
        if not has_text_tower or not cfg.encoder.get("keep_text", False):
            raise ConfigError(
                f"method {method} runs the CLIP text tower, but the encoder ({cfg.encoder.get('name')}) "
                + ("does not keep it (encoder.keep_text=false)" if has_text_tower else "has none")
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
    if str(cfg.get("report_figures", "auto")) not in ("auto", "always", "never"):
        raise ConfigError(f"report_figures must be auto, always or never, got {cfg.get('report_figures')!r}")
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
