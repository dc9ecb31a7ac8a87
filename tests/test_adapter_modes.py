"""Sampling modes, gradients, gradient checkpointing, bf16 and parameter counts of the adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import inputs, outputs, tiny
from transformers import LlamaConfig, LlamaForCausalLM

import bayeslora
from bayeslora import BayesLoraConfig, BayesLoraLinear


def llama_model(seed=0, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                  sigma_u_init=0.05, lambda_init=0.02, init_lora_weights=False)
    kwargs.update(overrides)
    return bayeslora.get_model(tiny("llama", seed), BayesLoraConfig(**kwargs))


def test_sample_mode_draws_fresh_and_mean_mode_is_deterministic():
    model = llama_model()
    batch = inputs()
    with torch.no_grad():
        a, b = outputs(model, batch), outputs(model, batch)
        assert not torch.allclose(a, b)
        torch.manual_seed(3)
        c = outputs(model, batch)
        torch.manual_seed(3)
        assert torch.equal(c, outputs(model, batch))
        with bayeslora.fixed_sample(model, seed=1):
            d, e = outputs(model, batch), outputs(model, batch)
        assert torch.equal(d, e)
        with bayeslora.fixed_sample(model, seed=1):
            assert torch.equal(d, outputs(model, batch))
        with bayeslora.using_mode(model, "mean"):
            f, g = outputs(model, batch), outputs(model, batch)
        assert torch.equal(f, g)
        assert not torch.allclose(outputs(model, batch), f)  # back in sample mode


def test_sampling_ignores_train_and_eval():
    model = llama_model()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(outputs(model, inputs()), outputs(model, inputs()))


def test_mean_mode_equals_average_of_many_samples():
    """E_q[A] of a flow posterior vs 20k draws, within 4 standard errors of the difference."""
    model = llama_model(sigma_u_init=0.1, flow_depth=1)
    layer = next(m for m in model.modules() if isinstance(m, BayesLoraLinear) and m.lora_bayes)
    sampler = bayeslora.get_sampler(model)
    n_draws, mean_draws = 20_000, layer.bayes_settings["default"]["mean_samples"]
    with torch.no_grad():
        sampler.set_mode("sample", n_draws)
        torch.manual_seed(0)
        sampler.draw()
        drawn = layer._bayes_draws["default"]["A"]
        mean = layer.mean_weights("default")["A"]
    # the mean-mode average is itself a Monte Carlo estimate over `mean_draws` flow evaluations
    se = drawn.std(0) * math.sqrt(1 / n_draws + 1 / mean_draws)
    assert ((drawn.mean(0) - mean).abs() <= 4 * se).all()


def test_mean_mode_output_follows_optimizer_steps():
    model = llama_model()
    bayeslora.set_mode(model, "mean")
    batch = inputs()
    with torch.no_grad():
        before = outputs(model, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outputs(model, batch).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(outputs(model, batch), before)


def test_batched_monte_carlo_equals_sequential_draws():
    """S draws in one S×B forward == S single-draw forwards with the same per-draw seeds."""
    model = llama_model()
    batch = inputs(batch=3)
    seeds = [11, 12, 13, 14]
    stacked = {k: v.repeat(len(seeds), 1) for k, v in batch.items()}  # sample-major S×B rows
    with torch.no_grad():
        bayeslora.set_mode(model, "sample", num_samples=len(seeds))
        bayeslora.set_draw_seeds(model, seeds)
        batched = outputs(model, stacked).view(len(seeds), 3, -1)
        bayeslora.set_mode(model, "sample", num_samples=1)
        for s, seed in enumerate(seeds):
            bayeslora.set_draw_seeds(model, [seed])
            assert torch.allclose(batched[s], outputs(model, batch).view(3, -1), atol=1e-5)
        assert not torch.allclose(batched[0], batched[1])


def test_seeded_draws_ignore_the_global_rng():
    model = llama_model()
    bayeslora.set_draw_seed(model, 7)
    with torch.no_grad():
        torch.manual_seed(1)
        a = outputs(model, inputs())
        torch.manual_seed(2)
        b = outputs(model, inputs())
    assert torch.equal(a, b)


def test_a_model_on_one_device_keeps_its_streams_and_a_split_model_gets_one_per_device(monkeypatch):
    """Seeded streams hash the device type, not its index (data-parallel ranks agree); a model split over
    devices in one process (``device_map``) adds the device's place, so cuda:0's and cuda:1's same-shaped
    groups do not draw the same noise. Place 0 is the stream every earlier release used."""
    import zlib

    from bayeslora.surgery.sampler import PosteriorSampler

    model = llama_model()
    sampler = bayeslora.get_sampler(model)
    places = []
    original = sampler._generators
    monkeypatch.setattr(sampler, "_generators", lambda key, twin=False, place=0: places.append(place) or
                        original(key, twin, place))
    bayeslora.set_draw_seed(model, 7)
    with torch.no_grad():
        outputs(model, inputs())
    assert places and set(places) == {0}  # one device: every group at place 0
    key = next(iter(sampler.groups(sampler.active_factors())))
    shape, dtype = key[0], key[1]
    assert PosteriorSampler.group_stream(key) == zlib.crc32(f"{shape.key()}|{dtype}|cpu".encode())
    rank0, rank1 = ((shape, dtype, torch.device("cuda", i)) + key[3:] for i in (0, 1))
    assert PosteriorSampler.group_stream(rank1) == PosteriorSampler.group_stream(rank0)  # rank r == rank 0
    assert len({PosteriorSampler.group_stream(key, place=p) for p in range(3)}) == 3
    assert PosteriorSampler.group_stream(key, twin=True) != PosteriorSampler.group_stream(key)


def test_groups_on_two_devices_take_places_in_the_order_first_seen(monkeypatch):
    """How ``_draw_groups`` numbers devices, on the CPU: the groups' keys are relabelled as if the model were
    split over cuda:3 (seen first) and cuda:2, and the generators it asks for are recorded."""
    model = llama_model()
    sampler = bayeslora.get_sampler(model)
    groups = sampler.groups(sampler.active_factors())
    assert len(groups) >= 2
    relabelled = {}
    for i, (key, refs) in enumerate(groups.items()):
        fake = torch.device("cuda", 3 if i == 0 else 2)
        relabelled[key[:2] + (fake,) + key[3:]] = refs
    asked = []
    monkeypatch.setattr(sampler, "_generators",
                        lambda key, twin=False, place=0: asked.append((str(key[2]), place)) or None)
    sampler.num_samples = 1
    with torch.no_grad():
        sampler._draw_groups(relabelled, None)
    assert sorted(set(asked)) == [("cuda:2", 1), ("cuda:3", 0)]  # not the device index, not all 0


def test_every_trainable_parameter_gets_gradients_and_inducing_locations_move():
    model = llama_model(flow_depth=1)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kinds = ["inducing_mean", "inducing_rho", "z_rows", "z_cols", "delta_rows", "delta_cols", "lambda_raw",
             "flow", "lora_A", "lora_B"]
    assert all(any(k in n for n in params) for k in kinds)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    batch = inputs()
    for step in range(2):
        before = {n: p.detach().clone() for n, p in params.items() if "z_" in n or "delta_" in n}
        opt.zero_grad()
        logits = outputs(model, batch)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch["input_ids"][:, 1:].reshape(-1))
        (nll + 1e-3 * bayeslora.kl_divergence(model)).backward()
        zero = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not zero, f"step {step}: no gradient for {zero}"
        opt.step()
        assert all(not torch.equal(before[n], params[n]) for n in before), f"step {step}: Z or D frozen"


def test_kl_breakdown_reports_flow_and_conditional_parts():
    model = llama_model(lambda_init=0.02)
    outputs(model, inputs())
    rows = bayeslora.kl_breakdown(model)
    assert len(rows) == 4  # 2 layers × (A, B)
    total = sum(r["kl_flow"] + r["kl_cond"] for r in rows)
    assert torch.allclose(total, bayeslora.kl_divergence(model))
    a = next(r for r in rows if r["factor"] == "A")
    numel = 4 * 32
    assert torch.allclose(a["kl_cond"], torch.tensor(numel * (0.02**2 / 2 - math.log(0.02) - 0.5)), rtol=1e-4)
    stats = bayeslora.posterior_stats(model)
    assert all(math.isclose(s["lambda"], 0.02, rel_tol=1e-4) for s in stats)
    assert all(math.isclose(s["sigma_u_mean"], 0.05, rel_tol=1e-4) for s in stats)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bayeslora.BayesLoraLinear)}
    for s in stats:
        layer = next(m for n, m in layers.items() if n.endswith(s["module"]))
        mean = layer.mean_weights(s["adapter"])[s["factor"]]
        assert math.isclose(s["mean_norm"], float(mean.norm()), rel_tol=1e-6)
        d_out, d_in = s["shape"]
        factor = layer.lora_bayes[s["adapter"]][s["factor"]]
        assert math.isclose(s["prior_norm"], factor.shape.prior_scale * math.sqrt(d_out * d_in))
    # E[B] = 0 at PEFT's default init, E[A] is not: the norms tell the factors apart
    assert any(s["mean_norm"] > 0 for s in stats if s["factor"] == "A")


def test_a_prior_at_init_removes_the_pull_of_the_initial_mean_and_is_saved(tmp_path):
    """With ``prior_at_init`` the flow KL's prior term is centred on T(m) at init, so at init (σ_U tiny)
    the KL drops by ½‖T(m)‖² per factor; the centre is saved with the adapter, and only then."""
    kl, centres = {}, {}
    for on in (False, True):
        model = llama_model(sigma_u_init=1e-4, prior_at_init=on)
        outputs(model, inputs())
        kl[on] = {(r["module"], r["factor"]): float(r["kl_flow"]) for r in bayeslora.kl_breakdown(model)}
        refs = bayeslora.get_sampler(model).all_factors()
        assert any(k.endswith("prior_mean") for k in model.state_dict()) == on
        if on:
            centres = {(r.name, r.which): r.factor.prior_mean.clone() for r in refs}
            model.save_pretrained(tmp_path / "adapter")
    assert centres and centres.keys() == kl[True].keys()
    for key, centre in centres.items():
        want = 0.5 * float(centre.square().sum())
        assert want > 1.0 and kl[False][key] - kl[True][key] == pytest.approx(want, rel=0.02), key
    reloaded = bayeslora.load(tiny("llama", 0), tmp_path / "adapter")
    for r in bayeslora.get_sampler(reloaded).all_factors():
        torch.testing.assert_close(r.factor.prior_mean, centres[(r.name, r.which)])


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = llama_model(seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
            assert model.base_model.model.model.layers[0].gradient_checkpointing
        model.train()
        torch.manual_seed(5)
        logits = outputs(model, inputs())
        (logits.square().mean() + 1e-3 * bayeslora.kl_divergence(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_reentrant_checkpointing_is_refused_with_a_clear_error():
    model = llama_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(ValueError, match="use_reentrant"):
        outputs(model, inputs())
    with torch.no_grad():  # inference does not checkpoint, so it still runs
        outputs(model, inputs())


def test_reentrant_checkpointing_enabled_after_a_forward_is_still_refused():
    model = llama_model()
    model.train()
    outputs(model, inputs())  # the sampler has walked and cached the model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        outputs(model, inputs())


def test_the_walk_over_the_model_is_cached_until_its_structure_changes(monkeypatch):
    model = llama_model()
    sampler = bayeslora.get_sampler(model)
    walks = []
    original = type(sampler.root).named_modules
    monkeypatch.setattr(type(sampler.root), "named_modules",
                        lambda self, *a, **k: (walks.append(1), original(self, *a, **k))[1])
    with torch.no_grad():
        outputs(model, inputs())
        outputs(model, inputs())
        outputs(model, inputs())
    assert len(walks) <= 1  # at most the first forward walks
    before = len(sampler.layers())
    model.add_adapter("second", BayesLoraConfig(r=4, target_modules=["k_proj"], bayesian_modules=["k_proj"]))
    bayeslora.set_mode(model, "mean")
    layers = sampler.layers()  # the new k_proj layers were found and took the model's mode
    assert len(layers) > before and all(layer.bayes_mode == "mean" for _, layer in layers)


def test_a_kernel_that_fails_to_factorise_raises_at_once_on_cpu_and_at_the_deferred_check_elsewhere():
    model = llama_model()
    factor = next(m for m in model.modules() if isinstance(m, BayesLoraLinear)).lora_bayes["default"]["A"]
    with torch.no_grad():
        factor.z_rows.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match="not positive definite"):
            outputs(model, inputs())  # the CPU checks every factorisation when it happens
        sampler = bayeslora.get_sampler(model)
        sampler.defer_checks, sampler.check_every = True, 3  # what an accelerator does: no host sync per draw
        outputs(model, inputs())
        outputs(model, inputs())
        with pytest.raises(FloatingPointError, match="deferred check"):
            outputs(model, inputs())
        outputs(model, inputs())  # the flag was read and cleared; it accumulates again
        with pytest.raises(FloatingPointError, match="deferred check"):
            sampler.check_posterior()  # what each epoch end calls, on every rank
        bayeslora.set_mode(model, "mean")
        with pytest.raises(FloatingPointError, match="not positive definite"):
            outputs(model, inputs())  # mean mode (and merging) never takes a NaN posterior


def test_a_non_finite_posterior_mean_is_refused_where_factorisation_does_not_check(monkeypatch):
    from bayeslora.core import posterior

    model = llama_model()
    factor = next(m for m in model.modules() if isinstance(m, BayesLoraLinear)).lora_bayes["default"]["B"]
    real = posterior._kernel
    monkeypatch.setattr(posterior, "_kernel", lambda z, d, j, defer=False: real(z, d, j, True))  # as on a GPU
    with torch.no_grad():
        factor.inducing_mean.fill_(float("nan"))
        bayeslora.set_mode(model, "mean")
        with pytest.raises(FloatingPointError, match="posterior mean is not finite"):
            outputs(model, inputs())


def test_bf16_base_model_runs_with_float32_inducing_maths():
    base = tiny("llama", dtype=torch.bfloat16)
    model = bayeslora.get_model(base, BayesLoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      bayesian_modules=["q_proj"], sigma_u_init=0.05))
    layer = next(m for m in model.modules() if isinstance(m, BayesLoraLinear) and m.lora_bayes)
    assert all(p.dtype == torch.float32 for p in layer.lora_bayes.parameters())
    batch = inputs()
    logits = outputs(model, batch)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    (logits.float().square().mean() + bayeslora.kl_divergence(model) * 1e-3).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.lora_bayes.parameters())
    assert layer._bayes_draws["default"]["A"].dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision, as in training
        outputs(model, batch)
    assert layer._bayes_draws["default"]["A"].dtype == torch.float32
    bayeslora.set_mode(model, "mean")
    with torch.no_grad():
        mean = outputs(model, batch)
        merged = model.merge_and_unload()
        merged_out = outputs(merged, batch)
    assert torch.isfinite(mean).all() and torch.isfinite(merged_out).all()
    assert (mean.float() - merged_out.float()).abs().max() < 0.1  # bf16 rounding of the merged weight


def factor_formula(d_o: int, d_i: int, rows: int, cols: int, flow: int) -> int:
    """METHOD.md section 6: R·d_o + C·d_i (Z) + (R + C) (D) + 2RC (m, ρ_U) + 1 (λ) + flow."""
    return rows * d_o + cols * d_i + rows + cols + 2 * rows * cols + 1 + flow


def test_parameter_count_matches_the_formula():
    model = llama_model(flow_depth=1)
    flow = sum(p.numel() for p in next(m for m in model.modules()
                                       if isinstance(m, BayesLoraLinear) and m.lora_bayes)
               .lora_bayes["default"]["A"].flow.parameters())
    assert flow == 1554  # the authors' flow: MADE 9→16, two residual 16→16 blocks, 16→18
    counts = bayeslora.count_parameters(model)
    per_layer = (factor_formula(4, 32, 9, 9, flow) - 4 * 32) + (factor_formula(32, 4, 9, 9, flow) - 32 * 4)
    assert counts["extra"] == 2 * per_layer
    assert counts["trainable"] == counts["plain_lora"] + counts["extra"]
    # q_proj (32→32) and v_proj (32→16: 2 KV heads of 8), 2 layers, at plain-LoRA sizes
    assert counts["plain_lora"] == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))


def test_llama2_7b_overhead_matches_the_paper(capsys):
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = bayeslora.get_model(base, BayesLoraConfig(r=8, lora_alpha=16,
                                                      target_modules=["q_proj", "v_proj", "lm_head"],
                                                      bayesian_modules=["q_proj", "lm_head"]))
    counts = bayeslora.count_parameters(model)
    assert counts["bayesian_factors"] == 66
    assert counts["plain_lora"] == 4_483_072
    flow_term = 66 * 1554
    assert counts["extra"] == 417_502, counts
    with capsys.disabled():
        print(f"\nLlama-2-7B (meta): plain LoRA {counts['plain_lora']:,}, Bayesian-LoRA "
              f"{counts['trainable']:,} (+{counts['extra']:,}; flow term {flow_term:,} = 66 × 1,554, "
              f"the authors' flow, so the paper's +417,502 is reproduced exactly)")


def test_mean_mode_cached_without_grad_still_trains():
    """A mean computed under no_grad (e.g. an eval) must not cut the gradients of the next forward."""
    model = llama_model()
    bayeslora.set_mode(model, "mean")
    with torch.no_grad():
        outputs(model, inputs())
    outputs(model, inputs()).square().mean().backward()
    mean_params = ("inducing_mean", "z_rows", "z_cols", "delta_rows", "delta_cols")  # λ does not enter E[W]
    bayes = [p for n, p in model.named_parameters() if "lora_bayes" in n and n.endswith(mean_params)]
    assert bayes and all(p.grad is not None and p.grad.abs().sum() > 0 for p in bayes)


def test_merge_uses_the_current_parameters():
    model = llama_model()
    bayeslora.set_mode(model, "mean")
    batch = inputs()
    with torch.no_grad():
        before = outputs(model, batch)  # fills the mean cache
        layer = next(m for m in model.modules() if isinstance(m, BayesLoraLinear) and m.lora_bayes)
        factor = layer.lora_bayes["default"]["B"]
        factor.inducing_mean.data = factor.inducing_mean.data + 3.0  # a new tensor: no version bump
        changed = outputs(model, batch)
        assert not torch.allclose(changed, before)  # the cache noticed the new tensor
        merged = model.merge_and_unload()
        assert torch.allclose(outputs(merged, batch), changed, atol=1e-5)


def test_mean_init_std_scales_the_initial_inducing_means_and_nothing_else():
    """The same seed draws the same stream: m is the default's times ``mean_init_std`` (B's stays 0 under
    PEFT's default init), and every other parameter is unchanged."""
    states = [llama_model(init_lora_weights=True, mean_init_std=std).state_dict() for std in (1.0, 3.5)]
    means = [k for k in states[0] if k.endswith("inducing_mean")]
    assert means and states[0].keys() == states[1].keys()
    for key in states[0]:
        want = states[0][key] * 3.5 if key in means else states[0][key]
        torch.testing.assert_close(states[1][key], want, msg=key)
    assert any(states[1][k].abs().sum() > 0 for k in means)
    with pytest.raises(ValueError, match="mean_init_std"):
        BayesLoraConfig(r=4, target_modules=["q_proj"], mean_init_std=0.0)


