"""Choice log-likelihood scoring of causal LMs: collation, exactness against unpadded forwards, protocols."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_causal, wordlevel_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from bayeslora.data import CausalChoiceCollator, Kind, MCExample
from bayeslora.data.prompts import loglik_pair_segments, render
from bayeslora.scoring import make_scorer

EXAMPLES = [
    MCExample(uid="a", question="what is red", choices=["a red apple", "sky", "green grass"], answer=0),
    MCExample(uid="b", question="which one is the longest word here", choices=["cat", "elephant"], answer=1),
    MCExample(uid="c", question="The dog chased the _ up the tree", choices=["cat", "rock"], answer=0,
              kind=Kind.WINOGRANDE),
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    texts = [render(ctx) + cont for ex in EXAMPLES for ctx, cont in loglik_pair_segments(ex)]
    folder = save_tiny_causal(tmp_path_factory.mktemp("lm"), texts)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_pairs_follow_the_harness_templates():
    (ctx, cont), _, _ = loglik_pair_segments(EXAMPLES[0])
    assert render(ctx) == "Question: what is red\nAnswer:" and cont == " a red apple"
    (ctx_w, cont_w), (ctx_w2, cont_w2) = loglik_pair_segments(EXAMPLES[2])
    assert render(ctx_w) == "The dog chased the cat" and cont_w == cont_w2 == " up the tree"


def test_collator_left_pads_and_marks_each_continuation(lm):
    _, tok = lm
    batch = CausalChoiceCollator(tok)(EXAMPLES)
    assert batch["input_ids"].shape[0] == 7 and batch["n_choices"].tolist() == [3, 2, 2]
    lengths = batch["continuation_mask"].sum(-1).tolist()
    assert lengths[:3] == [3, 1, 2] and lengths[5:] == [3, 3]  # tokens of " a red apple", " sky", ...
    assert (batch["attention_mask"][:, -1] == 1).all()  # every row ends at the last column


@pytest.mark.parametrize("protocol", ["loglik", "loglik-norm"])
def test_scores_equal_unpadded_single_row_forwards(lm, protocol):
    model, tok = lm
    scorer = make_scorer("causal", model, protocol)
    batch = scorer.make_collator(tok)(EXAMPLES)
    with torch.no_grad():
        logits, mask = scorer.choice_logits(model, batch)
    expected = []
    for ex in EXAMPLES:
        for ctx, cont in loglik_pair_segments(ex):
            ctx_ids = tok(render(ctx))["input_ids"]
            ids = tok(render(ctx) + cont)["input_ids"]
            k = len(ids) - len(ctx_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            score = sum(logp[len(ids) - k - 1 + j, ids[len(ids) - k + j]] for j in range(k))
            expected.append(score / k if protocol == "loglik-norm" else score)
    torch.testing.assert_close(logits[0][mask], torch.stack(expected), rtol=1e-4, atol=1e-4)
    assert logits.shape == (1, 3, 3) and torch.isinf(logits[0, 1, 2])


def test_batched_draws_repeat_rows_sample_major(lm):
    model, tok = lm
    scorer = make_scorer("causal", model, "loglik")
    batch = scorer.make_collator(tok)(EXAMPLES)
    with torch.no_grad():
        one, _ = scorer.choice_logits(model, batch, 1)
        three, _ = scorer.choice_logits(model, batch, 3)
    assert three.shape == (3, 3, 3)
    for s in range(3):
        torch.testing.assert_close(three[s], one[0], rtol=1e-5, atol=1e-5)


def test_protocols_belong_to_a_model_kind(lm):
    model, _ = lm
    assert make_scorer("causal", model).protocol == "loglik"
    assert make_scorer("causal", model, "labels").protocol == "labels"
    with pytest.raises(ValueError, match="does not apply to causal"):
        make_scorer("causal", model, "pairs")


def test_zero_shot_evaluation_of_a_base_model_needs_no_run(tmp_path, monkeypatch, capsys):
    import json

    from test_pipeline import write_task
    from tiny_models import save_tiny_encoder

    from bayeslora import cli
    from bayeslora.data import causal_prompt, load_task

    data = write_task(tmp_path / "rows.jsonl", n=12, kind="causal")
    rows = load_task("jsonl", "train", file=data)
    texts = [render(c) + t for ex in rows for c, t in loglik_pair_segments(ex)] + [causal_prompt(ex) for ex in rows]
    model = save_tiny_causal(tmp_path / "lm", texts)
    out = tmp_path / "zs" / "metrics.json"
    args = ["evaluate", "--model", model, "--task", "jsonl", "--split", "train", "--data-file", str(data)]
    assert cli.main(args + ["--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert (record["method"], record["scoring"], record["n"], record["run"]) == ("zero-shot", "loglik", 12, None)
    assert out.with_name("predictions.jsonl").exists() and 0 <= record["acc"] <= 1
    monkeypatch.chdir(tmp_path)
    assert cli.main(args + ["--scoring", "labels"]) == 0
    assert cli.main(args) == 0  # the default protocol (loglik) beside it, not over it
    for scoring in ("labels", "loglik"):
        default = tmp_path / "zero-shot" / "lm" / scoring / "metrics-jsonl-train-zero-shot-mean-S1.json"
        assert json.loads(default.read_text())["scoring"] == scoring
    encoder = save_tiny_encoder(tmp_path / "enc")
    assert cli.main(["evaluate", "--model", encoder, "--task", "jsonl", "--split", "train", "--data-file",
                     str(data)]) == 2
    assert cli.main(["evaluate", "--task", "jsonl", "--split", "train"]) == 2  # neither --run nor --model
    for flags in (["--samples", "8"], ["--mode", "sample"], ["--seed", "3"], ["--sequential"],
                  ["--calibration", "temperature"]):  # zero-shot refuses, by name, what it would otherwise ignore
        capsys.readouterr()
        assert cli.main(args + flags) == 2
        error = capsys.readouterr().err
        assert "zero-shot" in error and flags[0] in error
