"""Reliability diagram PNG (bayeslora.evaluation.reliability) and the package's import boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import bayeslora.evaluation as evaluation
from bayeslora.evaluation.metrics import compute_metrics, reliability_bins
from bayeslora.evaluation.reliability import draw_reliability, save_reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _predictions() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(500, 4, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, 4, (500,), generator=g)
    probs[:20] = torch.nn.functional.one_hot(labels[:20], 4).double()  # fills the "confidence = 1" bucket
    return probs, labels


def test_writes_a_valid_png_atomically(tmp_path: Path) -> None:
    probs, labels = _predictions()
    metrics = compute_metrics(probs, labels)
    path = save_reliability_diagram(reliability_bins(probs, labels), tmp_path / "reliability.png", metrics, label="arc_e dev")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # a real plot, not an empty canvas
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]  # no temp file left behind
    save_reliability_diagram(reliability_bins(probs[:50], labels[:50]), path)  # overwrite, no metrics
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.read_bytes() != data


def test_title_reports_acc_ece_x100_and_nll() -> None:
    probs, labels = _predictions()
    metrics = compute_metrics(probs, labels)
    fig = draw_reliability(reliability_bins(probs, labels), metrics, label="run-7")
    title = fig.axes[0].get_title()
    assert title.startswith("run-7\n")
    assert f"ACC {100 * metrics['acc']:.1f}" in title and f"ECE {100 * metrics['ece']:.2f}" in title
    assert f"NLL {metrics['nll']:.3f}" in title and "n = 500" in title
    bars = [p.get_height() for p in fig.axes[1].patches]
    assert sum(bars) == 480  # histogram of the 15 bins; the 20 saturated ones are the extra bucket


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    probs, labels = _predictions()
    with pytest.raises(FileNotFoundError):
        save_reliability_diagram(reliability_bins(probs, labels), tmp_path / "missing" / "r.png")
    assert list(tmp_path.iterdir()) == []


FORBIDDEN = ("bayeslora.training", "bayeslora.cli", "transformers", "peft", "accelerate")


def _imported_modules(code: str) -> list[str]:
    """Every module an evaluation source file imports, relative imports resolved against the package."""
    names: list[str] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = ["bayeslora", "evaluation"][: 3 - node.level] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _forbidden(names: list[str]) -> list[str]:
    return [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]


def test_import_checker_sees_relative_and_absolute_edges() -> None:
    assert _forbidden(_imported_modules("from ..training import loop"))[0] == "bayeslora.training"
    assert _forbidden(_imported_modules("from .. import cli")) == ["bayeslora.cli"]
    assert _forbidden(_imported_modules("import transformers.models")) == ["transformers.models"]
    assert _forbidden(_imported_modules("from .metrics import compute_metrics")) == []


def test_evaluation_imports_no_training_cli_or_hugging_face() -> None:
    package = Path(evaluation.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "predictive.py", "metrics.py", "reliability.py", "report.py"}
    for source in sources:
        bad = _forbidden(_imported_modules(source.read_text(encoding="utf-8")))
        assert not bad, f"{source.name} imports {bad}"
