"""Task registry: ``(task, split, data_dir, file)`` -> the files read and the examples they hold.

Splits (the exact definitions; ``shared/data/SOURCES.md`` says which files are held out):

============================  ==============================  ===========================  ======================
task                          train                           dev                          test
============================  ==============================  ===========================  ======================
``arc_easy/arc_challenge``    ``ARC-*-Train.jsonl``           ``ARC-*-Dev.jsonl``          ``ARC-*-Test.jsonl``
``openbookqa``                ``Main/train.jsonl``            ``Main/dev.jsonl``           ``Main/test.jsonl``
``winogrande_{xs,s,m}``       ``train_{size}.jsonl``          1,267 sampled qIDs (below)   release ``dev.jsonl``
``winogrande_l``              ``train_l`` minus dev sample    1,267 sampled qIDs           release ``dev.jsonl``
``boolq``                     needs ``file=`` (--train-file)  ``boolq/val_even.jsonl``     ``boolq/val_odd.jsonl``
``boolq_val_even``            seeded 2/3 of ``val_even``      the other third              ``boolq/val_odd.jsonl``
``mmlu*``                     none (error)                    ``mmlu/val/``                ``mmlu/test/``
``synthetic``                 generated                       generated                    generated (+ ``ood``)
``jsonl``                     needs ``file=``                 needs ``file=``              needs ``file=``
============================  ==============================  ===========================  ======================

``val`` (every task with a train split, and any ``file=``): a fixed seeded slice of the train rows,
10% capped at 500 (:func:`bayeslora.data.splits.val_uids`). Training fits on ``train`` less ``val``
(:func:`fit_and_val`), selects checkpoints and tunes on ``val``, and ``dev`` is only reported on.
``train`` itself stays the whole release file.

MMLU also has ``fewshot`` = ``mmlu/dev/`` (5 exemplars per subject). The WinoGrande dev sample is
defined in :mod:`bayeslora.data.splits`. If ``val_even``/``val_odd`` are absent but the full SuperGLUE
``boolq/val.jsonl`` is present, the BoolQ half is taken from it by ``idx`` parity (same rows).
``file`` replaces the split's file(s) entirely (the format is the task's); for MMLU it may be a CSV
file or a folder of CSVs. A missing file raises :class:`MissingSplitError` naming path and data dir.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import formats
from .example import DataFormatError, MCExample, MissingSplitError, SplitUnavailableError
from .files import require_data_dir
from .mmlu_subjects import resolve_mmlu_subjects
from .readers import get_field, iter_jsonl
from .splits import boolq_parity, boolq_val_even_train_uids, val_uids, winogrande_dev_qids

Reader = Callable[[Path], list[MCExample]]

ARC_DIRS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
WINOGRANDE_SIZES = ("xs", "s", "m", "l")
TASKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "openbookqa", *(f"winogrande_{s}" for s in WINOGRANDE_SIZES),
    "boolq", "boolq_val_even", "mmlu", "synthetic", "jsonl",
)  # fmt: skip
"""Fixed task names; MMLU also accepts the subject/group names of :mod:`.mmlu_subjects`."""


@dataclass(frozen=True)
class SplitPlan:
    """What one (task, split) reads: ``files`` (for the run record) and a ``load`` thunk."""

    files: tuple[Path, ...]
    load: Callable[[], list[MCExample]]


def load_task(
    task: str, split: str, data_dir: Path | str | None = None, file: Path | str | None = None
) -> list[MCExample]:
    """Load one split of a task as validated :class:`MCExample` rows, in file order.

    Args:
        task: a name of :data:`TASKS` or an MMLU subject/group name (``mmlu_chem``, ``mmlu_stem``, ...).
        split: ``train``, ``val`` (carved from train), ``dev``, ``test``; MMLU also ``fewshot``;
            ``synthetic`` also ``ood``.
        data_dir: the data folder; None means ``$BAYESLORA_DATA_DIR`` or ``<repo>/../shared/data``.
        file: read this file instead of the split's file (BoolQ train, users' data).

    Raises:
        MissingSplitError: a split file is absent. SplitUnavailableError: the split does not exist.
        DataFormatError: a row is malformed or a uid repeats (message gives file, line and field).
    """
    if split == "val":
        return fit_and_val(task, data_dir, file)[1]
    examples = plan_split(task, split, data_dir, file).load()
    _check_unique(examples)
    return examples


def fit_and_val(
    task: str, data_dir: Path | str | None = None, file: Path | str | None = None
) -> tuple[list[MCExample], list[MCExample]]:
    """The train split (or ``file``) cut into the rows to fit on and the ``val`` slice, both in file order."""
    examples = load_task(task, "train", data_dir, file)
    held = val_uids(ex.uid for ex in examples)
    return [ex for ex in examples if ex.uid not in held], [ex for ex in examples if ex.uid in held]


def split_files(
    task: str, split: str, data_dir: Path | str | None = None, file: Path | str | None = None
) -> list[Path]:
    """The files :func:`load_task` reads for these arguments (labels files and ``train_m`` included)."""
    return list(plan_split(task, "train" if split == "val" else split, data_dir, file).files)


def plan_split(task: str, split: str, data_dir: Path | str | None, file: Path | str | None) -> SplitPlan:
    """Resolve a (task, split) to a :class:`SplitPlan`, checking that every file exists."""
    if task == "synthetic":
        if file is not None:
            raise ValueError("the synthetic task is generated in code; it takes no file")
        from .synthetic import SyntheticConfig, check_split, make_split

        check_split(split)
        return SplitPlan((), lambda: make_split(split, SyntheticConfig()))
    if file is not None:
        return _file_plan(task, Path(file))
    if task == "jsonl":
        raise SplitUnavailableError("task 'jsonl' reads your own data: pass its file (train: --train-file, and --val-file or "
                                     "a val slice carved from it; evaluate and predict: --data-file)")
    root = require_data_dir(data_dir)
    if task in ARC_DIRS:
        name = ARC_DIRS[task]
        part = {"train": "Train", "dev": "Dev", "test": "Test"}[_check_split(task, split, ("train", "dev", "test"))]
        return _single(root / "arc" / name / f"{name}-{part}.jsonl", formats.read_arc_file, task, split, root)
    if task == "openbookqa":
        _check_split(task, split, ("train", "dev", "test"))
        return _single(root / "openbookqa" / "Main" / f"{split}.jsonl", formats.read_arc_file, task, split, root)
    if task.startswith("winogrande_") and task[len("winogrande_") :] in WINOGRANDE_SIZES:
        return _winogrande_plan(task, task[len("winogrande_") :], split, root)
    if task == "boolq":
        return _boolq_plan(split, root)
    if task == "boolq_val_even":
        return _boolq_val_even_plan(split, root)
    if task == "mmlu" or task.startswith(("mmlu_", "mmlu:")):
        return _mmlu_plan(task, split, root)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)} (and MMLU subject/group names)")


def reader_for(task: str) -> Reader:
    """The file format of a task (used when ``file`` overrides the split's file)."""
    if task in ARC_DIRS or task == "openbookqa":
        return formats.read_arc_file
    if task.startswith("winogrande_"):
        return formats.read_winogrande_file
    if task in ("boolq", "boolq_val_even"):
        return formats.read_boolq_file
    if task == "mmlu" or task.startswith(("mmlu_", "mmlu:")):
        return formats.read_mmlu_file
    if task == "jsonl":
        return formats.read_generic_file
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------------ helpers
def _check_split(task: str, split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise ValueError(f"task {task!r} has splits {list(allowed)}, not {split!r}")
    return split


def _missing(path: Path, task: str, split: str, root: Path) -> MissingSplitError:
    return MissingSplitError(
        f"{task} {split!r} split: {path} does not exist (data dir {root}). Held-out splits are not in the "
        f"shared data folder; point data_dir at a folder that has them, or pass the file explicitly."
    )


def _single(path: Path, reader: Reader, task: str, split: str, root: Path) -> SplitPlan:
    if not path.is_file():
        raise _missing(path, task, split, root)
    extra = formats.winogrande_labels_path(path) if reader is formats.read_winogrande_file else None
    files = (path, extra) if extra is not None and extra.is_file() else (path,)
    return SplitPlan(files, lambda: reader(path))


def _file_plan(task: str, path: Path) -> SplitPlan:
    reader = reader_for(task)
    if reader is formats.read_mmlu_file and path.is_dir():
        csvs = tuple(sorted(path.glob("*.csv")))
        if not csvs:
            raise MissingSplitError(f"{path} holds no .csv files")
        return SplitPlan(csvs, lambda: [ex for p in csvs for ex in formats.read_mmlu_file(p)])
    if not path.is_file():
        raise MissingSplitError(f"{task}: file {path} does not exist")
    return _single(path, reader, task, "file", path.parent)


def _winogrande_plan(task: str, size: str, split: str, root: Path) -> SplitPlan:
    _check_split(task, split, ("train", "dev", "test"))
    folder = root / "winogrande"
    if split == "test":
        return _single(folder / "dev.jsonl", formats.read_winogrande_file, task, split, root)
    if split == "train" and size != "l":
        return _single(folder / f"train_{size}.jsonl", formats.read_winogrande_file, task, split, root)
    plan_l = _single(folder / "train_l.jsonl", formats.read_winogrande_file, task, split, root)
    plan_m = _single(folder / "train_m.jsonl", formats.read_winogrande_file, task, split, root)

    def load() -> list[MCExample]:
        rows_l = plan_l.load()
        dev = winogrande_dev_qids((ex.uid for ex in rows_l), (ex.uid for ex in plan_m.load()))
        return [ex for ex in rows_l if (ex.uid in dev) == (split == "dev")]

    return SplitPlan(plan_l.files + plan_m.files, load)


def _boolq_plan(split: str, root: Path) -> SplitPlan:
    if split == "train":
        raise SplitUnavailableError(
            "BoolQ train is not in the data folder (see SOURCES.md, Gaps): pass the file explicitly "
            "(--train-file path/to/train.jsonl; Google's or SuperGLUE's BoolQ train.jsonl both work)"
        )
    _check_split("boolq", split, ("train", "dev", "test"))
    half = root / "boolq" / ("val_even.jsonl" if split == "dev" else "val_odd.jsonl")
    if half.is_file():
        return _single(half, formats.read_boolq_file, "boolq", split, root)
    full = root / "boolq" / "val.jsonl"
    if not full.is_file():
        raise _missing(half, "boolq", split, root)
    return SplitPlan((full,), lambda: _read_boolq_half(full, boolq_parity(split)))


def _boolq_val_even_plan(split: str, root: Path) -> SplitPlan:
    """Train on a seeded two thirds of ``val_even``, score the rest as dev; test is the odd half."""
    _check_split("boolq_val_even", split, ("train", "dev", "test"))
    if split == "test":
        return _boolq_plan("test", root)
    even = _boolq_plan("dev", root)

    def load() -> list[MCExample]:
        rows = even.load()
        train = boolq_val_even_train_uids(ex.uid for ex in rows)
        return [ex for ex in rows if (ex.uid in train) == (split == "train")]

    return SplitPlan(even.files, load)


def _read_boolq_half(path: Path, parity: int) -> list[MCExample]:
    """Rows of the SuperGLUE BoolQ validation file whose ``idx % 2 == parity``, in file order."""
    out = []
    for source, row in iter_jsonl(path):
        if get_field(row, "idx", int, source) % 2 == parity:
            out.append(formats.boolq_example(row, source, ""))
    return out


def _mmlu_plan(task: str, split: str, root: Path) -> SplitPlan:
    if split == "train":
        raise SplitUnavailableError(
            "MMLU has no train split: train on another task (METHOD.md: OpenBookQA) and evaluate MMLU "
            "with split 'dev' (mmlu/val), 'test' (mmlu/test) or 'fewshot' (mmlu/dev)"
        )
    folder = {"dev": "val", "test": "test", "fewshot": "dev"}[_check_split(task, split, ("dev", "test", "fewshot"))]
    paths = tuple(root / "mmlu" / folder / f"{s}_{folder}.csv" for s in resolve_mmlu_subjects(task))
    for path in paths:
        if not path.is_file():
            raise _missing(path, task, split, root)
    return SplitPlan(paths, lambda: [ex for p in paths for ex in formats.read_mmlu_file(p)])


def read_questions(path: Path | str) -> list[tuple[MCExample, bool]]:
    """Read a generic-format ``.jsonl`` file whose rows may lack ``answer`` (questions to answer):
    (example, whether the row gave its answer) per row, in file order; uids must be unique."""
    path = Path(path)
    rows = [(formats.generic_example(row, source, f"{path.stem}:{source.rsplit(':', 1)[1]}", labelled=False),
             row.get("answer") is not None) for source, row in iter_jsonl(path)]
    _check_unique([example for example, _ in rows])
    return rows


def _check_unique(examples: list[MCExample]) -> None:
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.uid in seen:
            raise DataFormatError(ex.source, f"duplicate id {ex.uid!r} (first at {seen[ex.uid]})", "id")
        seen[ex.uid] = ex.source
