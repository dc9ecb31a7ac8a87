"""Evaluating a trained run folder: reload its selected adapter and score a split; fit post-hoc
calibrations on its val slice.

Writes, next to each other: ``metrics-*.json`` (the numbers, in the schema ``bayeslora report``
reads), ``predictions-*.jsonl`` (per example: probabilities per choice and per sample, the averaged
predictive, its entropy and the mutual information) and ``reliability-*.png``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import safetensors.torch
import torch
from tqdm.auto import tqdm

from .calibration import Fitting, get_calibration
from .data import load_task, sha256_of
from .evaluation import compute_metrics, reliability_bins, save_reliability_diagram, summarise_samples
from .evaluation.predict import predict_examples
from .evaluation.report import atomic_write, write_json_atomic
from .methods import get_method
from .layout import EvalFiles, RunFolder, eval_stem, method_label, zero_shot_files
from .models import load_base_model
from .scoring import legacy_protocol, make_scorer
from .training.loop import check_run_data, fit_and_val_sets
from .training.config import TrainConfig

__all__ = ["PreparedRun", "calibrate_run", "evaluate_base", "evaluate_run", "load_run_model", "prepare_run"]


def load_run_model(run_dir: Path, device: torch.device | str = "cpu"):
    """(method, model, scorer, tokenizer, config, selection) of a run's selected adapter."""
    cfg = TrainConfig.from_run(run_dir)
    adapter, selection = RunFolder(run_dir).selected_adapter()
    method = get_method(cfg.method, cfg.method_options)
    loaded = load_base_model(cfg.model, dtype=cfg.dtype, kind=cfg.model_kind, quantize=cfg.quantize)
    model = method.load(loaded.model, adapter, cfg.lora()).to(device)
    scorer = make_scorer(loaded.kind, model, cfg.scoring or legacy_protocol(loaded.kind)).load(adapter).to(device)
    return method, model, scorer, loaded.tokenizer, cfg, selection


@dataclass
class PreparedRun:
    """A run's selected adapter made ready to predict: in its mode, through a fitted calibration if any."""

    predictor: Any  # the method, or the calibration's predictor
    model: torch.nn.Module
    scorer: torch.nn.Module
    tokenizer: Any
    cfg: TrainConfig
    mode: str
    facts: dict[str, Any]  # what every metrics or predictions file records about the run
    transform: Optional[Callable] = None  # a calibration's map of per-draw log-probabilities

    def close(self) -> None:
        if hasattr(self.predictor, "close"):  # a calibration's hooks or gradient switches come off the model
            self.predictor.close()


def prepare_run(run_dir: str | Path, *, mode: Optional[str] = None, calibration: Optional[str] = None,
                device: torch.device | str = "cpu") -> PreparedRun:
    """Load the run's selected adapter and make it predict in ``mode`` (default: the method's, or the
    mode ``calibration`` was fitted in, which must then agree)."""
    run_dir = Path(run_dir)
    method, model, scorer, tokenizer, cfg, selection = load_run_model(run_dir, device)
    calibrator, fitted = None, None
    if calibration is not None:
        calibrator, fitted = _fitted_calibration(RunFolder(run_dir), calibration, selection)
        if mode is not None and mode != fitted["mode"]:
            raise ValueError(f"--calibration {calibration} was fitted in {fitted['mode']} mode; evaluate it "
                             f"in that mode (or refit it with calibrate --mode {mode})")
        mode = fitted["mode"]
    mode = mode or method.default_mode
    transform, predictor = None, method
    if calibrator is None:
        model = method.prepare_eval(model, mode)
    else:
        model = method.prepare_eval(model, calibrator.base_mode(method, mode))
        predictor = calibrator.prepare(method, model, fitted["params"], tensors=fitted.get("tensors"))
        transform = lambda lp, mask: calibrator.transform(lp, mask, fitted["params"])  # noqa: E731
    facts = {"method": cfg.method, "recipe": cfg.recipe, "selection_rule": selection["rule"],
             "selected_epoch": selection["epoch"], "run": str(run_dir), "model": cfg.model,
             "calibration": calibration, "calibration_params": None if fitted is None else fitted["params"]}
    return PreparedRun(predictor, model, scorer, tokenizer, cfg, mode, facts, transform)


