"""The folders' layers (docs/development.md#layout): the runtime (handlers/, which every
archive ships whole and which therefore imports nothing else of the project) at the bottom,
model definitions above it, training and serving above those, the benchmarks and the page
on top. An import that runs upward, or two folders that import each other, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"handlers": 0, "models": 1, "training": 2, "serving": 2, "bench": 3, "ui": 3}


def imports(package: str) -> dict[str, set[str]]:
    """The project's packages that ``package`` imports -> the files that import them (every
    import statement, those inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_no_import_runs_upward():
    upward = [
        (f, package, target)
        for package in LAYERS
        for target, files in imports(package).items()
        if LAYERS[target] > LAYERS[package]
        for f in sorted(files)
    ]
    assert not upward, "imports against the layers (file, its folder, the folder above): " + str(upward)


def test_no_two_folders_import_each_other():
    edges = {(p, t) for p in LAYERS for t in imports(p)}
    both = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not both, f"folders that import each other: {both}"


def test_the_runtime_imports_nothing_of_the_project():
    """A TorchServe worker has the archive only: one import of models/ would fail there."""
    assert imports("handlers") == {}


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk finds imports inside functions, where a lazy upward import would hide."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.py").write_text("def f():\n    from bench import report\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert imports("models") == {"bench": {"models/m.py"}}
