"""Load the same tasks from the Hugging Face Hub when online, mapped onto the same :class:`MCExample`.

The local release files are the reference (``load_task``); this path is for machines that have the
network but not the data folder. Each ``*_from_hub`` function maps one Hub row onto the release row
layout and reuses the release parser, so validation and error messages are shared. ``datasets`` is
imported only inside :func:`load_hub_task`.

Only the field mappings are tested (on small fixture rows shaped like the Hub's); nothing here has been
run against the network in this repository's test suite.

Split mapping (same definitions as :mod:`bayeslora.data.tasks`):

* ARC (``allenai/ai2_arc``) and OpenBookQA (``allenai/openbookqa``, ``main``): train/validation/test.
* WinoGrande (``allenai/winogrande``): ``train`` of ``winogrande_{xs,s,m}``, ``test`` = ``validation``.
  The Hub copy has no ``qID`` field, so the qID-defined dev sample (and ``winogrande_l`` train, which
  excludes it) cannot be reproduced: those raise :class:`SplitUnavailableError`; use the release files.
* BoolQ (``aps/super_glue``, ``boolq``): ``train``; ``dev``/``test`` = even/odd ``idx`` of
  ``validation``.
* MMLU (``cais/mmlu``, one config per subject): ``dev`` = validation, ``test`` = test, ``fewshot`` = dev.
"""

from __future__ import annotations

from typing import Any

from . import formats
from .example import MCExample, SplitUnavailableError
from .mmlu_subjects import resolve_mmlu_subjects
from .splits import boolq_parity

STANDARD_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
RELEASE_MMLU_SPLIT = {"validation": "val", "test": "test", "dev": "dev"}  # uids match the CSV loader's


def arc_from_hub(row: dict[str, Any], source: str) -> MCExample:
    """``allenai/ai2_arc`` row: ``question`` is the stem, ``choices`` is ``{"text": [...], "label": [...]}``."""
    choices = [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]
    question = {"stem": row["question"], "choices": choices}
    release = {"id": row["id"], "question": question, "answerKey": row["answerKey"]}
    return formats.arc_example(release, source)


def openbookqa_from_hub(row: dict[str, Any], source: str) -> MCExample:
    """``allenai/openbookqa`` row: like ARC, but the stem is ``question_stem``."""
    return arc_from_hub({**row, "question": row["question_stem"]}, source)


def winogrande_from_hub(row: dict[str, Any], source: str, uid: str) -> MCExample:
    """``allenai/winogrande`` row (no qID on the Hub, so the caller supplies ``uid``)."""
    return formats.winogrande_example({**row, "qID": uid}, source)


def boolq_from_hub(row: dict[str, Any], source: str) -> MCExample:
    """``aps/super_glue`` ``boolq`` row: ``label`` is 0 (false) / 1 (true), ``idx`` an int."""
    return formats.boolq_example(dict(row), source, f"boolq-{row.get('idx')}")


def mmlu_from_hub(row: dict[str, Any], source: str, uid: str) -> MCExample:
    """``cais/mmlu`` row: ``choices`` is a list of 4 strings, ``answer`` an int 0-3."""
    answer = row["answer"]
    letter = formats.LETTERS[answer] if isinstance(answer, int) and 0 <= answer < 4 else repr(answer)
    return formats.mmlu_example([row["question"], *row["choices"], letter], source, uid)


def load_hub_task(task: str, split: str, cache_dir: str | None = None) -> list[MCExample]:
    """Download (or read from the HF cache) one split of ``task`` and map it onto :class:`MCExample`."""
    import datasets  # lazy: optional dependency, and slow to import

    def rows(name: str, config: str | None, hub_split: str) -> list[tuple[str, dict[str, Any]]]:
        data = datasets.load_dataset(name, config, split=hub_split, cache_dir=cache_dir)
        return [(f"hf:{name}/{config}:{hub_split}:{i}", row) for i, row in enumerate(data)]

    if task in ("arc_easy", "arc_challenge"):
        config = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
        return [arc_from_hub(r, s) for s, r in rows("allenai/ai2_arc", config, _standard(task, split))]
    if task == "openbookqa":
        return [openbookqa_from_hub(r, s) for s, r in rows("allenai/openbookqa", "main", _standard(task, split))]
    if task.startswith("winogrande_"):
        size = task[len("winogrande_") :]
        if split == "test":
            data = rows("allenai/winogrande", "winogrande_xl", "validation")
        elif split == "train" and size in ("xs", "s", "m"):
            data = rows("allenai/winogrande", task, "train")
        else:
            raise SplitUnavailableError(
                f"{task} {split!r} is defined by release qIDs, which the Hub copy lacks; use the release files"
            )
        return [winogrande_from_hub(r, s, f"{task}-{split}-{i}") for i, (s, r) in enumerate(data)]
    if task == "boolq":
        if split == "train":
            return [boolq_from_hub(r, s) for s, r in rows("aps/super_glue", "boolq", "train")]
        parity = boolq_parity(split)
        data = rows("aps/super_glue", "boolq", "validation")
        return [boolq_from_hub(r, s) for s, r in data if r["idx"] % 2 == parity]
    if task == "mmlu" or task.startswith(("mmlu_", "mmlu:")):
        hub_split = {"dev": "validation", "test": "test", "fewshot": "dev"}.get(split)
        if hub_split is None:
            raise SplitUnavailableError(f"MMLU has splits dev, test, fewshot; not {split!r}")
        return [
            mmlu_from_hub(r, s, f"{subject}/{RELEASE_MMLU_SPLIT[hub_split]}/{i}")
            for subject in resolve_mmlu_subjects(task)
            for i, (s, r) in enumerate(rows("cais/mmlu", subject, hub_split))
        ]
    raise ValueError(f"task {task!r} has no Hugging Face Hub mapping")


def _standard(task: str, split: str) -> str:
    if split not in STANDARD_SPLITS:
        raise ValueError(f"task {task!r} has splits train, dev, test; not {split!r}")
    return STANDARD_SPLITS[split]
