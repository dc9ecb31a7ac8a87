"""The benchmark's results: JSON lines, one row per evaluated cell, merged by concatenation.

Each shard appends to its own file, ``OUTPUT/results/shard-I-of-N.jsonl`` (``results.jsonl`` unsharded),
one ``write`` of whole lines per finished unit (a training run with every evaluation made from it).
Every row of an attempt carries the attempt's id and its row count, so an attempt that a kill cut short
is recognised as incomplete and ignored (the unit runs again), and a line that does not parse (a torn
tail, or one glued to the next file by ``cat``) is skipped with a warning naming file and line; the next
append first cuts a torn tail back to the last newline. Files from several machines merge by
concatenation (``cat``) or by reading them together. A unit can appear more than once (it crashed, or
its suite changed, then it ran again): the latest complete attempt of each unit wins.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = ["append_rows", "latest_rows", "read_rows", "results_file", "results_files"]


def results_file(output: Path, shard: tuple[int, int] | None) -> Path:
    name = "results.jsonl" if shard is None or shard[1] == 1 else f"shard-{shard[0]}-of-{shard[1]}.jsonl"
    return Path(output) / "results" / name


def results_files(output: Path) -> list[Path]:
    return sorted((Path(output) / "results").glob("*.jsonl"))


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append one attempt's rows as whole lines in one write, fsynced; a torn tail is cut off first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in rows).encode()
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":  # a kill tore the last append: drop the fragment
                handle.seek(0)
                keep = handle.read().rfind(b"\n") + 1
                handle.truncate(keep)
                warnings.warn(f"{path}: cut a torn last line ({size - keep} bytes)")
        handle.seek(0, os.SEEK_END)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(paths: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        lines = Path(path).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:  # torn by a kill (or glued by cat): its attempt is incomplete
                warnings.warn(f"{path}:{number}: skipping a line that is not JSON ({err.msg})")
                continue
            if not isinstance(row, dict) or "unit" not in row or "status" not in row:
                raise ValueError(f"{path}:{number}: not a benchmark row (needs 'unit' and 'status')")
            rows.append(row)
    return rows


def _row_key(r: dict[str, Any]) -> tuple:
    return (r.get("attempt"), r.get("eval_task"), r.get("cell"), r.get("mode"))


def complete_attempts(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """(unit, attempt id) -> its rows, for the attempts whose rows are all present (duplicates read once)."""
    attempts: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    for r in rows:  # by unit too: rows made without an attempt id (by hand, converted) stay apart per unit
        attempts.setdefault((r["unit"], r.get("attempt", "")), {})[_row_key(r)] = r
    out = {}
    for attempt, members in attempts.items():
        expected = next(iter(members.values())).get("rows_in_attempt")
        if expected is None or len(members) == expected:
            out[attempt] = list(members.values())
        else:
            warnings.warn(f"attempt {attempt[1]} of unit {next(iter(members.values()))['unit']}: {len(members)} of "
                          f"{expected} rows present (cut short); ignored, the unit runs again")
    return out


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each unit's rows from its latest complete attempt (by ``finished_at``; the later line breaks ties)."""
    latest: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for members in complete_attempts(rows).values():
        unit, stamp = members[0]["unit"], members[0].get("finished_at", "")
        if unit not in latest or stamp >= latest[unit][0]:
            latest[unit] = (stamp, members)
    return [r for _, members in latest.values() for r in members]