def test_gradient_checkpointing_on_a_bf16_base_gives_the_same_float32_gradients():
    """A bf16 base with non-reentrant checkpointing: the inducing parameters stay float32, and the
    recomputed blocks read the step's one draw, so the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        config = BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                                 sigma_u_init=0.05, lambda_init=0.02, init_lora_weights=False)
        model = bayeslora.get_model(tiny("llama", 0, dtype=torch.bfloat16), config)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(5)
        logits = outputs(model, inputs())
        assert logits.dtype == torch.bfloat16
        (logits.float().square().mean() + 1e-3 * bayeslora.kl_divergence(model)).backward()
        bayes = {n: p for n, p in model.named_parameters() if "lora_bayes" in n}
        assert bayes and all(p.dtype == torch.float32 and p.grad is not None for p in bayes.values())
        grads.append({n: p.grad.clone() for n, p in bayes.items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("d_in, r", [(64, 8), (384, 8), (576, 4), (2048, 16)])
def test_mean_init_std_lora_starts_the_a_factor_at_peft_s_norm_at_any_width(d_in, r):
    """``mean_init_std="lora"``: |E[A]| at init within 25% of PEFT's kaiming-uniform A norm √(r/3), where
    METHOD.md's m ~ N(0, 1) falls short by a factor that grows with the width."""
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=d_in, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    norms = {}
    for std in (1.0, "lora"):
        torch.manual_seed(0)
        model = bayeslora.get_model(copy.deepcopy(base), BayesLoraConfig(r=r, target_modules=["q_proj"],
                                                                         mean_init_std=std))
        norms[std] = [s["mean_norm"] for s in bayeslora.posterior_stats(model) if s["factor"] == "A"]
    lora = math.sqrt(r / 3)
    assert all(abs(n / lora - 1) < 0.25 for n in norms["lora"]), (norms, lora)
    assert all(n < 0.75 * lora for n in norms[1.0])
    with pytest.raises(ValueError, match="mean_init_std must be > 0 or 'lora'"):
        BayesLoraConfig(r=4, target_modules=["q_proj"], mean_init_std="peft")