def evaluate_run(run_dir: str | Path, task: str, split: str, *, data_dir: Optional[str] = None,
                 data_file: Optional[str] = None, samples: int = 4, mode: Optional[str] = None,
                 output: Optional[str | Path] = None, batch_size: int = 32, seed: int = 0,
                 batched: bool = True, max_examples: Optional[int] = None,
                 device: Optional[str] = None, calibration: Optional[str] = None,
                 note_samples: bool = False, name_seed: bool = False) -> dict[str, Any]:
    """Score a split with the run's selected adapter, optionally through a fitted calibration (in the
    mode it was fitted in). ``note_samples``: say on stderr when the predictor will not use ``samples``
    (a deterministic mode draws once, an ensemble once per member). ``name_seed``: a sample-mode score
    with another draw seed than 0 gets files of its own (``-seedN``; the command line's ``--seed``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = prepare_run(run_dir, mode=mode, calibration=calibration, device=device)
    try:
        draws = run.predictor.draws(run.mode, samples)
        if note_samples and draws != samples:
            print(f"note: --samples {samples} is not used: {method_label(run.cfg.method, calibration)} in {run.mode} "
                  f"mode predicts with {draws} draw{'s' if draws > 1 else ''}", file=sys.stderr)
        return _score(run.predictor, run.model, run.scorer, run.tokenizer, task, split, run.facts,
                      data_dir=data_dir, data_file=data_file, samples=samples, mode=run.mode,
                      batch_size=batch_size, seed=seed, batched=batched, max_examples=max_examples, device=device,
                      max_length=run.cfg.max_length, output=output, default_files=RunFolder(run_dir).eval_files,
                      transform=run.transform, name_seed=name_seed)
    finally:
        run.close()


def _fitted_calibration(folder: RunFolder, name: str, selection: dict[str, Any]):
    """The calibration object and its validated record; refuses one fitted on another adapter."""
    calibrator = get_calibration(name)
    record = folder.read_calibration(name)
    where = str(folder.calibration_file(name))
    if record.get("adapter") != selection["adapter"]:
        raise ValueError(f"{where}: fitted on {record.get('adapter')!r}, but the run now stands for "
                         f"{selection['adapter']!r}; refit it with bayeslora calibrate")
    if not isinstance(record.get("params"), dict):
        raise ValueError(f"{where}: field 'params' must be an object")
    if record.get("mode") not in ("sample", "mean", "merged"):
        raise ValueError(f"{where}: field 'mode' must be sample, mean or merged, got {record.get('mode')!r}")
    params = calibrator.check_params(record["params"], where)
    checked = {**record, "params": params}
    if record.get("tensors_sha256") is not None:
        file = folder.calibration_tensors_file(name)
        if not file.exists():
            raise FileNotFoundError(f"{file}: the {name} calibration's tensors are missing; refit it with "
                                    "bayeslora calibrate")
        if sha256_of(file) != record["tensors_sha256"]:
            raise ValueError(f"{file}: does not match the sha256 that {where} records; refit it with "
                             "bayeslora calibrate")
        try:
            tensors = safetensors.torch.load_file(str(file))
        except Exception as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
        checked["tensors"] = calibrator.check_tensors(tensors, params, str(file))
    return calibrator, checked


def calibrate_run(run_dir: str | Path, calibration: str, *, mode: Optional[str] = None, samples: int = 4,
                  batch_size: int = 32, seed: int = 0, batched: bool = True, data_dir: Optional[str] = None,
                  device: Optional[str] = None) -> dict[str, Any]:
    """Fit ``calibration`` on the run's val slice (the rows its checkpoint was selected on) and write
    ``RUN/calibration/NAME.json`` atomically; returns the record."""
    import time

    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method, model, scorer, tokenizer, cfg, selection = load_run_model(run_dir, device)
    calibrator = get_calibration(calibration)
    if not calibrator.applies_to(method):
        raise ValueError(f"--calibration {calibration} does not apply to a {cfg.method} run")
    mode = mode or calibrator.mode_for(method) or method.default_mode
    model = method.prepare_eval(model, calibrator.base_mode(method, mode))
    folder = RunFolder(run_dir)
    check_run_data(cfg, folder.read_config().get("data_files", {}), data_dir, where=str(folder.config))
    fit, val = fit_and_val_sets(cfg, data_dir)
    collator = scorer.make_collator(tokenizer, cfg.max_length)

    def predictor(using=None, examples=None, desc=None):
        rows = val if examples is None else examples
        bar = None if desc is None else tqdm(total=len(rows), desc=desc, unit="ex", leave=False)
        try:
            return predict_examples(using or method, model, scorer, rows, collator, mode=mode, samples=samples,
                                    batch_size=batch_size, seed=seed, batched=batched, device=device,
                                    progress=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()

    start = time.perf_counter()
    fitted = calibrator.fit(Fitting(method, model, val, mode, samples, seed, predictor, fit))
    folder.calibration_dir.mkdir(parents=True, exist_ok=True)
    tensors = fitted.pop("tensors", None)
    if tensors is not None:  # written first: the record that names its sha256 lands after it
        data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write(folder.calibration_tensors_file(calibration), lambda f: f.write(data))
        fitted["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    split, n_fitted = fitted.pop("fitted_split", "val"), fitted.pop("fitted_rows", len(val))
    record = {"calibration": calibration, **fitted, "mode": mode, "samples": samples, "seed": seed,
              "adapter": selection["adapter"], "selected_epoch": selection["epoch"],
              "fitted_on": {"task": cfg.task, "split": split, "n": n_fitted, "val_file": cfg.val_file,
                            "train_file": cfg.train_file},
              "fit_seconds": time.perf_counter() - start,
              "at_search_bound": calibrator.at_bound(fitted["params"])}
    write_json_atomic(folder.calibration_file(calibration), record)
    record["file"] = str(folder.calibration_file(calibration))
    return record


def evaluate_base(model_name: str, task: str, split: str, *, scoring: Optional[str] = None,
                  data_dir: Optional[str] = None, data_file: Optional[str] = None,
                  output: Optional[str | Path] = None, batch_size: int = 32, max_examples: Optional[int] = None,
                  max_length: Optional[int] = None, dtype: str = "float32", device: Optional[str] = None
                  ) -> dict[str, Any]:
    """Zero-shot: score the base model itself (no adapter), so users see where fine-tuning starts.

    Only causal LMs can: an encoder scores choices with a head that fine-tuning trains.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_base_model(model_name, dtype=dtype)
    if loaded.kind != "causal":
        raise ValueError(f"--model {model_name}: zero-shot evaluation needs a causal LM; an {loaded.kind} "
                         "scores choices with a head that training fits (train a run, then --run)")
    model = loaded.model.to(device).eval()
    scorer = make_scorer(loaded.kind, model, scoring).to(device)
    facts = {"method": "zero-shot", "recipe": None, "selection_rule": None, "selected_epoch": None, "run": None,
             "model": model_name, "calibration": None, "calibration_params": None}
    return _score(get_method("lora"), model, scorer, loaded.tokenizer, task, split, facts, data_dir=data_dir,
                  data_file=data_file, samples=1, mode="mean", batch_size=batch_size, seed=0, batched=True,
                  max_examples=max_examples, device=device, max_length=max_length, output=output,
                  default_files=lambda stem: zero_shot_files(model_name, stem, scorer.protocol))


