"""PEFT workflows that once went wrong for Bayesian adapters (the PEFT-compatibility issue).

Each test is a workflow a PEFT user runs: loading under another adapter name, ``low_cpu_mem_usage``,
``add_weighted_adapter``, ``set_mode`` before ``add_adapter``, and ``init_lora_weights``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import inputs, outputs, tiny

import bayeslora
from bayeslora import BayesLoraConfig, BayesLoraLinear

FAMILIES = ["llama", "gpt2", "bert"]  # nn.Linear decoder, Conv1D decoder, encoder
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}
OTHER_TARGET = {"llama": ["k_proj"], "gpt2": ["c_fc"], "bert": ["key"]}


def config(family, targets=None, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets or TARGETS[family], init_lora_weights=False,
                  sigma_u_init=0.05, lambda_init=0.02)
    kwargs.update(overrides)
    return BayesLoraConfig(**kwargs)


def trained_like(model, seed=0):
    """Move every Bayesian parameter off its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_bayes" in name and p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def mean_outputs(model, batch):
    with bayeslora.using_mode(model, "mean"), torch.no_grad():
        return outputs(model, batch)


def bayes_tensors(model, adapter):
    return {n.replace(f".{adapter}.", "."): p.detach().clone() for n, p in model.named_parameters()
            if f"lora_bayes.{adapter}." in n}


# ------------------------------------------------------------------------------ 1. adapter names
def test_checkpoint_keys_carry_no_adapter_name(tmp_path):
    model = bayeslora.get_model(tiny("llama"), config("llama"), adapter_name="mine")
    model.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "mine" / "adapter_model.safetensors"))
    bayes = [k for k in keys if "lora_bayes" in k]
    assert bayes and not [k for k in keys if ".mine" in k]
    assert all(k.split("lora_bayes.")[1].count(".") == 0 for k in bayes)  # flat below lora_bayes


@pytest.mark.parametrize("family", FAMILIES)
def test_load_under_another_adapter_name_restores_every_tensor(tmp_path, family):
    batch = inputs()
    model = bayeslora.get_model(tiny(family), config(family))
    trained_like(model)
    expected, saved = mean_outputs(model, batch), bayes_tensors(model, "default")
    model.save_pretrained(tmp_path)

    torch.manual_seed(123)  # a different random init, so an unloaded tensor would show
    loaded = bayeslora.load(tiny(family), tmp_path, adapter_name="x")
    assert bayes_tensors(loaded, "x").keys() == saved.keys()
    for name, value in bayes_tensors(loaded, "x").items():
        assert torch.equal(value, saved[name]), name
    torch.testing.assert_close(mean_outputs(loaded, batch), expected, rtol=0, atol=0)


