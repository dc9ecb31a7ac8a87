"""The benchmark's figures, drawn from result rows alone: per evaluated set and scoring protocol, the
reliability diagram of every cell (bins pooled over seeds), ACC against ECE, and selective accuracy
against coverage.

matplotlib's object API on the Agg canvas (no ``pyplot``, no window, no global backend); every PNG is
written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..compare import COVERAGES
from ..evaluation.report import atomic_write
from .table import line_order, protocol

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_plots"]


def _agg_figure(**kwargs) -> Figure:
    """A matplotlib Figure on its own Agg canvas; matplotlib is imported when a plot is drawn, not with
    the module (as in ``evaluation.reliability``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _sets(rows: list[dict[str, Any]]) -> dict[tuple, dict[tuple, list[dict[str, Any]]]]:
    out: dict[tuple, dict[tuple, list[dict[str, Any]]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            out.setdefault((r["split"], r["budget"], r["train_task"], r["eval_task"], protocol(r)), {}).setdefault(
                (r["cell"], r["mode"]), []).append(r)
    return out


def _save(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))


def _pooled_bins(members: list[dict[str, Any]]) -> tuple[list[float], float, list[float], list[int]]:
    """Accuracy per bin pooled over seeds (count-weighted), the bin width, bin starts and counts. The
    extra bucket of confidence exactly 1 is drawn with the top bin."""
    edges = members[0]["reliability"]["edges"]
    n_bins = len(edges) - 1
    counts, hits = [0] * n_bins, [0.0] * n_bins
    for m in members:
        rel = m["reliability"]
        for k, (c, a) in enumerate(zip(rel["counts"], rel["accuracy"])):
            k = min(k, n_bins - 1)
            counts[k] += c
            hits[k] += c * (a or 0.0)
    return [h / c if c else 0.0 for h, c in zip(hits, counts)], 1.0 / n_bins, edges[:-1], counts


def _mean(values) -> Optional[float]:
    """The mean of the values present (a non-finite value was stored as None), or None."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _reliability(name: str, cells: dict[tuple, list[dict[str, Any]]]) -> Figure:
    cols = min(4, len(cells))
    rows_n = math.ceil(len(cells) / cols)
    fig = _agg_figure(figsize=(3.2 * cols, 3.2 * rows_n), dpi=90, layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for ax, ((cell, mode), members) in zip(axes.flat, sorted(cells.items(), key=line_order)):
        acc, width, lo, counts = _pooled_bins(members)
        ax.bar(lo, acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5)
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0)
        ece = _mean(m["ece"] for m in members)
        shown = "n/a" if ece is None else f"{100 * ece:.1f}"
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{cell} ({mode})\nECE {shown}, n = {sum(counts)}")
        ax.title.set_fontsize("small")
    for ax in list(axes.flat)[len(cells):]:
        ax.set_visible(False)
    fig.suptitle(f"Reliability (accuracy per confidence bin), {name}", fontsize="medium")
    return fig


def _scatter(name: str, cells: dict[tuple, list[dict[str, Any]]]) -> Figure:
    fig = _agg_figure(figsize=(6.0, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for (cell, mode), members in sorted(cells.items(), key=line_order):
        acc, ece = _mean(m["acc"] for m in members), _mean(m["ece"] for m in members)
        if acc is None or ece is None:  # non-finite in every seed (stored as None): no point to place
            continue
        acc, ece = 100 * acc, 100 * ece
        ax.scatter([ece], [acc])
        ax.annotate(f"{cell} ({mode})", (ece, acc), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="ECE ×100 (lower is better)", ylabel="ACC ×100", title=f"ACC against ECE, {name}")
    return fig


def _coverage(name: str, cells: dict[tuple, list[dict[str, Any]]]) -> Figure:
    fig = _agg_figure(figsize=(6.0, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for (cell, mode), members in sorted(cells.items(), key=line_order):
        curve = [_mean(m["accuracy_at_coverage"][k] for m in members) for k in range(len(COVERAGES))]
        curve = [float("nan") if v is None else 100 * v for v in curve]  # a gap in the line, not a crash
        ax.plot([100 * c for c in COVERAGES], curve, marker=".", label=f"{cell} ({mode})")
    ax.set(xlabel="coverage % (most confident first)", ylabel="selective accuracy %",
           title=f"Accuracy against coverage, {name}")
    ax.legend(fontsize="x-small")
    return fig


def write_plots(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (split, budget, train_task, eval_task, scoring), cells in sorted(_sets(rows).items()):
        name = f"{train_task} → {eval_task} ({split}, {budget}, {scoring})"
        stem = f"{split}-{budget}-{train_task}-{eval_task}-{scoring}"
        written.append(_save(_reliability(name, cells), folder / f"reliability-{stem}.png"))
        written.append(_save(_scatter(name, cells), folder / f"acc-ece-{stem}.png"))
        written.append(_save(_coverage(name, cells), folder / f"coverage-{stem}.png"))
    return [Path(p) for p in written]
