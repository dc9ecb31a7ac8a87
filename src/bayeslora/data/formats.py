"""Parsers for the original release formats, one row -> one :class:`MCExample`.

Formats (exactly as the files sit in the data folder, see ``shared/data/SOURCES.md``):

* **ARC / OpenBookQA** JSON Lines: ``{"id", "question": {"stem", "choices": [{"text", "label"}]},
  "answerKey"}``. Labels may be ``"A".."E"`` or ``"1".."4"``; items have 3, 4 or 5 choices. Choices keep
  file order and are relabelled by position in prompts.
* **WinoGrande** JSON Lines: ``{"qID", "sentence", "option1", "option2", "answer": "1"|"2"}``. If a
  ``<stem>-labels.lst`` file sits beside the ``.jsonl``, every line must agree with ``answer``.
* **BoolQ** JSON Lines, either the SuperGLUE form ``{"question", "passage", "idx", "label"}`` or Google's
  original ``{"question", "title", "answer", "passage"}``; the label may be a JSON boolean or the string
  ``"true"``/``"false"`` (this data folder stringified it). Google's passage gets the SuperGLUE
  ``"<title> -- "`` prefix so train (Google file) and dev/test (SuperGLUE files) look alike.
* **MMLU** CSV without header: ``question, A, B, C, D, answer letter``; quoted fields contain commas and
  newlines.
* **Generic JSONL** (users' own data), one object per line::

      {"question": "2 + 2 = ?", "choices": ["3", "4", "5"], "answer": 1}
      {"question": "...", "choices": ["x", "y"], "answer": "B", "passage": "...", "id": "q7"}

  ``answer`` is a 0-based int or the choice's letter (A = first choice); ``passage`` and ``id`` are
  optional (without ``id`` the uid is ``<file stem>:<line>``). Other keys are ignored.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from .example import BOOLQ_CHOICES, DataFormatError, Kind, MCExample
from .readers import get_field, iter_csv, iter_jsonl, read_label_list

LETTERS = string.ascii_uppercase


# ----------------------------------------------------------------------------------------- ARC/OBQA
def arc_example(row: dict[str, Any], source: str) -> MCExample:
    """Parse one ARC / OpenBookQA row; the gold index is the position of ``answerKey`` among labels."""
    uid = get_field(row, "id", str, source)
    question = get_field(row, "question", dict, source)
    stem = get_field(question, "stem", str, source, "question.stem")
    raw_choices = get_field(question, "choices", list, source, "question.choices")
    texts, labels = [], []
    for i, choice in enumerate(raw_choices):
        if not isinstance(choice, dict):
            raise DataFormatError(source, f"choice {i} is not an object: {choice!r}", "question.choices")
        texts.append(get_field(choice, "text", str, source, f"question.choices[{i}].text"))
        labels.append(get_field(choice, "label", str, source, f"question.choices[{i}].label"))
    if len(set(labels)) != len(labels):
        raise DataFormatError(source, f"duplicate choice labels {labels}", "question.choices")
    key = get_field(row, "answerKey", str, source)
    if key not in labels:
        raise DataFormatError(source, f"{key!r} is not one of the choice labels {labels}", "answerKey")
    return MCExample(uid, stem, tuple(texts), labels.index(key), None, Kind.MULTIPLE_CHOICE, source)


def read_arc_file(path: Path) -> list[MCExample]:
    """Read an ARC or OpenBookQA ``.jsonl`` file."""
    return [arc_example(row, source) for source, row in iter_jsonl(path)]


# --------------------------------------------------------------------------------------- WinoGrande
def winogrande_example(row: dict[str, Any], source: str) -> MCExample:
    """Parse one WinoGrande row; ``answer`` "1"/"2" (or int 1/2) becomes gold index 0/1."""
    uid = get_field(row, "qID", str, source)
    sentence = get_field(row, "sentence", str, source)
    options = (get_field(row, "option1", str, source), get_field(row, "option2", str, source))
    answer = get_field(row, "answer", (str, int), source)
    if str(answer) not in ("1", "2"):
        raise DataFormatError(source, f"{answer!r} is not '1' or '2' (unlabelled test file?)", "answer")
    return MCExample(uid, sentence, options, int(answer) - 1, None, Kind.WINOGRANDE, source)


def winogrande_labels_path(path: Path) -> Path:
    """The release's label file for a WinoGrande split: ``train_s.jsonl`` -> ``train_s-labels.lst``."""
    return path.with_name(f"{path.stem}-labels.lst")


def read_winogrande_file(path: Path) -> list[MCExample]:
    """Read a WinoGrande ``.jsonl``; cross-check it against ``<stem>-labels.lst`` when that exists."""
    examples = [winogrande_example(row, source) for source, row in iter_jsonl(path)]
    labels_path = winogrande_labels_path(path)
    if labels_path.is_file():
        labels = read_label_list(labels_path)
        if len(labels) != len(examples):
            raise DataFormatError(
                str(labels_path), f"has {len(labels)} labels but {path} has {len(examples)} rows"
            )
        for (label_source, label), example in zip(labels, examples):
            if label != str(example.answer + 1):
                raise DataFormatError(
                    label_source,
                    f"label {label!r} disagrees with {example.source} (qID {example.uid}) "
                    f"answer {str(example.answer + 1)!r}",
                )
    return examples


