"""Misuse of the public API fails at once, names what is wrong, and leaves the model as it was."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, inputs, outputs, tiny
from transformers import LlamaConfig, LlamaForCausalLM

import bayeslora
from bayeslora import BayesLoraConfig


def llama_model(seed=0, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                  sigma_u_init=0.05, lambda_init=0.02, init_lora_weights=False)
    kwargs.update(overrides)
    return bayeslora.get_model(tiny("llama", seed), BayesLoraConfig(**kwargs))


def sampling_state(model):
    s = bayeslora.get_sampler(model)
    return s.mode, s.num_samples, s.fixed, s.draw_seed, s.draw_seeds


# ------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", ["1", "x", True, 1.0])
def test_fixed_sample_refuses_a_seed_that_is_not_an_integer_and_changes_nothing(seed):
    model = llama_model()
    bayeslora.set_mode(model, "mean")
    before = sampling_state(model)
    with pytest.raises(ValueError, match="seed"):
        with bayeslora.fixed_sample(model, seed=seed):
            pass
    assert sampling_state(model) == before


@pytest.mark.parametrize("seed", ["7", True, 2.5])
def test_set_draw_seed_refuses_a_seed_that_is_not_an_integer(seed):
    model = llama_model()
    with pytest.raises(ValueError, match="seed"):
        bayeslora.set_draw_seed(model, seed)
    assert bayeslora.get_sampler(model).draw_seed is None


@pytest.mark.parametrize("seeds", ["12", [1, "2"], [1, False], [1, None], 3])
def test_set_draw_seeds_refuses_seeds_that_are_not_integers(seeds):
    model = llama_model()
    with pytest.raises(ValueError, match="seeds"):
        bayeslora.set_draw_seeds(model, seeds)
    assert bayeslora.get_sampler(model).draw_seeds is None


def test_integer_like_seeds_are_still_accepted():
    model = llama_model()
    bayeslora.set_draw_seed(model, torch.tensor(5))
    assert bayeslora.get_sampler(model).draw_seed == 5
    bayeslora.set_draw_seeds(model, (1, torch.tensor(2)))
    assert bayeslora.get_sampler(model).draw_seeds == [1, 2]
    bayeslora.set_draw_seeds(model, None)
    bayeslora.set_draw_seed(model, None)


# ------------------------------------------------------------------------------------- fixed_sample
def test_fixed_sample_that_fails_to_draw_leaves_the_model_as_it_found_it():
    """A non-finite posterior makes the entry draw raise; the model stays in mean mode, unseeded."""
    model = llama_model()
    bayeslora.set_mode(model, "mean")
    before = sampling_state(model)
    factor = next(m for m in model.modules() if isinstance(m, bayeslora.BayesLoraLinear)).lora_bayes["default"]["A"]
    saved = factor.z_rows.detach().clone()
    with torch.no_grad():
        factor.z_rows.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        with bayeslora.fixed_sample(model, seed=3):
            pass
    assert sampling_state(model) == before
    with torch.no_grad():
        factor.z_rows.copy_(saved)
        assert torch.equal(outputs(model, inputs()), outputs(model, inputs()))  # mean mode, deterministic


def test_fixed_sample_that_fails_to_draw_keeps_the_last_forward_draws_and_kl():
    model = llama_model()
    bayeslora.set_draw_seed(model, 7)
    with torch.no_grad():
        outputs(model, inputs())
    sampler = bayeslora.get_sampler(model)
    before = sampling_state(model)
    kl = {k: tuple(v) for k, v in sampler.last_kl.items()}
    layer = next(m for m in model.modules() if isinstance(m, bayeslora.BayesLoraLinear) and m.lora_bayes)
    drawn = dict(layer._bayes_draws["default"])
    with torch.no_grad():
        layer.lora_bayes["default"]["A"].z_rows.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        with bayeslora.fixed_sample(model, seed=3, num_samples=2):
            pass
    assert sampling_state(model) == before
    assert {k: tuple(v) for k, v in sampler.last_kl.items()} == kl
    assert all(layer._bayes_draws["default"][w] is drawn[w] for w in ("A", "B"))
    assert layer.bayes_num_samples == 1


# ------------------------------------------------------------------------------------- load paths
def saved_adapter(path, layers=2):
    """A Bayesian adapter of a tiny Llama with ``layers`` layers saved at ``path``; returns ``path``."""
    model = bayeslora.get_model(llama_base(layers), BayesLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(path)
    return path


def llama_base(layers=2):
    if layers == 2:
        return tiny("llama")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def both_loaders(path):
    """``load`` onto a fresh base, and ``load_adapter`` as a second adapter of a Bayesian model."""
    yield lambda: bayeslora.load(llama_base(), path)
    model = saved_adapter_model()
    yield lambda: bayeslora.load_adapter(model, path, "second")


def saved_adapter_model():
    return bayeslora.get_model(llama_base(), BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


@pytest.mark.parametrize("name", ["out_typo", "./out_typo", "../out_typo", "runs/a/out", "user/adapter.safetensors",
                                  "user/adapter_config.json", "ABSOLUTE"])
def test_a_missing_local_path_is_file_not_found_not_a_hub_lookup(tmp_path, monkeypatch, name):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"asked the Hub for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    name = str(tmp_path / "no_such_adapter") if name == "ABSOLUTE" else name
    for loader in both_loaders(name):
        with pytest.raises(FileNotFoundError, match=re.escape(name)):
            loader()


def test_a_missing_path_given_as_a_path_object_is_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="user/adapter"):
        bayeslora.load(llama_base(), Path("user/adapter"))


def test_an_owner_name_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def hub(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline in this test")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        bayeslora.load(llama_base(), "user/adapter")
    assert asked == [("user/adapter", "adapter_config.json")]


def test_the_weights_file_instead_of_its_folder_says_pass_the_folder(tmp_path):
    saved_adapter(tmp_path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        for loader in both_loaders(tmp_path / name):
            with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / name))}.*pass the folder"):
                loader()


def test_a_corrupt_config_names_the_file_and_the_line(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{\n  "r": 4,\n  not json\n}')
    for loader in both_loaders(tmp_path):
        with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'adapter_config.json'))}.*line 3"):
            loader()


def test_weights_that_are_not_safetensors_name_the_file(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    for loader in both_loaders(tmp_path):
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "adapter_model.safetensors"))):
            loader()


def test_a_folder_without_config_or_weights_names_the_missing_file(tmp_path):
    saved_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    saved_adapter(tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    (tmp_path / "c").mkdir()
    for folder, missing in (("a", "adapter_config.json"), ("b", "adapter_model.safetensors"),
                            ("c", "adapter_config.json")):
        for loader in both_loaders(tmp_path / folder):
            with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / folder))}.*{missing}"):
                loader()


def test_checkpoint_keys_the_model_has_no_place_for_are_an_error(tmp_path):
    """A 2-layer adapter on a 1-layer base dropped layer 1 silently."""
    saved_adapter(tmp_path)
    base = llama_base(layers=1)
    with pytest.raises(ValueError, match=r"no place.*layers\.1\."):
        bayeslora.load(base, tmp_path)
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in base.modules())  # as it was
    model = bayeslora.get_model(llama_base(layers=1), BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"no place.*layers\.1\."):
        bayeslora.load_adapter(model, tmp_path, "second")
    assert "second" not in model.peft_config


def test_a_base_with_more_layers_still_loads(tmp_path):
    """The other direction is PEFT's missing-keys warning (the extra layer keeps its fresh adapter), unchanged."""
    saved_adapter(tmp_path)
    with pytest.warns(UserWarning, match="missing adapter keys"):
        bayeslora.load(llama_base(layers=3), tmp_path)


def test_a_pickled_adapter_is_refused_not_unpickled(tmp_path):
    """PEFT falls back to adapter_model.bin (a pickle) when there is no safetensors file; we never load one."""
    import safetensors.torch

    saved_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    torch.save(safetensors.torch.load_file(weights), tmp_path / "adapter_model.bin")
    weights.unlink()
    for load in both_loaders(tmp_path):
        with pytest.raises(ValueError, match="adapter_model.bin \\(a pickle\\) and no adapter_model.safetensors"):
            load()


def test_a_fixed_sample_inside_another_gives_the_outer_draw_back():
    model = llama_model()
    batch = inputs()
    with torch.no_grad(), bayeslora.fixed_sample(model, seed=1):
        outer = outputs(model, batch)
        with bayeslora.fixed_sample(model, seed=2, num_samples=2):
            inner = model(**{k: v.repeat(2, 1) for k, v in batch.items()}).logits
        assert not torch.allclose(inner[:2], outer)
        torch.testing.assert_close(outputs(model, batch), outer, rtol=0, atol=0)
        assert bayeslora.get_sampler(model).num_samples == 1
    assert bayeslora.get_sampler(model).fixed is False
