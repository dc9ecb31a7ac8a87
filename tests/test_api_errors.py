"""Misuse of the public API fails at once, names what is wrong, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from tiny_models import inputs, outputs, tiny

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
