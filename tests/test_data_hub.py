"""Hugging Face Hub field mappings, on fixture rows shaped like the Hub's (no network: a fake
``datasets`` module stands in for the download, so only the mapping and split logic are tested)."""

from __future__ import annotations

import sys
import types

import pytest

from bayeslora.data import BOOLQ_CHOICES, DataFormatError, Kind, SplitUnavailableError
from bayeslora.data import hub

ARC_ROW = {"id": "Mercury_1", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "2"}
OBQA_ROW = {"id": "7-980", "question_stem": "The sun is", "choices": {"text": list("wxyz"), "label": list("ABCD")}, "answerKey": "D"}
WG_ROW = {"sentence": "Ann met Bo and _ smiled.", "option1": "Ann", "option2": "Bo", "answer": "2"}
MMLU_ROW = {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"], "answer": 3}


def boolq_row(idx: int) -> dict:
    return {"question": f"q{idx}", "passage": "T -- p", "idx": idx, "label": idx % 3 == 0}


def test_field_mappings() -> None:
    arc = hub.arc_from_hub(ARC_ROW, "hf:1")
    assert (arc.uid, arc.question, arc.choices, arc.answer, arc.source) == ("Mercury_1", "Q?", ("a", "b", "c"), 1, "hf:1")
    obqa = hub.openbookqa_from_hub(OBQA_ROW, "hf:2")
    assert (obqa.question, obqa.answer, obqa.n_choices) == ("The sun is", 3, 4)
    wg = hub.winogrande_from_hub(WG_ROW, "hf:3", "wg-0")
    assert (wg.uid, wg.choices, wg.answer, wg.kind) == ("wg-0", ("Ann", "Bo"), 1, Kind.WINOGRANDE)
    bq = hub.boolq_from_hub({**boolq_row(4), "label": 1}, "hf:4")
    assert (bq.uid, bq.answer, bq.choices, bq.passage) == ("boolq-4", 1, BOOLQ_CHOICES, "T -- p")
    mm = hub.mmlu_from_hub(MMLU_ROW, "hf:5", "elementary_mathematics/val/0")
    assert (mm.choices, mm.answer) == (("1", "2", "3", "4"), 3)


def test_bad_hub_rows_fail_like_file_rows() -> None:
    with pytest.raises(DataFormatError, match="hf:1: field 'answerKey': 'E' is not one of the choice labels"):
        hub.arc_from_hub({**ARC_ROW, "answerKey": "E"}, "hf:1")
    with pytest.raises(DataFormatError, match="hf:2: field 'answer'"):
        hub.mmlu_from_hub({**MMLU_ROW, "answer": 4}, "hf:2", "x")
    with pytest.raises(DataFormatError, match="hf:3: field 'label': -1"):
        hub.boolq_from_hub({**boolq_row(1), "label": -1}, "hf:3")  # SuperGLUE's unlabelled test rows


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    tables = {
        ("allenai/ai2_arc", "ARC-Easy", "validation"): [ARC_ROW],
        ("aps/super_glue", "boolq", "validation"): [boolq_row(i) for i in range(5)],
        ("allenai/winogrande", "winogrande_xl", "validation"): [WG_ROW, WG_ROW],
        ("cais/mmlu", "college_physics", "validation"): [MMLU_ROW] * 2,
    }

    def load_dataset(name, config, split, cache_dir=None):  # noqa: ANN001, ANN202
        calls.append((name, config, split))
        return tables[(name, config, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_split_mapping(fake_datasets: list[tuple]) -> None:
    assert [e.uid for e in hub.load_hub_task("arc_easy", "dev")] == ["Mercury_1"]
    assert [e.uid for e in hub.load_hub_task("boolq", "dev")] == ["boolq-0", "boolq-2", "boolq-4"]
    assert [e.uid for e in hub.load_hub_task("boolq", "test")] == ["boolq-1", "boolq-3"]
    assert [e.uid for e in hub.load_hub_task("winogrande_s", "test")] == ["winogrande_s-test-0", "winogrande_s-test-1"]
    assert [e.uid for e in hub.load_hub_task("mmlu_phy", "dev")] == ["college_physics/val/0", "college_physics/val/1"]
    assert fake_datasets[-1] == ("cais/mmlu", "college_physics", "validation")
    with pytest.raises(SplitUnavailableError, match="qIDs"):
        hub.load_hub_task("winogrande_s", "dev")
    with pytest.raises(SplitUnavailableError, match="qIDs"):
        hub.load_hub_task("winogrande_l", "train")
    with pytest.raises(SplitUnavailableError):
        hub.load_hub_task("mmlu_phy", "train")
    with pytest.raises(ValueError, match="no Hugging Face Hub mapping"):
        hub.load_hub_task("synthetic", "train")
