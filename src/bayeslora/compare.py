"""``bayeslora compare``: Bayesian-LoRA against LoRA on the same data, budget and evaluation.

A comparison is a matrix of budgets × training tasks × cells × seeds. A *cell* is a named method with
optional settings (``lora``, ``bayeslora``, ``lora+paper`` = LoRA with the paper's regularisers, ...);
every cell trains with its method's own defaults unless the cell says otherwise. Training selects on the
``val`` slice; evaluation runs on ``--split`` (``dev``). The OOD protocol re-uses the OpenBookQA runs and
scores them on ARC-Easy, ARC-Challenge and MMLU STEM.

Runs and evaluations are files in the output folder (one run folder each, see :mod:`bayeslora.layout`),
so an interrupted comparison resumes where it stopped: trained runs and existing metrics are skipped, a
half-trained run resumes from its checkpoint. With ``--calibrations``, each run is also calibrated post hoc
on its val slice (``temperature``; ``posterior-scale`` and ``posterior-widen`` where the method has a posterior; ``tfb`` on a
deterministic LoRA run) and evaluated
through it, as the extra cells ``LABEL+CALIBRATION`` (e.g. ``lora+temperature``). ``summarise`` reads everything back and writes
``compare.json`` and ``compare.md`` (means ± std over seeds, paired intervals (seeds × examples) against the
reference cell, the ECE noise floor beside every ECE, posterior statistics, and the issue's targets).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .layout import RunFolder, eval_stem, method_label

__all__ = ["Budget", "Cell", "Plan", "check_data", "run_plan", "summarise"]


@dataclass(frozen=True)
class Budget:
    name: str
    epochs: Optional[int]  # None: the method's/recipe's default epochs
    batch_size: int = 16


BUDGETS = {"short": Budget("short", 1), "default": Budget("default", None)}


@dataclass(frozen=True)
class Cell:
    """A named method configuration: TrainConfig fields and method options (anything else)."""

    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Cell":
        """``NAME`` (a registered method) or ``LABEL={"method": ..., "recipe": ..., ...}`` (JSON)."""
        if "=" not in text:
            return cls(text, text)
        label, _, spec = text.partition("=")
        try:
            settings = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"--cell {label}: settings are not a JSON object ({err.msg})") from err
        if not isinstance(settings, dict) or "method" not in settings:
            raise ValueError(f"--cell {label}: settings must be a JSON object with a 'method'")
        reserved = sorted({"method_options", "progress", "output", "task", "seed"} & set(settings))
        if reserved:
            raise ValueError(f"--cell {label}: {reserved} are set by the comparison, not by a cell")
        return cls(label, settings.pop("method"), settings)


@dataclass
class Plan:
    output: Path
    tasks: list[str]
    cells: list[Cell]
    seeds: list[int]
    budgets: list[Budget]
    ood_train: Optional[str] = "openbookqa"
    ood_eval: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge", "mmlu_stem"])
    model: str = "minilm"
    data_dir: Optional[str] = None
    split: str = "dev"
    samples: int = 4
    max_length: Optional[int] = 128
    reference: str = "lora"
    calibrations: list[str] = field(default_factory=list)
    max_eval_examples: Optional[int] = None  # score only each eval set's first N examples (quick suites)
    calibration_cells: dict[str, list[str]] = field(default_factory=dict)  # calibration -> the only cells it fits on
    samples_sweep: list[int] = field(default_factory=list)  # also score each stochastic run with these draw counts

    def variants(self, cell: Cell) -> list[tuple[str, Optional[str]]]:
        """(table label, calibration) of a cell: itself, then each calibration that applies to its method."""
        from .calibration import get_calibration
        from .methods import get_method

        method = get_method(cell.method)
        return [(cell.label, None)] + [(method_label(cell.label, c), c) for c in self.calibrations
                                       if get_calibration(c).applies_to(method)
                                       and cell.label in self.calibration_cells.get(c, [cell.label])]

    def draw_variants(self, cell: Cell) -> list[tuple[str, int]]:
        """(table label, draws) of the extra scorings of a cell's run with each draw count in ``samples_sweep``
        other than the run's own: ``LABEL S=k``, in the method's default mode. None for a method whose
        draws do not follow S (deterministic; an ensemble draws its members)."""
        from .methods import get_method

        method = get_method(cell.method)
        if method.draws(method.default_mode, 1) == method.draws(method.default_mode, 2):
            return []
        own = cell.settings.get("samples", self.samples)
        return [(f"{cell.label} S={k}", k) for k in self.samples_sweep if k != own]

    def labels(self, cell: Cell) -> list[str]:
        """Every table label a cell's run is reported under: itself, its calibrations, its draw counts."""
        return [name for name, _ in self.variants(cell)] + [name for name, _ in self.draw_variants(cell)]

    def method_of(self, label: str) -> str:
        return next(c.method for c in self.cells if label in self.labels(c))

    def default_mode(self, label: str) -> str:
        """The mode a cell's targets are judged in: its calibration's, else its method's default."""
        from .calibration import get_calibration
        from .methods import get_method

        method = get_method(self.method_of(label))
        calibration = next((c for cell in self.cells for name, c in self.variants(cell) if name == label), None)
        return (calibration and get_calibration(calibration).mode_for(method)) or method.default_mode

    def validate(self, cell_key: str = "--cells {}") -> None:
        """Refuse what a unit would fail on, before the first unit trains; ``cell_key`` names a cell in the
        errors (``cells.{}`` in a suite file)."""
        from .calibration import CALIBRATIONS
        from .methods import METHODS

        unknown = sorted(set(self.calibrations) - set(CALIBRATIONS))
        if unknown:
            raise ValueError(f"--calibrations: unknown {unknown}; available: {', '.join(sorted(CALIBRATIONS))}")
        for flag, names in (("--tasks", self.tasks), ("--ood-train", [self.ood_train] if self.ood_train else []),
                            ("--ood-eval", self.ood_eval if self.ood_train else [])):
            typo = next((n for n in names if not is_task(n)), None)
            if typo is not None:
                raise ValueError(f"{flag}: unknown task {typo!r}")
        labels = [c.label for c in self.cells]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--cells: labels must be unique, got {labels}")
        for c in self.cells:
            if c.method not in METHODS:
                raise ValueError(f"{cell_key.format(c.label)}: unknown method {c.method!r}; available: "
                                 f"{', '.join(sorted(METHODS))} (name a variant LABEL='{{\"method\": ...}}')")
            try:
                self.check_cell(c)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{cell_key.format(c.label)}: {err}") from err
        for name, only in self.calibration_cells.items():
            missing = sorted(set(only) - set(labels))
            if name not in self.calibrations or missing:
                raise ValueError(f"calibration cells for {name!r}: {'not a listed calibration' if name not in self.calibrations else f'unknown cells {missing}'}")
        if self.ood_train in self.ood_eval:
            raise ValueError(f"--ood-eval must not contain the OOD training task {self.ood_train!r}")
        bad = [k for k in self.samples_sweep if not isinstance(k, int) or isinstance(k, bool) or k < 1]
        if bad or len(set(self.samples_sweep)) != len(self.samples_sweep):
            raise ValueError(f"samples sweep: must be distinct positive integers, got {self.samples_sweep!r}")
        every = [name for c in self.cells for name in self.labels(c)]
        clash = sorted({name for name in every if every.count(name) > 1})
        if clash:
            raise ValueError(f"--cells: the table labels {clash} would name two things (a cell label equals "
                             "another cell's calibration or draw-count label)")

    def check_cell(self, cell: Cell) -> None:
        """Build what each of the cell's units builds before its model loads (the resolved training config,
        the method's own config), so a bad setting fails at the start, not hours later at its unit."""
        from .methods import get_method
        from .training import resolve

        for budget in self.budgets:
            cfg = resolve(train_config(self, budget, self.train_tasks()[0], cell, self.seeds[0]))
            get_method(cfg.method, cfg.method_options).check(cfg.lora())

    def train_tasks(self) -> list[str]:
        extra = [self.ood_train] if self.ood_train and self.ood_train not in self.tasks else []
        return self.tasks + extra

    def evals_of(self, task: str) -> list[tuple[str, str]]:
        """(eval task, kind) for a training task: its own split (ID; the OOD source's too, which OOD
        detection is measured against) and, for the OOD source, the shifts."""
        out = [(task, "id")]
        if task == self.ood_train:
            out += [(t, "ood") for t in self.ood_eval]
        return out

    def run_dir(self, budget: Budget, task: str, cell: Cell, seed: int) -> Path:
        return self.output / "runs" / budget.name / task / cell.label / f"seed-{seed}"

    def runs(self) -> list[tuple[Budget, str, Cell, int]]:
        return [(b, t, c, s) for b in self.budgets for t in self.train_tasks() for s in self.seeds for c in self.cells]

    def stem(self, eval_task: str, method: str, mode: str, samples: int, calibration: Optional[str] = None) -> str:
        return eval_stem(eval_task, self.split, method, mode, samples, calibration, first=self.max_eval_examples)


