"""The house's one direction of flow, checked on the source: config -> data -> models -> methods (+
projection) -> engine -> report. A package may import only the packages listed for it, at module level
or inside a function; so, for instance, the projection stays ignorant of L2P, CLIP and the engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pgpcl

SRC = Path(pgpcl.__file__).parent
BASE = {"errors", "io", "progress", "registry"}  # leaf modules every package may use

ALLOWED = {
    "errors": set(),
    "io": {"errors"},
    "progress": set(),
    "registry": {"errors"},
    "config": BASE | {"methods"},  # only to look up a registered method's Params, lazily
    "data": BASE | {"config"},
    "models": BASE | {"config"},
    "projection": BASE | {"config"},
    "methods": BASE | {"config", "data", "models", "projection"},
    "engine": BASE | {"config", "data", "models", "methods", "projection"},
    "report": BASE | {"config", "engine"},
}


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pgpcl" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_packages_import_only_what_comes_before_them():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        package = _package(path)
        if package not in ALLOWED:
            continue  # the command-line side (cli, demo, pretrain) may use everything
        for other in sorted(_imported_packages(path) - {package} - ALLOWED[package]):
            wrong.append(f"{path.relative_to(SRC)} imports pgpcl.{other}")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_the_check_sees_real_imports():
    assert "projection" in _imported_packages(SRC / "engine" / "pgp_hooks.py")
    assert "methods" in _imported_packages(SRC / "config.py")  # the late import inside a function
    assert set(ALLOWED) | {"cli", "demo", "pretrain", "__init__", "__main__"} >= {
        _package(p) for p in SRC.rglob("*.py")}, "a new package needs its line in ALLOWED"