def eval_data_sha256(task: str, split: str, data_dir: Optional[str] = None,
                     data_file: Optional[str] = None) -> list[str]:
    """The sha256 of each file a split is read from, in order (what an evaluation's metrics record)."""
    from .data import file_records, split_files

    return [f["sha256"] for f in file_records(split_files(task, split, data_dir, data_file))]


def _score(method, model, scorer, tokenizer, task: str, split: str, facts: dict[str, Any], *,
           data_dir, data_file, samples: int, mode: str, batch_size: int, seed: int, batched: bool,
           max_examples, device, max_length, output, default_files: Callable[[str], EvalFiles],
           transform: Optional[Callable] = None, name_seed: bool = False) -> dict[str, Any]:
    """Predict, compute the metrics, and write the metrics, predictions and reliability files.

    ``transform`` (a calibration's) maps the per-draw log-probabilities (N, S, C) before averaging."""
    scored_bytes = eval_data_sha256(task, split, data_dir, data_file)  # before reading: what was scored
    examples = load_task(task, split, data_dir, data_file)
    if max_examples is not None:
        examples = examples[:max_examples]
    collator = scorer.make_collator(tokenizer, max_length)
    result = predict_examples(method, model, scorer, examples, collator, mode=mode, samples=samples,
                              batch_size=batch_size, seed=seed, batched=batched, device=device)
    if transform is not None:
        result.log_probs = transform(result.log_probs, result.mask)
    summary = summarise_samples(result.log_probs.transpose(0, 1), result.mask)
    log_p_bar = summary.log_probs
    metrics = compute_metrics(log_p_bar, result.labels, result.mask, kind="log_probs")
    draws = result.log_probs.shape[1]
    record = {
        "task": task, "split": split, "method": facts["method"], "mode": mode, "samples": draws,
        **metrics, "scoring": scorer.protocol, "recipe": facts["recipe"], "selection_rule": facts["selection_rule"],
        "selected_epoch": facts["selected_epoch"],
        "truncated": result.truncated, "eval_seconds": result.seconds,
        "examples_per_second": len(examples) / max(result.seconds, 1e-9),
        "peak_memory_bytes": result.peak_memory_bytes, "batched": batched, "seed": seed, "run": facts["run"],
        "data_file": data_file, "model": facts["model"], "calibration": facts["calibration"],
        "calibration_params": facts["calibration_params"],
        "data_sha256": scored_bytes,  # a changed file is scored again
    }
    stem = eval_stem(task, split, facts["method"], mode, draws, facts["calibration"], first=max_examples,
                     seed=seed if name_seed else 0)
    files = EvalFiles(Path(output)) if output else default_files(stem)
    out = files.metrics
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    _write_predictions(files.predictions, result, summary)
    bins = reliability_bins(log_p_bar, result.labels, result.mask, kind="log_probs")
    save_reliability_diagram(bins, files.reliability, metrics,
                             label=f"{method_label(facts['method'], facts['calibration'])} {mode} S={draws} on {task}/{split}")
    record["reliability_png"] = str(files.reliability)
    record["metrics_file"] = str(out)
    return record


def _write_predictions(path: Path, result, summary) -> None:
    def write(handle) -> None:
        for i, uid in enumerate(result.uids):
            n = int(result.mask[i].sum())
            per_sample = result.log_probs[i, :, :n].exp()
            label = int(result.labels[i])
            row = {"uid": uid, "label": label, "predicted": int(summary.log_probs[i, :n].argmax()),
                   "nll": -float(summary.log_probs[i, label]),
                   "probs": [round(float(p), 6) for p in summary.log_probs[i, :n].exp()],
                   "sample_probs": [[round(float(p), 6) for p in s] for s in per_sample],
                   "entropy": float(summary.entropy[i]), "mutual_information": float(summary.mutual_information[i])}
            handle.write((json.dumps(row) + "\n").encode())

    atomic_write(path, write)
