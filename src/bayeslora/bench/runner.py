"""Run a suite's matrix, one unit at a time, resumable and shardable.

A *unit* is one training run (budget × task × cell × seed) with everything scored from it: its
evaluations on every set, its post-hoc calibrations and their evaluations. A post-hoc cell therefore
always runs in the same shard as the run it is fitted on, and OOD detection compares sets scored by the
same adapter. ``--shard i/n`` deals each cell's units round the n shards in turn, the cell's first unit
to shard (cell index mod n) + 1 and each next one to the next shard, so the shards partition the matrix and
every shard holds its share of every cell (cells differ in cost: a LoRA unit is a fraction of a Bayesian
one; taking every n-th unit of the order gave one shard all of a cheap cell whenever n divided the cells).
A unit whose latest row in the output's results is ``ok`` is skipped; a unit that raises is recorded with
its error and traceback and the others go on (the next invocation retries it); ``run_bench`` returns the failed ones, and ``bayeslora bench`` exits 1 when there are any.
"""

from __future__ import annotations

import json
import subprocess
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ..compare import Budget, Cell, Plan, check_data, run_unit, unit_rows
from ..layout import RunFolder
from .results import append_rows, finite, latest_rows, read_rows, results_file, results_files
from .suite import Suite

__all__ = ["Unit", "current_signatures", "parse_shard", "run_bench", "shard_units", "suite_signatures", "suite_units"]

Unit = tuple[str, Budget, str, Cell, int]  # (id, budget, task, cell, seed)


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"2/4"`` -> (2, 4); None -> None."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers, e.g. 1/4; got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text}: need 1 <= I <= N")
    return i, n


def suite_units(plan: Plan) -> list[Unit]:
    """The matrix in its fixed order; a unit's id names the split it reports on, so dev and test results
    of one suite never stand for each other."""
    return [(f"{plan.split}/{b.name}/{t}/{c.label}/seed-{s}", b, t, c, s) for b, t, c, s in plan.runs()]


def unit_signature(plan: Plan, budget: Budget, task: str, cell: Cell, seed: int) -> str:
    """A hash of everything a unit's rows depend on (its resolved training config, the sha256 of every data
    file it trains and scores on, its sets and modes, its calibrations and extra draw counts, the eval subset
    and split): a finished unit whose suite or data changed runs again; one whose folder or data folder moved
    does not."""
    import hashlib
    import json

    from ..compare import train_config
    from ..runs import eval_data_sha256
    from ..training import resolve
    from ..training.config import LOCATION_ONLY
    from ..training.loop import run_data_files

    cfg = resolve(train_config(plan, budget, task, cell, seed))
    train = {k: v for k, v in cfg.to_dict().items() if k not in LOCATION_ONLY}  # the data's bytes stand in for its paths
    data = {name: [f["sha256"] for f in files] for name, files in run_data_files(cfg).items()}
    data.update({f"eval:{t}": eval_data_sha256(t, plan.split, cfg.data_dir) for t, _ in plan.evals_of(task)})
    spec = {"train": train, "data": data, "split": plan.split, "evals": plan.evals_of(task),
            "variants": plan.variants(cell), "first": plan.max_eval_examples}
    if plan.draw_variants(cell):  # only where there are any: the signatures of units from before stay as they were
        spec["draws"] = plan.draw_variants(cell)
    if cfg.val_file is not None:  # a whole val file, not a slice of train (the same bytes either way when it is
        spec["val_slice"] = False  # the train file); only where set, so other units keep their signatures
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def current_signatures(plan: Plan, units: list[Unit]) -> dict[str, Optional[str]]:
    """unit id -> its signature as the suite and data stand now; None where its data is not here (a finished
    unit then stays finished, and to run it, ``check_data`` names what is missing)."""
    def signature(unit: Unit) -> Optional[str]:
        try:
            return unit_signature(plan, *unit[1:])
        except FileNotFoundError:
            return None

    return {u[0]: signature(u) for u in units}


def suite_signatures(suite: Suite, output: Path, splits: list[str], data_dir: Optional[str] = None
                     ) -> dict[str, Optional[str]]:
    """Every unit of ``suite`` on each of ``splits``, with its signature now: what a report may show."""
    out: dict[str, Optional[str]] = {}
    for split in splits:
        try:
            plan = suite.plan(output, split=split, data_dir=data_dir)
        except ValueError:  # a split the suite cannot run (no OOD sets named for it): none of its units
            continue
        out.update(current_signatures(plan, suite_units(plan)))
    return out


