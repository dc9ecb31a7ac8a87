"""The run folder: the one place that names every file a run writes and reads each back.

Training, evaluation, the report and the comparison all go through :class:`RunFolder`, so a file name
lives here only::

    RUN/config.json              the resolved training config, versions, data files (sha256)
    RUN/history.json             one entry per epoch: val metrics, posterior statistics, timing (seconds,
                                 rows, peak memory), adapter
    RUN/selection.json           which epoch's adapter the run stands for, and by which rule
    RUN/adapters/epoch-N/        the adapter (PEFT folder) and the scorer head of epoch N
    RUN/checkpoint/              the resumable training state (see bayeslora.training.checkpoint)
    RUN/calibration/NAME.json    a post-hoc calibration fitted on the val slice (bayeslora calibrate)
    RUN/calibration/NAME.safetensors   its fitted tensors, if it has any (Laplace's factors)
    RUN/eval/metrics-STEM.json   one evaluation: task, split, mode, draws, ACC/ECE/NLL/Brier, ...
    RUN/eval/predictions-STEM.jsonl, RUN/eval/reliability-STEM.png   beside it
    zero-shot/MODEL/SCORING/metrics-STEM.json (and its two)   evaluate --model without a run

This module imports nothing of the model stack, so the report reads runs without loading torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EvalFiles", "RunFolder", "METRICS_GLOB", "eval_stem", "method_label", "previous_version", "zero_shot_files"]

METRICS_GLOB = "metrics*.json"


def previous_version(target: Path) -> Path:
    """Where an atomic folder swap keeps the previous version of ``target`` while it swaps."""
    return target.with_name(f".{target.name}.old")


def method_label(method: str, calibration: str | None = None) -> str:
    """How a method, post-hoc calibrated or not, is named in file names and tables: ``lora+temperature``."""
    return method if not calibration else f"{method}+{calibration}"


def eval_stem(task: str, split: str, method: str, mode: str, samples: int, calibration: str | None = None,
              first: int | None = None, seed: int = 0) -> str:
    """The name shared by one evaluation's metrics, predictions and reliability files; ``first``: only the
    split's first N examples were scored (``-first200``), so a partial score is never taken for a full one;
    ``seed``: the draws' seed in sample mode (``-seed1``; 0 unnamed), so scores of other draws sit side by side."""
    stem = f"{task}-{split}-{method_label(method, calibration)}-{mode}-S{samples}"
    stem = stem if first is None else f"{stem}-first{first}"
    return stem if seed == 0 or mode != "sample" else f"{stem}-seed{seed}"


def zero_shot_files(model: str, stem: str, scoring: str) -> "EvalFiles":
    """Where ``bayeslora evaluate --model M`` (no run folder) writes: ``zero-shot/<M>/<scoring>/``.

    The scoring protocol is a folder of its own, so scoring a base model two ways keeps both; M is a local
    folder's or file's name, or a Hub id with ``/`` as ``--`` (``org--name``, as the Hub cache names it), so
    two organisations' models of one name do not share a folder."""
    name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return EvalFiles(Path("zero-shot") / name / scoring / f"metrics-{stem}.json")


@dataclass(frozen=True)
class EvalFiles:
    """The three files of one evaluation, named after its metrics file."""

    metrics: Path

    @property
    def predictions(self) -> Path:
        return self.metrics.with_name(self.metrics.name.replace("metrics", "predictions", 1)).with_suffix(".jsonl")

    @property
    def reliability(self) -> Path:
        return self.metrics.with_name(self.metrics.name.replace("metrics", "reliability", 1)).with_suffix(".png")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def calibration_dir(self) -> Path:
        return self.root / "calibration"

    def calibration_file(self, name: str) -> Path:
        return self.calibration_dir / f"{name}.json"

    def calibration_tensors_file(self, name: str) -> Path:
        return self.calibration_dir / f"{name}.safetensors"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @staticmethod
    def adapter_name(epoch: int) -> str:
        """The adapter folder of an epoch, relative to the run (as ``selection.json`` records it)."""
        return f"adapters/epoch-{epoch}"

    def eval_files(self, stem: str) -> EvalFiles:
        return EvalFiles(self.eval_dir / f"metrics-{stem}.json")

    def metrics_files(self) -> list[Path]:
        """Every metrics file of the run: ``metrics*.json`` in the run folder, then in ``eval/``."""
        found = sorted(p for p in self.root.glob(METRICS_GLOB) if p.is_file())
        return found + sorted(p for p in self.eval_dir.glob(METRICS_GLOB) if p.is_file())

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    def run_entries(self) -> list[Path]:
        """What a run wrote into this folder (the files and folders above, and metrics files at its top):
        empty for a new folder or one holding only other files."""
        owned = [self.config, self.history, self.selection, self.adapters_dir, self.checkpoint,
                 previous_version(self.checkpoint), self.calibration_dir, self.eval_dir]
        return [p for p in owned if p.exists()] + sorted(p for p in self.root.glob(METRICS_GLOB) if p.is_file())

    def holds_run(self) -> bool:
        """Whether a bayeslora run wrote here: a config.json with its ``train`` record, or training state (a
        model folder's config.json, or a project's eval/, does not make a folder a run)."""
        try:
            recorded = json.loads(self.config.read_text()) if self.config.is_file() else None
        except (OSError, ValueError):
            recorded = None
        return (isinstance(recorded, dict) and "train" in recorded) or self._state().exists()

    def remove_run(self) -> None:
        """Delete what :meth:`run_entries` lists (never other files in the folder) of a folder that
        :meth:`holds_run`; config.json goes first, so an interrupted removal leaves no folder that reads as a
        run with parts missing."""
        import shutil

        if not self.holds_run():
            raise ValueError(f"{self.root}: not a bayeslora run folder; nothing deleted")
        for path in self.run_entries():
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    # ------------------------------------------------------------------ reading back
    def _read(self, path: Path, what: str) -> Any:
        if not path.exists():
            raise FileNotFoundError(f"{path}: {what}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err

    def read_config(self) -> dict[str, Any]:
        return self._read(self.config, "not a bayeslora run folder (no config.json)")

    def read_history(self) -> list[dict[str, Any]]:
        return self._read(self.history, "the run has finished no epoch yet (no history.json)")

    def read_selection(self) -> dict[str, Any]:
        return self._read(self.selection, "the run has no selected adapter yet (did training finish an epoch?)")

    def read_calibration(self, name: str) -> dict[str, Any]:
        return self._read(self.calibration_file(name), f"the run has no {name!r} calibration "
                          f"(run: bayeslora calibrate --run {self.root} --calibration {name})")

    def selected_adapter(self) -> tuple[Path, dict[str, Any]]:
        selection = self.read_selection()
        return self.root / selection["adapter"], selection

    def _state(self) -> Path:
        """The checkpoint's state.json, or the one kept beside it when a kill landed mid-swap."""
        for folder in (self.checkpoint, previous_version(self.checkpoint)):
            if (folder / "state.json").exists():
                return folder / "state.json"
        return self.checkpoint / "state.json"

    def has_training_state(self) -> bool:
        return self.config.exists() and self._state().exists()

    def is_trained(self) -> bool:
        """Whether training finished: the selection exists and the checkpoint says no step is left."""
        state = self._state()
        if not (self.selection.exists() and self.config.exists() and state.exists()):
            return False
        total = self.read_config().get("total_steps")
        return total is not None and json.loads(state.read_text())["position"]["step"] >= total
