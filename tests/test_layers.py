"""The house's layers: the folders of ``safe_scheduler`` are its layers, and imports only point down.

Read from the source (``ast``), every import of the package, at module level or inside a function,
from the modules of every layer; a module may import its own layer or the layers below it, and no
modules import each other in a circle. The tree primitive imports no configuration at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "safe_scheduler"
#: Bottom to top. The root's modules (entry, doctor, __main__) are the top; ``tasks`` is task code's.
LAYERS = ["base", "children", "shutdown", "liveness", "components", "core", "startup", ""]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's face: its version, nothing else
        return 0
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS) - 1


def _imports() -> dict[str, set[str]]:
    modules = {_module(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safe_scheduler"):
                for alias in node.names:  # ``from safe_scheduler.x import y``: y may be a module
                    targets.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                                else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("safe_scheduler")}
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def test_imports_point_down_the_layers():
    up = [(a, b) for a, targets in _imports().items() for b in targets
          if not a.endswith("tasks") and _layer(b) > _layer(a)]
    assert not up, f"imports that point up a layer: {up}"


def test_no_modules_import_each_other_in_a_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path + [nxt]
            found = visit(nxt, path + [nxt]) if nxt not in state else None
            if found:
                return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state:
            circle = visit(start, [start])
            assert circle is None, f"a circle: {' -> '.join(circle)}"


def test_the_tree_primitive_imports_no_configuration():
    assert _imports()["safe_scheduler.children.tree"] == set()
