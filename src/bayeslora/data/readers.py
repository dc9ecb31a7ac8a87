"""Low-level readers: JSON Lines, header-less CSV and label lists, each row tagged with ``file:line``.

These know nothing about tasks; they exist so that every parser reports errors the same way and so
that no row is ever skipped silently (only whitespace-only lines, which hold no row, are skipped).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .example import DataFormatError


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(source, row)`` for each non-blank line of a JSON Lines file; ``source`` is ``file:line``."""
    with open(path, encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(source, f"invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataFormatError(source, f"expected a JSON object, got {type(row).__name__}")
            yield source, row


def iter_csv(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(source, fields)`` per CSV record; ``source`` names the record's first line.

    Quoted fields may contain commas and newlines (MMLU does both), so a record can span lines.
    """
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        start = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataFormatError(f"{path}:{start}", f"invalid CSV ({err})") from None
            source = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(field.strip() for field in fields):
                continue
            yield source, fields


def read_label_list(path: Path) -> list[tuple[str, str]]:
    """Read a one-label-per-line file (WinoGrande ``*-labels.lst``) as ``(source, label)`` pairs."""
    with open(path, encoding="utf-8-sig") as handle:
        return [(f"{path}:{i}", line.strip()) for i, line in enumerate(handle, start=1) if line.strip()]


def get_field(
    row: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, name: str | None = None
) -> Any:
    """Return ``row[key]`` checked against ``kind``, or raise naming the file, line and field.

    ``name`` is the dotted field name shown in errors for nested objects (``question.stem``).
    ``bool`` is rejected where ``int`` is asked for, since JSON ``true`` is not a gold index.
    """
    name = name or key
    if key not in row:
        raise DataFormatError(source, f"missing (row has {sorted(row)})", name)
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise DataFormatError(source, f"expected {names}, got {type(value).__name__} {value!r}", name)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
