"""Prompt templates (METHOD.md section 7) and answer-label strings; the only place prompt text lives.

Causal LMs read one prompt per example and are scored on the next-token logits of the label tokens.
Templates (choices relabelled A, B, C, ... by position, whatever the file's labels were)::

    Return the label of the correct answer for the question below.

    Question: {question}
    Choices:
    A) {choice}
    B) {choice}
    Answer:

    Fill in the blank (_) in the sentence below with the correct option.

    Sentence: {sentence with its _ blank}
    Choices:
    A) {option1}
    B) {option2}
    Answer:

    Read the passage below and answer the question with the words 'true' or 'false'.

    Passage: {passage}
    Question: {question}?
    Answer (true or false):

A multiple-choice item that carries a passage (users' JSONL) gets ``Passage: {passage}`` before
``Question:``.

**Label strings** include the leading space: ``" A"``, ``" B"``, ... and, for BoolQ, ``" False"``,
``" True"`` (in choice order ``("false", "true")``, capitalised as METHOD.md fixes). The label is what
the model would write right after the cue ``Answer:``, and that is a space-prefixed token in BPE
(``ĠA``) and SentencePiece (``▁A``) vocabularies. The collator does not tokenize the label alone (which
gives ``A`` without the space in GPT-2, or an extra ``▁`` in Llama); it takes the one token that
``cue + label`` adds to ``cue`` (see :func:`bayeslora.data.collate.label_token_ids`).

Prompts are lists of :class:`Segment` so truncation can shorten the passage (first) or the question
(second) and never touch the instruction, the choices or the answer cue. The passage keeps its start
(a Wikipedia paragraph leads with its topic); the question keeps its end (long MMLU questions put a
source text first and the actual question last).

Encoders score (context, choice) pairs, see :func:`encoder_pair_segments`. Causal LMs can instead be
scored by the log-likelihood of each choice's text given a context (:func:`loglik_pair_segments`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

from .example import Kind, MCExample

MC_INSTRUCTION = "Return the label of the correct answer for the question below."
WINOGRANDE_INSTRUCTION = "Fill in the blank (_) in the sentence below with the correct option."
BOOLQ_INSTRUCTION = "Read the passage below and answer the question with the words 'true' or 'false'."
ANSWER_CUE = "Answer:"
BOOLQ_ANSWER_CUE = "Answer (true or false):"
BOOLQ_LABELS = (" False", " True")


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text and how it may be shortened.

    ``keep``: ``"all"`` never shortened; ``"head"`` shortened from the end (keeps its start);
    ``"tail"`` shortened from the start (keeps its end). ``priority``: lower is shortened first.
    """

    text: str
    keep: Literal["all", "head", "tail"] = "all"
    priority: int = 0


PASSAGE_PRIORITY, QUESTION_PRIORITY = 0, 1


def render(segments: list[Segment]) -> str:
    """Concatenate segments into the prompt text."""
    return "".join(s.text for s in segments)


def choice_letters(n: int) -> tuple[str, ...]:
    """``("A", "B", ...)`` for ``n`` choices."""
    return tuple(string.ascii_uppercase[:n])


def answer_cue(example: MCExample) -> str:
    """The text every prompt of this kind ends with (the position whose next token is scored)."""
    return BOOLQ_ANSWER_CUE if example.kind is Kind.BOOLQ else ANSWER_CUE


def label_strings(example: MCExample) -> tuple[str, ...]:
    """The answer label per choice, with the leading space: ``(" A", " B", ...)`` or BoolQ's."""
    if example.kind is Kind.BOOLQ:
        return BOOLQ_LABELS
    return tuple(f" {letter}" for letter in choice_letters(example.n_choices))


