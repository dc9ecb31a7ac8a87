"""Run results on disk: atomic JSON writes, and the comparison table behind ``bayeslora report``.

A run folder holds one or more ``metrics*.json`` files, directly or in an ``eval/`` subfolder (e.g.
``metrics_dev.json`` and ``eval/metrics_test_sample.json``). Each is a flat dict with at least
``task, split, method, mode, samples, n, acc, ece, nll, brier`` (``acc`` and ``ece`` as fractions) and
optionally ``recipe``, ``selection_rule`` and ``eval_seconds``. A missing or mistyped field is an error
naming the file and the field: a table that quietly skips a run would mislead a comparison.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..atomic import atomic_write
from ..layout import METRICS_GLOB, RunFolder, method_label

REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "task": (str,), "split": (str,), "method": (str,), "mode": (str,), "samples": (int,), "n": (int,),
    "acc": (int, float), "ece": (int, float), "nll": (int, float), "brier": (int, float),
}
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "recipe": (str,), "selection_rule": (str,), "eval_seconds": (int, float), "calibration": (str,),
}


class MetricsFileError(ValueError):
    """A metrics file is unreadable or lacks / mistypes a field; the message names file and field."""


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Serialise ``obj`` as UTF-8 JSON (newline-terminated) and write it atomically.

    The object is serialised before the temp file is created, so an unserialisable object leaves any
    existing file untouched. Non-finite floats (an infinite NLL) are written as ``Infinity`` / ``NaN``,
    which Python's ``json`` reads back.
    """
    data = (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def find_metrics_files(run: str | os.PathLike[str]) -> list[Path]:
    """The metrics files of one run: the path itself if it is a file, else every ``metrics*.json``
    directly in the folder, then in its ``eval/`` subfolder (each group sorted by name)."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise FileNotFoundError(f"no such run folder or metrics file: {run}")
    found = RunFolder(run).metrics_files()
    if not found:
        raise FileNotFoundError(f"no {METRICS_GLOB} in {run} or {run / 'eval'}")
    return found


def _check_field(path: Path, record: dict[str, Any], field: str, types: tuple[type, ...]) -> None:
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise MetricsFileError(f"{path}: field {field!r} must be {wanted}, got {value!r}")


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate one metrics file (see the module docstring for the fields)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MetricsFileError(f"{path}: cannot read metrics JSON ({err})") from err
    if not isinstance(record, dict):
        raise MetricsFileError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for field, types in REQUIRED_FIELDS.items():
        if field not in record:
            raise MetricsFileError(f"{path}: missing required field {field!r}")
        _check_field(path, record, field, types)
    for field, types in OPTIONAL_FIELDS.items():
        if record.get(field) is not None:
            _check_field(path, record, field, types)
    return record


@dataclass(frozen=True)
class ReportRow:
    """One metrics file in the table: the run label, the file, and its validated record."""

    run: str
    path: Path
    record: dict[str, Any]

    @property
    def sort_key(self) -> tuple[str, str, str, str, int]:
        r = self.record
        return (r["task"], r["split"], self.method, r["mode"], r["samples"])

    @property
    def method(self) -> str:
        """The method, with its post-hoc calibration if it has one (``lora+temperature``)."""
        return method_label(self.record["method"], self.record.get("calibration"))


def _run_label(arg: Path) -> str:
    """The run folder as the user wrote it; for a file argument, its folder (above ``eval/``)."""
    folder = arg.parent if arg.is_file() else arg
    if arg.is_file() and folder.name == "eval":
        folder = folder.parent
    return os.path.normpath(folder)


def collect_rows(runs: Iterable[str | os.PathLike[str]]) -> list[ReportRow]:
    """Load every metrics file of every run, drop repeats of the same file, sort stably by
    (task, split, method, mode, samples): rows with equal keys keep the order the runs were given."""
    rows: list[ReportRow] = []
    seen: set[Path] = set()
    for arg in runs:
        for path in find_metrics_files(arg):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                rows.append(ReportRow(_run_label(Path(arg)), path, load_metrics(path)))
    return sorted(rows, key=lambda row: row.sort_key)


def _fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return f"{value * scale:.{digits}f}" if math.isfinite(value) else str(value * scale)


_COLUMNS: list[tuple[str, Callable[[ReportRow], str], bool]] = [  # header, cell, right-aligned
    ("run", lambda r: r.run, False),
    ("task", lambda r: r.record["task"], False),
    ("split", lambda r: r.record["split"], False),
    ("method", lambda r: r.method, False),
    ("mode", lambda r: r.record["mode"], False),
    ("S", lambda r: str(r.record["samples"]), True),
    ("n", lambda r: str(r.record["n"]), True),
    ("ACC×100", lambda r: _fmt(r.record["acc"], 2, 100), True),
    ("ECE×100", lambda r: _fmt(r.record["ece"], 2, 100), True),
    ("NLL", lambda r: _fmt(r.record["nll"], 4), True),
    ("Brier", lambda r: _fmt(r.record["brier"], 4), True),
]
_OPTIONAL_COLUMNS: list[tuple[str, str, Callable[[Any], str], bool]] = [  # header, field, cell, right
    ("recipe", "recipe", str, False),
    ("selection", "selection_rule", str, False),
    ("eval s", "eval_seconds", lambda v: _fmt(float(v), 1), True),
]


def format_table(rows: Sequence[ReportRow]) -> str:
    """Plain-text table with aligned columns (text left, numbers right), two spaces between columns.

    Optional columns (recipe, selection, eval s) appear only if some row has them ("-" elsewhere).
    """
    columns = list(_COLUMNS)
    for header, field, cell, right in _OPTIONAL_COLUMNS:
        if any(row.record.get(field) is not None for row in rows):
            columns.append((header, lambda r, f=field, c=cell: "-" if r.record.get(f) is None else c(r.record[f]), right))
    table = [[header for header, _, _ in columns]] + [[cell(row) for _, cell, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        "  ".join(text.rjust(w) if right else text.ljust(w) for text, w, (_, _, right) in zip(line, widths, columns))
        for line in table
    ]
    return "\n".join(line.rstrip() for line in lines)


def report(runs: Iterable[str | os.PathLike[str]], *, out: IO[str] | None = None) -> str:
    """Collect the metrics files of ``runs`` (folders or files), build the table, print it to ``out``
    (pass ``sys.stdout`` from the CLI; ``None`` prints nothing) and return it."""
    table = format_table(collect_rows(runs))
    if out is not None:
        print(table, file=out)
    return table


__all__ = [
    "MetricsFileError", "ReportRow", "atomic_write", "collect_rows", "find_metrics_files", "format_table",
    "load_metrics", "report", "write_json_atomic",
]
