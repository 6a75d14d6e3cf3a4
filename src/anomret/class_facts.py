"""What the classes a config names declare, read from their source without importing them.

Checking a config (:mod:`anomret.contracts`) needs a few facts about the classes its ``_target_`` keys name:
the keywords each constructor takes, a few literal class attributes (a memory's ``kind``, a method's
``needs``) and what they derive from. Importing those classes imports torch and Lightning (seconds on a
small machine); reading their modules' source takes milliseconds, so a wrong setting is refused before
the user has waited for anything. What cannot be read from source — a class outside anomret, a base or
an attribute that is not a plain name or literal — comes from importing the class instead: slower, never
different (``tests/unit/test_class_facts.py`` compares the two for every class in ``conf/``).
"""

from __future__ import annotations

import ast
import functools
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomret.needs import MethodNeeds

_PACKAGE = "anomret"
_NEEDS = f"{MethodNeeds.__module__}.{MethodNeeds.__qualname__}"


@dataclass(frozen=True)
class ClassRef:
    """A class named by an attribute (``option_groups = {"prompts": MRADPromptLearner}``)."""

    name: str  # qualified: module.Class


class _Unknown:
    """An attribute whose value is not a literal: asked for, it is read from the imported class."""


_UNKNOWN = _Unknown()


@dataclass(frozen=True)
class ClassFacts:
    """The facts a config check reads about one class.

    Attributes:
        name: the qualified name (``anomret.models.rad.RAD``).
        keywords: the keyword arguments its constructor takes (``**kwargs`` followed up the bases); ``None``
            when some constructor takes arbitrary keywords that cannot be traced.
        ancestors: the qualified names of the class and everything it derives from.
    """

    name: str
    _keywords: frozenset[str] | _Unknown | None = field(repr=False)
    ancestors: frozenset[str]
    _attributes: Mapping[str, Any] = field(repr=False)
    # Every class it derives from was read too (an attribute missing here is missing on the class).
    _complete: bool = field(default=True, repr=False)

    @property
    def keywords(self) -> frozenset[str] | None:
        if isinstance(self._keywords, _Unknown):
            return imported_facts(self.name).keywords
        return self._keywords

    @property
    def short_name(self) -> str:
        return self.name.rpartition(".")[2]

    def is_a(self, qualified_name: str) -> bool:
        return qualified_name in self.ancestors

    def get(self, attribute: str, default: Any = None) -> Any:
        """A class attribute, as ``getattr(cls, attribute, default)`` gives it (classes as :class:`ClassRef`)."""
        value = self._attributes.get(attribute, _UNKNOWN if not self._complete else default)
        if value is _UNKNOWN:  # not a literal, or perhaps defined by a base outside anomret
            return imported_facts(self.name).get(attribute, default)
        return value


def class_facts(target: str) -> ClassFacts:
    """The facts of the class ``target`` names: from its source where it is anomret's, else imported.

    Raises ``ImportError``/``ValueError`` (as Hydra's ``get_class``) when ``target`` names no class.
    """
    return (_from_source(target) if target.startswith(f"{_PACKAGE}.") else None) or imported_facts(target)


# ----------------------------------------------------------------------------------------- imported
@functools.cache
def imported_facts(target: str) -> ClassFacts:
    """The facts of ``target`` from the imported class (the slow way, and the reference)."""
    from hydra.utils import get_class

    cls = get_class(target)
    if not isinstance(cls, type):
        raise ValueError(f"{target} is not a class")
    return ClassFacts(
        name=_qualified(cls),
        _keywords=_signature_keywords(cls),
        ancestors=frozenset(_qualified(klass) for klass in cls.__mro__),
        _attributes=_ImportedAttributes(cls),
    )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _signature_keywords(cls: type) -> frozenset[str] | None:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if klass is object:  # object() takes no arguments, whatever its signature says
            return frozenset(names - {"self"})
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return frozenset(names - {"self"})
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, type):
        return ClassRef(_qualified(value))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


class _ImportedAttributes(Mapping[str, Any]):
    def __init__(self, cls: type) -> None:
        self._cls = cls

    def __getitem__(self, name: str) -> Any:
        try:
            return _plain(getattr(self._cls, name))
        except AttributeError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(dir(self._cls))

    def __len__(self) -> int:
        return len(dir(self._cls))


# ------------------------------------------------------------------------------------------- source
@dataclass(frozen=True)
class _Module:
    name: str
    classes: dict[str, ast.ClassDef]
    imported: dict[str, str]  # local name → qualified name


def _source_file(name: str) -> tuple[Path, bool] | None:
    """The file of anomret module ``name`` and whether it is a package, found without importing its
    parent packages (``importlib.util.find_spec`` would, and some of those import torch)."""
    parts = name.split(".")
    if parts[0] != _PACKAGE:
        return None
    folder = Path(__file__).parent.joinpath(*parts[1:])
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py", True
    module = folder.with_suffix(".py")
    return (module, False) if module.is_file() else None


