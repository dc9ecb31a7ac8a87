"""The benchmark's markdown table, built from result rows alone (so merged shards need no run folders).

One table per evaluated set (training task → eval set) and scoring protocol; one line per cell variant
and mode with its predictive draws S, mean ± std over the seeds present; ACC, ECE and AURC ×100. The best value of each column within a set is bold
(highest ACC and AUROC; lowest ECE, NLL, Brier and AURC). Units that failed are listed with their error.
"""

from __future__ import annotations

import re
import statistics
from typing import Any, Callable, Optional

__all__ = ["aggregate", "line_order", "markdown_table"]

# (column, row key, scale, digits, better: "max" | "min" | None)
COLUMNS: tuple[tuple[str, str, float, int, Optional[str]], ...] = (
    ("ACC", "acc", 100, 1, "max"), ("ECE", "ece", 100, 1, "min"), ("NLL", "nll", 1, 3, "min"),
    ("Brier", "brier", 1, 3, "min"), ("AURC", "aurc", 100, 1, "min"), ("AURC by MI", "aurc_mi", 100, 1, "min"),
    ("entropy", "entropy", 1, 3, None), ("MI", "mi", 1, 4, None),
    ("AUROC by entropy", "auroc_entropy", 100, 1, "max"), ("AUROC by MI", "auroc_mi", 100, 1, "max"),
)
COSTS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("train s", "train_seconds", lambda v: f"{v:.0f}"),
    ("train ex/s", "train_examples_per_second", lambda v: f"{v:.2g}" if v < 10 else f"{v:.0f}"),
    ("eval s", "eval_seconds", lambda v: f"{v:.0f}"),
    ("eval ex/s", "examples_per_second", lambda v: f"{v:.2g}" if v < 10 else f"{v:.0f}"),
    ("train peak MB", "train_peak_memory_bytes", lambda v: f"{v / 2**20:.0f}"),
    ("eval peak MB", "eval_peak_memory_bytes", lambda v: f"{v / 2**20:.0f}"),
    ("trainable", "trainable_parameters", lambda v: f"{v / 1e6:.2f}M"),
    ("stored", "parameters", lambda v: f"{v / 1e6:.2f}M"),
)


NOT_COMPARABLE = {"boolq_val_even": " — trained on two thirds of val_even: not comparable with published BoolQ numbers"}


def protocol(row: dict[str, Any]) -> str:
    """How a row's choices were scored (:func:`~bayeslora.compare.scoring_of` on the row and the training
    config it carries), or "unrecorded"."""
    from ..compare import scoring_of

    return scoring_of(row, {"train": row.get("config") or {}}) or "unrecorded"


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(split, budget, train task, eval task, kind, scoring) -> {(cell, mode): {key: (mean, std, k) or None}},
    k the number of seeds with a value (a seed whose MI is noise has no AURC by MI; a non-finite value is
    stored as None): a line shows "k/N seeds" where k < N and does not compete for the column's best.

    The scoring protocol is part of the set's key: two protocols' numbers of one set are not averaged
    together (rows written before it was recorded read it from their run config)."""
    groups: dict[tuple, dict[tuple, list[dict[str, Any]]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = (r["split"], r["budget"], r["train_task"], r["eval_task"], r["kind"], protocol(r))
        groups.setdefault(key, {}).setdefault((r["cell"], r["mode"]), []).append(r)
    out: dict[tuple, dict[str, Any]] = {}
    for key, cells in groups.items():
        out[key] = {}
        for variant, members in cells.items():
            stats: dict[str, Any] = {"seeds": sorted(m["seed"] for m in members), "n": members[0]["n"],
                                     "samples": sorted({m.get("samples") for m in members}, key=str)}
            for _, name, *_ in COLUMNS + COSTS:  # (mean, std, how many seeds had a value) or None
                values = [m[name] for m in members if m.get(name) is not None]
                stats[name] = ((statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                                len(values)) if values else None)
            out[key][variant] = stats
    return out


def line_order(item: tuple[tuple[str, str], Any]) -> list:
    """Sort key of a (cell, mode) line: numbers in labels by value (``S=2`` before ``S=16``, ``kl-3`` before
    ``kl-10``), the rest alphabetically."""
    (cell, mode), _ = item
    return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
            for t in re.split(r"(\d+(?:\.\d+)?)", cell) if t] + [(1, 0.0, mode), (2, 0.0, cell)]  # ties: as written


def _best(cells: dict[tuple, dict[str, Any]], name: str, better: Optional[str]) -> Optional[float]:
    values = [s[name][0] for s in cells.values() if s[name] is not None and s[name][2] == len(s["seeds"])]
    if better is None or len(values) < 2:
        return None
    return max(values) if better == "max" else min(values)


def markdown_table(rows: list[dict[str, Any]], header: list[str], stale: frozenset[str] | set[str] = frozenset()) -> str:
    """The tables; a line holding a unit in ``stale`` (ran with other settings than its suite's now) gets ‡."""
    lines = list(header)
    marked = {(r["split"], r["budget"], r["train_task"], r["eval_task"], r["cell"], r["mode"])
              for r in rows if r["unit"] in stale} if stale else set()
    for (split, budget, train_task, eval_task, kind, scoring), cells in sorted(
            aggregate(rows).items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][4] != "id", kv[0][2:])):
        shown = [c for c in COLUMNS if any(s[c[1]] is not None for s in cells.values())]
        costs = [c for c in COSTS if any(s[c[1]] is not None for s in cells.values())]
        n = sorted({s["n"] for s in cells.values()})
        caveat = NOT_COMPARABLE.get(eval_task, "")
        lines += ["", f"### {train_task} → {eval_task} ({'in-distribution' if kind == 'id' else 'OOD'}; "
                      f"{split}; budget {budget}; scored by {scoring}; n = {', '.join(map(str, n))}){caveat}", ""]
        head = ["cell", "mode", "S", "seeds"] + [c[0] for c in shown] + [c[0] for c in costs]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        best = {c[1]: _best(cells, c[1], c[4]) for c in shown}
        for (cell, mode), s in sorted(cells.items(), key=line_order):
            mark = "‡" if (split, budget, train_task, eval_task, cell, mode) in marked else ""
            out = [cell + mark, mode, "/".join(str(k) for k in s["samples"] if k is not None), str(len(s["seeds"]))]
            for _, name, scale, digits, _ in shown:
                if s[name] is None:
                    out.append("")
                    continue
                mean, std, k = s[name]
                text = f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if k > 1 else "")
                if k < len(s["seeds"]):  # only some seeds have it: say so, and it is not a candidate for best
                    out.append(f"{text} ({k}/{len(s['seeds'])} seeds)")
                    continue
                out.append(f"**{text}**" if best[name] is not None and mean == best[name] else text)
            out += ["" if s[name] is None else fmt(s[name][0]) for _, name, fmt in costs]
            lines.append("| " + " | ".join(out) + " |")
    failed = [r for r in rows if r.get("status") == "error"]
    if failed:
        lines += ["", "Failed units (rerun the command to retry them):", ""]
        lines += [f"- `{r['unit']}`: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"
