"""Data flows one way through the package's layers (see STYLE.md): a lower layer never imports a
higher one, and the leaf layers stay leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import diffcircuit

PACKAGE = Path(diffcircuit.__file__).parent
RANK = {
    "errors": 0,
    "_version": 0,
    "_threads": 0,
    "data": 1,
    "models": 2,
    "instrument": 3,
    "metrics": 4,
    "interventions": 5,
    "stats": 6,
    "discovery": 7,
    "protocol": 8,
    "report": 9,
    "commands": 9,
    "cli": 10,
    "cli_options": 10,
    "cli_render": 10,
    "__init__": 10,
}
LEAF_ALLOWED = {"data": {"errors"}, "stats": {"errors"}}
STATS_FORBIDDEN = {"torch", "diffusers"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_module_imports_only_its_own_or_lower_layers():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(path)
        assert layer in RANK, f"{path} is in no known layer; add it to STYLE.md and this test"
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "diffcircuit" and name != "diffcircuit":
                target = name.split(".")[1]
                if RANK[target] > RANK[layer]:
                    problems.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {name}")
                if layer in LEAF_ALLOWED and target != layer and target not in LEAF_ALLOWED[layer]:
                    problems.append(f"leaf {layer} imports {name}")
            elif name == "diffcircuit" and RANK[layer] < RANK["cli"]:
                problems.append(f"{path.relative_to(PACKAGE)} imports the top-level package")
            if layer == "stats" and top in STATS_FORBIDDEN:
                problems.append(
                    f"stats must stay numpy/scipy-only: {path.relative_to(PACKAGE)} imports {name}"
                )
    assert not problems, "\n".join(problems)


def test_every_module_declares_all():
    missing = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__all__" not in p.read_text()
    ]
    assert not missing, missing
