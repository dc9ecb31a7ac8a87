"""Which published paired intervals still exclude 0 once reconstructed the corrected way (stop 37).

Before stop 37, `compare` built its Δ intervals by a two-level percentile bootstrap that is too narrow at
2-6 seeds. The corrected interval (`bayeslora.evaluation.significance.paired_difference`) needs the
per-example prediction files, which were not kept; a `compare.json` keeps the per-seed rows and the
published interval. From those this script rebuilds the two variance terms: the seed term from the per-seed
differences (s^2 / S) and the example term from the published width (the old bootstrap's variance was about
example + (S - 1)/S x seed, so example = (half-width / 1.96)^2 - (S - 1)/S x s^2 / S), adds them and takes a
Welch t quantile. Adding them counts the seed x example interaction twice, so the rebuilt interval is wider
than the exact one in expectation, not case by case (the published width is a percentile width over 2-6
discrete seed picks, and the exact interval is itself an estimate): a line whose rebuilt interval spans 0 is
no longer shown to exclude it; one that clears 0 by less than MARGIN x its half-width is undecided. Prints
the counts and markdown tables of both.

    python benchmarks/interval_proxy.py benchmarks/results/compare-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy.stats import t as student_t

MARGIN = 1.2  # |mean| / rebuilt half-width below this: too close to call from the rebuild


def rows_that_fall(path: Path) -> tuple[int, int, list[str], list[str]]:
    """(published intervals excluding 0, of them still excluding 0 rebuilt, table lines of those that do not,
    table lines of those that do by less than MARGIN)."""
    summary = json.loads(path.read_text())
    reference = summary["plan"]["reference"]
    rows = {(r["budget"], r["train_task"], r["eval_task"], r["cell"], r["mode"], r["seed"]): r for r in summary["rows"]}
    excluded = kept = 0
    lines, narrow = [], []
    for e in summary["table"]:
        vs = e.get("vs_reference")
        if not vs or len(vs["seeds"]) < 2:
            continue
        n = e["n"]
        where = (e["budget"], e["train_task"], e["eval_task"])
        for metric in ("nll", "brier"):
            if vs.get(metric) is None:  # a non-finite score: no published interval
                continue
            per_seed = [rows[(*where, e["cell"], e["mode"], s)][metric]
                        - rows[(*where, reference, vs.get("mode", "mean"), s)][metric] for s in vs["seeds"]]
            low, high = vs[metric]["low"], vs[metric]["high"]
            if not (high < 0 or low > 0):
                continue
            excluded += 1
            mean, seeds = statistics.fmean(per_seed), len(per_seed)
            v_seeds = statistics.variance(per_seed) / seeds
            v_examples = max(((high - low) / 2 / 1.96) ** 2 - (seeds - 1) / seeds * v_seeds, 0.0)
            v = v_seeds + v_examples
            parts = v_seeds ** 2 / (seeds - 1) + v_examples ** 2 / (n - 1)
            half = student_t.ppf(0.975, v ** 2 / parts if parts > 0 else float("inf")) * v ** 0.5
            line = (f"| `{path.stem}` | {e['train_task']} → {e['eval_task']} | {e['cell']} ({e['mode']}) | "
                    f"{'NLL' if metric == 'nll' else 'Brier'} | {len(per_seed)} | {mean:+.3f} [{low:+.3f}, "
                    f"{high:+.3f}] | [{mean - half:+.3f}, {mean + half:+.3f}] | {abs(mean) / half:.2f} |")
            if mean + half < 0 or mean - half > 0:
                kept += 1
                if abs(mean) < MARGIN * half:
                    narrow.append(line)
            else:
                lines.append(line)
    return excluded, kept, lines, narrow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="compare.json files")
    args = parser.parse_args()
    excluded = kept = 0
    fallen, narrow = [], []
    for path in sorted(args.summaries):
        e, k, f, n = rows_that_fall(path)
        excluded, kept, fallen, narrow = excluded + e, kept + k, fallen + f, narrow + n
    head = ("| file | set | cell (mode) | metric | seeds | published Δ [95%] | rebuilt [95%] | |mean| / half |\n"
            "|---|---|---|---|---|---|---|---|")
    print(f"published intervals over >= 2 seeds excluding 0: {excluded}; still excluding 0 rebuilt: {kept} "
          f"(of which by less than {MARGIN} x the half-width, undecided: {len(narrow)}); no longer shown to: "
          f"{excluded - kept}\n")
    print("No longer shown to exclude 0:\n\n" + head + "\n" + "\n".join(fallen))
    print(f"\nUndecided (the rebuilt interval clears 0 by less than {MARGIN} x its half-width):\n\n" + head + "\n"
          + "\n".join(narrow))


if __name__ == "__main__":
    main()
