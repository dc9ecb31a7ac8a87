"""Reliability diagram: accuracy per confidence bin against the diagonal, written as a PNG.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``), so it never opens a window,
never touches the global backend and is safe in worker processes. The file is written atomically
(``report.atomic_write``: temp file in the same folder, fsync, ``os.replace``) so a crash never leaves a truncated PNG behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .metrics import CalibrationBins
from .report import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _agg_figure(**kwargs) -> Figure:
    """A matplotlib Figure on its own Agg canvas. matplotlib is imported here, not with the module: every
    method imports the evaluation package, so a process that never draws a plot would carry ~30 MB of
    resident memory for it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _title(bins: CalibrationBins, metrics: Mapping[str, float] | None, label: str | None) -> str:
    """``label — ACC 71.2 · ECE 4.90 · NLL 0.612 (n = 1267)``; ACC and ECE shown ×100."""
    if metrics is not None:
        acc, ece = float(metrics["acc"]), float(metrics["ece"])
    else:  # recoverable from the bins alone; NLL is not
        full = bins.counts > 0
        acc = float((bins.accuracy[full] * bins.counts[full]).sum() / bins.n)
        ece = bins.ece
    parts = [f"ACC {100 * acc:.1f}", f"ECE {100 * ece:.2f}"]
    if metrics is not None and "nll" in metrics:
        parts.append(f"NLL {float(metrics['nll']):.3f}")
    text = " · ".join(parts) + f" (n = {bins.n})"
    return f"{label}\n{text}" if label else text


def draw_reliability(
    bins: CalibrationBins, metrics: Mapping[str, float] | None = None, *, label: str | None = None
) -> Figure:
    """Build the figure: accuracy bars per bin, the diagonal, gap outlines, and a count histogram.

    Args:
        bins: per-bin data from ``metrics.reliability_bins``; the extra "confidence = 1" bucket, if
            non-empty, is drawn as a marker at x = 1 (it is a separate bucket in the ECE too).
        metrics: optional dict with ``acc``, ``ece`` (fractions) and ``nll`` for the title.
        label: optional first title line (run / task / method).
    """
    n_bins = bins.edges.numel() - 1
    lo, width = bins.edges[:-1].tolist(), 1.0 / n_bins
    counts = bins.counts[:n_bins].tolist()
    acc = torch.nan_to_num(bins.accuracy[:n_bins], nan=0.0).tolist()
    conf = bins.mean_confidence[:n_bins]

    fig = _agg_figure(figsize=(5.0, 6.0), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(lo, acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.6, label="accuracy")
    full = [k for k in range(n_bins) if counts[k] > 0]
    gap_base = [min(acc[k], float(conf[k])) for k in full]
    gap_height = [abs(acc[k] - float(conf[k])) for k in full]
    top.bar([lo[k] for k in full], gap_height, bottom=gap_base, width=width, align="edge",
            fill=False, edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0, label="perfect calibration")
    if int(bins.counts[n_bins]) > 0:
        top.scatter([1.0], [float(bins.accuracy[n_bins])], marker="D", color="tab:orange", zorder=3, clip_on=False,
                    label=f"confidence = 1 (n = {int(bins.counts[n_bins])})")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=_title(bins, metrics, label))

    bottom.bar(lo, counts, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.6)
    bottom.set(xlabel="confidence (top label)", ylabel="count")
    fig.legend(*top.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    return fig


def save_reliability_diagram(
    bins: CalibrationBins,
    path: str | os.PathLike[str],
    metrics: Mapping[str, float] | None = None,
    *,
    label: str | None = None,
) -> Path:
    """Draw the reliability diagram and write it atomically as a PNG; returns the path.

    The parent folder must exist. See ``draw_reliability`` for the arguments.
    """
    fig = draw_reliability(bins, metrics, label=label)
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
