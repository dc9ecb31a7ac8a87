"""Shorten a prompt to a token budget by cutting only its shortenable segments.

Truncating token ids at either end would cut the instruction (left) or the choices and answer cue
(right), which changes the task. Instead the passage, then the question, are shortened in *text* space
at token boundaries and the prompt is re-tokenized, until it fits. Works with any Hugging Face
tokenizer (duck-typed: only ``__call__`` is used); fast tokenizers cut at exact token offsets, slow ones
by a proportional character estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .prompts import Segment, render

Counter = Callable[[str], int]


def fit_segments(segments: list[Segment], count: Counter, max_tokens: int, tokenizer: Any) -> tuple[str, bool]:
    """Return ``(text, truncated)`` with ``count(text) <= max_tokens``.

    Segments with ``keep != "all"`` are shortened in ``priority`` order (passage before question), each
    down to nothing if needed. Raises ValueError if the fixed segments alone exceed the budget.
    """
    text = render(segments)
    n_tokens = count(text)
    if n_tokens <= max_tokens:
        return text, False
    segs = list(segments)
    order = sorted((i for i, s in enumerate(segs) if s.keep != "all"), key=lambda i: (segs[i].priority, i))
    for i in order:
        while n_tokens > max_tokens and segs[i].text:
            shorter = drop_tokens(segs[i].text, n_tokens - max_tokens, segs[i].keep, tokenizer)
            segs[i] = replace(segs[i], text=shorter)
            text = render(segs)
            n_tokens = count(text)
        if n_tokens <= max_tokens:
            return text, True
    raise ValueError(
        f"max_length {max_tokens} is too small: the prompt needs {n_tokens} tokens even with its passage and "
        f"question removed (the instruction, choices and answer cue are never cut): {text[:200]!r}"
    )


def drop_tokens(text: str, n_drop: int, keep: str, tokenizer: Any) -> str:
    """Remove about ``n_drop`` tokens from the end (``keep="head"``) or start (``keep="tail"``) of ``text``.

    Always returns a strictly shorter string when ``text`` is non-empty, so callers' loops terminate.
    """
    spans = _token_spans(text, tokenizer)
    n_keep = len(spans) - max(n_drop, 1)
    if n_keep <= 0 or not spans:
        return ""
    if keep == "head":
        shorter = text[: spans[n_keep - 1][1]].rstrip()
    else:
        shorter = text[spans[len(spans) - n_keep][0] :].lstrip()
    if len(shorter) >= len(text):  # tokens without offsets: fall back to one character
        shorter = text[:-1] if keep == "head" else text[1:]
    return shorter


def _token_spans(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Character spans of ``text``'s tokens (no special tokens)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(a, b) for a, b in enc["offset_mapping"] if b > a]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = len(text) / max(n, 1)  # slow tokenizer: even character widths are an estimate
    return [(math.floor(i * width), math.floor((i + 1) * width)) for i in range(n)]
