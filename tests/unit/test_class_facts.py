"""The facts a config check reads from source equal those of the imported classes, for every anomret class,
and the classes a config names are read from source (no import: no torch before the check answers)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml

import anomret
import anomret.class_facts as class_facts_module
from anomret.class_facts import _UNKNOWN, ClassRef, _from_source, class_facts, imported_facts
from anomret.needs import MethodNeeds

CONF = Path(__file__).parents[2] / "conf"
# What the config check asks of the class at the top of each group's files (nested classes: keywords only).
ASKED = {
    "model": ("needs", "method", "option_groups"),
    "memory": ("kind", "supports_append"),
    "retrieval": ("kind",),
    "encoder": ("text_tower",),
}


def _anomret_classes() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(anomret.__path__, "anomret."):
        module = importlib.import_module(info.name)
        names += [
            f"{info.name}.{name}"
            for name, value in vars(module).items()
            if inspect.isclass(value) and value.__module__ == info.name
        ]
    return names


def _conf_targets(value: object) -> set[str]:
    if isinstance(value, dict):
        found = {str(value["_target_"])} if "_target_" in value else set()
        return found.union(*(_conf_targets(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_conf_targets(item) for item in value))
    return set()


def _configured_classes() -> list[tuple[str, tuple[str, ...]]]:
    """The classes of the groups the config check reads, each with the attributes it asks of them."""
    asked: dict[str, set[str]] = {}
    for group, attributes in ASKED.items():
        for path in (CONF / group).glob("*.yaml"):
            config = yaml.safe_load(path.read_text())
            for target in _conf_targets(config):
                asked.setdefault(target, set())
            asked[str(config["_target_"])].update(attributes)
    return sorted((target, tuple(sorted(names))) for target, names in asked.items())


@pytest.mark.parametrize("target", _anomret_classes())
def test_source_facts_equal_the_imported_class(target):
    source, imported = _from_source(target), imported_facts(target)
    assert source is not None
    assert source.keywords == imported.keywords
    ours = {name for name in imported.ancestors if name.startswith("anomret.")}
    assert {name for name in source.ancestors if name.startswith("anomret.")} == ours
    cls = importlib.import_module(target.rpartition(".")[0]).__dict__[target.rpartition(".")[2]]
    for name, value in source._attributes.items():  # every attribute read from source, as Python has it
        if value is not _UNKNOWN:
            expected = getattr(cls, name)
            if isinstance(expected, dict):
                expected = {
                    k: ClassRef(f"{v.__module__}.{v.__qualname__}") if isinstance(v, type) else v
                    for k, v in expected.items()
                }
            assert value == expected, name


@pytest.mark.parametrize(("target", "attributes"), _configured_classes())
def test_every_class_a_config_names_is_read_without_importing_it(target, attributes, monkeypatch):
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} was imported")

    monkeypatch.setattr(class_facts_module, "imported_facts", refuse)
    facts = class_facts(target)
    assert facts.keywords is not None
    for name in attributes:
        facts.get(name)
    for group in (facts.get("option_groups") or {}).values() if "option_groups" in attributes else ():
        assert class_facts(group.name).keywords is not None


def test_a_method_declares_its_needs_and_is_recognised_as_a_method():
    rad = class_facts("anomret.models.rad.RAD")
    assert rad.get("needs") == MethodNeeds(memory="normal", retrieval="spatial")
    assert rad.get("method") == "rad"
    assert rad.is_a("anomret.models.base.RetrievalModule")
    assert rad.keywords is not None and {"encoder", "retrieval", "map", "score", "layers"} <= rad.keywords
    clip = class_facts("anomret.models.mrad_clip.MRADCLIP")
    assert clip.get("needs").text_tower and clip.get("needs").trains
    assert clip.get("option_groups") == {"prompts": ClassRef("anomret.models.prompts.MRADPromptLearner")}
    # inherited through MRADFT and MRADTF: the constructor's **kwargs reach MRADFT's arguments
    assert {"lr", "patch_drop_ratio", "prior_threshold"} <= (clip.keywords or set())


def test_a_class_outside_anomret_or_a_missing_one_is_imported():
    assert class_facts("collections.OrderedDict").name == "collections.OrderedDict"
    with pytest.raises((ImportError, ValueError)):
        class_facts("anomret.models.rad.NoSuchClass")
