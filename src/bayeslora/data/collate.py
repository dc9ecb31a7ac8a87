"""Batch collation for causal LMs (left-padded prompts + label tokens, or one left-padded
(context, choice) row per choice for the log-likelihood protocol) and encoders (choice pairs).

Both collators take a Hugging Face tokenizer (any object with the tokenizer ``__call__``; nothing here
imports model code) and return ``torch`` tensors. Padding is done here rather than by the tokenizer so
that it does not depend on the tokenizer's ``padding_side`` setting: causal prompts are padded on the
*left* (the scored position is the last column for every row), encoder pairs on the right.

``labels`` in the returned dicts is the gold *choice index*, not LM targets: pass only
``input_ids``/``attention_mask``/``position_ids`` (``token_type_ids``) to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .example import MCExample
from .prompts import (
    ANSWER_CUE, BOOLQ_ANSWER_CUE, BOOLQ_LABELS, answer_cue, causal_prompt_segments, choice_letters,
    encoder_pair_segments, label_strings, loglik_pair_segments,
)
from .truncation import fit_segments


def label_token_ids(tokenizer: Any, labels: Sequence[str], cue: str) -> list[int]:
    """The vocabulary id of each label as the model would emit it right after ``cue``.

    The id is the one token that ``tokenize(cue + label)`` adds to ``tokenize(cue)``, so the leading
    space of ``" A"`` is handled as each tokenizer does it (``ĠA``, ``▁A``, ``a``). Raises ValueError
    naming the label if it is not exactly one token, is the unknown token, or collides with another.
    """
    base = tokenizer(cue, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for label in labels:
        full = tokenizer(cue + label, add_special_tokens=False)["input_ids"]
        extra = full[len(base) :]
        if full[: len(base)] != base or len(extra) != 1:
            pieces = tokenizer.convert_ids_to_tokens(full[len(base) :] if full[: len(base)] == base else full)
            raise ValueError(
                f"answer label {label!r} is not a single token for this tokenizer after {cue!r} "
                f"(it tokenizes as {pieces}); label tokens must be single and distinct"
            )
        if getattr(tokenizer, "unk_token_id", None) is not None and extra[0] == tokenizer.unk_token_id:
            raise ValueError(f"answer label {label!r} maps to the unknown token for this tokenizer")
        ids.append(extra[0])
    if len(set(ids)) != len(ids):
        clash = [lab for lab, i in zip(labels, ids) if ids.count(i) > 1]
        raise ValueError(f"answer labels {clash} map to the same token for this tokenizer; they must be distinct")
    return ids


def answer_label_rows(tokenizer: Any) -> list[int]:
    """Every vocabulary id a prompt of this package can score as an answer label: " A" to " Z" after the
    multiple-choice cue and BoolQ's " False", " True" after its own (the labels that are one token for this
    tokenizer; an item needing another fails to collate anyway). The rows a label-scored lm_head needs."""
    rows: set[int] = set()
    for labels, cue in ((tuple(f" {c}" for c in choice_letters(26)), ANSWER_CUE), (BOOLQ_LABELS, BOOLQ_ANSWER_CUE)):
        for label in labels:
            try:
                rows.update(label_token_ids(tokenizer, [label], cue))
            except ValueError:
                continue
    if not rows:
        raise ValueError("no answer label is a single token for this tokenizer; --scoring labels cannot work")
    return sorted(rows)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _default_max_length(tokenizer: Any, cap: int) -> int:
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < cap else cap


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``position_ids`` (N, L) of token rows padded on the left."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}


def _item_fields(examples: Sequence[MCExample], truncated: int) -> dict[str, Any]:
    """The per-item fields of a batch scored as one row per choice: ``n_choices``, ``choice_mask``,
    ``labels``, ``truncated``, ``uids``."""
    n_choices = torch.tensor([ex.n_choices for ex in examples], dtype=torch.long)
    return {"n_choices": n_choices,
            "choice_mask": torch.arange(int(n_choices.max()))[None, :] < n_choices[:, None],
            "labels": torch.tensor([ex.answer for ex in examples], dtype=torch.long),
            "truncated": truncated, "uids": [ex.uid for ex in examples]}


class CausalCollator:
    """Collate :class:`MCExample` rows into a left-padded causal-LM batch.

    Returns a dict with (B = batch, L = longest prompt, C = most choices in the batch):
    ``input_ids``, ``attention_mask``, ``position_ids`` (B, L), left-padded, so ``[:, -1]`` is every
    prompt's last token (the answer cue); ``label_token_ids`` (B, C) vocabulary ids of the answer labels,
    0 where ``label_mask`` (B, C) is False; ``labels`` (B,) gold choice index; ``n_choices`` (B,);
    ``truncated`` (int) number of prompts shortened to fit ``max_length``; ``uids`` (list of str).
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length or _default_max_length(tokenizer, 4096)
        self.pad_id = _pad_id(tokenizer)
        self._label_cache: dict[tuple[tuple[str, ...], str], list[int]] = {}

    def label_ids(self, example: MCExample) -> list[int]:
        """Label token ids of one example (cached per label set and cue)."""
        key = (label_strings(example), answer_cue(example))
        if key not in self._label_cache:
            self._label_cache[key] = label_token_ids(self.tokenizer, *key)
        return self._label_cache[key]

    def encode(self, example: MCExample) -> tuple[list[int], bool]:
        """Token ids of one prompt (special tokens included), shortened if needed, and whether it was."""

        seen: dict[str, list[int]] = {}

        def count(text: str) -> int:
            seen[text] = self.tokenizer(text, verbose=False)["input_ids"]
            return len(seen[text])

        text, truncated = fit_segments(causal_prompt_segments(example), count, self.max_length, self.tokenizer)
        return seen[text], truncated

    def __call__(self, examples: Sequence[MCExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        encoded = [self.encode(ex) for ex in examples]
        n_max = max(ex.n_choices for ex in examples)
        batch = len(examples)
        label_ids = torch.zeros((batch, n_max), dtype=torch.long)
        label_mask = torch.zeros((batch, n_max), dtype=torch.bool)
        for row, ex in enumerate(examples):
            label_ids[row, : ex.n_choices] = torch.tensor(self.label_ids(ex), dtype=torch.long)
            label_mask[row, : ex.n_choices] = True
        return {
            **_left_padded([ids for ids, _ in encoded], self.pad_id),
            "label_token_ids": label_ids,
            "label_mask": label_mask,
            "labels": torch.tensor([ex.answer for ex in examples], dtype=torch.long),
            "n_choices": torch.tensor([ex.n_choices for ex in examples], dtype=torch.long),
            "truncated": sum(t for _, t in encoded),
            "uids": [ex.uid for ex in examples],
        }


class EncoderCollator:
    """Collate :class:`MCExample` rows into flattened, right-padded (context, choice) pairs.

    Returns (N = total choices in the batch, L = longest pair, B = batch, C = most choices):
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them) (N, L), pairs
    in example-major order; ``n_choices`` (B,); ``choice_mask`` (B, C); ``labels`` (B,) gold index;
    ``truncated`` (int) number of examples with a shortened context; ``uids``. Regroup the N pair scores
    with :func:`regroup_pair_scores`.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length or _default_max_length(tokenizer, 512)
        self.pad_id = _pad_id(tokenizer)

    def __call__(self, examples: Sequence[MCExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        firsts, seconds, truncated = [], [], 0
        for ex in examples:
            any_cut = False
            for context, second in encoder_pair_segments(ex):

                def count(text: str, second: str = second) -> int:
                    return len(self.tokenizer(text, second, verbose=False)["input_ids"])

                text, cut = fit_segments(context, count, self.max_length, self.tokenizer)
                firsts.append(text)
                seconds.append(second)
                any_cut |= cut
            truncated += any_cut
        enc = self.tokenizer(firsts, seconds, verbose=False)
        width = max(len(ids) for ids in enc["input_ids"])
        out: dict[str, Any] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in enc:
                rows = [ids + [fill] * (width - len(ids)) for ids in enc[key]]
                out[key] = torch.tensor(rows, dtype=torch.long)
        out.update(_item_fields(examples, truncated))
        return out


class CausalChoiceCollator:
    """Collate :class:`MCExample` rows into left-padded (context + continuation) rows, one per choice.

    Returns (N = total choices in the batch, L = longest row, K = longest continuation):
    ``input_ids``, ``attention_mask``, ``position_ids`` (N, L), rows in example-major order and
    left-padded, so every continuation ends at the last position; ``continuation_mask`` (N, K), True
    on the last ``k_i`` of the K final positions (row i's continuation tokens); ``n_choices`` (B,);
    ``choice_mask`` (B, C); ``labels`` (B,); ``truncated`` (int, examples whose context was shortened);
    ``uids``. The continuation's ids are those that ``context + continuation`` adds to ``context``
    (so BPE merges across the boundary are the tokenizer's own), else its separate tokenization.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length or _default_max_length(tokenizer, 4096)
        self.pad_id = _pad_id(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, verbose=False)["input_ids"]

    def encode(self, context: list, continuation: str) -> tuple[list[int], int, bool]:
        """(row ids, continuation length, whether the context was shortened)."""
        cont_alone = self.tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
        if not cont_alone:
            raise ValueError(f"a choice continuation tokenizes to nothing: {continuation!r}")
        seen: dict[str, list[int]] = {}

        def count(text: str) -> int:
            seen[text] = self._ids(text)
            return len(seen[text])

        text, cut = fit_segments(context, count, self.max_length - len(cont_alone), self.tokenizer)
        ctx, whole = seen[text], self._ids(text + continuation)
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx and len(whole) <= self.max_length:
            return whole, len(whole) - len(ctx), cut
        return ctx + cont_alone, len(cont_alone), cut

    def __call__(self, examples: Sequence[MCExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows, lengths, truncated = [], [], 0
        for ex in examples:
            any_cut = False
            for context, continuation in loglik_pair_segments(ex):
                ids, k, cut = self.encode(context, continuation)
                rows.append(ids)
                lengths.append(k)
                any_cut |= cut
            truncated += any_cut
        k_max = max(lengths)
        continuation_mask = torch.zeros((len(rows), k_max), dtype=torch.bool)
        for i, k in enumerate(lengths):
            continuation_mask[i, k_max - k:] = True
        return {**_left_padded(rows, self.pad_id), "continuation_mask": continuation_mask,
                **_item_fields(examples, truncated)}


def regroup_pair_scores(scores: torch.Tensor, n_choices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape flat pair scores ``(..., N)`` to ``(..., B, C)`` logits, ``-inf`` where there is no choice.

    Returns ``(logits, mask)``; ``logits.softmax(-1)`` then gives each example's choice distribution.
    Leading dimensions (e.g. posterior samples S) are kept.
    """
    mask = torch.arange(int(n_choices.max()), device=n_choices.device)[None, :] < n_choices[:, None]
    if scores.shape[-1] != int(mask.sum()):
        raise ValueError(f"got {scores.shape[-1]} pair scores for {int(mask.sum())} choices")
    logits = scores.new_full((*scores.shape[:-1], *mask.shape), float("-inf"))
    logits[..., mask] = scores
    return logits, mask