def is_task(name: str) -> bool:
    """A registered task, or an MMLU subject or group name."""
    from .data.mmlu_subjects import resolve_mmlu_subjects
    from .data.tasks import TASKS

    if name in TASKS:
        return True
    if name.startswith(("mmlu_", "mmlu:")):
        try:
            return bool(resolve_mmlu_subjects(name))
        except (ValueError, KeyError):
            return False
    return False


def data_dir_of(plan: Plan, cell: Cell) -> Optional[str]:
    """The data folder of a cell's units: the cell's own ``data_dir``, else the plan's. Training, evaluation
    and calibration all read this one, so a unit is never trained on one folder and scored on another."""
    return cell.settings.get("data_dir", plan.data_dir)


def train_config(plan: Plan, budget: Budget, task: str, cell: Cell, seed: int):
    from dataclasses import fields

    from .training import TrainConfig
    from .training.config import DATA_PATHS, absolute_path

    known = {f.name for f in fields(TrainConfig)}
    train_fields = {k: v for k, v in cell.settings.items() if k in known and k != "data_dir"}
    options = {k: v for k, v in cell.settings.items() if k not in known}
    base = dict(model=plan.model, task=task, method=cell.method, data_dir=data_dir_of(plan, cell),
                epochs=budget.epochs, batch_size=budget.batch_size, seed=seed, samples=plan.samples,
                max_length=plan.max_length, progress=False)
    values = {**base, **train_fields, "output": str(plan.run_dir(budget, task, cell, seed))}
    for name in DATA_PATHS:  # recorded absolute, as `train` records them: calibrate and resume from anywhere
        if values.get(name) is not None:
            values[name] = absolute_path(values[name])
    return TrainConfig(**values, method_options=options)