@pytest.mark.parametrize("field, value, message", [
    ("prior_std", "0.1", "prior_std must be a finite number, got '0.1'"),
    ("jitter", "x", "jitter must be a finite number"), ("lambda_max", True, "lambda_max must be a finite number"),
    ("sigma_u_init", None, "sigma_u_init must be a finite number"),
    ("prior_std", float("inf"), "prior_std must be a finite number, got inf"),  # NaN draws, swallowed by SDPA
    ("mean_samples", 1, "mean_samples must be an integer >= 2"),  # β = 0/0: NaN merged into the base weights
    ("seed", "a", "seed must be an integer"), ("inducing_rows", True, "inducing_rows must be a positive integer"),
    ("lora_alpha", "16", "lora_alpha must be a number"), ("lora_dropout", 1.0, r"lora_dropout must be a number in \[0, 1\)"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] must be a positive integer"),  # not "r must be"
])
def test_a_field_of_the_wrong_kind_is_a_value_error_naming_it(field, value, message):
    """Each of these failed later (a bare TypeError inside a comparison or a forward, NaN weights) or named
    another field."""
    with pytest.raises(ValueError, match=f"BayesLoraConfig.{message}"):
        BayesLoraConfig(r=4, target_modules=["q_proj"], **{field: value})


# ------------------------------------------------------------------ lora_offset: the posterior centred on a LoRA point
def _offset_layers(model):
    return [m for m in model.modules() if isinstance(m, BayesLoraLinear) and m.lora_bayes]