# -------------------------------------------------------------------------------------------- BoolQ
def boolq_example(row: dict[str, Any], source: str, default_uid: str) -> MCExample:
    """Parse one BoolQ row (SuperGLUE or Google's original layout); the gold index is 1 for true.

    The uid is ``boolq-<idx>`` when the row has ``idx`` (SuperGLUE), else ``default_uid``.
    """
    question = get_field(row, "question", str, source)
    passage = get_field(row, "passage", str, source)
    key = "label" if "label" in row else "answer"
    label = get_field(row, key, (bool, str, int), source)
    truth = _parse_bool(label, source, key)
    if "title" in row:
        title = get_field(row, "title", str, source)
        if title and not passage.startswith(f"{title} -- "):
            passage = f"{title} -- {passage}"
    idx = row.get("idx")
    uid = f"boolq-{idx}" if idx is not None else default_uid
    return MCExample(uid, question, BOOLQ_CHOICES, int(truth), passage, Kind.BOOLQ, source)


def _parse_bool(value: bool | str | int, source: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataFormatError(source, f"{value!r} is not true/false", key)


def read_boolq_file(path: Path) -> list[MCExample]:
    """Read a BoolQ ``.jsonl`` file (any of the accepted layouts)."""
    return [boolq_example(row, source, f"{path.stem}:{_line(source)}") for source, row in iter_jsonl(path)]


# --------------------------------------------------------------------------------------------- MMLU
def mmlu_example(fields: list[str], source: str, uid: str) -> MCExample:
    """Parse one MMLU CSV record ``question, A, B, C, D, answer``."""
    if len(fields) != 6:
        raise DataFormatError(source, f"expected 6 columns (question, A, B, C, D, answer), got {len(fields)}")
    answer = fields[5].strip()
    if answer not in ("A", "B", "C", "D"):
        raise DataFormatError(source, f"{fields[5]!r} is not one of ['A', 'B', 'C', 'D']", "answer")
    return MCExample(uid, fields[0], tuple(fields[1:5]), LETTERS.index(answer), None, Kind.MULTIPLE_CHOICE, source)


def mmlu_subject_of(path: Path) -> tuple[str, str]:
    """``college_physics_val.csv`` -> ``("college_physics", "val")``; another name -> ``(stem, "file")``."""
    stem = path.stem
    for tag in ("dev", "val", "test"):
        if stem.endswith(f"_{tag}"):
            return stem[: -len(tag) - 1], tag
    return stem, "file"


def read_mmlu_file(path: Path) -> list[MCExample]:
    """Read one MMLU CSV; uids are ``<subject>/<release split>/<record index>`` (``college_physics/val/3``)."""
    subject, tag = mmlu_subject_of(path)
    return [mmlu_example(fields, source, f"{subject}/{tag}/{i}") for i, (source, fields) in enumerate(iter_csv(path))]


# ------------------------------------------------------------------------------------------ generic
def generic_example(row: dict[str, Any], source: str, default_uid: str, labelled: bool = True) -> MCExample:
    """Parse one row of the generic JSONL format documented in this module's docstring; with
    ``labelled=False`` a row without ``answer`` is accepted and gets the placeholder answer 0."""
    question = get_field(row, "question", str, source)
    choices = get_field(row, "choices", list, source)
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise DataFormatError(source, f"choice {i} is {type(choice).__name__}, not a string", "choices")
    passage = get_field(row, "passage", str, source) if row.get("passage") is not None else None
    uid = str(get_field(row, "id", (str, int), source)) if "id" in row else default_uid
    if not labelled and row.get("answer") is None:
        return MCExample(uid, question, tuple(choices), 0, passage, Kind.MULTIPLE_CHOICE, source)
    answer = get_field(row, "answer", (int, str), source)
    if isinstance(answer, str):
        letters = list(LETTERS[: len(choices)])
        if answer.strip() not in letters:
            raise DataFormatError(source, f"{answer!r} is not one of the choice letters {letters}", "answer")
        answer = letters.index(answer.strip())
    elif not 0 <= answer < len(choices):
        raise DataFormatError(source, f"index {answer} is outside the {len(choices)} choices", "answer")
    return MCExample(uid, question, tuple(choices), answer, passage, Kind.MULTIPLE_CHOICE, source)


def read_generic_file(path: Path) -> list[MCExample]:
    """Read a generic-format ``.jsonl`` file of users' own multiple-choice data."""
    return [generic_example(row, source, f"{path.stem}:{_line(source)}") for source, row in iter_jsonl(path)]


def _line(source: str) -> str:
    return source.rsplit(":", 1)[1]