def causal_prompt_segments(example: MCExample) -> list[Segment]:
    """The causal-LM prompt of ``example`` as shortenable segments (see the module docstring)."""
    if example.kind is Kind.BOOLQ:
        return [
            Segment(f"{BOOLQ_INSTRUCTION}\n\nPassage: "),
            Segment(example.passage or "", "head", PASSAGE_PRIORITY),
            Segment("\nQuestion: "),
            Segment(example.question.rstrip().rstrip("?"), "tail", QUESTION_PRIORITY),
            Segment(f"?\n{BOOLQ_ANSWER_CUE}"),
        ]
    choices = "".join(f"\n{letter}) {text}" for letter, text in zip(choice_letters(example.n_choices), example.choices))
    tail = Segment(f"\nChoices:{choices}\n{ANSWER_CUE}")
    if example.kind is Kind.WINOGRANDE:
        return [
            Segment(f"{WINOGRANDE_INSTRUCTION}\n\nSentence: "),
            Segment(example.question, "tail", QUESTION_PRIORITY),
            tail,
        ]
    head = [Segment(f"{MC_INSTRUCTION}\n\n")]
    if example.passage is not None:
        head += [Segment("Passage: "), Segment(example.passage, "head", PASSAGE_PRIORITY), Segment("\n")]
    return [*head, Segment("Question: "), Segment(example.question, "tail", QUESTION_PRIORITY), tail]


def causal_prompt(example: MCExample) -> str:
    """The full (untruncated) causal-LM prompt text."""
    return render(causal_prompt_segments(example))


def encoder_pair_segments(example: MCExample) -> list[tuple[list[Segment], str]]:
    """Per choice, the (context segments, second text) pair an encoder scores.

    * multiple choice: ``(question, choice)``, with ``passage + " "`` before the question if present;
    * BoolQ: ``(question + "? " + passage, "false" | "true")``;
    * WinoGrande: the option is substituted into the blank and the sentence is split there,
      ``(text before the blank + option, text after the blank)`` as in the WinoGrande paper's RoBERTa
      baseline, so the two pairs differ only in the filled-in option.

    Only the context is ever shortened (passage first, then the question from its start).
    """
    if example.kind is Kind.WINOGRANDE:
        before, _, after = example.question.partition("_")
        return [
            ([Segment(before, "tail", QUESTION_PRIORITY), Segment(option)], after.lstrip())
            for option in example.choices
        ]
    if example.kind is Kind.BOOLQ:
        context = [
            Segment(example.question.rstrip().rstrip("?"), "tail", QUESTION_PRIORITY),
            Segment("? "),
            Segment(example.passage or "", "head", PASSAGE_PRIORITY),
        ]
        return [(context, choice) for choice in example.choices]
    context = [Segment(example.question, "tail", QUESTION_PRIORITY)]
    if example.passage is not None:
        context = [Segment(example.passage, "head", PASSAGE_PRIORITY), Segment(" "), *context]
    return [(context, choice) for choice in example.choices]


def encoder_pairs(example: MCExample) -> list[tuple[str, str]]:
    """The untruncated (context, choice) text pairs of ``example``, one per choice."""
    return [(render(context), second) for context, second in encoder_pair_segments(example)]


def loglik_pair_segments(example: MCExample) -> list[tuple[list[Segment], str]]:
    """Per choice, the (context segments, continuation) whose continuation tokens a causal LM scores.

    The choice log-likelihood protocol, as lm-evaluation-harness scores multiple choice:

    * multiple choice: ``Question: {question}\nAnswer:`` (after ``Passage: {passage}\n`` if present),
      continuation ``" {choice}"``;
    * BoolQ: ``{passage}\nQuestion: {question}?\nAnswer:``, continuation ``" false"`` / ``" true"``;
    * WinoGrande: the sentence up to the blank with the option filled in, continuation the rest of the
      sentence (the same text for both options, so only the context differs).

    Only the context is ever shortened (passage first, then the question from its start).
    """
    if example.kind is Kind.WINOGRANDE:
        before, _, after = example.question.partition("_")
        rest = " " + after.strip()
        return [([Segment(before, "tail", QUESTION_PRIORITY), Segment(option)], rest) for option in example.choices]
    if example.kind is Kind.BOOLQ:
        context = [
            Segment(example.passage or "", "head", PASSAGE_PRIORITY),
            Segment("\nQuestion: "),
            Segment(example.question.rstrip().rstrip("?"), "tail", QUESTION_PRIORITY),
            Segment(f"?\n{ANSWER_CUE}"),
        ]
        return [(context, f" {choice}") for choice in example.choices]
    context = [Segment("Question: "), Segment(example.question, "tail", QUESTION_PRIORITY), Segment(f"\n{ANSWER_CUE}")]
    if example.passage is not None:
        context = [Segment("Passage: "), Segment(example.passage, "head", PASSAGE_PRIORITY), Segment("\n"), *context]
    return [(context, f" {choice}") for choice in example.choices]