def test_lora_offset_starts_at_the_base_model_with_peft_s_initial_a():
    base = tiny("llama", 0)
    with torch.no_grad():
        want = outputs(base, inputs())
    model = llama_model(lora_offset=True, init_lora_weights=True, sigma_u_init=1e-3)
    bayeslora.set_mode(model, "mean")
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, inputs()), want, atol=0, rtol=0)
    for layer in _offset_layers(model):
        pair = layer.lora_bayes["default"]
        a, b = pair["A"].offset, pair["B"].offset
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert float(b.abs().max()) == 0.0  # PEFT's B = 0
        bound = 1 / math.sqrt(layer.in_features)  # PEFT's kaiming_uniform(a=√5) bound
        assert 0 < float(a.abs().max()) <= bound and float(a.std()) > bound / 3
        for factor in pair.values():  # the deviation starts at zero, through an identity flow
            assert float(factor.inducing_mean.abs().max()) == 0.0
    stats = [s for s in bayeslora.posterior_stats(model) if s["factor"] == "A"]
    assert stats and all(s["deviation_norm"] < 1e-6 < s["mean_norm"] for s in stats)  # E[A] = W₀ ≠ 0


def test_lora_offset_shifts_every_draw_and_the_mean_by_w0_and_the_kl_does_not_see_it():
    model = llama_model(lora_offset=True, sigma_u_init=0.05, lambda_init=0.02)
    sampler = bayeslora.get_sampler(model)
    layer = _offset_layers(model)[0]
    with torch.no_grad():
        for factor in layer.lora_bayes["default"].values():
            factor.inducing_mean.normal_()
        before = {w: t.clone() for w, t in layer.mean_weights("default", refresh=True).items()}
        torch.manual_seed(5)
        outputs(model, inputs())
        drawn = {w: t.clone() for w, t in layer._bayes_draws["default"].items()}
        kl = [float(r["kl_flow"]) for r in bayeslora.kl_breakdown(model)]
        shift = {}
        for which, factor in layer.lora_bayes["default"].items():
            shift[which] = torch.randn_like(factor.offset)
            factor.offset.add_(shift[which])
        after = layer.mean_weights("default", refresh=True)
        torch.manual_seed(5)
        outputs(model, inputs())
        assert [float(r["kl_flow"]) for r in bayeslora.kl_breakdown(model)] == pytest.approx(kl, rel=1e-6)
    for which in ("A", "B"):
        torch.testing.assert_close(after[which], before[which] + shift[which])
        torch.testing.assert_close(layer._bayes_draws["default"][which], drawn[which] + shift[which])
        layer_name = next(n for n, m in model.named_modules() if m is layer)
        stat = next(s for s in bayeslora.posterior_stats(model) if s["factor"] == which
                    and layer_name.endswith(s["module"]))
        offset = layer.lora_bayes["default"][which].offset
        assert stat["deviation_norm"] == pytest.approx(float((after[which] - offset).norm()), rel=1e-5)
        assert stat["deviation_norm"] == pytest.approx(float((before[which] - offset + shift[which]).norm()), rel=1e-5)
    assert sampler.mode == "sample"


