"""``bayeslora.data`` imports no model code (STYLE.md: import direction), checked on the source's AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "src" / "bayeslora" / "data"
MODULES = sorted(DATA.glob("*.py"))
FORBIDDEN = ("peft", "accelerate", "zuko", "torch.nn", "transformers.models", "bayeslora")
ONLY_IN = {"torch": {"collate.py"}, "transformers": {"collate.py"}, "tokenizers": {"collate.py"}}


def imports(tree: ast.AST, top_level_only: bool) -> list[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))  # type: ignore[attr-defined]
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.append(node.module or "")
            elif node.level > 1:  # `from .. import x` leaves the data package
                names.append(f"bayeslora.{node.module or ''}")
    return names


def test_there_are_modules_to_check() -> None:
    assert {"collate.py", "tasks.py", "formats.py", "prompts.py", "synthetic.py"} <= {p.name for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_model_code_is_imported(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for name in imports(tree, top_level_only=False):
        assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), f"{path.name} imports {name}"
        root = name.split(".")[0]
        if root in ONLY_IN:
            assert path.name in ONLY_IN[root], f"{path.name} imports {name}; only {ONLY_IN[root]} may"
    assert "datasets" not in imports(tree, top_level_only=True), f"{path.name}: import datasets lazily"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 300
