"""Which published paired intervals survive a t interval over seeds (stop 37's correction).

Before `af044e3`, `compare` built its Δ intervals by a two-level percentile bootstrap that is too narrow
at 2-6 seeds. The corrected interval (`bayeslora.evaluation.significance.paired_difference`) needs the
per-example prediction files; a `compare.json` keeps only per-seed rows. This script reads those rows
and prints, for every table line with >= 2 paired seeds whose published NLL or Brier interval excluded 0,
whether a t interval over the seeds' means (S - 1 degrees of freedom, no example term) still does, as a
markdown table of the ones that do not.

    python benchmarks/interval_proxy.py benchmarks/results/compare-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy.stats import t as student_t


def rows_that_fall(path: Path) -> tuple[int, int, list[str]]:
    """(published intervals excluding 0, of them surviving the proxy, table lines of those that do not)."""
    summary = json.loads(path.read_text())
    reference = summary["plan"]["reference"]
    rows = {(r["budget"], r["train_task"], r["eval_task"], r["cell"], r["mode"], r["seed"]): r for r in summary["rows"]}
    excluded = kept = 0
    lines = []
    for e in summary["table"]:
        vs = e.get("vs_reference")
        if not vs or len(vs["seeds"]) < 2:
            continue
        where = (e["budget"], e["train_task"], e["eval_task"])
        for metric in ("nll", "brier"):
            per_seed = [rows[(*where, e["cell"], e["mode"], s)][metric]
                        - rows[(*where, reference, vs.get("mode", "mean"), s)][metric] for s in vs["seeds"]]
            low, high = vs[metric]["low"], vs[metric]["high"]
            if not (high < 0 or low > 0):
                continue
            excluded += 1
            mean = statistics.fmean(per_seed)
            half = student_t.ppf(0.975, len(per_seed) - 1) * statistics.stdev(per_seed) / len(per_seed) ** 0.5
            if mean + half < 0 or mean - half > 0:
                kept += 1
                continue
            lines.append(f"| `{path.stem}` | {e['train_task']} → {e['eval_task']} | {e['cell']} ({e['mode']}) | "
                         f"{'NLL' if metric == 'nll' else 'Brier'} | {len(per_seed)} | {mean:+.3f} [{low:+.3f}, "
                         f"{high:+.3f}] | [{mean - half:+.3f}, {mean + half:+.3f}] |")
    return excluded, kept, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="compare.json files")
    args = parser.parse_args()
    excluded = kept = 0
    lines = []
    for path in sorted(args.summaries):
        e, k, fallen = rows_that_fall(path)
        excluded, kept, lines = excluded + e, kept + k, lines + fallen
    print(f"published intervals over >= 2 seeds excluding 0: {excluded}; still excluding 0 under a t interval "
          f"over seeds: {kept}; no longer: {excluded - kept}\n")
    print("| file | set | cell (mode) | metric | seeds | published Δ [95%] | t over seeds [95%] |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
