"""The one example type every task is converted to, and the errors the loaders raise.

Every task (ARC, OpenBookQA, WinoGrande, BoolQ, MMLU, users' JSONL, the synthetic demo) becomes a list
of :class:`MCExample`: a question, its choices in display order and the 0-based gold index. Prompts,
collators and metrics only ever see this type, so a new task is one parser, never a new code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """How an example is shown to a model (it selects the prompt template, not the maths)."""

    MULTIPLE_CHOICE = "mc"
    """A question with 2-26 answer options relabelled A, B, C, ... by position (ARC, OBQA, MMLU)."""
    WINOGRANDE = "winogrande"
    """``question`` is a sentence with one ``_`` blank; ``choices`` are the two fillers."""
    BOOLQ = "boolq"
    """``passage`` + yes/no ``question``; ``choices`` are ``("false", "true")`` so ``answer`` is 0/1."""


BOOLQ_CHOICES: tuple[str, str] = ("false", "true")
"""BoolQ choice order: index 0 is "false", index 1 is "true", so ``answer == int(label)``."""

MAX_CHOICES = 26
"""Choices are labelled A..Z by position, so at most 26."""


class DataFormatError(ValueError):
    """A data row is malformed; the message starts with ``file:line`` and names the field.

    Example: ``data/arc/x.jsonl:17: field 'answerKey': 'F' is not one of the choice labels ['A', 'B']``.
    It is a ``ValueError`` so callers that catch bad input generically still catch it.
    """

    def __init__(self, source: str, message: str, field: str | None = None) -> None:
        self.source = source
        self.field = field
        where = f"{source}: field {field!r}: " if field else f"{source}: "
        super().__init__(where + message)


class MissingSplitError(FileNotFoundError):
    """A split's file is absent (e.g. a held-out test file that is not in this data folder)."""


class SplitUnavailableError(ValueError):
    """The split does not exist for this task (MMLU ``train``) or needs an explicit file (BoolQ train)."""


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item, validated on construction.

    Attributes:
        uid: identifier, unique within a loaded split (release id, qID, ``boolq-<idx>``,
            ``<subject>/<split>/<row>`` for MMLU, ``<file stem>:<line>`` for id-less user rows).
        question: question text; for WinoGrande the sentence with its ``_`` blank.
        choices: answer options in display order (position i is shown as the i-th letter).
        answer: 0-based index of the gold choice.
        passage: supporting text (BoolQ passage, optional ``passage`` of user JSONL), else None.
        kind: which prompt template applies, see :class:`Kind`.
        source: ``"file:line"`` of the row (or ``"synthetic:<split>:<i>"``) for error messages.
    """

    uid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    passage: str | None = None
    kind: Kind = Kind.MULTIPLE_CHOICE
    source: str = ""

    def __post_init__(self) -> None:
        # Accept lists and plain strings for convenience, but store the immutable canonical forms.
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "kind", Kind(self.kind))
        where = self.source or self.uid
        if not isinstance(self.question, str):
            raise DataFormatError(where, f"must be a string, got {type(self.question).__name__}", "question")
        if not 2 <= len(self.choices) <= MAX_CHOICES:
            raise DataFormatError(where, f"needs 2..{MAX_CHOICES} choices, got {len(self.choices)}", "choices")
        for choice in self.choices:
            if not isinstance(choice, str):
                raise DataFormatError(where, f"choice {choice!r} is not a string", "choices")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise DataFormatError(where, f"must be an int, got {self.answer!r}", "answer")
        if not 0 <= self.answer < len(self.choices):
            raise DataFormatError(
                where, f"gold index {self.answer} is outside the {len(self.choices)} choices", "answer"
            )
        if self.passage is not None and not isinstance(self.passage, str):
            raise DataFormatError(where, f"must be a string or None, got {self.passage!r}", "passage")
        if self.kind is Kind.WINOGRANDE:
            if len(self.choices) != 2:
                raise DataFormatError(where, "a WinoGrande item has exactly two options", "choices")
            if "_" not in self.question:
                raise DataFormatError(where, "a WinoGrande sentence needs a '_' blank", "sentence")
        if self.kind is Kind.BOOLQ:
            if self.choices != BOOLQ_CHOICES:
                raise DataFormatError(where, f"BoolQ choices must be {BOOLQ_CHOICES}", "choices")
            if self.passage is None:
                raise DataFormatError(where, "a BoolQ item needs a passage", "passage")

    @property
    def n_choices(self) -> int:
        """Number of answer options (varies per item in ARC: 3, 4 or 5)."""
        return len(self.choices)