def check_data(plan: Plan, runs: list[tuple[Budget, str, Cell, int]]) -> None:
    """Raise naming the file when one the runs read (training data, each eval set's split) is missing from
    its unit's data folder: checked before the first run trains, not after each one has."""
    from .data import split_files

    seen = set()
    for budget, task, cell, seed in runs:
        cfg = train_config(plan, budget, task, cell, seed)
        needs = [(task, "train", cfg.train_file), (task, "train", cfg.val_file) if cfg.val_file else None,
                 *((t, plan.split, None) for t, _ in plan.evals_of(task))]
        for need in filter(None, needs):
            if (need, cfg.data_dir) not in seen:
                seen.add((need, cfg.data_dir))
                split_files(need[0], need[1], cfg.data_dir, need[2])


MI_NOISE = 1e-12  # mutual information below this is float rounding: a deterministic predictor's


def _modes(method_name: str, kind: str = "id") -> list[str]:
    """Evaluation modes: the method's default first; mean mode beside it on in-distribution sets only."""
    from .methods import METHODS

    cls = METHODS[method_name]
    modes = [cls.default_mode] + [m for m in ("mean",) if m in cls.modes and m != cls.default_mode]
    return modes if kind == "id" else modes[:1]


def _calibrated_mode(folder: RunFolder, calibration: str, samples: int) -> tuple[str, int]:
    """(mode, draws) of a run's evaluations through ``calibration``."""
    from .calibration import get_calibration
    from .methods import get_method

    train = folder.read_config()["train"]
    method, calibrator = get_method(train["method"], train["method_options"]), get_calibration(calibration)
    mode = calibrator.mode_for(method) or method.default_mode
    return mode, calibrator.draws(method, mode, samples)


def _draws(folder: RunFolder, mode: str, samples: int) -> int:
    """The draws an evaluation of this run makes in ``mode`` (an ensemble: its size), as its files are named."""
    from .methods import get_method

    train = folder.read_config()["train"]
    return get_method(train["method"], train["method_options"]).draws(mode, samples)


def run_plan(plan: Plan, log=print) -> None:
    """Train every run and evaluate it on its sets, skipping what the output folder already holds."""
    plan.validate()
    runs = plan.runs()
    check_data(plan, runs)
    n_evals = sum(len(_modes(c.method, k)) + len(plan.draw_variants(c)) for _, t, c, _ in runs
                  for _, k in plan.evals_of(t))
    log(f"compare: {len(runs)} training runs ({len(plan.budgets)} budgets × {len(plan.train_tasks())} tasks × "
        f"{len(plan.cells)} cells × {len(plan.seeds)} seeds), {n_evals} evaluations on '{plan.split}', "
        f"into {plan.output}")
    start = time.perf_counter()
    for i, (budget, task, cell, seed) in enumerate(runs):
        label = f"[{i + 1}/{len(runs)}] {budget.name} {task} {cell.label} seed {seed}"
        run_unit(plan, budget, task, cell, seed, label, log)
        log(f"{label}: done; elapsed {(time.perf_counter() - start) / 60:.1f} min")


def run_unit(plan: Plan, budget: Budget, task: str, cell: Cell, seed: int, label: str, log=print) -> None:
    """One training run with everything scored from it: train (or resume, or skip when trained), evaluate it
    on each of its sets in each mode, fit its calibrations and evaluate through them; skips what exists."""
    from .runs import evaluate_run
    from .training import TrainConfig, resolve, train
    from .training.loop import rehome_run
    from .methods import get_method
    from .training.config import LOCATION_ONLY, RESOLVED_AT_TRAINING, SPEED_AND_MEMORY_ONLY

    folder = RunFolder(plan.run_dir(budget, task, cell, seed))
    here = resolve(train_config(plan, budget, task, cell, seed))
    wanted = here.to_dict()
    # a run trained before a field existed has the field's default
    stored = (TrainConfig.from_dict(folder.read_config()["train"], str(folder.config)).to_dict()
              if folder.config.exists() else wanted)
    # and a method option it predates takes the method's default too
    stored["method_options"] = get_method(stored["method"], stored["method_options"]).resolved_options()
    changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k)
                     and k not in SPEED_AND_MEMORY_ONLY + LOCATION_ONLY
                     and not (k in RESOLVED_AT_TRAINING and wanted.get(k) is None))
    if (stored.get("val_file") is None) != (wanted.get("val_file") is None):  # a val slice or a whole val file
        changed.append("val_file")
    if changed:
        raise ValueError(f"{folder.config}: this run was trained with other settings ({changed}); "
                         "use another --output or another cell label")
    if folder.config.exists() and (folder.is_trained() or folder.has_training_state() or folder.selection.exists()):
        rehome_run(folder, here)
    if not folder.is_trained():
        if folder.has_training_state():
            log(f"{label}: resuming training")
            recorded = TrainConfig.from_run(folder.root)  # re-homed: this folder and this data
            recorded.output = str(folder.root)
            train(recorded, resume=True)
        elif folder.selection.exists():
            raise ValueError(f"{folder.root}: an adapter was selected but the checkpoint is gone; "
                             "restore it or remove the run folder to retrain")
        else:  # nothing worth keeping: a run killed before its first checkpoint
            shutil.rmtree(folder.root, ignore_errors=True)
            log(f"{label}: training")
            train(train_config(plan, budget, task, cell, seed))
    cfg = TrainConfig.from_run(folder.root)
    hashes: dict[str, list[str]] = {}  # each scored split's sha256, hashed once per unit
    default_mode = get_method(cfg.method, cfg.method_options).default_mode
    scorings = [(eval_task, mode, _draws(folder, mode, cfg.samples), "")  # (set, mode, draws, how the log names S)
                for eval_task, kind in plan.evals_of(task) for mode in _modes(cell.method, kind)]
    scorings += [(eval_task, default_mode, samples, f" S={samples}")
                 for eval_task, _ in plan.evals_of(task) for _, samples in plan.draw_variants(cell)]
    for eval_task, mode, samples, named in scorings:
        if _scored(folder.eval_files(plan.stem(eval_task, cfg.method, mode, samples)), eval_task, plan, cell, hashes):
            continue
        r = evaluate_run(folder.root, eval_task, plan.split, data_dir=data_dir_of(plan, cell),
                         samples=samples, mode=mode, seed=seed, max_examples=plan.max_eval_examples)
        log(f"{label}: {eval_task}/{plan.split} {mode}{named}: acc {100 * r['acc']:.1f} ece {100 * r['ece']:.1f} "
            f"nll {r['nll']:.4f}" + (f" ({r['examples_per_second']:.3g} ex/s)" if named else ""))
    for _, calibration in plan.variants(cell)[1:]:
        _calibrated_evals(plan, folder, cell, calibration, task, seed, label, log, hashes)


