"""``bayeslora predict``: answers with their probability, uncertainty split and abstention, for both model
kinds and any method or calibration, agreeing with what ``evaluate`` predicts."""

from __future__ import annotations

import json

import pytest
from test_pipeline import train_args, write_task
from tiny_models import save_tiny_causal, save_tiny_encoder

from bayeslora import answer_questions, cli
from bayeslora.data import causal_prompt, load_task


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    data = {kind: write_task(root / f"{kind}.jsonl", kind=kind) for kind in ("causal", "encoder")}
    prompts = [causal_prompt(e) for e in load_task("jsonl", "train", file=data["causal"])]
    ws = {"root": root, "data": data, "causal": save_tiny_causal(root / "causal", prompts),
          "encoder": save_tiny_encoder(root / "encoder")}
    out = {"data": data, "root": root}
    for kind, method in (("causal", "lora"), ("causal", "bayeslora"), ("encoder", "lora")):
        out[kind, method] = root / f"{kind}-{method}"
        assert cli.main(train_args(ws, kind, method, out[kind, method], "--max-steps", "4")) == 0
    return out


def unlabelled(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind,method", [("causal", "lora"), ("causal", "bayeslora"), ("encoder", "lora")])
def test_predict_agrees_with_evaluate_and_reports_the_uncertainty_split(runs, kind, method, capsys):
    run, data = runs[kind, method], runs["data"][kind]
    assert cli.main(["evaluate", "--run", str(run), "--task", "jsonl", "--data-file", str(data), "--split", "train",
                     "--samples", "3"]) == 0
    mode = "sample" if method == "bayeslora" else "mean"
    predictions = [json.loads(line) for line in
                   next((run / "eval").glob(f"predictions-*-{mode}-*.jsonl")).read_text().splitlines()]
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(run), "--data-file", str(data), "--samples", "3"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == len(predictions) == 32
    for got, want in zip(answers, predictions):
        assert got["id"] == want["uid"] and got["probs"] == want["probs"]
        assert got["answer_index"] == max(range(len(want["probs"])), key=want["probs"].__getitem__)
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-12)
        assert got["aleatoric"] + got["epistemic"] == pytest.approx(got["entropy"], abs=1e-9)
        assert 0 <= got["epistemic_share"] <= 1 and got["abstain"] is False
        assert got["correct"] == (got["answer_index"] == got["label"])
    if method == "bayeslora":
        assert all(a["epistemic"] > 0 for a in answers)
    else:
        assert all(a["epistemic"] == 0 for a in answers)


def test_unlabelled_questions_get_answers_and_abstention_follows_the_threshold(runs, tmp_path):
    file = unlabelled(tmp_path / "q.jsonl", [
        {"question": "the word is alpha", "choices": ["yes", "no"]},
        {"question": "the word is beta", "choices": ["yes", "no"], "id": "b"},
        {"question": "the word is alpha", "choices": ["yes", "no"], "answer": 0}])
    run = runs["causal", "bayeslora"]
    records = answer_questions(run, file, samples=3)
    assert [r["id"] for r in records] == ["q:1", "b", "q:3"]
    assert "label" not in records[0] and records[2]["label"] == 0
    assert all(r["answer"] in ("yes", "no") and 0.5 <= r["probability"] <= 1 for r in records)
    every = answer_questions(run, file, samples=3, abstain_above=0.0)
    assert all(r["abstain"] for r in every)  # any uncertainty exceeds 0
    cut = sorted(r["probability"] for r in records)[1]
    some = answer_questions(run, file, samples=3, uncertainty="one-minus-confidence", abstain_above=1 - cut)
    assert [r["abstain"] for r in some] == [r["probability"] < cut for r in records]
    out = tmp_path / "out" / "answers.jsonl"
    assert cli.main(["predict", "--run", str(run), "--data-file", str(file), "--output", str(out),
                     "--uncertainty", "mutual-information", "--abstain-above", "1e9"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3 and not any(r["abstain"] for r in written)
    assert all(r["uncertainty"] == "mutual-information" for r in written)


def test_predict_through_a_calibration_and_bad_input_names_the_problem(runs, tmp_path, capsys):
    run, data = runs["causal", "lora"], runs["data"]["causal"]
    assert cli.main(["calibrate", "--run", str(run), "--calibration", "temperature"]) == 0
    plain = answer_questions(run, data)
    hot = answer_questions(run, data, calibration="temperature")
    assert [a["answer_index"] for a in plain] == [a["answer_index"] for a in hot]
    assert [a["probability"] for a in plain] != [a["probability"] for a in hot]
    assert cli.main(["evaluate", "--run", str(run), "--task", "jsonl", "--data-file", str(data), "--split", "train",
                     "--calibration", "temperature"]) == 0
    evaluated = [json.loads(line) for line in
                 next((run / "eval").glob("predictions-*lora+temperature-*.jsonl")).read_text().splitlines()]
    assert [a["probs"] for a in hot] == [e["probs"] for e in evaluated]
    assert [a["answer_index"] for a in hot] == [e["predicted"] for e in evaluated]
    bad = unlabelled(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"]}, {"question": "q"}])
    assert cli.main(["predict", "--run", str(run), "--data-file", str(bad)]) == 2
    assert "bad.jsonl:2: field 'choices'" in capsys.readouterr().err
    twice = unlabelled(tmp_path / "twice.jsonl", [{"question": "q", "choices": ["a", "b"], "id": 1},
                                                  {"question": "r", "choices": ["a", "b"], "id": 1}])
    assert cli.main(["predict", "--run", str(run), "--data-file", str(twice)]) == 2
    assert "twice.jsonl:2: field 'id'" in capsys.readouterr().err
    assert cli.main(["predict", "--run", str(run), "--data-file", str(data), "--abstain-above", "-1"]) == 2
    assert "--abstain-above" in capsys.readouterr().err
