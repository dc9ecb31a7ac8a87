"""``OUTPUT/bench.md`` and ``OUTPUT/plots/``: everything a suite's results say, from the JSON lines alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from ..evaluation import atomic_write
from .plots import write_plots
from .results import latest_rows, read_rows, results_files
from .table import markdown_table

__all__ = ["write_report"]


def _header(rows: list[dict[str, Any]], description: Optional[str], total: Optional[int] = None,
            left_out: Iterable[str] = ()) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    suites = sorted({r["suite"] for r in rows})
    lines = [f"# Benchmark: {', '.join(suites)}", ""]
    if description:
        lines += [description.strip(), ""]
    # no commit: run from an installed wheel, or from a copy that is not a git checkout
    commits = sorted({r.get("commit") or "unknown (not a git checkout; see versions)" for r in rows})
    splits = sorted({r["split"] for r in rows})
    of = "" if total is None else f" of {total}"
    lines.append(f"Reported on `{', '.join(splits)}`; commit(s) {', '.join(f'`{c}`' for c in commits)}; "
                 f"{len({r['unit'] for r in ok})}{of} units finished, {len({r['unit'] for r in rows if r['status'] == 'error'})} failed.")
    lines += list(left_out)
    if ok:
        v = ok[0]["versions"]
        lines.append("Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + ".")
        sizes = sorted({(r["train_task"], r.get("n_train"), r.get("n_val")) for r in ok})
        lines.append("Training rows (fit / val slice) per task: " + "; ".join(
            f"{t} {n} / {m}" for t, n, m in sizes) + ".")
        evals = sorted({(r["eval_task"], r["n"]) for r in ok})
        lines.append("Scored examples per set: " + "; ".join(f"{t} {n}" for t, n in evals) + ".")
        budgets = sorted({(r["budget"], r["config"].get("epochs"), r["config"].get("batch_size")) for r in ok},
                         key=str)
        lines.append("Budget: " + "; ".join(f"{b}: {e if e is not None else 'method default'} epoch(s), batch {bs}"
                                            for b, e, bs in budgets) + ".")
    lines += ["", "ACC, ECE and AURC ×100 (mean ± std over seeds); AUROC ×100 of telling the OOD set from the "
              "training task's own set (50 = chance); entropy = aleatoric + MI; bold = best in the set."]
    return lines


def _named(units: list[str], most: int = 10) -> str:
    return ", ".join(f"`{u}`" for u in units[:most]) + (f" and {len(units) - most} more" if len(units) > most else "")


def in_suite(rows: list[dict[str, Any]], units: dict[str, Optional[str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the suite as it stands (``units``: unit id -> its signature now, None where its data is not
    here to check), and a line for each kind left out: units the suite no longer has, and finished units that
    ran with other settings or data than the suite's now (the next ``bench`` reruns them). Averaging either
    into a line would mix configurations under one label."""
    foreign = sorted({r["unit"] for r in rows if r["unit"] not in units})
    stale = sorted({r["unit"] for r in rows if r["unit"] in units and r["status"] == "ok"
                    and units[r["unit"]] not in (None, r.get("unit_signature"))})
    notes = []
    if stale:
        notes.append(f"Left out: {len(stale)} finished unit(s) that ran with other settings or data than the suite's "
                     f"now (rerun `bayeslora bench` to redo them): {_named(stale)}.")
    if foreign:
        notes.append(f"Left out: rows of {len(foreign)} unit(s) this suite no longer has: {_named(foreign)}.")
    return [r for r in rows if r["unit"] in units and r["unit"] not in stale], notes


def write_report(output: Path, files: Optional[Iterable[Path]] = None, description: Optional[str] = None,
                 units: Optional[dict[str, Optional[str]]] = None) -> tuple[Path, list[Path]]:
    """Read every results file in ``OUTPUT/results`` (or ``files``) and write the table and the plots; with
    ``units`` (the suite's unit ids and current signatures), only the rows of the suite as it stands."""
    output = Path(output)
    rows = latest_rows(read_rows(files if files is not None else results_files(output)))
    if not rows:
        raise FileNotFoundError(f"{output}/results: no benchmark rows to report")
    notes: list[str] = []
    if units is not None:
        rows, notes = in_suite(rows, units)
        if not rows:
            raise ValueError(f"{output}/results: no row belongs to the suite as it stands ({' '.join(notes)})")
    text = markdown_table(rows, _header(rows, description, None if units is None else len(units), notes))
    table = output / "bench.md"
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(table, lambda handle: handle.write(text.encode()))
    return table, write_plots(rows, output / "plots")
