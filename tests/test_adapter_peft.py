"""The adapter inside PEFT: parity with plain LoRA, PEFT invariants, save/load, merge, config errors."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from tiny_models import inputs, outputs, tiny

import bayeslora
from bayeslora import BayesLoraConfig, BayesLoraLinear

CAUSAL = ["llama", "qwen2", "mistral", "gpt2"]
ALL = CAUSAL + ["bert"]
TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
           "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}
BAYES = {"llama": ["q_proj"], "qwen2": ["q_proj"], "mistral": ["q_proj"], "gpt2": ["c_attn"], "bert": ["query"]}


def bayes_model(family, seed=0, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], bayesian_modules=BAYES[family],
                  sigma_u_init=0.05, lambda_init=0.02)
    kwargs.update(overrides)
    return bayeslora.get_model(tiny(family, seed), BayesLoraConfig(**kwargs))


def adamw_steps(model, steps=3, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        torch.manual_seed(100 + i)
        loss = outputs(model, inputs(seed + i)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("family", ALL)
def test_no_bayesian_modules_is_exactly_peft_lora(family):
    common = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False)
    torch.manual_seed(1)
    ours = bayeslora.get_model(tiny(family), BayesLoraConfig(bayesian_modules=[], **common))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny(family), LoraConfig(**common))
    batch = inputs()
    assert torch.equal(outputs(ours, batch), outputs(theirs, batch))
    adamw_steps(ours)
    adamw_steps(theirs)
    ours_sd, theirs_sd = get_peft_model_state_dict(ours), get_peft_model_state_dict(theirs)
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)
    assert torch.equal(outputs(ours, batch), outputs(theirs, batch))


@pytest.mark.parametrize("family", ALL)
def test_bayesian_layers_are_peft_lora_layers_without_unused_weights(family):
    model = bayes_model(family)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert layers and all(isinstance(m, BayesLoraLinear) for m in layers.values())
    bayes = [m for m in layers.values() if m.lora_bayes]
    plain = [m for m in layers.values() if not m.lora_bayes]
    assert bayes and plain
    assert all("default" not in m.lora_A and "default" not in m.lora_B for m in bayes)
    assert all("default" in m.lora_A for m in plain)


@pytest.mark.parametrize("family", ALL)
def test_mean_mode_peft_invariants(family):
    base = tiny(family)
    reference = copy.deepcopy(base)
    model = bayeslora.get_model(base, BayesLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family],
                                                      bayesian_modules=BAYES[family], sigma_u_init=0.05))
    adamw_steps(model, steps=1)  # move away from init so the adapter is far from zero
    bayeslora.set_mode(model, "mean")
    batch = inputs(7)
    with torch.no_grad():
        mean_out = outputs(model, batch)
        with model.disable_adapter():
            assert torch.allclose(outputs(model, batch), outputs(reference, batch), atol=1e-6)
        assert not torch.allclose(mean_out, outputs(reference, batch), atol=1e-4)
        before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "lora_" not in k}
        model.merge_adapter()
        assert torch.allclose(outputs(model, batch), mean_out, atol=1e-5)
        with pytest.raises(RuntimeError, match="merged"):
            with bayeslora.using_mode(model, "sample"):
                outputs(model, batch)
        model.unmerge_adapter()
        after = {k: v for k, v in model.base_model.model.state_dict().items() if "lora_" not in k}
        assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
        merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(outputs(merged, batch), mean_out, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_only_adapter_parameters_change_after_a_step(family):
    model = bayes_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adamw_steps(model, steps=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_bayes" in n for n in changed) and any("lora_A" in n for n in changed)


def test_tied_lm_head_is_untied_before_merging():
    base = tiny("gpt2")
    embedding = base.transformer.wte.weight.detach().clone()
    model = bayeslora.get_model(base, BayesLoraConfig(r=4, target_modules=["c_attn", "lm_head"],
                                                      bayesian_modules=["lm_head"], sigma_u_init=0.05))
    bayeslora.set_mode(model, "mean")
    batch = inputs()
    with torch.no_grad():
        mean_out = outputs(model, batch)
        merged = model.merge_and_unload()
        assert torch.equal(merged.transformer.wte.weight, embedding)
        assert merged.lm_head.weight is not merged.transformer.wte.weight
        assert not merged.config.tie_word_embeddings
        assert torch.allclose(outputs(merged, batch), mean_out, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_save_load_round_trip(tmp_path, family):
    model = bayes_model(family)
    adamw_steps(model, steps=1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BAYESLORA" and saved["bayesian_modules"] == BAYES[family]
    assert (tmp_path / "adapter_model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = bayeslora.load(tiny(family), tmp_path)
    batch = inputs(3)
    with torch.no_grad():
        for mode in ("mean", "sample"):
            bayeslora.set_mode(model, mode)
            bayeslora.set_mode(loaded, mode)
            torch.manual_seed(11)
            a = outputs(model, batch)
            torch.manual_seed(11)
            b = outputs(loaded, batch)
            assert torch.equal(a, b), mode


def test_plain_peft_loader_refuses_a_bayesian_folder(tmp_path):
    model = bayes_model("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="BAYESLORA"):
        PeftModel.from_pretrained(tiny("llama"), tmp_path)
    # PEFT's own loader restores the Bayesian adapter when handed our config
    restored = PeftModel.from_pretrained(tiny("llama"), tmp_path,
                                         config=BayesLoraConfig.from_pretrained(tmp_path))
    bayeslora.attach(restored)
    assert any(isinstance(m, BayesLoraLinear) and m.lora_bayes for m in restored.modules())
    bayeslora.set_mode(model, "mean")
    bayeslora.set_mode(restored, "mean")
    with torch.no_grad():
        assert torch.equal(outputs(model, inputs()), outputs(restored, inputs()))


def test_map_recovery_settings_make_sample_equal_mean():
    tiny_value = 1e-8
    model = bayes_model("llama", sigma_u_init=tiny_value, sigma_u_max=tiny_value, lambda_init=tiny_value,
                        lambda_max=tiny_value, flow_depth=0)
    batch = inputs()
    with torch.no_grad():
        sample = outputs(model, batch)
        bayeslora.set_mode(model, "mean")
        mean = outputs(model, batch)
    assert torch.allclose(sample, mean, atol=1e-5)


def test_quantized_bayesian_targets_are_wrapped_and_refuse_to_merge():
    """Without bitsandbytes installed: a layer that looks quantized gets a BayesLoraLinear (its own forward
    computes the base output) and merging into it is refused; tests/test_quantized.py runs the real thing."""
    base = tiny("llama")

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes.nn.Linear4bit
        pass

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    attn = base.model.layers[0].self_attn
    old = attn.q_proj
    attn.q_proj = Linear4bit(old.in_features, old.out_features, bias=False)
    model = bayeslora.get_model(base, BayesLoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BayesLoraLinear) and layer.base_is_quantized
    with pytest.raises(NotImplementedError, match="round its posterior mean"):
        model.merge_and_unload()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"r": 0}, "r"),
        ({"inducing_rows": 0}, "inducing_rows"),
        ({"inducing_cols": -1}, "inducing_cols"),
        ({"bayesian_modules": ["k_proj"]}, "bayesian_modules"),
        ({"target_modules": ["q_proj", "nonexistent"]}, "target_modules"),
        ({"lambda_init": 0.0}, "lambda_init"),
        ({"lambda_max": -1.0}, "lambda_max"),
        ({"lambda_init": 0.5, "lambda_max": 0.1}, "lambda_init"),
        ({"sigma_u_init": 0.0}, "sigma_u_init"),
        ({"sigma_u_init": 0.5, "sigma_u_max": 0.1}, "sigma_u_init"),
        ({"flow_depth": -1}, "flow_depth"),
        ({"flow_hidden": 0}, "flow_hidden"),
        ({"lora_offset": "false"}, "lora_offset"),
        ({"prior_at_init": 1}, "prior_at_init"),
        ({"lora_offset": True, "prior_at_init": True}, "lora_offset"),
        ({"lora_offset": True, "mean_init_std": "lora"}, "lora_offset"),
    ],
)
def test_bad_configuration_names_the_field(overrides, field):
    base = tiny("llama")
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"])
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=field):
        bayeslora.get_model(base, BayesLoraConfig(**kwargs))
    assert not any(isinstance(m, LoraLayer) for m in base.modules())  # the model was not modified


def test_default_targets_follow_the_architecture():
    for family, expected in [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}), ("bert", {"query", "value"})]:
        model = bayeslora.get_model(tiny(family), BayesLoraConfig(r=2))
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        assert names == expected, family


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    """The README "Library" block, run as written with a tiny Llama for the real weights."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Library"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    names = {"base_model": tiny("llama"), "fresh_base_model": tiny("llama"), "inputs": inputs(batch=2),
             "task_nll": torch.zeros(()), "beta": 1e-3}
    exec(compile(code, "README.md", "exec"), names)
    predictive = names["predictive"]
    assert predictive.shape == (2, 8, names["probs"].shape[-1])
    torch.testing.assert_close(predictive.sum(-1), torch.ones(2, 8))
    assert names["probs"].view(8, 2, 8, -1).std(0).max() > 0  # the S rows of an example saw S draws
    assert bayeslora.get_sampler(names["model2"]).mode == "sample"  # as the README says of load


def test_get_model_and_load_start_in_sample_mode_also_in_eval(tmp_path):
    """What the docs of get_model, load and the README say: eval() does not stop the draws; mean mode does."""
    model = bayes_model("llama", init_lora_weights=False)
    model.save_pretrained(tmp_path)
    loaded = bayeslora.load(tiny("llama"), tmp_path)
    batch = inputs()
    with torch.no_grad():
        for m in (model, loaded):
            m.eval()
            assert bayeslora.get_sampler(m).mode == "sample"
            assert not torch.equal(outputs(m, batch), outputs(m, batch))
            bayeslora.set_mode(m, "mean")
            assert torch.equal(m.generate(**batch, max_new_tokens=3, do_sample=False),
                               m.generate(**batch, max_new_tokens=3, do_sample=False))
