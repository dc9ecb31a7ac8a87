"""What the library does when a user gets it wrong: bad targets leave the model as it was, no NaN is merged,
a write the cache cannot see has a way back, a whole-model cast can be undone. (A cold review of the
Python API found each of these silently wrong.)"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, inputs, tiny

import bayeslora
from bayeslora import BayesLoraConfig


def _plain(model: torch.nn.Module) -> bool:
    return all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())


@pytest.mark.parametrize("options, message", [
    ({"target_modules": ["q_proj", "lm_head"], "output_rows": {"lm_head": [1, VOCAB + 3]}},
     f"output_rows for 'lm_head': row {VOCAB + 3} is outside its {VOCAB} outputs"),
    ({"target_modules": ["q_proj", "norm"]}, "is not supported"),  # PEFT's refusal, after wrapping q_proj
    ({"target_modules": ["q_proj", "act_fn"]}, "is not supported"),
    ({"target_modules": ["embed_tokens", "q_proj"], "bayesian_modules": ["embed_tokens"]},
     "bayesian_modules: model.embed_tokens is a Embedding; only Linear and Conv1D layers can be Bayesian"),
    ({"target_modules": ["embed_tokens"]}, "no target is a Linear or Conv1D layer, so no factor would be Bayesian"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [5]},
     "'q_proj' matches no module of the model within layers_to_transform=\\[5\\]"),
])
def test_a_config_get_model_refuses_leaves_the_model_as_it_was(options, message):
    base = tiny("llama")
    with torch.no_grad():
        want = base(**inputs()).logits
    with pytest.raises(ValueError, match=message):
        bayeslora.get_model(base, BayesLoraConfig(r=4, **options))
    assert _plain(base)
    with torch.no_grad():
        assert torch.equal(base(**inputs()).logits, want)
    model = bayeslora.get_model(base, BayesLoraConfig(r=4, target_modules=["q_proj"]))  # and it can be retried
    assert bayeslora.count_parameters(model)["bayesian_factors"] == 4


def test_merging_a_non_finite_posterior_mean_is_refused_not_written_into_the_base():
    model = bayeslora.get_model(tiny("llama"), BayesLoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_bayes["default"]["A"].inducing_mean.fill_(float("nan"))
    with pytest.raises(ValueError, match="posterior mean of Bayesian adapter 'default' is not finite"):
        model.merge_and_unload()  # no safe_merge asked for
    assert torch.equal(layer.base_layer.weight, before)


def test_set_mode_mean_recomputes_a_mean_cached_before_a_write_through_data():
    """``p.data`` has its own version counter: the cached mean cannot see the write, set_mode can."""
    config = BayesLoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    model = bayeslora.get_model(tiny("llama"), config)
    bayeslora.set_mode(model, "mean")
    with torch.no_grad():
        before = model(**inputs()).logits
        for name, p in model.named_parameters():
            if "inducing_mean" in name:
                p.data.mul_(3.0)
        bayeslora.set_mode(model, "mean")
        after = model(**inputs()).logits
        fresh = bayeslora.get_model(tiny("llama"), config)
        fresh.load_state_dict(model.state_dict())
        bayeslora.set_mode(fresh, "mean")
        want = fresh(**inputs()).logits
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want)


def test_attach_puts_the_inducing_parameters_back_in_float32_after_a_whole_model_cast():
    """The README's remedy: ``model.to(torch.bfloat16)`` casts them as it casts PEFT's LoRA factors (and an
    engine's mixed precision may do so on purpose, so it is not warned about); attach undoes it."""
    model = bayeslora.get_model(tiny("llama"), BayesLoraConfig(r=4, target_modules=["q_proj"]))
    model = model.to(torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_bayes" in n} == {torch.bfloat16}
    bayeslora.attach(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_bayes" in n} == {torch.float32}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs()).logits).all()


def test_a_failed_get_model_on_a_model_with_an_adapter_keeps_that_adapter():
    """The undo after PEFT's refusal takes back only what the failed call added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = tiny("llama")
    first = bayeslora.get_model(base, BayesLoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    bayeslora.set_mode(first, "mean")
    with torch.no_grad():
        want = first(**inputs()).logits
    layers = lambda: {n: m for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)}  # noqa: E731
    before = {n: sorted(m.lora_bayes) for n, m in layers().items()}
    with pytest.raises(ValueError, match="is not supported"):
        bayeslora.get_model(base, BayesLoraConfig(r=4, target_modules=["q_proj", "v_proj", "input_layernorm"]),
                            adapter_name="second")
    assert {n: sorted(m.lora_bayes) for n, m in layers().items()} == before  # q_proj: "default" only; v_proj plain
    with torch.no_grad():
        torch.testing.assert_close(first(**inputs()).logits, want, rtol=0, atol=0)


def test_an_infinite_clamp_means_no_clamp_and_is_accepted():
    """``lambda_max`` and ``sigma_u_max`` are only ``clamp(max=…)`` bounds: inf is a config that works."""
    inf = float("inf")
    model = bayeslora.get_model(tiny("llama"), BayesLoraConfig(r=4, target_modules=["q_proj"], lambda_max=inf,
                                                               sigma_u_max=inf))
    with torch.no_grad():
        assert torch.isfinite(model(**inputs()).logits).all()
    with pytest.raises(ValueError, match="prior_std must be a finite number, got inf"):
        BayesLoraConfig(r=4, target_modules=["q_proj"], prior_std=inf)


def test_only_set_mode_mean_recomputes_the_mean_using_mode_keeps_it(monkeypatch):
    """``using_mode(model, "mean")`` (and fixed_sample's exit) must not pay the 4096-draw mean again."""
    from bayeslora.surgery import layer as layer_module
    from bayeslora.surgery import sampler as sampler_module

    model = bayeslora.get_model(tiny("llama"), BayesLoraConfig(r=4, target_modules=["q_proj"]))
    calls = []
    for module in (layer_module, sampler_module):
        real = module.mean_group
        monkeypatch.setattr(module, "mean_group", lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    counts = []
    with torch.no_grad():
        for _ in range(3):
            with bayeslora.using_mode(model, "mean"):
                model(**inputs())
            counts.append(len(calls))
        bayeslora.set_mode(model, "mean")
        model(**inputs())
    assert counts[0] > 0 and counts == [counts[0]] * 3  # computed once, then reused
    assert len(calls) == 2 * counts[0]  # set_mode(model, "mean"): computed again
