"""A Bayesian adapter restricted to some output rows (``BayesLoraConfig.output_rows``): an lm_head scored on
its answer-label rows only. The other rows must stay the base model's in every mode, the restricted rows
must train, merge, save and load like any adapter, and bad rows must be refused by name."""

from __future__ import annotations

import json

import pytest
import torch

import bayeslora
from bayeslora import BayesLoraConfig
from tiny_models import VOCAB, inputs, outputs, tiny

ROWS = [5, 17, 40, 41]


def head_model(family="llama", rows=ROWS, seed=0, **overrides):
    targets = ["c_attn", "lm_head"] if family == "gpt2" else ["q_proj", "lm_head"]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, bayesian_modules=targets,
                  sigma_u_init=0.05, lambda_init=0.02, init_lora_weights=False,
                  output_rows=None if rows is None else {"lm_head": rows})
    kwargs.update(overrides)
    return bayeslora.get_model(tiny(family, seed), BayesLoraConfig(**kwargs))


def other_rows(rows=ROWS):
    return [i for i in range(VOCAB) if i not in rows]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_rows_outside_the_restriction_are_the_base_model_s_in_every_mode(family):
    """Only the lm_head is adapted here (q_proj too would change every row through the hidden state), so
    the unrestricted rows equal the base model's logits exactly, in sample, batched-sample and mean mode."""
    model = head_model(family, target_modules=["lm_head"], bayesian_modules=["lm_head"])
    batch = inputs()
    with torch.no_grad():
        with model.disable_adapter():
            base = outputs(model, batch)
        for mode, n in (("sample", 1), ("sample", 3), ("mean", 1)):
            with bayeslora.using_mode(model, mode, n):
                rows_batch = {k: v.repeat(n, 1) for k, v in batch.items()}
                got = outputs(model, rows_batch)
            want = base.repeat(n, 1, 1)
            torch.testing.assert_close(got[..., other_rows()], want[..., other_rows()], rtol=0, atol=0)
            assert (got[..., ROWS] - want[..., ROWS]).abs().amax() > 1e-3, (mode, n)


def test_the_restricted_factor_has_only_its_rows_and_counts_against_a_full_lora_head():
    model = head_model()
    head = model.base_model.model.lm_head
    shape = head.lora_bayes["default"]["B"].shape
    assert (shape.d_out, shape.d_in) == (len(ROWS), 4)
    full = bayeslora.count_parameters(head_model(rows=None))
    restricted = bayeslora.count_parameters(model)
    # same plain-LoRA reference (a full-vocabulary B), fewer variational parameters
    assert restricted["plain_lora"] == full["plain_lora"]
    assert restricted["trainable"] < full["trainable"]
    head_b = [s for s in bayeslora.posterior_stats(model) if s["module"].endswith("lm_head") and s["factor"] == "B"]
    assert [s["shape"] for s in head_b] == [(len(ROWS), 4)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merging_a_restricted_adapter_adds_its_mean_to_its_rows_only(family):
    model = head_model(family)
    batch = inputs()
    with torch.no_grad():
        with bayeslora.using_mode(model, "mean"):
            mean = outputs(model, batch)
        bayeslora.set_mode(model, "mean")
        merged = model.merge_and_unload()
        torch.testing.assert_close(outputs(merged, batch), mean, rtol=1e-4, atol=1e-5)


def test_a_restricted_adapter_trains_and_saves_its_rows(tmp_path):
    model = head_model()
    model.train()
    logits = outputs(model, inputs())
    (logits[..., ROWS].logsumexp(-1).mean() + 1e-3 * bayeslora.kl_divergence(model)).backward()
    head_b = model.base_model.model.lm_head.lora_bayes["default"]["B"]
    assert head_b.inducing_mean.grad is not None and head_b.inducing_mean.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad(), bayeslora.using_mode(model, "mean"):
        before = outputs(model, inputs(1))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["output_rows"] == {"lm_head": ROWS}
    reloaded = bayeslora.load(tiny("llama", 0), tmp_path / "adapter")
    with torch.no_grad(), bayeslora.using_mode(reloaded, "mean"):
        torch.testing.assert_close(outputs(reloaded, inputs(1)), before)


@pytest.mark.parametrize("rows, message", [
    ({"lm_head": [1, 1]}, "repeats a row"),
    ({"lm_head": []}, "non-empty list"),
    ({"lm_head": [-1]}, "integers >= 0"),
    ({"lm_head": "12"}, "list of row indices"),
    ({}, "non-empty dict"),
])
def test_bad_rows_are_refused_naming_the_field(rows, message):
    with pytest.raises(ValueError, match=rf"output_rows.*{message}|{message}.*output_rows"):
        BayesLoraConfig(r=4, target_modules=["lm_head"], output_rows=rows)


def test_rows_beyond_the_layer_or_on_a_plain_or_missing_target_are_refused_by_name():
    with pytest.raises(ValueError, match=rf"row {VOCAB} is outside .*{VOCAB} outputs"):
        head_model(rows=[0, VOCAB])
    with pytest.raises(ValueError, match="output_rows: 'lm_head' is not a Bayesian target"):
        head_model(bayesian_modules=["q_proj"])
    with pytest.raises(ValueError, match="output_rows: 'lm_haed' is not a Bayesian target"):
        bayeslora.get_model(tiny("llama"), BayesLoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                           output_rows={"lm_haed": [1, 2]}))


def test_an_adapter_deleted_and_added_again_adds_to_its_new_rows():
    """The row index is cached per device: an adapter re-added under the same name with other rows must
    not reuse the old index (which would add the new delta to the old rows)."""
    model = head_model(target_modules=["lm_head"], bayesian_modules=["lm_head"], rows=[1, 2, 3])
    batch = inputs()
    with torch.no_grad(), bayeslora.using_mode(model, "mean"):
        outputs(model, batch)  # caches the index of rows 1-3
        model.add_adapter("other", BayesLoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
        model.set_adapter("other")
        model.delete_adapter("default")
        config = BayesLoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False,
                                 output_rows={"lm_head": [60, 61, 62]})
        model.add_adapter("default", config)
        model.set_adapter("default")
        with model.disable_adapter():
            base = outputs(model, batch)
        got = outputs(model, batch)
    changed = (got - base).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == [60, 61, 62]


def test_add_weighted_adapter_spreads_a_restricted_mean_over_a_full_plain_b():
    model = head_model()
    head = model.base_model.model.lm_head
    delta = head.get_delta_weight("default")
    model.add_weighted_adapter(["default"], [0.5], "mix", combination_type="cat")
    assert "mix" in head.lora_A and "mix" not in head.lora_bayes
    assert model.peft_config["mix"].output_rows is None
    torch.testing.assert_close(head.get_delta_weight("mix"), 0.5 * delta, rtol=1e-5, atol=1e-6)
    assert delta[other_rows()].abs().max() == 0 and delta[ROWS].abs().max() > 0
