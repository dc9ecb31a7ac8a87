"""The benchmark's results: JSON lines, one row per evaluated cell, merged by concatenation.

Each shard appends to its own file, ``OUTPUT/results/shard-I-of-N.jsonl`` (``results.jsonl`` unsharded),
one ``write`` of whole lines per finished unit (a training run with every evaluation made from it), so
a kill leaves at most a torn last line, which readers skip with a warning. Files from several machines
merge by concatenation (``cat``) or by reading them together. A unit can appear more than once (it
crashed, then ran again): the latest attempt of each unit wins.
"""

from __future__ import annotations

import json
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


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole lines in one write and fsync them (a kill tears at most the last line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode()
    with open(path, "ab") as handle:
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
            except json.JSONDecodeError as err:
                if number == len(lines):  # torn by a kill mid-write: the unit runs again
                    warnings.warn(f"{path}:{number}: skipping a torn last line")
                    continue
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from err
            if not isinstance(row, dict) or "unit" not in row or "status" not in row:
                raise ValueError(f"{path}:{number}: not a benchmark row (needs 'unit' and 'status')")
            rows.append(row)
    return rows


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each unit's rows from its latest attempt (by ``finished_at``; the later line breaks ties)."""
    latest: dict[str, tuple[str, str]] = {}
    for r in rows:
        stamp = r.get("finished_at", "")
        if r["unit"] not in latest or stamp >= latest[r["unit"]][0]:
            latest[r["unit"]] = (stamp, r.get("attempt", ""))
    return [r for r in rows if (r.get("finished_at", ""), r.get("attempt", "")) == latest[r["unit"]]]
