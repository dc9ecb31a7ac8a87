"""Tasks, file formats, prompts and collation for multiple-choice fine-tuning and evaluation.

Every task becomes a list of :class:`MCExample` (question, choices, gold index, ...)::

    from bayeslora.data import load_task, split_files, sha256_of
    train = load_task("winogrande_s", "train")            # data dir: $BAYESLORA_DATA_DIR or ../shared/data
    dev = load_task("boolq", "dev", data_dir="/data")
    mine = load_task("jsonl", "train", file="my.jsonl")    # generic JSONL, see bayeslora.data.formats
    demo = load_task("synthetic", "ood")                   # offline demo task, see bayeslora.data.synthetic

Modules: ``example`` (the type and errors), ``readers``/``formats`` (release file formats),
``tasks`` (split definitions and ``load_task``), ``splits`` (computed splits), ``mmlu_subjects``,
``synthetic`` (demo task), ``prompts`` (templates and label strings), ``truncation``, ``collate``
(tokenizer + torch; imported on first use so ``import bayeslora.data`` stays light), ``hub`` (optional
Hugging Face Hub loading), ``files`` (data dir, sha256).

This package imports no model code.
"""

from __future__ import annotations

from typing import Any

from .example import (
    BOOLQ_CHOICES,
    DataFormatError,
    Kind,
    MCExample,
    MissingSplitError,
    SplitUnavailableError,
)
from .files import DATA_DIR_ENV, default_data_dir, file_records, sha256_of
from .mmlu_subjects import SUBJECTS as MMLU_SUBJECTS
from .mmlu_subjects import resolve_mmlu_subjects
from .prompts import answer_cue, causal_prompt, encoder_pairs, label_strings
from .synthetic import SyntheticConfig
from .tasks import TASKS, fit_and_val, load_task, read_questions, split_files

_LAZY = {
    "answer_label_rows": "collate",
    "CausalChoiceCollator": "collate",
    "CausalCollator": "collate",
    "EncoderCollator": "collate",
    "label_token_ids": "collate",
    "regroup_pair_scores": "collate",
    "load_hub_task": "hub",
}


def __getattr__(name: str) -> Any:
    """Import the torch-dependent collators (and the Hub loader) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BOOLQ_CHOICES",
    "DATA_DIR_ENV",
    "MMLU_SUBJECTS",
    "TASKS",
    "CausalChoiceCollator",
    "CausalCollator",
    "DataFormatError",
    "EncoderCollator",
    "Kind",
    "MCExample",
    "MissingSplitError",
    "SplitUnavailableError",
    "SyntheticConfig",
    "answer_cue",
    "answer_label_rows",
    "causal_prompt",
    "default_data_dir",
    "encoder_pairs",
    "file_records",
    "fit_and_val",
    "label_strings",
    "label_token_ids",
    "load_hub_task",
    "load_task",
    "read_questions",
    "regroup_pair_scores",
    "resolve_mmlu_subjects",
    "sha256_of",
    "split_files",
]
