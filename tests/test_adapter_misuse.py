"""What the library does when a user gets it wrong: bad targets leave the model as it was, no NaN is merged,
a write the cache cannot see has a way back, a whole-model cast is called out. (A cold review of the
Python API found each of these silently wrong.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import VOCAB, inputs, tiny

import bayeslora
from bayeslora import BayesLoraConfig
from bayeslora.surgery import sampler as sampler_module


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


def test_a_whole_model_cast_to_bf16_is_called_out_once_and_attach_restores_float32(monkeypatch):
    monkeypatch.setattr(sampler_module, "_WARNED_LOW_PRECISION", False)
    model = bayeslora.get_model(tiny("llama"), BayesLoraConfig(r=4, target_modules=["q_proj"]))
    model = model.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(**inputs())
        model(**inputs())
    said = [w for w in caught if "inducing parameters" in str(w.message)]
    assert len(said) == 1 and "bayeslora.attach(model)" in str(said[0].message)
    bayeslora.attach(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora_bayes" in n}
    assert set(dtypes.values()) == {torch.float32}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        monkeypatch.setattr(sampler_module, "_WARNED_LOW_PRECISION", False)
        copy.deepcopy(model)(**inputs())
    assert not [w for w in caught if "inducing parameters" in str(w.message)]