def test_lora_offset_with_a_collapsed_posterior_is_plain_peft_lora():
    """σ_U, λ → 0, no flow, zero deviation: every draw is W₀, so the model is a PEFT LoRA with A = W₀_A,
    B = W₀_B, to float rounding (sample mode, mean mode and merged)."""
    from peft import LoraConfig, get_peft_model

    tiny_value = 1e-8
    model = llama_model(lora_offset=True, init_lora_weights=True, sigma_u_init=tiny_value,
                        sigma_u_max=tiny_value, lambda_init=tiny_value, lambda_max=tiny_value, flow_depth=0,
                        bayesian_modules=None)
    plain = get_peft_model(tiny("llama", 0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    plain_layers = {n: m for n, m in plain.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, BayesLoraLinear) and layer.lora_bayes:
                pair = layer.lora_bayes["default"]
                pair["B"].offset.normal_(std=0.1)  # a trained-looking B, so the adapter is visible
                plain_layers[name].lora_A["default"].weight.copy_(pair["A"].offset)
                plain_layers[name].lora_B["default"].weight.copy_(pair["B"].offset)
        want = outputs(plain, inputs())
        assert not torch.allclose(want, outputs(tiny("llama", 0), inputs()), atol=1e-3)
        torch.testing.assert_close(outputs(model, inputs()), want, atol=1e-5, rtol=1e-5)
        bayeslora.set_mode(model, "mean")
        torch.testing.assert_close(outputs(model, inputs()), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs(model.merge_and_unload(), inputs()), want, atol=1e-5, rtol=1e-5)


def test_lora_offset_trains_saves_and_loads(tmp_path):
    model = llama_model(lora_offset=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = outputs(model, inputs()).square().mean() + 1e-3 * bayeslora.kl_divergence(model)
    loss.backward()
    for layer in _offset_layers(model):
        for factor in layer.lora_bayes["default"].values():
            assert factor.offset.grad is not None and float(factor.offset.grad.abs().sum()) > 0
    opt.step()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = bayeslora.load(tiny("llama", 0), tmp_path / "adapter")
    for m in (model, reloaded):
        bayeslora.set_mode(m, "mean")
    with torch.no_grad():
        torch.testing.assert_close(outputs(reloaded, inputs()), outputs(model, inputs()), atol=0, rtol=0)
    counts = bayeslora.count_parameters(model)
    per_layer = (factor_formula(4, 32, 9, 9, 1554)) + (factor_formula(32, 4, 9, 9, 1554))
    assert counts["extra"] == 2 * per_layer  # the point factors are LoRA's own parameters, not overhead


@pytest.mark.parametrize("offset_first", [True, False])
def test_adapters_with_and_without_a_point_factor_are_drawn_in_separate_groups(offset_first):
    """Two active Bayesian adapters of one shape, one with W₀ and one without: each keeps its own W₀ (or
    none), in mean and sample mode, as when it is the only adapter (a shared group once dropped or refused it)."""
    order = (True, False) if offset_first else (False, True)
    model = llama_model(lora_offset=order[0], target_modules=["q_proj"], bayesian_modules=None, flow_depth=0)
    model.add_adapter("b", BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_offset=order[1],
                                           sigma_u_init=0.05, lambda_init=0.02, init_lora_weights=False,
                                           flow_depth=0))
    layer = _offset_layers(model)[0]
    with torch.no_grad():
        for pair in layer.lora_bayes.values():
            if pair["B"].offset is not None:
                pair["B"].offset.normal_()
        alone = {name: {w: t.clone() for w, t in layer.mean_weights(name, refresh=True).items()}
                 for name in ("default", "b")}
        model.base_model.set_adapter(["default", "b"])
        bayeslora.set_mode(model, "mean")
        outputs(model, inputs())  # the sampler computes both adapters' means, grouped
        for name in ("default", "b"):
            for which in ("A", "B"):
                torch.testing.assert_close(layer._bayes_mean_cache[name][1][which], alone[name][which])
        bayeslora.set_mode(model, "sample")
        outputs(model, inputs())
        assert {k[1] for k in bayeslora.get_sampler(model).last_kl} == {"default", "b"}
        # seeded draws: equal variational parameters must still give the two groups independent noise
        for which in ("A", "B"):
            source, target = layer.lora_bayes["default"][which], layer.lora_bayes["b"][which]
            for (name, p), (_, q) in zip(source.named_parameters(), target.named_parameters()):
                if name != "offset":
                    q.copy_(p)
        bayeslora.set_draw_seed(model, 123)
        outputs(model, inputs())
        deviation = {name: {w: d - (layer.lora_bayes[name][w].offset if layer.lora_bayes[name][w].offset is not None
                                    else 0) for w, d in layer._bayes_draws[name].items()} for name in ("default", "b")}
        for which in ("A", "B"):
            gap = (deviation["default"][which] - deviation["b"][which]).abs().max()
            assert gap > 0.1 * deviation["b"][which].std()
    from bayeslora.core import StackedFactors

    mixed = [layer.lora_bayes["default"]["B"], layer.lora_bayes["b"]["B"]]
    with pytest.raises(ValueError, match="point factor"):
        StackedFactors.of(mixed, torch.float32)


def test_a_point_factor_decays_like_lora_s_factors_and_the_variational_parameters_do_not():
    from bayeslora.methods import get_method

    model = llama_model(lora_offset=True)
    no_decay = get_method("bayeslora").no_decay_parameters(model)
    offsets = {n for n, _ in model.named_parameters() if n.endswith(".offset")}
    assert offsets and not offsets & no_decay
    assert {n for n in no_decay if n.endswith("inducing_mean")} and all("lora_bayes" in n for n in no_decay)
