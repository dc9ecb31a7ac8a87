"""Benchmark suites are data: a TOML file names the model, tasks, OOD protocol, cells, seeds and budget.

The shipped suites live in ``bayeslora/bench/suites/*.toml`` (package data); ``--suite`` takes one of
their names or the path of a user's own file. Every key is checked, and a bad one is reported with the
file and the key, so a typo never silently runs the wrong matrix. Schema (see the shipped files)::

    description = "..."                    # required: what the suite measures and what it costs
    model = "minilm"                       # --model of every run
    tasks = ["arc_easy", "openbookqa"]     # in-distribution training tasks
    seeds = [0, 1, 2]
    split = "dev"                          # where it reports unless --split says otherwise
    samples = 4                            # predictive draws S in sample mode (selection and scoring)
    samples_sweep = [1, 2, 4, 8]           # optional: also score each stochastic run with these S (no retraining)
    max_length = 128
    max_eval_examples = 200                # optional: score only each set's first N examples
    reference = "lora"                     # the cell the others are paired with
    calibrations = ["temperature", "laplace"]
    calibration_cells = { laplace = ["lora"] }   # optional: fit a calibration on these cells only
    [budget]  name = "short"  epochs = 1  batch_size = 16
    [ood]     train = "openbookqa"  eval = { dev = [...], test = [...] }   # or eval = [...] for both
    [defaults]                             # settings of every cell (TrainConfig fields, method options)
    [cells.lora]                           # a cell per table; method defaults to the table's name
    [cells.flow-0]  method = "bayeslora"  flow_depth = 0
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..compare import Budget, Cell, Plan, is_task

__all__ = ["SUITES_DIR", "Suite", "load_suite", "shipped_suites"]

SUITES_DIR = Path(__file__).with_name("suites")
_KEYS = {"description", "model", "tasks", "seeds", "split", "samples", "samples_sweep", "max_length", "max_eval_examples",
         "reference", "calibrations", "calibration_cells", "budget", "ood", "defaults", "cells"}
_RESERVED = {"method_options", "progress", "output", "task", "seed", "epochs", "batch_size"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # labels become folder names


def _non_finite(value: Any, where: str = "") -> Optional[str]:
    """The key path of the first NaN or infinity in ``value`` (TOML allows both; no setting wants them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


@dataclass(frozen=True)
class Suite:
    name: str
    source: Path
    sha256: str
    description: str
    model: str
    tasks: list[str]
    seeds: list[int]
    split: str
    samples: int
    max_length: Optional[int]
    max_eval_examples: Optional[int]
    reference: str
    calibrations: list[str]
    calibration_cells: dict[str, list[str]]
    budget: Budget
    ood_train: Optional[str]
    ood_eval: dict[str, list[str]]  # split -> OOD sets
    cells: list[Cell]
    samples_sweep: list[int]

    def plan(self, output: Path, split: Optional[str] = None, data_dir: Optional[str] = None) -> Plan:
        split = split or self.split
        if self.ood_train and split not in self.ood_eval:
            raise ValueError(f"{self.source}: [ood] eval names no sets for split {split!r} "
                             f"(it has {sorted(self.ood_eval)})")
        plan = Plan(output=Path(output), tasks=list(self.tasks), cells=list(self.cells), seeds=list(self.seeds),
                    budgets=[self.budget], ood_train=self.ood_train,
                    ood_eval=list(self.ood_eval.get(split, [])) if self.ood_train else [],
                    model=self.model, data_dir=data_dir, split=split, samples=self.samples,
                    max_length=self.max_length, reference=self.reference, calibrations=list(self.calibrations),
                    max_eval_examples=self.max_eval_examples, calibration_cells=dict(self.calibration_cells),
                    samples_sweep=list(self.samples_sweep))
        plan.validate(cell_key="cells.{}")
        return plan


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name, or a TOML file by path; raises ValueError naming the file and key."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SUITES_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise FileNotFoundError(f"--suite {name_or_path!r}: no such shipped suite (shipped: "
                                    f"{', '.join(shipped_suites())}) and no such file")
    if not path.exists():
        raise FileNotFoundError(f"--suite {path}: no such file")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    return _parse(data, path, hashlib.sha256(raw).hexdigest())


def _parse(data: dict[str, Any], path: Path, sha256: str) -> Suite:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{path}: {key}: {why}")

    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
    where = _non_finite(data)
    if where is not None:
        raise bad(where, "NaN and infinity are not allowed")

    def task_list(key: str, value: Any) -> list[str]:
        names = str_list(key, value)
        unknown = [n for n in names if not is_task(n)]
        if unknown:
            raise bad(key, f"unknown task {unknown[0]!r}")
        if len(set(names)) != len(names):
            raise bad(key, f"names a task twice: {names}")
        return names

    def get(key: str, kind, default: Any = ..., required: bool = False):
        if key not in data:
            if required or default is ...:
                raise bad(key, "is required")
            return default
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise bad(key, f"must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def str_list(key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, f"must be a list of strings, got {value!r}")
        return value

    description = get("description", str, required=True)
    tasks = task_list("tasks", get("tasks", list, required=True))
    if not tasks:
        raise bad("tasks", "names no task")
    seeds = get("seeds", list, [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad("seeds", f"must be a non-empty list of distinct integers, got {seeds!r}")
    for key in ("samples", "max_length", "max_eval_examples"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise bad(key, f"must be a positive integer, got {value!r}")

    sweep = get("samples_sweep", list, [])
    if not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in sweep) or len(set(sweep)) != len(sweep):
        raise bad("samples_sweep", f"must be a list of distinct positive integers, got {sweep!r}")

    budget = get("budget", dict, {})
    extra = sorted(set(budget) - {"name", "epochs", "batch_size"})
    if extra:
        raise bad(f"budget.{extra[0]}", "unknown key (known: name, epochs, batch_size)")
    for key in ("epochs", "batch_size"):
        value = budget.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise bad(f"budget.{key}", f"must be a positive integer, got {value!r}")
    name = budget.get("name", "default")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad("budget.name", f"must be a name of letters, digits and . _ + - (a folder), got {name!r}")
    budget = Budget(name, budget.get("epochs"), budget.get("batch_size", 16))

    ood = get("ood", dict, {})
    extra = sorted(set(ood) - {"train", "eval"})
    if extra:
        raise bad(f"ood.{extra[0]}", "unknown key (known: train, eval)")
    ood_train = ood.get("train", "")
    if not isinstance(ood_train, str) or (ood_train and not is_task(ood_train)):
        raise bad("ood.train", f"must be a task name (or \"\" for none), got {ood_train!r}")
    ood_train = ood_train or None
    ood_eval_raw = ood.get("eval", [])
    if isinstance(ood_eval_raw, list):
        ood_eval = {split: task_list("ood.eval", ood_eval_raw) for split in ("dev", "test", "val")}
    elif isinstance(ood_eval_raw, dict):
        ood_eval = {split: task_list(f"ood.eval.{split}", sets) for split, sets in ood_eval_raw.items()}
    else:
        raise bad("ood.eval", f"must be a list or a table of lists by split, got {ood_eval_raw!r}")
    if ood_train and not any(ood_eval.values()):
        raise bad("ood.eval", "names no OOD sets although ood.train is set")

    defaults = get("defaults", dict, {})
    cells_raw = get("cells", dict, required=True)
    if not cells_raw:
        raise bad("cells", "names no cell")
    cells = []
    for label, settings in cells_raw.items():
        if not _NAME.match(label):
            raise bad(f"cells.{label}", "a cell label is letters, digits and . _ + - (it names a folder)")
        if not isinstance(settings, dict):
            raise bad(f"cells.{label}", f"must be a table, got {settings!r}")
        merged = {**defaults, **settings}
        reserved = sorted(_RESERVED & set(merged))
        if reserved:
            raise bad(f"cells.{label}", f"{reserved} are set by the suite (budget, seeds, tasks), not by a cell")
        method = merged.pop("method", label)
        cells.append(Cell(label, method, merged))

    calibration_cells = get("calibration_cells", dict, {})
    for key, value in calibration_cells.items():
        str_list(f"calibration_cells.{key}", value)
    reference = get("reference", str, "lora")
    if reference not in {c.label for c in cells}:
        raise bad("reference", f"{reference!r} is not one of the cells ({', '.join(c.label for c in cells)})")
    split = get("split", str, "dev")
    if split not in ("dev", "test", "val"):
        raise bad("split", f"must be dev, test or val, got {split!r}")
    suite = Suite(name=path.stem, source=path, sha256=sha256, description=description,
                  model=get("model", str, "minilm"), tasks=tasks, seeds=seeds, split=split,
                  samples=data.get("samples", 4), max_length=data.get("max_length", 128),
                  max_eval_examples=data.get("max_eval_examples"), reference=reference,
                  calibrations=str_list("calibrations", get("calibrations", list, [])),
                  calibration_cells=calibration_cells, budget=budget, ood_train=ood_train, ood_eval=ood_eval,
                  cells=cells, samples_sweep=sweep)
    try:  # the matrix itself (methods, calibrations, labels) and every cell's settings, built as a unit builds them
        suite.plan(Path("."), split=split)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return suite
