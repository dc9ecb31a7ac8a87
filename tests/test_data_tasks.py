"""Split definitions, file resolution and errors of ``load_task``; plus the real data folder if present."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from bayeslora.data import (
    DATA_DIR_ENV,
    DataFormatError,
    MissingSplitError,
    SplitUnavailableError,
    default_data_dir,
    file_records,
    load_task,
    resolve_mmlu_subjects,
    sha256_of,
    split_files,
)
from bayeslora.data.mmlu_subjects import CATEGORY, SUBJECTS, subjects_in_category
from bayeslora.data.splits import WINOGRANDE_DEV_SIZE


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def wg(qid: str, answer: str) -> dict:
    return {"qID": qid, "sentence": f"{qid} saw _ there.", "option1": "A", "option2": "B", "answer": answer}


@pytest.fixture
def winogrande_dir(tmp_path: Path) -> Path:
    """Nested xs < s < m < l files, with l large enough for the 1,267-row dev sample."""
    rows = [wg(f"q{i:05d}", "12"[i % 2]) for i in range(1400)]
    random.Random(1).shuffle(rows)  # file order != qID order, so the sample must sort
    folder = tmp_path / "winogrande"
    for size, n in (("xs", 20), ("s", 50), ("m", 100), ("l", 1400)):
        write_jsonl(folder / f"train_{size}.jsonl", rows[:n])
    (folder / "train_l-labels.lst").write_text("".join(r["answer"] + "\n" for r in rows))
    return tmp_path


def test_winogrande_dev_is_the_seeded_sample_of_l_minus_m(winogrande_dir: Path) -> None:
    rows_l = [json.loads(line) for line in (winogrande_dir / "winogrande/train_l.jsonl").read_text().splitlines()]
    m_ids = {json.loads(line)["qID"] for line in (winogrande_dir / "winogrande/train_m.jsonl").read_text().splitlines()}
    expected = set(random.Random(0).sample(sorted({r["qID"] for r in rows_l} - m_ids), 1267))
    dev = load_task("winogrande_s", "dev", winogrande_dir)
    assert len(dev) == WINOGRANDE_DEV_SIZE == 1267
    assert {e.uid for e in dev} == expected
    assert [e.uid for e in dev] == [r["qID"] for r in rows_l if r["qID"] in expected]  # file order
    assert [e.uid for e in load_task("winogrande_xs", "dev", winogrande_dir)] == [e.uid for e in dev]
    train_l = load_task("winogrande_l", "train", winogrande_dir)
    assert len(train_l) == 1400 - 1267 and not {e.uid for e in train_l} & expected
    for size, n in (("xs", 20), ("s", 50), ("m", 100)):
        train = load_task(f"winogrande_{size}", "train", winogrande_dir)
        assert len(train) == n and not {e.uid for e in train} & expected


def test_winogrande_files_and_missing_test(winogrande_dir: Path) -> None:
    folder = winogrande_dir / "winogrande"
    assert split_files("winogrande_l", "dev", winogrande_dir) == [
        folder / "train_l.jsonl", folder / "train_l-labels.lst", folder / "train_m.jsonl"
    ]
    assert split_files("winogrande_m", "train", winogrande_dir) == [folder / "train_m.jsonl"]
    with pytest.raises(MissingSplitError) as err:
        load_task("winogrande_m", "test", winogrande_dir)
    assert isinstance(err.value, FileNotFoundError)
    assert str(folder / "dev.jsonl") in str(err.value) and f"data dir {winogrande_dir}" in str(err.value)
    write_jsonl(folder / "dev.jsonl", [wg("t1", "2")])
    assert [(e.uid, e.answer) for e in load_task("winogrande_m", "test", winogrande_dir)] == [("t1", 1)]


def test_winogrande_dev_needs_enough_candidates(tmp_path: Path) -> None:
    for size in ("m", "l"):
        write_jsonl(tmp_path / "winogrande" / f"train_{size}.jsonl", [wg("a", "1"), wg("b", "2")])
    with pytest.raises(ValueError, match="needs 1267"):
        load_task("winogrande_m", "dev", tmp_path)


def arc(uid: str) -> dict:
    return {"id": uid, "question": {"stem": "s", "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "B"}


def test_arc_and_openbookqa_release_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "arc/ARC-Easy/ARC-Easy-Train.jsonl", [arc("e1"), arc("e2")])
    write_jsonl(tmp_path / "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl", [arc("c1")])
    write_jsonl(tmp_path / "openbookqa/Main/test.jsonl", [arc("o1")])
    assert [e.uid for e in load_task("arc_easy", "train", tmp_path)] == ["e1", "e2"]
    assert [e.uid for e in load_task("arc_challenge", "dev", tmp_path)] == ["c1"]
    assert [e.uid for e in load_task("openbookqa", "test", tmp_path)] == ["o1"]
    with pytest.raises(MissingSplitError, match="ARC-Easy-Test.jsonl does not exist"):
        load_task("arc_easy", "test", tmp_path)
    with pytest.raises(ValueError, match="not 'validation'"):
        load_task("arc_easy", "validation", tmp_path)


def test_duplicate_ids_fail(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "openbookqa/Main/train.jsonl", [arc("same"), arc("other"), arc("same")])
    with pytest.raises(DataFormatError, match=r"train\.jsonl:3: field 'id': duplicate id 'same' \(first at .*:1\)"):
        load_task("openbookqa", "train", tmp_path)


def boolq(idx: int, label: str) -> dict:
    return {"question": f"q{idx}", "passage": "T -- p", "idx": idx, "label": label}


def test_boolq_splits_and_train_file(tmp_path: Path) -> None:
    with pytest.raises(SplitUnavailableError, match="--train-file"):
        load_task("boolq", "train", tmp_path)
    train = write_jsonl(tmp_path / "elsewhere/train.jsonl", [{"question": "g", "title": "T", "passage": "p", "answer": True}])
    assert [e.answer for e in load_task("boolq", "train", tmp_path, file=train)] == [1]
    with pytest.raises(MissingSplitError, match="val_even.jsonl"):
        load_task("boolq", "dev", tmp_path)
    # only the full validation file: the halves come from it by idx parity
    write_jsonl(tmp_path / "boolq/val.jsonl", [boolq(i, "true" if i % 3 else "false") for i in range(7)])
    assert [e.uid for e in load_task("boolq", "dev", tmp_path)] == ["boolq-0", "boolq-2", "boolq-4", "boolq-6"]
    assert [e.uid for e in load_task("boolq", "test", tmp_path)] == ["boolq-1", "boolq-3", "boolq-5"]
    assert split_files("boolq", "test", tmp_path) == [tmp_path / "boolq/val.jsonl"]
    # the named half files win when present
    write_jsonl(tmp_path / "boolq/val_odd.jsonl", [boolq(99, "false")])
    assert [e.uid for e in load_task("boolq", "test", tmp_path)] == ["boolq-99"]


def test_boolq_val_even_trains_on_a_seeded_two_thirds_and_scores_the_rest(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "boolq/val_even.jsonl", [boolq(2 * i, "true" if i % 3 else "false") for i in range(30)])
    write_jsonl(tmp_path / "boolq/val_odd.jsonl", [boolq(1, "false")])
    train, dev = load_task("boolq_val_even", "train", tmp_path), load_task("boolq_val_even", "dev", tmp_path)
    assert len(train) == 20 and len(dev) == 10 and not {e.uid for e in train} & {e.uid for e in dev}
    assert sorted(e.uid for e in train + dev) == sorted(e.uid for e in load_task("boolq", "dev", tmp_path))
    val = load_task("boolq_val_even", "val", tmp_path)  # the val slice is carved from the training two thirds
    assert len(val) == 2 and {e.uid for e in val} <= {e.uid for e in train}
    assert [e.uid for e in load_task("boolq_val_even", "test", tmp_path)] == ["boolq-1"]
    # the order of the file does not move the split
    write_jsonl(tmp_path / "boolq/val_even.jsonl", [boolq(2 * i, "true" if i % 3 else "false") for i in reversed(range(30))])
    assert {e.uid for e in load_task("boolq_val_even", "train", tmp_path)} == {e.uid for e in train}


def write_mmlu(root: Path, folder: str, subject: str, n: int) -> None:
    path = root / "mmlu" / folder / f"{subject}_{folder}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'"{subject} q{i}, with comma",a,b,c,d,{"ABCD"[i % 4]}\n' for i in range(n)))


def test_mmlu_splits_subjects_and_errors(tmp_path: Path) -> None:
    for subject, n in (("college_chemistry", 3), ("college_physics", 2)):
        write_mmlu(tmp_path, "val", subject, n)
        write_mmlu(tmp_path, "dev", subject, 5)
    assert len(load_task("mmlu_chem", "dev", tmp_path)) == 3
    assert len(load_task("mmlu:college_chemistry,college_physics", "dev", tmp_path)) == 5
    assert [e.uid for e in load_task("mmlu_phy", "fewshot", tmp_path)][:2] == ["college_physics/dev/0", "college_physics/dev/1"]
    with pytest.raises(SplitUnavailableError, match="MMLU has no train split"):
        load_task("mmlu_chem", "train", tmp_path)
    with pytest.raises(MissingSplitError, match="college_chemistry_test.csv"):
        load_task("mmlu_chem", "test", tmp_path)
    with pytest.raises(MissingSplitError, match="abstract_algebra_val.csv"):
        load_task("mmlu_stem", "dev", tmp_path)
    assert len(load_task("mmlu", "test", tmp_path, file=tmp_path / "mmlu/val")) == 5  # a folder of CSVs


def test_mmlu_subject_groups() -> None:
    assert len(SUBJECTS) == 57
    groups = [set(subjects_in_category(c)) for c in CATEGORY]
    assert set().union(*groups) == set(SUBJECTS) and sum(len(g) for g in groups) == 57  # a partition
    assert resolve_mmlu_subjects("mmlu_chem") == ("college_chemistry",)
    assert resolve_mmlu_subjects("mmlu_phy") == ("college_physics",)
    assert resolve_mmlu_subjects("mmlu_sub_chemistry") == ("college_chemistry", "high_school_chemistry")
    assert "college_physics" in resolve_mmlu_subjects("mmlu_stem")
    assert "professional_law" in resolve_mmlu_subjects("mmlu_humanities")
    assert resolve_mmlu_subjects("mmlu_all") == resolve_mmlu_subjects("mmlu") == SUBJECTS
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        resolve_mmlu_subjects("mmlu:college_alchemy")
    with pytest.raises(ValueError, match="unknown MMLU task"):
        resolve_mmlu_subjects("mmlu_everything")


def test_generic_jsonl_synthetic_and_unknown_tasks(tmp_path: Path) -> None:
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "A"}])
    assert [e.answer for e in load_task("jsonl", "train", file=mine)] == [0]
    assert split_files("jsonl", "dev", file=mine) == [mine]
    with pytest.raises(SplitUnavailableError, match="pass its file"):
        load_task("jsonl", "train", tmp_path)
    with pytest.raises(ValueError, match="takes no file"):
        load_task("synthetic", "train", file=mine)
    assert split_files("synthetic", "train") == [] and len(load_task("synthetic", "ood")) == 200
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        load_task("squad", "train", tmp_path)
    with pytest.raises(MissingSplitError, match="nope.jsonl does not exist"):
        load_task("arc_easy", "train", file=tmp_path / "nope.jsonl")


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "custom"))
    assert default_data_dir() == tmp_path / "custom"
    with pytest.raises(FileNotFoundError, match=f"{DATA_DIR_ENV}"):
        load_task("arc_easy", "train")
    monkeypatch.delenv(DATA_DIR_ENV)
    repo = Path(__file__).resolve().parents[1]
    assert default_data_dir() == repo.parent / "shared" / "data"


def test_sha256_and_records(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    payload = bytes(range(256)) * 5000  # > 1 MiB chunk, exercises chunked reading
    path.write_bytes(payload)
    assert sha256_of(path) == hashlib.sha256(payload).hexdigest()
    assert file_records([path]) == [{"path": str(path), "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}]


# ------------------------------------------------------------------------------ the real data folder
REAL = default_data_dir()
needs_real_data = pytest.mark.skipif(
    not (REAL / "SOURCES.md").is_file(),
    reason=f"shared data folder not found at {REAL} (set {DATA_DIR_ENV} to the folder SOURCES.md describes)",
)

EXPECTED_ROWS = [  # shared/data/SOURCES.md
    ("arc_challenge", "train", 1119), ("arc_challenge", "dev", 299),
    ("arc_easy", "train", 2251), ("arc_easy", "dev", 570),
    ("openbookqa", "train", 4957), ("openbookqa", "dev", 500),
    ("winogrande_xs", "train", 160), ("winogrande_s", "train", 640), ("winogrande_m", "train", 2558),
    ("winogrande_l", "train", 10234 - 1267), ("winogrande_m", "dev", 1267),
    ("boolq", "dev", 1635), ("mmlu", "dev", 1531), ("mmlu", "fewshot", 285),
    ("mmlu_chem", "dev", 8), ("mmlu_phy", "dev", 11),
]  # fmt: skip


@needs_real_data
@pytest.mark.parametrize(("task", "split", "rows"), EXPECTED_ROWS)
def test_real_data_row_counts(task: str, split: str, rows: int) -> None:
    examples = load_task(task, split, REAL)
    assert len(examples) == rows
    assert all(0 <= e.answer < e.n_choices for e in examples)


@needs_real_data
def test_real_data_every_available_split_loads_and_held_out_ones_fail_clearly() -> None:
    from bayeslora.data import TASKS

    loaded, held_out = set(), set()
    for task in TASKS:
        for split in ("train", "dev", "test", "fewshot", "ood"):
            try:
                files = split_files(task, split, REAL)
            except MissingSplitError as err:  # held out: the message names the file and the data dir
                assert f"data dir {REAL}" in str(err) and "does not exist" in str(err)
                held_out.add((task, split))
                continue
            except ValueError:  # split not defined for this task, or needs an explicit file
                continue
            assert all(f.is_file() for f in files)
            assert load_task(task, split, REAL)
            loaded.add((task, split))
    wino = {f"winogrande_{s}" for s in ("xs", "s", "m", "l")}
    assert loaded == (
        {(t, s) for t in ("arc_easy", "arc_challenge", "openbookqa", *wino) for s in ("train", "dev")}
        | {("boolq", "dev"), ("boolq_val_even", "train"), ("boolq_val_even", "dev"), ("mmlu", "dev"), ("mmlu", "fewshot")}
        | {("synthetic", s) for s in ("train", "dev", "test", "ood")}
    )
    assert held_out == {(t, "test") for t in ("arc_easy", "arc_challenge", "openbookqa", "boolq", "boolq_val_even",
                                              "mmlu", *wino)}


@needs_real_data
def test_real_data_hashes_and_winogrande_dev_disjointness() -> None:
    arc_train = REAL / "arc/ARC-Challenge/ARC-Challenge-Train.jsonl"
    assert sha256_of(arc_train) == "e02837c53ee86f6d73c259f91c77725c5062ef4531130b7f473a9d9b01118a77"
    dev = {e.uid for e in load_task("winogrande_l", "dev", REAL)}
    for size in ("xs", "s", "m", "l"):
        assert not dev & {e.uid for e in load_task(f"winogrande_{size}", "train", REAL)}
    arc_dev = load_task("arc_challenge", "dev", REAL)
    assert {e.n_choices for e in arc_dev} == {3, 4, 5}


# ------------------------------------------------------------------------------ the val slice
def test_val_slice_size_rule_and_order_independence(tmp_path: Path) -> None:
    from bayeslora.data import fit_and_val
    from bayeslora.data.splits import val_size, val_uids

    assert [val_size(n) for n in (0, 1, 2, 9, 100, 2251, 5000, 10000)] == [0, 0, 1, 1, 10, 225, 500, 500]
    uids = [f"u{i}" for i in range(50)]
    assert val_uids(uids) == val_uids(reversed(uids)) and len(val_uids(uids)) == 5
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2, "id": f"u{i}"} for i in range(50)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit, val = fit_and_val("jsonl", file=data)
    assert len(fit) == 45 and len(val) == 5 and not {e.uid for e in fit} & {e.uid for e in val}
    assert [e.uid for e in load_task("jsonl", "val", file=data)] == [e.uid for e in val]


@needs_real_data
def test_real_val_slices_are_fixed_and_disjoint_from_dev() -> None:
    from bayeslora.data import fit_and_val

    for task, n_val in (("arc_easy", 225), ("arc_challenge", 112), ("openbookqa", 496), ("winogrande_s", 64)):
        fit, val = fit_and_val(task, REAL)
        assert len(val) == n_val and len(fit) + n_val == len(load_task(task, "train", REAL))
        assert not {e.uid for e in val} & {e.uid for e in load_task(task, "dev", REAL)}
    first = [e.uid for e in load_task("arc_easy", "val", REAL)][:3]
    assert first == [e.uid for e in fit_and_val("arc_easy", REAL)[1]][:3]
