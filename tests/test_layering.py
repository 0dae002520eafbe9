"""The package's floors: lower layers never import higher ones, and no folder imports
another in a cycle. Read from the source (ast), so lazy imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import chestxray

PACKAGE = Path(chestxray.__file__).parent
# floor of each top-level module or folder; equal floors may not import each other
FLOORS = {
    "errors": 0,
    "labels": 1,
    "io": 1,
    "data": 2,
    "models": 3,
    "inference": 4,
    "evaluation": 5,
    "export": 6,
    "training": 6,
    "pacs": 7,
    "serve": 8,  # the viewer shows a PACS's studies and builds its DICOM SR with the pacs package
    "commands": 9,
    "cli": 10,
    "__init__": 10,
    "samples": 0,
    "weights": 0,
}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "chestxray":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def unit_of_file(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_has_a_floor():
    units = {unit_of_file(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOORS), f"modules without a floor: {units - set(FLOORS)}"


def test_no_upward_imports():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of_file(path)
        if unit == "__init__":
            continue  # the package root re-exports the public API lazily
        for module in imports_of(path):
            target = _unit(module)
            if target is None or target == unit or target not in FLOORS:
                continue
            if FLOORS[target] >= FLOORS[unit] and target != "__init__":
                bad.append(f"{path.relative_to(PACKAGE)} imports {module} (floor {FLOORS[target]} >= {FLOORS[unit]})")
    assert not bad, "\n".join(bad)


def test_no_module_cycles_inside_folders():
    """Inside a folder, modules import each other without cycles (e.g. registry <-> timm)."""
    graph: dict[str, set[str]] = {}
    names = {".".join(("chestxray",) + p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    for name, path in names.items():
        graph[name] = {m for m in imports_of(path) if m in names and m != name and not m.endswith("__init__")}
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in graph.get(node, ()):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in seen:
                visit(nxt, stack + [nxt])
        seen[node] = 2

    for node in graph:
        if node not in seen:
            visit(node, [node])