def shard_units(units: list[Unit], shard: Optional[tuple[int, int]]) -> list[Unit]:
    """This shard's units, in the matrix order: each cell's units dealt round the shards in turn."""
    if shard is None:
        return units
    index, n = shard
    cells: dict[str, int] = {}
    dealt: dict[str, int] = {}
    mine = []
    for unit in units:
        label = unit[3].label
        first = cells.setdefault(label, len(cells))
        if (first + dealt.get(label, 0)) % n == index - 1:
            mine.append(unit)
        dealt[label] = dealt.get(label, 0) + 1
    return mine


def _commit() -> Optional[str]:
    """The source checkout's commit (``+dirty`` with uncommitted changes to the package); None outside a
    git checkout (an installed wheel: its version is in ``versions``)."""
    package = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", str(package)],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def finished_units(output: Path) -> dict[str, str]:
    """unit id -> the signature its latest complete attempt succeeded with."""
    return {r["unit"]: r.get("unit_signature", "") for r in latest_rows(read_rows(results_files(output)))
            if r["status"] == "ok"}


def run_bench(suite: Suite, output: Path, *, split: Optional[str] = None, data_dir: Optional[str] = None,
              shard: Optional[tuple[int, int]] = None, progress: bool = True, log=print,
              ) -> tuple[Path, int, list[str]]:
    """Run this shard's unfinished units; returns the results file it appends to, the shard's unit count and
    the ids of the units that failed this time (recorded there; the others went on)."""
    from tqdm.auto import tqdm

    from ..training.loop import versions

    output = Path(output)
    plan = suite.plan(output, split=split, data_dir=data_dir)
    mine = shard_units(suite_units(plan), shard)
    done = finished_units(output)
    signatures = current_signatures(plan, mine)
    todo = [u for u in mine if not (u[0] in done and signatures[u[0]] in (None, done[u[0]]))]
    check_data(plan, [u[1:] for u in todo])
    target = results_file(output, shard)
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    log(f"bench {suite.name}{where}: {len(mine)} units, {len(mine) - len(todo)} already finished; "
        f"reporting on '{plan.split}'; results -> {target}")
    meta = {"suite": suite.name, "suite_sha256": suite.sha256, "split": plan.split,
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}", "commit": _commit(), "versions": versions()}
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="bench units", unit="unit",
               disable=not progress, dynamic_ncols=True)
    say = (lambda text: bar.write(text)) if progress else log
    failed = []
    for unit_id, budget, task, cell, seed in todo:
        bar.set_postfix_str(unit_id)
        started = time.perf_counter()
        attempt = {"unit": unit_id, "attempt": uuid.uuid4().hex, "unit_signature": signatures[unit_id], **meta}
        try:
            run_unit(plan, budget, task, cell, seed, unit_id, say)
            rows, _ = unit_rows(plan, budget, task, cell, seed)
            if not rows:
                raise RuntimeError("the unit finished but none of its evaluations is on disk")
            config = _run_facts(plan.run_dir(budget, task, cell, seed))
            rows = [finite({**attempt, "status": "ok", **config, **r}) for r in rows]
            json.dumps(rows, allow_nan=False)  # a row that cannot be stored fails this unit, not the shard
        except Exception as err:  # noqa: BLE001 - recorded, and the matrix goes on
            rows = [{**attempt, "status": "error", "budget": budget.name, "train_task": task, "cell": cell.label,
                     "seed": seed, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}]
            say(f"{unit_id}: FAILED ({type(err).__name__}: {err}); recorded, going on")
            failed.append(unit_id)
        stamp = datetime.now(timezone.utc).isoformat()
        for r in rows:
            r["finished_at"], r["unit_seconds"], r["rows_in_attempt"] = stamp, time.perf_counter() - started, len(rows)
        append_rows(target, rows)
        bar.update(1)
    bar.close()
    return target, len(mine), failed


def _run_facts(run_dir: Path) -> dict[str, Any]:
    config = RunFolder(run_dir).read_config()
    return {"run": str(run_dir), "config": config["train"], "n_train": config.get("n_train"),
            "n_val": config.get("n_val"), "total_steps": config.get("total_steps")}