def _scored(files, eval_task: str, plan: Plan, cell: Cell, hashes: dict) -> bool:
    """Whether an evaluation is on disk and scored the split's current bytes (one written before its metrics
    recorded them is taken as it is); a changed eval file is scored again. ``hashes`` caches each split's."""
    from .runs import eval_data_sha256

    if not files.metrics.exists():
        return False
    recorded = json.loads(files.metrics.read_text()).get("data_sha256")
    if recorded is None:
        return True
    if eval_task not in hashes:
        hashes[eval_task] = eval_data_sha256(eval_task, plan.split, data_dir_of(plan, cell))
    return recorded == hashes[eval_task]


def _calibrated_evals(plan: Plan, folder: RunFolder, cell: Cell, calibration: str, task: str, seed: int,
                      label: str, log, hashes: dict) -> None:
    """Fit ``calibration`` on the run's val slice once, then score every set of the run through it."""
    from .runs import calibrate_run, evaluate_run

    recorded, data_dir = folder.read_config()["train"], data_dir_of(plan, cell)
    method, draws = recorded["method"], recorded["samples"]  # the suite's S unless the cell sets its own
    mode, samples = _calibrated_mode(folder, calibration, draws)
    if not folder.calibration_file(calibration).exists():
        r = calibrate_run(folder.root, calibration, mode=mode, samples=draws, seed=seed, data_dir=data_dir)
        log(f"{label}: {calibration} fitted on {r['fitted_on']['split']}: {r['params']}, val nll {r['val_before']['nll']:.4f} -> "
            f"{r['val_after']['nll']:.4f}")
    for eval_task, _ in plan.evals_of(task):
        if _scored(folder.eval_files(plan.stem(eval_task, method, mode, samples, calibration)), eval_task, plan, cell, hashes):
            continue
        r = evaluate_run(folder.root, eval_task, plan.split, data_dir=data_dir, samples=samples, seed=seed,
                         calibration=calibration, max_examples=plan.max_eval_examples)
        log(f"{label}: {eval_task}/{plan.split} +{calibration}: acc {100 * r['acc']:.1f} ece {100 * r['ece']:.1f} "
            f"nll {r['nll']:.4f}")


# ------------------------------------------------------------------------------ summary
def _predictions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_example(rows: list[dict[str, Any]]) -> dict[str, Any]:
    probs = [torch.tensor(r["probs"], dtype=torch.float64) for r in rows]
    labels = [r["label"] for r in rows]
    brier = torch.tensor([float(((p - torch.nn.functional.one_hot(torch.tensor(y), p.numel())) ** 2).sum())
                          for p, y in zip(probs, labels)])
    correct = torch.tensor([r.get("predicted", int(p.argmax())) == y for r, p, y in zip(rows, probs, labels)])
    return {"uid": [r["uid"] for r in rows], "nll": torch.tensor([r["nll"] for r in rows], dtype=torch.float64),
            "correct": correct,
            "brier": brier.to(torch.float64), "confidence": torch.stack([p.max() for p in probs]),
            "mi": torch.tensor([r["mutual_information"] for r in rows], dtype=torch.float64),
            "entropy": torch.tensor([r["entropy"] for r in rows], dtype=torch.float64)}


def _posterior(folder: RunFolder) -> Optional[dict[str, float]]:
    selection, history = folder.read_selection(), folder.read_history()
    entry = next(h for h in history if h["epoch"] == selection["epoch"])
    stats = entry.get("posterior") or {}
    if not stats:
        return None
    lam = [v["lambda"] for v in stats.values()]
    sig = [v["sigma_u_mean"] for v in stats.values()]
    return {"lambda_mean": sum(lam) / len(lam), "lambda_max": max(lam), "sigma_u_mean": sum(sig) / len(sig),
            "sigma_u_max": max(sig)}


