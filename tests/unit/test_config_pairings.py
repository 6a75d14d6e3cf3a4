"""Every pairing of the config groups that define a method is either accepted or refused in one line, before
anything is built; the accepted ones are exactly those whose parts fit what the method declares it needs.

New files in ``conf/method``, ``conf/model``, ``conf/memory``, ``conf/retrieval`` or ``conf/encoder`` join
the product automatically (the end-to-end smoke runs are in ``tests/integration/test_smoke.py``).
"""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from anomret.config import config_dir
from anomret.contracts import ConfigError, Purpose, check_config

SWAPPED = ("memory", "retrieval", "encoder")


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def composed() -> dict[str, object]:
    """One composed config per ``method=`` and per ``model=`` option (the groups whose defaults lists
    pull in others); memory, retrieval and encoder options are then swapped in as their files read."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        configs = {f"method={m}": compose("config", overrides=[f"method={m}"]) for m in options("method")}
        configs.update({f"model={m}": compose("config", overrides=[f"model={m}"]) for m in options("model")})
    GlobalHydra.instance().clear()
    return configs


def _fits(cfg) -> bool:
    """What the method declares it needs, read from the classes the config names."""
    needs = get_class(cfg.model._target_).needs
    memory, retrieval, encoder = (get_class(cfg[g]._target_) for g in SWAPPED)
    text_ok = not needs.text_tower or (encoder.text_tower and bool(cfg.encoder.get("keep_text")))
    return memory.kind == needs.memory and retrieval.kind == needs.retrieval and text_ok


def test_every_method_group_composes_into_a_valid_run(composed):
    for name in options("method"):
        check_config(composed[f"method={name}"], Purpose.TRAIN)


@pytest.mark.parametrize("model", options("model"))
def test_every_pairing_is_accepted_exactly_when_it_fits_or_refused_in_one_line(composed, model):
    base = composed[f"model={model}"]
    accepted = refused = 0
    for choice in itertools.product(*(options(group) for group in SWAPPED)):
        cfg = base.copy()
        with open_dict(cfg):
            for group, name in zip(SWAPPED, choice, strict=True):
                cfg[group] = OmegaConf.load(config_dir() / group / f"{name}.yaml")
        try:
            check_config(cfg, Purpose.TRAIN)
        except ConfigError as error:
            assert not _fits(cfg), f"model={model} {choice} fits but was refused: {error}"
            assert "\n" not in str(error) and "Fix:" in str(error), str(error)
            refused += 1
            continue
        assert _fits(cfg), f"model={model} {choice} was accepted but does not fit the method's needs"
        accepted += 1
    assert accepted and refused
