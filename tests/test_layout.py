"""The package layout docs/stages.md describes ("Code layout"): imports run one way, down the floors; a stage's
package never imports another stage's; every name has one import path (no re-exports)."""

from __future__ import annotations

import ast
from pathlib import Path

MELLOW = Path(__file__).resolve().parents[1] / "mellow"
BOTTOM = ("config", "files", "errors", "progress", "manifests", "answers", "distributed", "envfile", "hub",
          "torchrun_hook")
FLOOR = {**dict.fromkeys(BOTTOM, 0), "audio": 1, "store": 2, "settings": 3, "model": 4, "sources": 4,
         "encode": 5, "train": 5, "evaluate": 6, "doctor": 7, "quickstart": 7,
         "options": 7, "cli": 8}


def _imports() -> list[tuple[str, str, str]]:
    """(importing module's path, its package or top module, the imported mellow module) of every import."""
    found = []
    for path in sorted(MELLOW.rglob("*.py")):
        parts = path.relative_to(MELLOW).with_suffix("").parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mellow":
                modules = [node.module] if node.module != "mellow" else [f"mellow.{a.name}" for a in node.names]
                found += [("/".join(parts), parts[0], module) for module in modules]
    return found


def test_every_package_and_top_module_has_a_floor():
    homes = {path.relative_to(MELLOW).parts[0].removesuffix(".py") for path in MELLOW.iterdir()
             if path.suffix == ".py" or (path / "__init__.py").is_file()} - {"__init__"}
    assert homes == set(FLOOR)


def test_imports_run_down_the_floors_and_never_between_stages():
    upward = [f"{where} imports {module}" for where, home, module in _imports()
              if (other := module.split(".")[1]) != home and FLOOR[other] >= FLOOR[home] > 0]
    assert not upward


def test_a_name_is_imported_from_where_it_is_defined():
    defined: dict[str, set[str]] = {}
    for path in MELLOW.rglob("*.py"):
        module = ".".join(("mellow", *path.relative_to(MELLOW).with_suffix("").parts)).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        defined[module] = names
    borrowed = []
    for path in MELLOW.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in defined:
                borrowed += [f"{path.relative_to(MELLOW)}: {node.module}.{alias.name}" for alias in node.names
                             if alias.name not in defined[node.module]
                             and f"{node.module}.{alias.name}" not in defined]
    assert not borrowed
    package_inits = [path for path in MELLOW.rglob("__init__.py") if path.parent != MELLOW]
    assert package_inits and all(len(ast.parse(p.read_text()).body) == 1 for p in package_inits)  # a docstring