def _stored_parameters(folder: RunFolder, calibration: Optional[str]) -> Optional[int]:
    """Numbers a prediction needs beyond the base model: the selected adapter's tensors (every member,
    the scoring head, BLoB's ρ, a posterior's parameters) plus a calibration's fitted values and tensors.
    None where the run's files do not say (no safetensors adapter, an unreadable calibration record)."""
    from safetensors import safe_open

    from .calibration import get_calibration

    def count(path: Path) -> int:
        with safe_open(str(path), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())

    try:
        adapter, _ = folder.selected_adapter()
        files = sorted(adapter.rglob("*.safetensors"))
        if not files:
            return None
        total = sum(count(p) for p in files)
        if calibration is not None:
            record = folder.read_calibration(calibration)
            total += get_calibration(calibration).fitted_values(record["params"])
            if record.get("tensors_sha256") is not None:
                total += count(folder.calibration_tensors_file(calibration))
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError):
        return None
    return total


def _fit_seconds(folder: RunFolder, calibration: Optional[str]) -> Optional[float]:
    if calibration is None or not folder.calibration_file(calibration).exists():
        return None
    return folder.read_calibration(calibration).get("fit_seconds")


def _train_seconds(folder: RunFolder) -> Optional[float]:
    """Seconds per optimizer step over the run's recorded epochs (None for runs that predate timing)."""
    timed = [h for h in folder.read_history() if h.get("timed_steps")]
    if not timed:
        return None
    return sum(h["train_seconds"] for h in timed) / sum(h["timed_steps"] for h in timed)


COVERAGES = tuple(round(0.05 * k, 2) for k in range(1, 21))  # the accuracy-coverage curve's points


def unit_rows(plan: Plan, budget: Budget, task: str, cell: Cell, seed: int,
              ) -> tuple[list[dict[str, Any]], dict[tuple[str, str, str], dict[str, Any]]]:
    """Every evaluation of one training run found on disk, as rows (metrics, selective prediction, OOD
    detection against the run's own in-distribution set, cost, reliability bins, the accuracy-coverage
    curve), and the per-example arrays keyed (eval task, cell variant, mode)."""
    from .evaluation import load_metrics
    from .evaluation.metrics import calibration_bins
    from .evaluation.selective import auroc, risk_coverage
    from .evaluation.significance import ece_noise_floor
    from .methods import get_method

    folder = RunFolder(plan.run_dir(budget, task, cell, seed))
    if not folder.config.exists():
        return [], {}
    config = folder.read_config()
    method = config["train"]["method"]
    draws = config["train"]["samples"]  # the suite's S unless the cell sets its own
    cases = [(eval_task, kind, name, calibration, mode, _draws(folder, mode, draws))
             for eval_task, kind in plan.evals_of(task) for name, calibration in plan.variants(cell)
             if calibration is None for mode in _modes(method, kind)]
    cases += [(eval_task, kind, name, calibration, *_calibrated_mode(folder, calibration, draws))
              for eval_task, kind in plan.evals_of(task) for name, calibration in plan.variants(cell)[1:]]
    cases += [(eval_task, kind, name, None, get_method(method).default_mode, k)
              for eval_task, kind in plan.evals_of(task) for name, k in plan.draw_variants(cell)]
    rows, examples = [], {}
    for eval_task, kind, name, calibration, mode, samples in cases:
        files = folder.eval_files(plan.stem(eval_task, method, mode, samples, calibration))
        if not files.metrics.exists():
            continue
        m = load_metrics(files.metrics)
        ex = _per_example(_predictions(files.predictions))
        examples[(eval_task, name, mode)] = ex
        curve = risk_coverage(ex["confidence"], ex["correct"])
        rows.append({"budget": budget.name, "train_task": task, "eval_task": eval_task, "kind": kind,
                     "cell": name, "method": method, "calibration": calibration, "mode": mode, "samples": samples,
                     "seed": seed, "scoring": scoring_of(m, config), "n": m["n"], "acc": m["acc"],
                     "ece": m["ece"], "nll": m["nll"], "brier": m["brier"],
                     "ece_floor": ece_noise_floor(ex["confidence"]), "mi": float(ex["mi"].mean()),
                     "entropy": float(ex["entropy"].mean()), "aleatoric": float((ex["entropy"] - ex["mi"]).mean()),
                     "mi_share": float(ex["mi"].sum() / ex["entropy"].sum().clamp_min(1e-12)),
                     "posterior": _posterior(folder), "step_seconds": _train_seconds(folder),
                     "train_seconds": _train_total(folder, "train_seconds"),
                     "train_examples_per_second": _train_throughput(folder),
                     "train_peak_memory_bytes": _train_total(folder, "peak_memory_bytes", max),
                     "eval_seconds": m.get("eval_seconds"), "examples_per_second": m.get("examples_per_second"),
                     "eval_peak_memory_bytes": m.get("peak_memory_bytes"),
                     "trainable_parameters": config.get("trainable_parameters"),
                     "parameters": _stored_parameters(folder, calibration),
                     "fit_seconds": _fit_seconds(folder, calibration),
                     "aurc": curve.aurc,
                     "aurc_mi": (risk_coverage(-ex["mi"], ex["correct"]).aurc
                                 if bool((ex["mi"] > MI_NOISE).any()) else None),
                     "accuracy_at_coverage": [curve.accuracy_at(c) for c in COVERAGES],
                     "reliability": calibration_bins(ex["confidence"], ex["correct"]).to_dict()})
    for r in rows:  # OOD detection: this set against the same variant's in-distribution predictions
        ex, own = examples[(r["eval_task"], r["cell"], r["mode"])], examples.get((task, r["cell"], r["mode"]))
        ood = r["kind"] == "ood" and own is not None
        r["auroc_entropy"] = auroc(own["entropy"], ex["entropy"]) if ood else None
        r["auroc_mi"] = auroc(own["mi"], ex["mi"]) if ood and bool((ex["mi"] > MI_NOISE).any()) else None
    return rows, examples