def test_load_adapter_adds_a_second_bayesian_adapter_and_leaves_the_first(tmp_path):
    batch = inputs()
    first = bayeslora.get_model(tiny("llama"), config("llama"))
    trained_like(first, seed=1)
    first.save_pretrained(tmp_path)
    expected = mean_outputs(first, batch)

    torch.manual_seed(7)
    model = bayeslora.get_model(tiny("llama"), config("llama"))
    before = bayes_tensors(model, "default")
    bayeslora.load_adapter(model, tmp_path, "other")
    for name, value in bayes_tensors(model, "default").items():
        assert torch.equal(value, before[name]), f"loading 'other' changed 'default': {name}"
    model.set_adapter("other")
    torch.testing.assert_close(mean_outputs(model, batch), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        bayeslora.load_adapter(model, tmp_path, "other")


def test_failed_load_adapter_leaves_no_adapter_behind(tmp_path):
    model = bayeslora.get_model(tiny("llama"), config("llama"))
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()  # the config alone: the weights cannot load
    with pytest.raises(Exception):
        bayeslora.load_adapter(model, tmp_path, "second")
    assert list(model.peft_config) == ["default"]
    assert not any("second" in m.lora_bayes for m in model.modules() if isinstance(m, BayesLoraLinear))


def test_distributed_checkpoint_state_dict_round_trip():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = bayeslora.get_model(tiny("llama"), config("llama"))
    trained_like(model)
    fresh = bayeslora.get_model(tiny("llama", seed=3), config("llama"))
    set_model_state_dict(fresh, get_model_state_dict(model))
    for name, value in bayes_tensors(model, "default").items():
        assert torch.equal(bayes_tensors(fresh, "default")[name], value), name


def test_state_dict_round_trip_through_the_model_itself():
    model = bayeslora.get_model(tiny("gpt2"), config("gpt2"))
    trained_like(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = bayeslora.get_model(tiny("gpt2", seed=3), config("gpt2"))
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in bayes_tensors(model, "default").items():
        assert torch.equal(bayes_tensors(fresh, "default")[name], value)


# ------------------------------------------------------------------------------ 2. low_cpu_mem_usage
def test_low_cpu_mem_usage_get_model_leaves_the_adapter_on_meta():
    model = bayeslora.get_model(tiny("llama"), config("llama"), low_cpu_mem_usage=True)
    bayes = [p for n, p in model.named_parameters() if "lora_bayes" in n]
    assert bayes and all(p.is_meta for p in bayes)  # PEFT's meaning: to be loaded into


@pytest.mark.parametrize("family", FAMILIES)
def test_low_cpu_mem_usage_load_equals_a_normal_load(tmp_path, family):
    batch = inputs()
    model = bayeslora.get_model(tiny(family), config(family))
    trained_like(model)
    model.save_pretrained(tmp_path)
    expected = mean_outputs(model, batch)
    loaded = bayeslora.load(tiny(family), tmp_path, low_cpu_mem_usage=True)
    bayes = [p for n, p in loaded.named_parameters() if "lora_bayes" in n]
    assert not any(p.is_meta for p in bayes) and all(p.dtype == torch.float32 for p in bayes)
    torch.testing.assert_close(mean_outputs(loaded, batch), expected, rtol=0, atol=0)

    again = bayeslora.get_model(tiny(family), config(family))
    bayeslora.load_adapter(again, tmp_path, "second", low_cpu_mem_usage=True)
    again.set_adapter("second")
    torch.testing.assert_close(mean_outputs(again, batch), expected, rtol=0, atol=0)


def test_bayesian_parameters_stay_float32_on_a_bf16_base():
    model = bayeslora.get_model(tiny("llama", dtype=torch.bfloat16), config("llama"))
    layer = next(m for m in model.modules() if isinstance(m, BayesLoraLinear))
    layer._move_adapter_to_device_of_base_layer("default")
    assert all(p.dtype == torch.float32 for p in layer.lora_bayes.parameters())


# ------------------------------------------------------------------------------ 3. add_weighted_adapter
def _delta(model, adapter):
    """Σ over layers of the merge delta of ``adapter`` (its posterior mean, or plain LoRA weights)."""
    return {name: layer.get_delta_weight(adapter) for name, layer in model.named_modules()
            if isinstance(layer, BayesLoraLinear) and (adapter in layer.lora_bayes or adapter in layer.lora_A)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_add_weighted_adapter_cat_combines_the_posterior_means_exactly(family):
    model = bayeslora.get_model(tiny(family), config(family))
    model.add_adapter("two", config(family, seed=1))
    trained_like(model)
    first, second = _delta(model, "default"), _delta(model, "two")
    model.add_weighted_adapter(["default", "two"], [0.7, -0.3], "mix", combination_type="cat")
    mixed = _delta(model, "mix")
    assert mixed.keys() == first.keys()
    for name in mixed:
        torch.testing.assert_close(mixed[name], 0.7 * first[name] - 0.3 * second[name], rtol=1e-5, atol=1e-6)
    layers = [m for m in model.modules() if isinstance(m, BayesLoraLinear)]
    assert all("mix" in m.lora_A and "mix" not in m.lora_bayes for m in layers)  # a plain LoRA adapter
    assert not any(a.endswith("__posterior_mean") for a in model.peft_config)  # temporaries are gone
    assert model.peft_config["mix"].bayesian_modules == []


def test_add_weighted_adapter_mixes_a_bayesian_and_a_plain_adapter():
    model = bayeslora.get_model(tiny("llama"), config("llama"))
    model.add_adapter("plain", config("llama", bayesian_modules=[]))
    trained_like(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BayesLoraLinear):
                m.lora_B["plain"].weight.normal_()
    first, second = _delta(model, "default"), _delta(model, "plain")
    model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "sum", combination_type="cat")
    for name, delta in _delta(model, "sum").items():
        torch.testing.assert_close(delta, first[name] + second[name], rtol=1e-5, atol=1e-6)


def test_add_weighted_adapter_survives_pickling_and_takes_a_source_twice():
    import io

    model = bayeslora.get_model(tiny("llama"), config("llama"))
    trained_like(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)  # our own object, never a user's file
    first = _delta(restored, "default")
    restored.add_weighted_adapter(["default", "default"], [0.5, 0.25], "twice", combination_type="cat")
    for name, delta in _delta(restored, "twice").items():
        torch.testing.assert_close(delta, 0.75 * first[name], rtol=1e-5, atol=1e-6)
    assert not any("twice" in m.lora_bayes for m in restored.modules() if isinstance(m, BayesLoraLinear))


def test_add_weighted_adapter_on_plain_adapters_is_peft_unchanged():
    model = bayeslora.get_model(tiny("llama"), config("llama", bayesian_modules=[]))
    model.add_adapter("two", config("llama", bayesian_modules=[]))
    model.add_weighted_adapter(["default", "two"], [0.5, 0.5], "mix", combination_type="svd")
    assert "mix" in model.peft_config


# ------------------------------------------------------------------------------ 4. mode of later layers
@pytest.mark.parametrize("family", FAMILIES)
def test_set_mode_reaches_layers_created_later(family):
    batch = inputs()
    model = bayeslora.get_model(tiny(family), config(family))
    bayeslora.set_mode(model, "mean")
    model.add_adapter("later", config(family, targets=OTHER_TARGET[family]))
    model.set_adapter("later")
    trained_like(model)
    with torch.no_grad():
        first, second = outputs(model, batch), outputs(model, batch)
    assert torch.equal(first, second)  # mean mode: deterministic
    layers = [m for m in model.modules() if isinstance(m, BayesLoraLinear)]
    assert {m.bayes_mode for m in layers} == {"mean"}
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, batch), first, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ 5. init_lora_weights
def base_and_outputs(family, batch):
    base = tiny(family)
    with torch.no_grad():
        return base, outputs(base, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_lora_weights_true_starts_exactly_at_the_base_model(family):
    batch = inputs()
    base, expected = base_and_outputs(family, batch)
    defaults = BayesLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family])  # init_lora_weights=True
    model = bayeslora.get_model(base, defaults)
    torch.testing.assert_close(mean_outputs(model, batch), expected, rtol=0, atol=0)
    with torch.no_grad():
        sampled = outputs(model, batch)  # sample mode: B's draws have std ≈ σ_p·(σ_U, λ at init) = σ_p·1e-3
    assert 0 < (sampled - expected).abs().max() < 0.05
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_lora_weights_false_is_a_visible_random_adapter(family):
    batch = inputs()
    base, expected = base_and_outputs(family, batch)
    model = bayeslora.get_model(base, config(family, init_lora_weights=False))
    assert (mean_outputs(model, batch) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("value", ["gaussian", "pissa", "olora", "loftq", None])
def test_other_init_lora_weights_values_raise_naming_the_field(value):
    with pytest.raises(ValueError, match="init_lora_weights"):
        BayesLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=value)


