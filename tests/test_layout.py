"""The package map of the README holds: who may import whom, and no import cycles.

Read from the source with `ast` (nothing is imported), so a new module is covered as soon as it exists.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Lowest first: each package may import those before it, never one after it.
LAYERS = ("pallas_kernels", "omnimoe_jax", "train", "benchmarks")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py")) if path.is_file()
}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str, *, module_level_only: bool) -> set[str]:
    """The project modules `name` imports (`from a import b` counts as a.b when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    return found - {name}


def layer(name: str) -> str:
    return name.partition(".")[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_package_imports_one_above_it(name):
    allowed = LAYERS[: LAYERS.index(layer(name)) + 1]
    above = sorted(t for t in imports(name, module_level_only=False) if layer(t) not in allowed)
    assert not above, f"{name} imports {above}, from a package above it (order: {' < '.join(LAYERS)})"


def test_the_kernels_never_import_flax():
    for name, path in MODULES.items():
        if layer(name) == "pallas_kernels":
            tree = ast.parse(path.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not [m for m in names if m.partition(".")[0] == "flax"], f"{name} imports flax"


def test_parallel_imports_no_layer():
    # The layers (router, atomic experts) import omnimoe_jax.parallel, never the other way round; inside
    # omnimoe_jax it may only use the field checks.
    for name in MODULES:
        if name.startswith("omnimoe_jax.parallel"):
            outside = {
                t
                for t in imports(name, module_level_only=False)
                if layer(t) == "omnimoe_jax" and not t.startswith("omnimoe_jax.parallel")
            }
            assert outside <= {"omnimoe_jax._config_fields"}, f"{name} imports {sorted(outside)}"


def test_no_import_cycles():
    graph = {name: imports(name, module_level_only=True) for name in MODULES}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all its imports are

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_map_sees_the_packages():
    # Guards the test itself: a broken path or parser would find nothing and pass everything.
    assert {"omnimoe_jax.parallel._device_mesh", "pallas_kernels._checks", "train.loop"} <= set(MODULES)
    assert "omnimoe_jax.parallel._device_mesh" in imports("omnimoe_jax._router", module_level_only=True)
    assert "pallas_kernels.omni_router.config" in imports("pallas_kernels.omni_router.kernel", module_level_only=True)
