"""``OUTPUT/bench.md`` and ``OUTPUT/plots/``: everything a suite's results say, from the JSON lines alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from ..evaluation import atomic_write
from .plots import write_plots
from .results import latest_rows, read_rows, results_files
from .table import markdown_table

__all__ = ["write_report"]


def _header(rows: list[dict[str, Any]], description: Optional[str], units: Optional[Iterable[str]] = None,
            left_out: Iterable[str] = (), stale: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``units``: the suite's unit ids (None: every row's unit counts as the suite's)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    suites = sorted({r["suite"] for r in rows})
    lines = [f"# Benchmark: {', '.join(suites)}", ""]
    if description:
        lines += [description.strip(), ""]
    # no commit: run from an installed wheel, or from a copy that is not a git checkout
    commits = sorted({r.get("commit") or "unknown (not a git checkout; see versions)" for r in rows})
    splits = sorted({r["split"] for r in rows})
    mine = {r["unit"] for r in rows} if units is None else set(units)
    of = "" if units is None else f" of {len(mine)}"
    lines.append(f"Reported on `{', '.join(splits)}`; commit(s) {', '.join(f'`{c}`' for c in commits)}; "
                 f"{len({r['unit'] for r in ok if r['unit'] in mine} - set(stale))}{of} units finished with the "
                 f"suite's settings, {len({r['unit'] for r in rows if r['status'] == 'error' and r['unit'] in mine})} "
                 f"failed.")
    lines += list(left_out)
    others = sorted({r["unit"] for r in rows if r["unit"] not in mine})
    if others:
        lines.append(f"Also shown as they are, not checked against their own suites: rows of {len(others)} unit(s) "
                     f"of {', '.join(sorted({str(r.get('suite')) for r in rows if r['unit'] in others}))}.")
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


def in_suite(rows: list[dict[str, Any]], suite: str, units: dict[str, Optional[str]]
             ) -> tuple[list[dict[str, Any]], set[str], list[str]]:
    """Hold a folder's rows against suite ``suite`` as it stands (``units``: unit id -> its signature now, None
    where its data is not here to check). Returns the rows to show, the units among them that ran with other
    settings or data than the suite has now (or before rows recorded a signature, or under an older signature
    scheme: no telling), and header lines naming what was left out or marked. Rows of this suite's units it no
    longer has (a dropped seed or cell) are left out; rows of other suites sharing the folder (narrowed
    suites, one per task) are shown as they are."""
    dropped = sorted({r["unit"] for r in rows if r.get("suite") == suite and r["unit"] not in units})
    stale = {r["unit"] for r in rows if r["unit"] in units and r["status"] == "ok"  # any suite's run of its units
             and units[r["unit"]] not in (None, r.get("unit_signature"))}
    notes = []
    if stale:
        notes.append(f"‡ marks lines with {len(stale)} finished unit(s) that ran with other settings or data than the "
                     f"suite has now, or whose signature predates the current scheme, so a line may mix "
                     f"configurations (rerun `bayeslora bench` to redo them): {_named(sorted(stale))}.")
    if dropped:
        notes.append(f"Left out: rows of {len(dropped)} unit(s) this suite no longer has: {_named(dropped)}.")
    return [r for r in rows if r["unit"] not in dropped], stale, notes


def write_report(output: Path, files: Optional[Iterable[Path]] = None, description: Optional[str] = None,
                 units: Optional[dict[str, Optional[str]]] = None, suite: Optional[str] = None
                 ) -> tuple[Path, list[Path]]:
    """Read every results file in ``OUTPUT/results`` (or ``files``) and write the table and the plots; with
    ``units`` (suite ``suite``'s unit ids and current signatures) held against the suite as it stands
    (:func:`in_suite`)."""
    output = Path(output)
    rows = latest_rows(read_rows(files if files is not None else results_files(output)))
    if not rows:
        raise FileNotFoundError(f"{output}/results: no benchmark rows to report")
    notes: list[str] = []
    stale: set[str] = set()
    if units is not None:
        rows, stale, notes = in_suite(rows, suite, units)
        if not rows:
            raise ValueError(f"{output}/results: no row belongs to suite {suite!r} as it stands ({' '.join(notes)})")
    text = markdown_table(rows, _header(rows, description, units, notes, stale), stale)
    table = output / "bench.md"
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(table, lambda handle: handle.write(text.encode()))
    return table, write_plots(rows, output / "plots")