def _train_throughput(folder: RunFolder) -> Optional[float]:
    """Training rows per second over the epochs that recorded their rows (None for runs from before)."""
    timed = [h for h in folder.read_history() if h.get("timed_examples") and h.get("train_seconds")]
    return sum(h["timed_examples"] for h in timed) / sum(h["train_seconds"] for h in timed) if timed else None


def _train_total(folder: RunFolder, key: str, combine=sum) -> Optional[float]:
    """A timing or memory figure over the run's recorded epochs (None where no epoch recorded it)."""
    values = [h[key] for h in folder.read_history() if h.get(key) is not None]
    return combine(values) if values else None


def scoring_of(metrics: dict[str, Any], config: dict[str, Any]) -> Optional[str]:
    """How an evaluation's choices were scored: its metrics file's record, else its run's (training
    config, else the protocol of runs from before the option existed, by the recorded model kind)."""
    from .scoring import legacy_protocol

    kind = config.get("model_kind")
    return (metrics.get("scoring") or config["train"].get("scoring")
            or (legacy_protocol(kind) if kind else None))


def _one_protocol(members: list[dict[str, Any]], key: tuple) -> Optional[str]:
    """The scoring protocol the seeds of one table line share (None: not recorded anywhere)."""
    found = {r.get("scoring") for r in members}
    if len(found) > 1:
        raise ValueError(f"{key}: its seeds were scored under different protocols {sorted(map(str, found))}; "
                         "rerun them with one --scoring")
    return found.pop()


def summarise(plan: Plan) -> dict[str, Any]:
    """Read every evaluation back; aggregate over seeds; pair each cell with the reference cell."""
    plan.validate()
    from .evaluation.significance import paired_difference

    rows: list[dict[str, Any]] = []
    per_example: dict[tuple, dict[int, dict[str, Any]]] = {}
    for budget, task, cell, seed in plan.runs():
        unit, examples = unit_rows(plan, budget, task, cell, seed)
        rows += unit
        for (eval_task, name, mode), ex in examples.items():
            per_example.setdefault((budget.name, task, eval_task, name, mode), {})[seed] = ex
    if not rows:
        raise FileNotFoundError(f"{plan.output}: nothing to summarise (no evaluation of this comparison's runs "
                                "there; check --output and the matrix flags)")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    by_seed = {(r["budget"], r["train_task"], r["eval_task"], r["cell"], r["mode"], r["seed"]): r for r in rows}
    for r in rows:
        groups.setdefault((r["budget"], r["train_task"], r["eval_task"], r["kind"], r["cell"], r["mode"]), []).append(r)
    table = []
    # the reference is held in the mode its targets are judged in (a Bayesian reference: sample, not mean)
    labels = {name for cell in plan.cells for name in plan.labels(cell)}
    reference_mode = plan.default_mode(plan.reference) if plan.reference in labels else None  # no reference: no Δ
    for key, members in groups.items():
        entry = dict(zip(("budget", "train_task", "eval_task", "kind", "cell", "mode"), key))
        entry["seeds"] = sorted(r["seed"] for r in members)
        entry["n"] = members[0]["n"]
        entry["scoring"] = _one_protocol(members, key)
        for metric in ("acc", "ece", "nll", "brier", "ece_floor", "mi", "mi_share"):
            values = torch.tensor([r[metric] for r in members], dtype=torch.float64)
            entry[metric] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std()) if len(values) > 1 else 0.0
        for metric in ("step_seconds", "eval_seconds", "parameters", "fit_seconds", "aurc", "aurc_mi",
                       "auroc_entropy", "auroc_mi"):
            values = [r[metric] for r in members if r.get(metric) is not None]
            entry[metric] = sum(values) / len(values) if values else None
        posts = [r["posterior"] for r in members if r["posterior"]]
        entry["posterior"] = ({k: sum(p[k] for p in posts) / len(posts) for k in posts[0]} if posts else None)
        ref_key = (key[0], key[1], key[2], plan.reference)
        ref_mode = next((m for m in (reference_mode, "mean", "sample") if (*ref_key, m) in per_example), None)
        if key[4] != plan.reference and ref_mode is not None:
            mine, ref = per_example[(*key[:3], key[4], key[5])], per_example[(*ref_key, ref_mode)]
            seeds = sorted(set(mine) & set(ref))
            for s in seeds:
                if mine[s]["uid"] != ref[s]["uid"]:
                    raise ValueError(f"{key}: seed {s} scored other examples than {plan.reference}; cannot pair")
            if seeds:
                entry["vs_reference"] = {"seeds": seeds, "mode": ref_mode}
                for metric in ("nll", "brier"):
                    a = torch.stack([mine[s][metric] for s in seeds])
                    b = torch.stack([ref[s][metric] for s in seeds])
                    if not bool(torch.isfinite(a - b).all()):  # an infinite NLL is reported, not clipped: no Δ
                        entry["vs_reference"][metric] = None
                        continue
                    res = paired_difference(a, b)
                    entry["vs_reference"][metric] = {"diff": res.difference, "low": res.low, "high": res.high,
                                                     "df": res.df, "examples_only": res.examples_only}
                entry["vs_reference"].update(held_against(
                    [by_seed[(*key[:3], key[4], key[5], s)] for s in seeds],
                    [by_seed[(*ref_key, ref_mode, s)] for s in seeds]))
        table.append(entry)
    return {"plan": {"tasks": plan.tasks, "ood_train": plan.ood_train, "ood_eval": plan.ood_eval,
                     "cells": [c.__dict__ for c in plan.cells], "seeds": plan.seeds, "split": plan.split,
                     "budgets": [b.__dict__ for b in plan.budgets], "model": plan.model, "samples": plan.samples,
                     "reference": plan.reference, "calibrations": plan.calibrations,
                     "samples_sweep": plan.samples_sweep},
            "rows": rows, "table": table, "targets": targets(table, plan)}


