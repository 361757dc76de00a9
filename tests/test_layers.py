"""The package's layout is the layer rule: every top-level part sits in one layer.

The rule itself (imports go down only; Hydra and the web extras stay above the
library) is import-linter's contract in ``pyproject.toml``, run by CI as
``lint-imports``; these tests keep that contract complete and check at run time
what a text scan could miss.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "seq2seq"


def _contract_layers() -> list[list[str]]:
    """The layers contract of ``pyproject.toml``, top to bottom, as module names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [[name.strip() for name in re.split(r"[|:]", layer)] for layer in layers]


def test_every_part_of_the_package_is_in_a_layer():
    """A new module or subpackage must be placed in a layer, or the contract cannot see it."""
    named = {name for layer in _contract_layers() for name in layer}
    parts = {f"seq2seq.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts |= {f"seq2seq.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert parts == named, (parts - named, named - parts)


def test_library_import_loads_no_hydra():
    """Importing the library (training and translation included) must not load Hydra."""
    code = (
        "import sys, seq2seq.training.fit, seq2seq.decoding.translator;"
        " sys.exit('hydra' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def layer_diagram() -> str:
    """The layers as README.md and docs/design.md draw them, top (apps) to bottom."""
    rows = []
    for layer in _contract_layers():
        names = [
            n.removeprefix("seq2seq.")
            + ("/" if (PACKAGE / n.removeprefix("seq2seq.")).is_dir() else "")
            for n in layer
        ]
        rows.append("  " + " | ".join(names))
    return "\n".join(rows)


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_docs_draw_the_contract_s_layers(doc):
    """The diagram users read is the contract CI checks, so the two cannot drift."""
    assert layer_diagram() in (ROOT / doc).read_text(), f"{doc} must contain:\n{layer_diagram()}"