@functools.cache
def _module(name: str) -> _Module | None:
    found = _source_file(name)
    if found is None:
        return None
    path, is_package = found
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if is_package else name.rpartition(".")[0]
    imported: dict[str, str] = {}
    for statement in tree.body:
        if isinstance(statement, ast.ImportFrom):
            source = statement.module or ""
            if statement.level:
                base = package.rsplit(".", statement.level - 1)[0] if statement.level > 1 else package
                source = f"{base}.{source}" if source else base
            for alias in statement.names:
                imported[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(statement, ast.Import):
            for alias in statement.names:  # import a.b as c: c is a.b; import a.b: a is a
                local = alias.asname or alias.name.partition(".")[0]
                imported[local] = alias.name if alias.asname else local
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    return _Module(name, classes, imported)


def _reference(node: ast.expr, module: _Module) -> str | None:
    """The qualified name a name or dotted name in ``module`` stands for."""
    if isinstance(node, ast.Name):
        if node.id in module.classes:
            return f"{module.name}.{node.id}"
        return module.imported.get(node.id, f"builtins.{node.id}")
    if isinstance(node, ast.Attribute):
        owner = _reference(node.value, module)
        return f"{owner}.{node.attr}" if owner else None
    return None


class _NotLiteral(Exception):
    pass


def _value(node: ast.expr, module: _Module) -> Any:
    """A class attribute's value: literals, containers of them, class names, ``MethodNeeds(...)``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_value(item, module) for item in node.elts)
    if isinstance(node, ast.List):
        return [_value(item, module) for item in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {
            _value(k, module): _value(v, module) for k, v in zip(node.keys, node.values, strict=True) if k
        }
    if isinstance(node, ast.Call) and not node.args and _reference(node.func, module) == _NEEDS:
        return MethodNeeds(**{str(k.arg): _value(k.value, module) for k in node.keywords})
    reference = _reference(node, module) if isinstance(node, ast.Name | ast.Attribute) else None
    if reference and reference.startswith(f"{_PACKAGE}.") and _from_source(reference) is not None:
        return ClassRef(reference)
    raise _NotLiteral  # a constant, or a name outside anomret: what it is needs an import


def _is_dataclass(node: ast.ClassDef, module: _Module) -> tuple[bool, bool]:
    """(decorated with ``@dataclass``, and it generates ``__init__``)."""
    for decorator in node.decorator_list:
        call = decorator if isinstance(decorator, ast.Call) else None
        name = _reference(call.func if call else decorator, module)
        if name == "dataclasses.dataclass":
            init = next((k.value for k in call.keywords if k.arg == "init"), None) if call else None
            return True, not (isinstance(init, ast.Constant) and init.value is False)
    return False, False


def _is_classvar(annotation: ast.expr, module: _Module) -> bool:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value.startswith(("ClassVar", "typing.ClassVar"))
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return _reference(target, module) == "typing.ClassVar"


def _dataclass_fields(node: ast.ClassDef, module: _Module) -> list[str]:
    fields = []
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if _is_classvar(statement.annotation, module):
            continue
        value = statement.value
        if isinstance(value, ast.Call) and _reference(value.func, module) == "dataclasses.field":
            init = next((k.value for k in value.keywords if k.arg == "init"), None)
            if isinstance(init, ast.Constant) and init.value is False:
                continue
        fields.append(statement.target.id)
    return fields


@functools.cache
def _from_source(target: str) -> ClassFacts | None:
    module_name, _, class_name = target.rpartition(".")
    module = _module(module_name) if module_name else None
    if module is None:
        return None
    node = module.classes.get(class_name)
    if node is None:  # re-exported: follow the import
        source = module.imported.get(class_name)
        return _from_source(source) if source and source.startswith(f"{_PACKAGE}.") else None

    bases: list[ClassFacts | None] = []  # None: a base outside anomret, known by name only
    ancestors = {target}
    for base in node.bases:
        reference = _reference(base.value if isinstance(base, ast.Subscript) else base, module)
        if reference is None:
            return None
        if reference == "builtins.object":
            continue
        facts = _from_source(reference) if reference.startswith(f"{_PACKAGE}.") else None
        if facts is None and reference.startswith(f"{_PACKAGE}."):
            return None
        bases.append(facts)
        ancestors |= facts.ancestors if facts else {reference}

    attributes: dict[str, Any] = {}
    for base_facts in reversed(bases):
        if base_facts is not None:
            attributes.update(base_facts._attributes)
    # An enum's (or a named tuple's) class attributes are what its metaclass makes of them.
    opaque = any(name.startswith(("enum.", "typing.NamedTuple")) for name in ancestors)
    for statement in node.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):  # methods, properties
            attributes[statement.name] = _UNKNOWN
            continue
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            name_node, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            name_node, value = statement.target, statement.value
        else:
            continue
        if isinstance(name_node, ast.Name):
            try:
                attributes[name_node.id] = _UNKNOWN if opaque else _value(value, module)
            except _NotLiteral:
                attributes[name_node.id] = _UNKNOWN

    complete = all(base is not None and base._complete for base in bases)
    return ClassFacts(
        target, _source_keywords(node, module, bases), frozenset(ancestors), attributes, complete
    )


def _source_keywords(
    node: ast.ClassDef, module: _Module, bases: list[ClassFacts | None]
) -> frozenset[str] | _Unknown | None:
    """The constructor's keywords; unknown where they depend on a class outside anomret."""
    first_base = bases[0] if bases else None
    inherited = first_base._keywords if first_base is not None else (frozenset() if not bases else _UNKNOWN)
    init = next(
        (s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"),
        None,
    )
    dataclass_, generates_init = _is_dataclass(node, module)
    if init is None and dataclass_ and generates_init:
        # The generated __init__ takes the fields of every dataclass in the hierarchy.
        fields = frozenset(_dataclass_fields(node, module))
        if not bases:
            return fields
        return inherited | fields if isinstance(inherited, frozenset) else _UNKNOWN
    if init is None:
        return inherited
    arguments = init.args
    names = frozenset(a.arg for a in [*arguments.args[1:], *arguments.kwonlyargs])
    if arguments.kwarg is None:
        return names
    return inherited | names if isinstance(inherited, frozenset) else inherited
