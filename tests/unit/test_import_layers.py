"""The package reads downward: every import goes to a lower layer (or within one layer without a cycle).

Layers, top to bottom (a new module must be given its layer here):

- entry points: what ``python -m anomret.<name>`` runs;
- orchestration: the assembly of a run, the pipeline, callbacks, the CLI's error handling;
- methods (models);
- memory, features, retrieval, metrics, maps, losses;
- encoders and data;
- small utilities that import no other anomret module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import anomret

LAYERS: dict[str, int] = {
    # entry points
    "train": 5,
    "eval": 5,
    "predict": 5,
    "append": 5,
    "prepare": 5,
    "report": 5,
    "export": 5,
    "serve": 5,
    "analysis": 5,
    # orchestration
    "assembly": 4,
    "contracts": 4,
    "banks": 4,
    "pipeline": 4,
    "callbacks": 4,
    "launch": 4,
    "cli": 4,
    "output": 4,
    "precision": 4,
    "reporting": 4,
    "decisions": 4,
    "package": 4,
    "serving": 4,
    "onnx_export": 4,
    # methods
    "models": 3,
    # memory, features, retrieval, metrics
    "memory": 2,
    "features": 2,
    "retrieval": 2,
    "metrics": 2,
    "maps": 2,
    "losses": 2,
    # encoders and data
    "encoders": 1,
    "data": 1,
    # utilities
    "checks": 0,
    "files": 0,
    "fingerprint": 0,
    "distributed": 0,
    "config": 0,
    "plugins": 0,
    "viz": 0,
    "tables": 0,
    "locks": 0,
    "sizes": 0,
    "needs": 0,
    "class_facts": 0,
}

ROOT = Path(anomret.__file__).parent


def _unit(module: str) -> str | None:
    """``anomret.memory.store`` → ``memory``; ``anomret.pipeline`` → ``pipeline``; others → None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "anomret" and len(parts) > 1 else None


def import_edges() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every import of another anomret unit, lazy ones included."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        own = _unit(".".join(relative.parts))
        if own is None or own == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                target = _unit(name)
                if target is not None and target != own:
                    edges.add((own, target, str(path.relative_to(ROOT))))
    return edges


def test_every_module_has_a_layer():
    units = {_unit(".".join(p.relative_to(ROOT.parent).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    assert units - {None, "__init__", "__main__"} <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_point_down_only():
    upward = sorted(
        f"{path}: {source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]})"
        for source, target, path in import_edges()
        if LAYERS[target] > LAYERS[source]
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for source, target, _ in import_edges():
        graph.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for step in graph.get(start, ()):
            if step == goal or (step not in seen and reaches(step, goal, seen | {step})):
                return True
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if reaches(b, a, {b}))
    assert not cycles, "\n".join(cycles)
