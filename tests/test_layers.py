"""The one-way dependency order, checked on the imports themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seq2seq"

# module -> the rank it sits at; a module may import only lower ranks
RANK = {
    "allocator": 0,
    "config": 0,
    "device": 0,
    "distributed": 0,
    "sharding": 1,
    "metrics": 0,
    "safe_output": 0,
    "builtin": 1,
    "corpus": 2,
    "tokenizer": 2,
    "batching": 3,
    "tokdata": 3.5,
    "additive": 3,
    "gru": 3,
    "loss": 3,
    "softmax": 4,
    "model": 5,
    "search": 6,
    "inference": 6.5,
    "ensemble": 6.75,
    "bundle": 7,
    "snapshots": 7,
    "translator": 8,
    "rundir": 8,
    "plotting": 8,
    "trainer": 9,
    "ensemble_training": 9.5,
    "cli": 9.5,
    "service": 9.5,
    "train": 10,
    "translate": 10,
    "evaluate": 10,
    "serve": 10,
}
APPS = 10  # the Hydra apps' rank


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seq2seq"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("seq2seq."))
    return found


def test_every_module_has_a_rank():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= set(RANK), modules - set(RANK)


def test_imports_only_go_down():
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        for dep in _imports(path):
            assert RANK[dep] < RANK[path.stem] or dep == path.stem, f"{path.stem} imports {dep}"


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found


def test_only_apps_import_hydra():
    """Hydra (its ConfigStore included) is the apps' business: importing the
    library, e.g. ``seq2seq.model``, must not load it."""
    for path in PACKAGE.glob("*.py"):
        uses_hydra = "hydra" in _third_party(path)
        assert not uses_hydra or RANK.get(path.stem, 0) >= APPS - 0.5, path.stem


def test_library_import_loads_no_hydra():
    """The text check above could miss an indirect import; the process cannot."""
    code = "import sys, seq2seq.trainer, seq2seq.translator; sys.exit('hydra' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent).returncode == 0