def held_against(own: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy difference and ECE ratio of a cell against the reference, from rows paired seed by seed
    (``own[i]`` and ``theirs[i]`` share a seed): a cell that lacks a seed the reference has is not set
    beside the reference's mean over other seeds. The ratio is None where the reference's ECE is 0."""
    if len(own) != len(theirs) or not own:
        raise ValueError(f"pair rows seed by seed: got {len(own)} and {len(theirs)}")
    reference_ece = sum(r["ece"] for r in theirs)
    gap = sum(a["acc"] - b["acc"] for a, b in zip(own, theirs)) / len(own)
    return {"acc": round(gap, 12) + 0.0,  # accuracies are counts over n: a tie is 0, not -3e-15 ("-0.0")
            "ece_ratio": sum(r["ece"] for r in own) / reference_ece if reference_ece > 0 else None}


def targets(table: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """The issue's targets for every non-reference cell in its default (first) mode, per budget, each over the
    seeds it shares with the reference."""
    out = []
    for e in table:
        if e["cell"] == plan.reference or e["mode"] != plan.default_mode(e["cell"]):
            continue
        vs = e.get("vs_reference")
        if vs is None:  # no reference on this set, or no seed in common with it: nothing to hold against it
            continue
        out.append({"budget": e["budget"], "cell": e["cell"], "set": f"{e['train_task']}→{e['eval_task']}",
                    "kind": e["kind"], "seeds": vs["seeds"], "acc_diff": 100 * vs["acc"],
                    "nll_lower": None if vs["nll"] is None else vs["nll"]["high"] < 0,  # None: not finite
                    "brier_lower": None if vs["brier"] is None else vs["brier"]["high"] < 0,
                    "examples_only": len(vs["seeds"]) == 1,  # one seed: says nothing of another training run
                    "ece_ratio": vs["ece_ratio"]})
    return out


def _reference_modes(summary: dict[str, Any]) -> str:
    """' (in its sample mode)' where the reference was held in a mode other than mean, else ''."""
    modes = sorted({e["vs_reference"].get("mode", "mean") for e in summary["table"] if e.get("vs_reference")})
    return f" (in its {' / '.join(modes)} mode)" if modes and modes != ["mean"] else ""


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    plan = summary["plan"]
    lines.append(f"Model {plan['model']}; split {plan['split']}; seeds {plan['seeds']}; predictive draws "
                 f"S={plan['samples']} (sample mode); ACC, ECE ×100 (mean ± std over seeds); 'floor' = the ECE "
                 f"of a perfectly calibrated predictor with the same confidences; Δ = paired difference to "
                 f"{plan['reference']}{_reference_modes(summary)} with a 95% interval (the variance of the mean from the "
                 f"crossed seeds × examples ANOVA, a Welch t quantile: simulated, it excludes a zero difference ~13% "
                 f"of the time at 2 seeds and ~7% at 3 where seeds dominate, ≤ 5% where examples do); † = one seed: "
                 f"examples only, nothing said of another training run.")
    protocols = sorted({e.get("scoring") or "unrecorded" for e in summary["table"]})
    if protocols:
        lines[-1] += f" Choices scored by {', '.join(f'`{p}`' for p in protocols)}" + (
            " (the cell names its own)." if len(protocols) > 1 else ".")
    head = ("| budget | train → eval | cell | mode | n | ACC | ECE (floor) | NLL | Brier | ΔNLL [95%] | ΔBrier [95%] "
            "| AURC conf / MI | MI share | λ / σ_U | s/step | post-hoc fit s | eval s | stored params (extra) |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    reference = {(e["budget"], e["train_task"], e["eval_task"]): e.get("parameters") for e in summary["table"]
                 if e["cell"] == plan["reference"] and e.get("parameters") is not None}
    for e in sorted(summary["table"], key=lambda e: (e["budget"], e["kind"], e["train_task"], e["eval_task"],
                                                      e["cell"], e["mode"])):
        vs = e.get("vs_reference")

        def delta(metric: str) -> str:
            if not vs:
                return ""
            d = vs[metric]
            if d is None:
                return "n/a (not finite)"
            return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + ("†" if len(vs["seeds"]) == 1 else "")

        ref = reference.get((e["budget"], e["train_task"], e["eval_task"]))
        params = e.get("parameters")
        params_text = "" if params is None else (
            f"{params / 1e6:.3f}M" + (f" ({(params - ref) / 1e6:+.3f}M)" if ref is not None and e["cell"] != plan["reference"]
                                      else ""))
        cell = e["cell"] + (f" [{e.get('scoring') or 'unrecorded'}]" if len(protocols) > 1 else "")
        cell += _seeds_note(e["seeds"], plan["seeds"])
        if vs and vs["seeds"] != e["seeds"]:  # the reference lacks one of this line's seeds
            cell += f" (Δ over seeds {', '.join(map(str, vs['seeds']))})"
        post = e["posterior"]
        post_text = f"{post['lambda_mean']:.2g} / {post['sigma_u_mean']:.2g}" if post else ""
        lines.append(
            f"| {e['budget']} | {e['train_task']} → {e['eval_task']} | {cell} | {e['mode']} | {e['n']} | "
            f"{100 * e['acc']:.1f} ± {100 * e['acc_std']:.1f} | {100 * e['ece']:.1f} ± {100 * e['ece_std']:.1f} "
            f"({100 * e['ece_floor']:.1f}) | {e['nll']:.3f} | {e['brier']:.3f} | {delta('nll')} | {delta('brier')} | "
            f"{_aurc(e)} | {e['mi_share']:.2g} | {post_text} | {_seconds(e.get('step_seconds'), 2)} | "
            f"{_seconds(e.get('fit_seconds'), 0)} | {_seconds(e.get('eval_seconds'), 0)} | {params_text} |")
    lines += _ood_lines(summary["table"], plan["seeds"])
    lines += ["", "Targets (against the reference, default mode; the ECE ratio has no interval: each ECE carries "
                  "its noise floor, which pulls the ratio toward 1, so read it beside the floors above):", "",
              "| budget | cell | set | kind | ΔACC | NLL lower | Brier lower | ECE ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['budget']} | {t['cell']}{_seeds_note(t['seeds'], plan['seeds'])} | {t['set']} | "
                     f"{t['kind']} | {t['acc_diff']:+.1f} | "
                     f"{_held(t['nll_lower'], t)} | {_held(t['brier_lower'], t)} | "
                     f"{'n/a' if t['ece_ratio'] is None else format(t['ece_ratio'], '.2f')} |")
    sets_with_reference = {(e["budget"], e["train_task"], e["eval_task"]) for e in summary["table"]
                           if e["cell"] == plan["reference"]}
    unpaired = sorted({f"{e['cell']} ({e['budget']}, {e['train_task']}→{e['eval_task']})" for e in summary["table"]
                       if e["cell"] != plan["reference"] and "vs_reference" not in e
                       and (e["budget"], e["train_task"], e["eval_task"]) in sets_with_reference})
    if unpaired:
        lines += ["", f"Not held against {plan['reference']} (no seed in common with it): {', '.join(unpaired)}."]
    return "\n".join(lines) + "\n"


def _held(lower: Optional[bool], target: dict[str, Any]) -> str:
    """'yes' / 'no' for an interval below 0; a one-seed 'yes' says so (its interval holds examples only); 'n/a'
    where a paired score was not finite."""
    if lower is None:
        return "n/a"
    return ("yes†" if target.get("examples_only") else "yes") if lower else "no"


def _seeds_note(seeds: list[int], planned: list[int]) -> str:
    """Marks a line measured on fewer seeds than the plan names (an unfinished or partial comparison), so
    its mean ± std is not read as over every seed."""
    return "" if sorted(seeds) == sorted(planned) else f" (seeds {', '.join(map(str, sorted(seeds)))} only)"


def _aurc(e: dict[str, Any]) -> str:
    conf = "" if e.get("aurc") is None else f"{100 * e['aurc']:.1f}"
    return conf if e.get("aurc_mi") is None else f"{conf} / {100 * e['aurc_mi']:.1f}"


def _ood_lines(table: list[dict[str, Any]], planned: list[int]) -> list[str]:
    """OOD detection: AUROC of telling each OOD set from the cell's in-distribution set."""
    rows = [e for e in table if e.get("auroc_entropy") is not None]
    if not rows:
        return []
    lines = ["", "OOD detection (AUROC ×100 of telling the OOD set from the training task's own eval set, by "
             "predictive entropy / by mutual information; 50 = chance):", "",
             "| budget | train → eval | cell | mode | by entropy | by MI |", "|---|---|---|---|---|---|"]
    for e in sorted(rows, key=lambda e: (e["budget"], e["train_task"], e["eval_task"], e["cell"], e["mode"])):
        mi = "" if e.get("auroc_mi") is None else f"{100 * e['auroc_mi']:.1f}"
        lines.append(f"| {e['budget']} | {e['train_task']} → {e['eval_task']} | {e['cell']}"
                     f"{_seeds_note(e['seeds'], planned)} | {e['mode']} | {100 * e['auroc_entropy']:.1f} | {mi} |")
    return lines


def _seconds(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_summary(plan: Plan) -> tuple[Path, Path]:
    from .evaluation import atomic_write, write_json_atomic

    summary = summarise(plan)
    json_path = write_json_atomic(plan.output / "compare.json", summary)
    text = markdown(summary)
    md_path = plan.output / "compare.md"
    atomic_write(md_path, lambda handle: handle.write(text.encode()))
    return Path(json_path), md_path
