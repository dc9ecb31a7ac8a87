"""Prompt templates, label strings, encoder pairs and the synthetic demo task (no tokenizer needed)."""

from __future__ import annotations

import math

import pytest

from bayeslora.data import BOOLQ_CHOICES, Kind, MCExample, SyntheticConfig, load_task
from bayeslora.data import prompts, synthetic

MC = MCExample("m", "Which is a fruit?", ("rock", "apple", "car"), 1)
WG = MCExample("w", "Ann thanked Bo because _ helped her.", ("Ann", "Bo"), 1, kind=Kind.WINOGRANDE)
BQ = MCExample("b", "is the sky blue", BOOLQ_CHOICES, 1, passage="Sky -- The sky is blue.", kind=Kind.BOOLQ)


def test_causal_prompts_are_the_method_templates() -> None:
    assert prompts.causal_prompt(MC) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Question: Which is a fruit?\nChoices:\nA) rock\nB) apple\nC) car\nAnswer:"
    )
    assert prompts.causal_prompt(BQ) == (
        "Read the passage below and answer the question with the words 'true' or 'false'.\n\n"
        "Passage: Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer (true or false):"
    )
    assert prompts.causal_prompt(WG) == (
        "Fill in the blank (_) in the sentence below with the correct option.\n\n"
        "Sentence: Ann thanked Bo because _ helped her.\nChoices:\nA) Ann\nB) Bo\nAnswer:"
    )


def test_question_mark_is_not_doubled_and_mc_passage_is_shown() -> None:
    asked = MCExample("b2", "is it?", BOOLQ_CHOICES, 0, passage="p", kind=Kind.BOOLQ)
    assert "Question: is it?\n" in prompts.causal_prompt(asked)
    with_passage = MCExample("m2", "Q?", ("a", "b"), 0, passage="Some context.")
    assert prompts.causal_prompt(with_passage).endswith("Passage: Some context.\nQuestion: Q?\nChoices:\nA) a\nB) b\nAnswer:")


def test_label_strings_have_a_leading_space_and_follow_position() -> None:
    assert prompts.label_strings(MC) == (" A", " B", " C")
    assert prompts.label_strings(WG) == (" A", " B")
    assert prompts.label_strings(BQ) == (" False", " True")  # BOOLQ_CHOICES = ("false", "true")
    five = MCExample("f", "q", tuple("vwxyz"), 4)
    assert prompts.label_strings(five)[-1] == " E" and prompts.causal_prompt(five).count(")") == 5
    assert prompts.answer_cue(BQ) == "Answer (true or false):" and prompts.answer_cue(MC) == "Answer:"
    for ex in (MC, WG, BQ):
        assert prompts.causal_prompt(ex).endswith(prompts.answer_cue(ex))


def test_only_passage_and_question_segments_are_shortenable() -> None:
    for ex in (MC, WG, BQ):
        segments = prompts.causal_prompt_segments(ex)
        shortenable = {s.text for s in segments if s.keep != "all"}
        assert shortenable <= {ex.question, ex.question.rstrip("?"), ex.passage}
        assert segments[-1].keep == "all" and segments[-1].text.endswith(prompts.answer_cue(ex))
    bq = prompts.causal_prompt_segments(BQ)
    passage = next(s for s in bq if s.text == BQ.passage)
    question = next(s for s in bq if s.text == BQ.question)
    assert (passage.keep, question.keep) == ("head", "tail") and passage.priority < question.priority


def test_encoder_pairs() -> None:
    assert prompts.encoder_pairs(MC) == [("Which is a fruit?", "rock"), ("Which is a fruit?", "apple"), ("Which is a fruit?", "car")]
    assert prompts.encoder_pairs(WG) == [("Ann thanked Bo because Ann", "helped her."), ("Ann thanked Bo because Bo", "helped her.")]
    assert prompts.encoder_pairs(BQ) == [
        ("is the sky blue? Sky -- The sky is blue.", "false"),
        ("is the sky blue? Sky -- The sky is blue.", "true"),
    ]


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_sized_and_seeded() -> None:
    config = SyntheticConfig(n_train=64, n_dev=10, n_test=10, n_ood=12, seed=3)
    first = synthetic.make_split("train", config)
    assert first == synthetic.make_split("train", config) and len(first) == 64
    assert len(synthetic.make_split("ood", config)) == 12
    assert first != synthetic.make_split("train", SyntheticConfig(n_train=64, seed=4))
    # a split does not depend on the sizes of the other splits
    assert synthetic.make_split("dev", config) == synthetic.make_split("dev", SyntheticConfig(n_dev=10, seed=3))
    assert load_task("synthetic", "train") == synthetic.make_split("train")
    assert len({ex.uid for ex in first}) == 64 and {ex.n_choices for ex in first} == {2, 3, 4}


def test_synthetic_accuracies_match_their_definitions() -> None:
    config = SyntheticConfig()
    assert synthetic.bayes_accuracy(config) == pytest.approx(0.85)
    assert synthetic.chance_accuracy(config) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    h = [-(0.85 * math.log(0.85) + 0.15 * math.log(0.15 / (c - 1))) for c in (2, 3, 4)]
    assert synthetic.bayes_nll(config) == pytest.approx(sum(h) / 3)
    assert synthetic.bayes_nll(SyntheticConfig(noise=0.0)) == 0.0
    big = SyntheticConfig(n_train=6000, n_ood=6000)
    for split in ("train", "ood"):
        examples = synthetic.make_split(split, big)
        # empirical rates within ~4 standard errors of the stated values
        assert abs(synthetic.empirical_accuracy(examples, "rule") - synthetic.bayes_accuracy(big)) < 0.02
        assert abs(synthetic.empirical_accuracy(examples, "cue") - synthetic.cue_accuracy(split, big)) < 0.025
    assert synthetic.cue_accuracy("ood", big) < synthetic.chance_accuracy(big) < synthetic.cue_accuracy("test", big)


def test_synthetic_ood_shifts_vocabulary_and_flips_the_cue() -> None:
    train, ood = synthetic.make_split("train"), synthetic.make_split("ood")
    words = lambda exs: {w for ex in exs for c in ex.choices for w in c.split()[1:]}  # noqa: E731
    assert not words(train) & words(ood)
    assert all(synthetic.cue_answer(ex) != synthetic.rule_answer(ex) for ex in ood)
    cue_hits = sum(synthetic.cue_answer(ex) == synthetic.rule_answer(ex) for ex in train) / len(train)
    assert 0.85 < cue_hits < 0.95  # cue_strength 0.9
    assert all(len(ex.question.split()) <= 4 and all(len(c.split()) == 3 for c in ex.choices) for ex in train)


@pytest.mark.parametrize(
    "kwargs",
    [{"noise": 0.5}, {"noise": -0.1}, {"min_choices": 1}, {"max_choices": 7}, {"cue_strength": 1.5}, {"n_train": -1}],
)
def test_synthetic_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SyntheticConfig(**kwargs)
    with pytest.raises(ValueError, match="not 'validation'"):
        synthetic.make_split("validation")
