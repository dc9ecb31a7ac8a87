"""Release-format parsers and the example type: fixtures are written into tmp_path by each test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bayeslora.data import BOOLQ_CHOICES, DataFormatError, Kind, MCExample
from bayeslora.data import formats


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def arc_row(uid: str, labels: list[str], key: str, stem: str = "Q?") -> dict:
    choices = [{"text": f"option {lab}", "label": lab} for lab in labels]
    return {"id": uid, "question": {"stem": stem, "choices": choices}, "answerKey": key}


# --------------------------------------------------------------------------------------------- ARC
def test_arc_numeric_labels_and_3_and_5_choices(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "arc.jsonl",
        [
            arc_row("num", ["1", "2", "3", "4"], "3"),
            arc_row("three", ["A", "B", "C"], "C"),
            arc_row("five", ["A", "B", "C", "D", "E"], "E"),
        ],
    )
    examples = formats.read_arc_file(path)
    assert [(e.uid, e.n_choices, e.answer) for e in examples] == [("num", 4, 2), ("three", 3, 2), ("five", 5, 4)]
    assert examples[0].choices == ("option 1", "option 2", "option 3", "option 4")
    assert examples[0].source == f"{path}:1" and examples[2].source == f"{path}:3"
    assert all(e.kind is Kind.MULTIPLE_CHOICE and e.passage is None for e in examples)


def test_arc_answer_key_not_a_label_names_file_line_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [arc_row("ok", ["A", "B"], "A"), "", arc_row("bad", ["A", "B", "C", "D"], "F")])
    with pytest.raises(ValueError) as err:
        formats.read_arc_file(path)
    # the blank line 2 is skipped but still counted: the bad row is line 3
    assert str(err.value) == f"{path}:3: field 'answerKey': 'F' is not one of the choice labels ['A', 'B', 'C', 'D']"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"id": "a", "answerKey": "A"}, "question"),
        ({"id": "a", "question": {"choices": []}, "answerKey": "A"}, "question.stem"),
        ({"id": "a", "question": {"stem": "s", "choices": [{"label": "A"}]}, "answerKey": "A"}, "question.choices[0].text"),
        ({"id": 3, "question": {"stem": "s", "choices": []}, "answerKey": "A"}, "id"),
    ],
)
def test_arc_missing_or_mistyped_fields(tmp_path: Path, row: dict, field: str) -> None:
    path = write_jsonl(tmp_path / "arc.jsonl", [row])
    with pytest.raises(DataFormatError, match=rf"arc\.jsonl:1: field '{re.escape(field)}'"):
        formats.read_arc_file(path)


def test_arc_duplicate_labels_and_single_choice_fail(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="duplicate choice labels"):
        formats.read_arc_file(write_jsonl(tmp_path / "a.jsonl", [arc_row("d", ["A", "A"], "A")]))
    with pytest.raises(DataFormatError, match="needs 2..26 choices, got 1"):
        formats.read_arc_file(write_jsonl(tmp_path / "b.jsonl", [arc_row("one", ["A"], "A")]))


def test_invalid_json_and_non_object_rows(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        formats.read_arc_file(write_jsonl(tmp_path / "bad.jsonl", [arc_row("a", ["A", "B"], "A"), "{not json"]))
    with pytest.raises(DataFormatError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        formats.read_arc_file(write_jsonl(tmp_path / "list.jsonl", [[1, 2]]))


# -------------------------------------------------------------------------------------- WinoGrande
def wg_row(qid: str, answer: str = "1", sentence: str = "Ann thanked Bo because _ helped.") -> dict:
    return {"qID": qid, "sentence": sentence, "option1": "Ann", "option2": "Bo", "answer": answer}


def test_winogrande_parses_and_agrees_with_labels_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train_xs.jsonl", [wg_row("q1", "1"), wg_row("q2", "2")])
    (tmp_path / "train_xs-labels.lst").write_text("1\n2\n")
    examples = formats.read_winogrande_file(path)
    assert [(e.uid, e.answer, e.kind) for e in examples] == [("q1", 0, Kind.WINOGRANDE), ("q2", 1, Kind.WINOGRANDE)]
    assert examples[0].choices == ("Ann", "Bo") and "_" in examples[0].question


def test_winogrande_labels_file_that_disagrees_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train_s.jsonl", [wg_row("q1", "1"), wg_row("q2", "2"), wg_row("q3", "1")])
    (tmp_path / "train_s-labels.lst").write_text("1\n1\n1\n")
    with pytest.raises(DataFormatError) as err:
        formats.read_winogrande_file(path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'train_s-labels.lst'}:2: ")
    assert f"{path}:2" in message and "q2" in message


def test_winogrande_labels_file_with_wrong_length(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train_m.jsonl", [wg_row("q1"), wg_row("q2")])
    (tmp_path / "train_m-labels.lst").write_text("1\n")
    with pytest.raises(DataFormatError, match="has 1 labels but .* has 2 rows"):
        formats.read_winogrande_file(path)


@pytest.mark.parametrize(("row", "needle"), [(wg_row("u", ""), "field 'answer'"), (wg_row("n", "1", "No blank."), "field 'sentence'")])
def test_winogrande_unlabelled_or_blankless_rows_fail(tmp_path: Path, row: dict, needle: str) -> None:
    with pytest.raises(DataFormatError, match=needle):
        formats.read_winogrande_file(write_jsonl(tmp_path / "w.jsonl", [row]))


# -------------------------------------------------------------------------------------------- BoolQ
def test_boolq_string_and_boolean_labels_and_google_layout(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "val.jsonl",
        [
            {"question": "is it", "passage": "P -- text", "idx": 0, "label": "true"},
            {"question": "is it not", "passage": "P -- text", "idx": 1, "label": "false"},
            {"question": "json bool", "passage": "P -- text", "idx": 2, "label": True},
            {"question": "google", "title": "Topic", "passage": "body", "answer": False},
        ],
    )
    examples = formats.read_boolq_file(path)
    assert [e.answer for e in examples] == [1, 0, 1, 0]
    assert [e.uid for e in examples[:3]] == ["boolq-0", "boolq-1", "boolq-2"]
    assert examples[3].uid == "val:4" and examples[3].passage == "Topic -- body"
    assert all(e.choices == BOOLQ_CHOICES and e.kind is Kind.BOOLQ for e in examples)


def test_boolq_bad_label(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": "yes"}])
    with pytest.raises(DataFormatError, match=r"b\.jsonl:1: field 'label': 'yes' is not true/false"):
        formats.read_boolq_file(path)


# --------------------------------------------------------------------------------------------- MMLU
def test_mmlu_csv_quoted_commas_and_newlines(tmp_path: Path) -> None:
    path = tmp_path / "college_physics_val.csv"
    path.write_text(
        '"Which, of these, is right?",1,"2, or 3","multi\nline",4,B\n'
        "Plain question,a,b,c,d,D\n",
        encoding="utf-8",
    )
    examples = formats.read_mmlu_file(path)
    assert len(examples) == 2
    first, second = examples
    assert first.question == "Which, of these, is right?"
    assert first.choices == ("1", "2, or 3", "multi\nline", "4") and first.answer == 1
    assert first.uid == "college_physics/val/0" and second.uid == "college_physics/val/1"
    # the second record starts on line 3 because the first spans two lines
    assert first.source == f"{path}:1" and second.source == f"{path}:3" and second.answer == 3


@pytest.mark.parametrize(("line", "needle"), [("q,a,b,c,d,E\n", "field 'answer': 'E'"), ("q,a,b,c,A\n", "expected 6 columns")])
def test_mmlu_bad_rows(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "x_test.csv"
    path.write_text("q,a,b,c,d,A\n" + line)
    with pytest.raises(DataFormatError, match=rf"x_test\.csv:2: .*{needle}"):
        formats.read_mmlu_file(path)


# ------------------------------------------------------------------------------------------ generic
def test_generic_jsonl_int_and_letter_answers(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
            {"question": "Pick B", "choices": ["x", "y"], "answer": "B", "passage": "ctx", "id": "q7"},
        ],
    )
    first, second = formats.read_generic_file(path)
    assert (first.uid, first.answer, first.passage) == ("mine:1", 1, None)
    assert (second.uid, second.answer, second.passage) == ("q7", 1, "ctx")


@pytest.mark.parametrize(
    ("answer", "needle"),
    [(3, "index 3 is outside the 3 choices"), ("D", "'D' is not one of the choice letters"), (True, "expected int or str")],
)
def test_generic_gold_outside_choices_fails(tmp_path: Path, answer: object, needle: str) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "answer": answer}])
    with pytest.raises(DataFormatError, match=rf"g\.jsonl:1: field 'answer': .*{needle}"):
        formats.read_generic_file(path)


# ---------------------------------------------------------------------------------------- MCExample
def test_mcexample_validates_and_is_frozen() -> None:
    ex = MCExample("u", "q", ["a", "b"], 1, source="f:1")  # type: ignore[arg-type]
    assert ex.choices == ("a", "b") and ex.kind is Kind.MULTIPLE_CHOICE
    with pytest.raises(AttributeError):
        ex.answer = 0  # type: ignore[misc]
    with pytest.raises(DataFormatError, match="f:1: field 'answer': gold index 2"):
        MCExample("u", "q", ("a", "b"), 2, source="f:1")
    with pytest.raises(DataFormatError, match="BoolQ item needs a passage"):
        MCExample("u", "q", BOOLQ_CHOICES, 0, kind=Kind.BOOLQ)
    with pytest.raises(ValueError):
        MCExample("u", "q", ("a", "b"), 0, kind="nonsense")  # type: ignore[arg-type]
