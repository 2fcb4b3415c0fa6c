"""The service's layers, read from its import statements: each module imports only from its
own layer or the ones below it, no two modules import each other (directly or round a
circle), and only the entry points import the app factory."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
# Bottom to top: modules, and packages (ending in a dot). A module may import from its own
# package and from any layer below; the floor's modules from each other.
LAYERS = (
    ("service", "service.files", "service.settings", "service.model", "service.metrics"),
    ("service.postgres.", "service.wire."),
    ("service.cache.",),
    ("service.usecases.",),
    ("service.web.",),
    ("service.process.",),
    ("service.__main__", "service.wsgi", "service.probe"),
)
FACTORY = "service.process.factory"


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SERVICE.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """The service modules `path` imports, wherever in the file (a function's imports count)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], *([base] if base else [])])
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return (found & set(MODULES)) - {name}


GRAPH = {module: imported(path) for module, path in MODULES.items()}


def layer(module: str) -> tuple[int, str]:
    """The layer's rank and the package (or floor module) that holds `module`."""
    for rank, owners in enumerate(LAYERS):
        for owner in owners:
            package = owner.endswith(".")
            if module == owner.removesuffix(".") or package and module.startswith(owner):
                return rank, owner
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_own_layer_and_those_below(module: str) -> None:
    rank, owner = layer(module)
    for target in sorted(GRAPH[module]):
        target_rank, target_owner = layer(target)
        assert target_rank < rank or target_owner == owner or rank == 0, \
            f"{module} (layer {rank}) imports {target} (layer {target_rank})"


def test_no_import_circle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module):],
                                                                    module]))
        if module in done:
            return
        for target in GRAPH.get(module, ()):
            visit(target, [*path, module])
        done.add(module)

    for module in GRAPH:
        visit(module, [])


def test_only_the_entry_points_import_the_factory() -> None:
    importers = {module for module, targets in GRAPH.items() if FACTORY in targets}
    assert importers <= set(LAYERS[-1]), importers