# ------------------------------------------------------------------------------ files from older versions
def test_an_adapter_saved_with_a_0d_lambda_still_loads(tmp_path):
    """λ is a 1-element tensor (ZeRO-3 cannot partition a 0-d one); files written when it was 0-d load."""
    from safetensors.torch import save_file

    batch = inputs()
    model = bayeslora.get_model(tiny("llama"), config("llama"))
    trained_like(model)
    expected, saved = mean_outputs(model, batch), bayes_tensors(model, "default")
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    lambdas = [k for k in tensors if k.endswith("lambda_raw")]
    assert lambdas and all(tensors[k].shape == (1,) for k in lambdas)
    save_file({k: (v.reshape(()) if k in lambdas else v) for k, v in tensors.items()}, str(file))

    loaded = bayeslora.load(tiny("llama"), tmp_path)
    for name, value in bayes_tensors(loaded, "default").items():
        assert torch.equal(value, saved[name]), name
    torch.testing.assert_close(mean_outputs(loaded, batch), expected, rtol=0, atol=0)


def test_a_training_checkpoint_saved_with_0d_lambdas_resumes_to_the_same_step(tmp_path):
    """Its λ weights and their AdamW moments were 0-d: the resumed step equals the uninterrupted one."""
    from safetensors.torch import save_file

    from bayeslora.training.checkpoint import load_checkpoint, save_checkpoint, trainable_state

    def setup():
        torch.manual_seed(0)
        model = bayeslora.get_model(tiny("llama"), config("llama"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        return model, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def step(params, optimizer):
        optimizer.zero_grad()
        sum((p.float() - 0.3).square().sum() for p in params).backward()
        optimizer.step()

    model, params, optimizer, scheduler = setup()
    step(params, optimizer)
    save_checkpoint(tmp_path, trainable_state(model), optimizer.state_dict(), scheduler, {"position": {}})
    step(params, optimizer)  # the uninterrupted second step

    folder = tmp_path / "checkpoint"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lambdas = {i for i, n in enumerate(names) if n.endswith("lambda_raw")}
    weights = load_file(folder / "trainable.safetensors")
    save_file({k: (v.reshape(()) if k.endswith("lambda_raw") else v) for k, v in weights.items()},
              str(folder / "trainable.safetensors"))
    states = load_file(folder / "optimizer.safetensors")
    old = {k: (v.reshape(()) if k.split(".")[2].isdigit() and int(k.split(".")[2]) in lambdas
               and not k.endswith(".step") else v) for k, v in states.items()}
    assert sum(v.dim() == 0 and not k.endswith(".step") for k, v in old.items()) == 2 * len(lambdas) > 0
    save_file(old, str(folder / "optimizer.safetensors"))

    resumed, resumed_params, resumed_optimizer, resumed_scheduler = setup()
    load_checkpoint(tmp_path, resumed, resumed_optimizer, resumed_scheduler)
    step(resumed_params, resumed_optimizer)
    for name, a, b in zip(names, params, resumed_params):
        assert a.shape == b.shape and torch.equal(a, b), name
