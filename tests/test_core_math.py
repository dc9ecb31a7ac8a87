"""The maths of one Bayesian factor, checked statistically in float64 (METHOD.md sections 2 and 3)."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.core import (
    FactorShape, InducingFactor, RowFlow, StackedFactors, apply_flows, conditional_kl, draw_group, draw_groups,
    geometry, inverse_softplus, mean_flow_noise, mean_group,
)
from bayeslora.core.posterior import _Gram, _GramAndNoiseProduct, _PlusScaledNoise, _project, _TransposedProduct

N_DRAWS = 50_000


def make_factor(*, flow_depth=0, sigma=1e-3, lam=1e-3, d=0.3, lam_max=None, sigma_max=None, seed=0,
                d_out=5, d_in=7, rows=3, cols=4):
    torch.manual_seed(seed)
    shape = FactorShape(d_out, d_in, rows, cols, flow_depth, 16, 0.1,
                        sigma_max if sigma_max is not None else max(sigma, 0.1),
                        lam_max if lam_max is not None else max(lam, 0.03), 1e-5)
    return InducingFactor(shape, sigma_u_init=sigma, lambda_init=lam, d_init=d).double()


def covariance_within(samples: torch.Tensor, expected_mean: torch.Tensor, expected_cov: torch.Tensor,
                      k: float = 5.0) -> None:
    """Assert sample mean and covariance agree with the expected ones within k standard errors."""
    n = samples.shape[0]
    mean = samples.mean(0)
    se_mean = expected_cov.diagonal().sqrt() / math.sqrt(n)
    assert ((mean - expected_mean).abs() <= k * se_mean + 1e-12).all(), (mean - expected_mean).abs().max()
    centred = samples - expected_mean
    cov = centred.T @ centred / n
    var = expected_cov.diagonal()
    se_cov = ((var[:, None] * var[None, :] + expected_cov.square()) / n).sqrt()
    excess = ((cov - expected_cov).abs() / se_cov).max()
    assert excess < k, f"covariance off by {excess:.2f} standard errors"


def projector(z: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """Zᵀ K⁻¹ Z with K = Z Zᵀ + diag², by a Cholesky solve."""
    k = z @ z.T + torch.diag(diag.square())
    return z.T @ torch.cholesky_solve(z, torch.linalg.cholesky(k))


@pytest.mark.parametrize("position", [0, 1])
def test_matheron_noise_covariance_is_identity_minus_kron_projections(position):
    """For a lone factor, and for the second factor of a group whose first has other Z and D (so a
    factor's draw cannot borrow its neighbour's geometry)."""
    f = make_factor(sigma=1e-30, sigma_max=1.0, lam=1.0, lam_max=1.0)
    other = make_factor(sigma=1e-30, sigma_max=1.0, lam=1.0, lam_max=1.0, d=1.5, seed=9)
    with torch.no_grad():
        f.inducing_mean.zero_()
        other.inducing_mean.zero_()
        p = StackedFactors.of([other, f][1 - position:], torch.float64)
        geo = geometry(p)
        xi = draw_group(p, N_DRAWS, torch.Generator().manual_seed(1)).weights[position] / f.shape.prior_scale
    p_r = projector(p.z_rows[position], geo.diag_rows[position])
    p_c = projector(p.z_cols[position], geo.diag_cols[position])
    expected = torch.eye(35, dtype=torch.float64) - torch.kron(p_r, p_c)
    covariance_within(xi.reshape(N_DRAWS, -1), torch.zeros(35, dtype=torch.float64), expected)


def test_posterior_equal_to_prior_gives_prior_weights():
    f = make_factor(sigma=1.0, sigma_max=1.0, lam=1.0, lam_max=1.0)
    with torch.no_grad():
        f.inducing_mean.zero_()
        w = draw_group(StackedFactors.of([f], torch.float64), N_DRAWS, torch.Generator().manual_seed(2))
    expected = f.shape.prior_scale**2 * torch.eye(35, dtype=torch.float64)
    covariance_within(w.weights[0].reshape(N_DRAWS, -1), torch.zeros(35, dtype=torch.float64), expected)


def test_flow_kl_without_flow_averages_to_gaussian_kl():
    f = make_factor(sigma=0.5, sigma_max=1.0)
    with torch.no_grad():
        p = StackedFactors.of([f], torch.float64)
        g = torch.Generator().manual_seed(3)
        # 500 batches of 100 draws: each value is the library's estimate averaged over its 100 draws
        batches = torch.stack([draw_group(p, 100, g).kl_flow[0] for _ in range(N_DRAWS // 100)])
    m, s = p.mean[0], p.sigma[0]
    analytic = 0.5 * (s.square() + m.square() - 1 - 2 * s.log()).sum()
    se = batches.std() / math.sqrt(batches.numel())
    assert (batches.mean() - analytic).abs() < 5 * se, (batches.mean(), analytic, se)


def test_flow_log_determinant_equals_autograd_jacobian():
    torch.manual_seed(4)
    flow = RowFlow(features=6, depth=2, hidden=16).double()
    with torch.no_grad():  # move away from the near-identity initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, dtype=torch.float64)
    _, ladj = flow(x)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x)
    assert torch.allclose(ladj, torch.linalg.slogdet(jac).logabsdet, atol=1e-10)
    assert jac.triu(1).abs().sum() > 0 or jac.tril(-1).abs().sum() > 0  # a real, non-diagonal flow


@pytest.mark.parametrize("group_size", [1, 3])
def test_sampling_takes_one_conditioner_pass_per_flow_layer(group_size):
    depth = 2
    factors = [make_factor(flow_depth=depth, d_out=4, d_in=9, rows=9, cols=9, seed=i) for i in range(group_size)]
    calls = []
    for f in factors:
        for t in f.flow.transforms:
            t.hyper.register_forward_hook(lambda *a: calls.append(1))
    draw_group(StackedFactors.of(factors, torch.float64), 4)
    assert len(calls) == depth  # IAF direction: not C=9 sequential passes per layer


def test_batched_flows_equal_per_factor_flows():
    factors = [make_factor(flow_depth=1, seed=i) for i in range(3)]
    u0 = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    u, ladj = apply_flows([f.flow for f in factors], u0)
    for i, f in enumerate(factors):
        ui, li = f.flow(u0[i])
        assert torch.allclose(u[i], ui) and torch.allclose(ladj[i], li)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_hand_batched_flow_equals_vmap_over_zuko_and_falls_back_when_it_would_not(depth, monkeypatch):
    from bayeslora.core import flow as flow_module

    factors = [make_factor(flow_depth=depth, seed=i) for i in range(3)]
    with torch.no_grad():
        for f in factors:  # far from the identity, so every conditioner weight matters
            for p in f.flow.parameters():
                p.normal_(0, 0.3)
    flows, u0 = [f.flow for f in factors], torch.randn(3, 2, 3, 4, dtype=torch.float64)
    batched, vmapped = flow_module._batched_flows(flows, u0), flow_module._vmap_flows(flows, u0)
    # the same products in another kernel order: equal to float64 rounding (bit-equal in the float32 case tried)
    assert torch.allclose(batched[0], vmapped[0], rtol=1e-12, atol=1e-13)
    assert torch.allclose(batched[1], vmapped[1], rtol=1e-12, atol=1e-13)
    grads = [torch.autograd.grad(out[0].sum() + out[1].sum(), flows[1].transforms[0].hyper[0].weight)[0]
             for out in (flow_module._batched_flows(flows, u0), flow_module._vmap_flows(flows, u0))]
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)

    monkeypatch.setattr(flow_module, "_BATCHED_OK", {})  # a zuko whose internals changed: caught once, vmap used
    monkeypatch.setattr(flow_module, "_batched_flows", lambda fl, u: (u + 1, u.new_zeros(u.shape[:-1])))
    with pytest.warns(UserWarning, match="batched flow disagrees"):
        u, ladj = apply_flows(flows, u0)
    assert torch.equal(u, vmapped[0])


@pytest.mark.parametrize("d_out, d_in", [(2, 7), (5, 3), (2, 3), (40, 50)])
def test_float32_draws_stay_linear_in_the_spread_for_narrow_and_wide_factors(d_out, d_in):
    """Without a flow, W − E[W] is linear in (σ_U, λ). A factor narrower than its inducing matrix (a LoRA
    rank below R or C) has a nearly singular K = ZZᵀ + D²; the projection must not amplify rounding."""
    f = make_factor(d_out=d_out, d_in=d_in, rows=3, cols=4, sigma=0.01, lam=0.01, d=1e-3).float()
    with torch.no_grad():
        p = StackedFactors.of([f], torch.float32)
        mean = mean_group(p, 16, 0)[0]
        base = draw_group(p, 4, torch.Generator().manual_seed(3)).weights[0] - mean
        wide = draw_group(p.widened(3.0), 4, torch.Generator().manual_seed(3)).weights[0] - mean
    # float32 with D = 1e-3 leaves ~1e-4 of the deviation's scale (the pre-change T form did the same);
    # solving on the R×C matrix of a narrow factor left 5e-3
    assert (wide - 3.0 * base).abs().max() <= 1e-3 * base.abs().max()


@pytest.mark.parametrize("d_out, d_in, rows, cols", [
    (2, 3, 3, 4),    # both sides narrow: both T formed
    (40, 3, 3, 4),   # wide rows only
    (2, 50, 3, 4),   # wide columns only
    (40, 50, 3, 4),  # both wide, (R×d_i) first is cheaper
    (5, 50, 4, 3),   # both wide, (d_o×C) first is cheaper
    (9, 9, 9, 9),    # d = R: both narrow, at the boundary
])
def test_projection_in_any_order_equals_t_rows_x_t_cols(d_out, d_in, rows, cols):
    """However :func:`_project` orders its products, it computes scale · T_r X T_c, and its gradients
    (through the custom Z Zᵀ backward too) are autograd's of the explicit formula."""
    f = make_factor(d_out=d_out, d_in=d_in, rows=rows, cols=cols)
    x = torch.randn(1, 2, rows, cols, dtype=torch.float64)

    def projected(explicit: bool):
        for t in f.parameters():
            t.grad = None
        p = StackedFactors.of([f], torch.float64)
        geo = geometry(p)
        if explicit:
            out = 0.7 * geo.proj_rows.unsqueeze(1) @ x @ geo.proj_cols.unsqueeze(1)
        else:
            out = _project(x, p.z_rows.unsqueeze(1), p.z_cols.unsqueeze(1), geo.chol_rows.unsqueeze(1),
                           geo.chol_cols.unsqueeze(1), 0.7)
        out.sin().sum().backward()
        return out.detach(), [t.grad.clone() for t in (f.z_rows, f.z_cols, f.delta_rows, f.delta_cols)]

    (ours, our_grads), (theirs, their_grads) = projected(False), projected(True)
    assert ours.shape == (1, 2, d_out, d_in)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def _groups_of_one_core(flow_depth: int):
    """Three groups sharing R = C = 3 as a model's A (r×d_i), B (d_o×r, with W₀) and a wide factor do: a narrow
    row side, a narrow column side, both sides wide; trained-looking (random) parameters and prior means."""
    spec = [(2, dict(d_out=2, d_in=11)), (1, dict(d_out=13, d_in=2)), (2, dict(d_out=17, d_in=5))]
    groups, seed = [], 0
    for count, dims in spec:
        factors = []
        for _ in range(count):
            f = make_factor(flow_depth=flow_depth, rows=3, cols=3, seed=seed, sigma=0.3, lam=0.5, **dims)
            seed += 1
            with torch.no_grad():
                for q in f.parameters():
                    q.add_(0.2 * torch.randn_like(q))
                f.prior_mean.copy_(0.3 * torch.randn_like(f.prior_mean))
            if dims["d_in"] == 2:  # a W₀ group beside groups without one
                f.offset = torch.nn.Parameter(torch.randn(dims["d_out"], dims["d_in"], dtype=torch.float64))
            factors.append(f)
        groups.append(factors)
    return groups


@pytest.mark.parametrize("flow_depth", [0, 1])
def test_drawing_groups_together_equals_drawing_each_alone(flow_depth):
    factor_groups = _groups_of_one_core(flow_depth)
    params = [q for fs in factor_groups for f in fs for q in f.parameters()]

    def drawn(together: bool):
        for q in params:
            q.grad = None
        stacked = [StackedFactors.of(fs, torch.float64) for fs in factor_groups]
        gens = [[torch.Generator().manual_seed(10 * k + i) for i in range(3)] for k in range(len(stacked))]
        out = (draw_groups(stacked, 3, gens) if together
               else [draw_group(p, 3, g) for p, g in zip(stacked, gens)])
        loss = sum((o.weights.sin().sum() + o.kl_flow.square().sum()) for o in out)
        loss.backward()
        return [(o.weights.detach(), o.kl_flow.detach()) for o in out], [q.grad.clone() for q in params]

    (ours, our_grads), (alone, alone_grads) = drawn(True), drawn(False)
    for (w, kl), (w_alone, kl_alone), fs in zip(ours, alone, factor_groups):
        assert w.shape == (len(fs), 3, fs[0].shape.d_out, fs[0].shape.d_in)
        torch.testing.assert_close(w, w_alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kl, kl_alone, rtol=1e-10, atol=1e-10)
    assert all((w[:, 0] - w[:, 1]).abs().max() > 1e-3 for w, _ in ours)  # random draws, not a constant
    for a, b in zip(our_grads, alone_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_drawing_groups_together_reads_the_global_rng_group_by_group():
    """Without generators each group's noise is the next ``randn`` of torch's global RNG, in order, as when
    the groups are drawn one after another."""
    stacked = [StackedFactors.of(fs, torch.float64) for fs in _groups_of_one_core(1)]
    with torch.no_grad():
        torch.manual_seed(3)
        ours = draw_groups(stacked, 2)
        torch.manual_seed(3)
        alone = [draw_group(p, 2) for p in stacked]
    for a, b in zip(ours, alone):
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad_side", ["z_rows", "z_cols"])
def test_a_kernel_that_fails_in_any_group_of_a_call_raises_or_flags_every_group(bad_side):
    factor_groups = _groups_of_one_core(0)
    with torch.no_grad():
        getattr(factor_groups[1][0], bad_side).fill_(float("nan"))
        stacked = [StackedFactors.of(fs, torch.float64) for fs in factor_groups]
        with pytest.raises(FloatingPointError, match="not positive definite"):
            draw_groups(stacked, 1)
        flags = [d.failed for d in draw_groups(stacked, 1, defer_check=True)]
        assert all(bool(f) for f in flags)
        fine = [StackedFactors.of(fs, torch.float64) for fs in _groups_of_one_core(0)]
        assert not any(bool(d.failed) for d in draw_groups(fine, 1, defer_check=True))


def test_drawing_groups_together_refuses_groups_of_other_cores():
    a = make_factor(rows=3, cols=3, d_out=5, d_in=7)
    b = make_factor(rows=4, cols=3, d_out=5, d_in=7, seed=1)
    with pytest.raises(ValueError, match="do not share an R×C core"):
        draw_groups([StackedFactors.of([a], torch.float64), StackedFactors.of([b], torch.float64)], 1)
    with pytest.raises(ValueError, match="2 generators for 1 groups"):
        draw_groups([StackedFactors.of([a], torch.float64)], 1, [None, None])


def test_gram_backward_is_autograds():
    z = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Gram.apply, (z,))


def test_gram_and_noise_product_backward_is_autograds():
    z = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    e1 = torch.randn(2, 4, 11, 5, dtype=torch.float64)  # 4 draws: Z's gradient sums over them
    assert torch.autograd.gradcheck(lambda z: _GramAndNoiseProduct.apply(z, e1), (z,))
    gram, product = _GramAndNoiseProduct.apply(z, e1)
    torch.testing.assert_close(gram, z @ z.transpose(-1, -2))
    torch.testing.assert_close(product, z.unsqueeze(1) @ e1)


@pytest.mark.parametrize("z_shape, x_shape", [((2, 3, 11), (2, 3, 4)), ((2, 1, 3, 11), (2, 4, 3, 5))])
def test_transposed_product_backward_is_autograds_and_keeps_z_layout(z_shape, x_shape):
    z = torch.randn(*z_shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_TransposedProduct.apply, (z, x))
    out = _TransposedProduct.apply(z, x)
    torch.testing.assert_close(out, z.transpose(-1, -2) @ x)
    out.sum().backward()
    assert z.grad.shape == z.shape and z.grad.is_contiguous()


def test_scaled_noise_backward_is_autograds():
    p = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.rand(2, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    # P is summed into in place (a fresh intermediate in the draw), so each call gets a copy of the leaf
    assert torch.autograd.gradcheck(lambda p, c, e: _PlusScaledNoise.apply(p.clone(), c, e), (p, c, e))
    torch.testing.assert_close(_PlusScaledNoise.apply(p.clone(), c, e), p + c * e)


def test_conditional_kl_closed_form_matches_gaussian_kl():
    lam = torch.tensor(0.02, dtype=torch.float64)
    numel = 35
    closed = numel * (lam**2 / 2 - lam.log() - 0.5)
    sigma_p = 0.3  # any prior scale: the KL of N(0, σ²λ²) to N(0, σ²) does not depend on σ
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(0.0, sigma_p * lam), torch.distributions.Normal(0.0, sigma_p)
    ) * numel
    assert torch.allclose(conditional_kl(lam, numel), closed)
    assert torch.allclose(conditional_kl(lam, numel), reference)
    assert conditional_kl(torch.tensor(1.0), numel) == 0  # zero when q = p


def test_mean_without_flow_is_exact_and_matches_draw_average():
    f = make_factor(sigma=0.1, sigma_max=0.1, lam=0.03)
    with torch.no_grad():
        p = StackedFactors.of([f], torch.float64)
        w = draw_group(p, 20_000, torch.Generator().manual_seed(5)).weights[0]
        mean = mean_group(p, 4096, 0)[0]  # no flow: exact, the Monte-Carlo settings are unused
    se = w.std(0) / math.sqrt(w.shape[0])
    assert ((w.mean(0) - mean).abs() <= 4 * se).all()


@pytest.mark.parametrize("log_scale_bias", [0.0, -4.0, 1.0])
def test_mean_with_a_flow_beats_the_plain_flow_average(log_scale_bias):
    """The control-variate mean (U0, with estimated β) is closer to a 2^20-draw reference than the plain
    average of the same 4096 draws, also for flows that shrink or stretch their input."""
    f = make_factor(flow_depth=1, sigma=1.0, sigma_max=1.0, rows=9, cols=9, d_out=4, d_in=32)
    with torch.no_grad():
        f.flow.transforms[0].hyper[-1].bias[1::2] = log_scale_bias
        f.flow.transforms[0].hyper[-1].weight.normal_(0, 0.1)
        p = StackedFactors.of([f], torch.float64)
        reference = mean_group(p, 1 << 18, 123)
        plain_err, cv_err = 0.0, 0.0
        for seed in range(4):
            eps = mean_flow_noise(p.shape, 4096, seed, p.mean).expand(1, 4096, 9, 9)
            u_w, _ = apply_flows([f.flow], p.mean.unsqueeze(1) + p.sigma.unsqueeze(1) * eps)
            geo = geometry(p)
            plain = p.shape.prior_scale * (geo.proj_rows @ (geo.chol_rows @ u_w.mean(1)
                                           @ geo.chol_cols.transpose(-1, -2) @ geo.proj_cols))
            plain_err += (plain - reference).square().mean().item()
            cv_err += (mean_group(p, 4096, seed) - reference).square().mean().item()
    assert cv_err < plain_err / 1.5  # measured: ~2x (shrinking flow) to >10x better


def test_mean_of_an_identity_flow_is_the_inducing_mean_exactly():
    f = make_factor(flow_depth=1, sigma=0.5, sigma_max=1.0)
    with torch.no_grad():
        for transform in f.flow.transforms:
            transform.hyper[-1].weight.zero_()
            transform.hyper[-1].bias.zero_()
        f.inducing_mean.zero_()
        p = StackedFactors.of([f], torch.float64)
        assert torch.equal(mean_group(p, 4096, 0), torch.zeros_like(mean_group(p, 4096, 0)))


def test_mean_flow_noise_is_device_independent_and_seeded():
    shape = make_factor().shape
    like = torch.zeros((), dtype=torch.float32)
    a = mean_flow_noise(shape, 16, 7, like)
    b = mean_flow_noise(shape, 16, 7, like)
    c = mean_flow_noise(shape, 16, 8, like)
    assert a.shape == (16, 3, 4) and torch.equal(a, b) and not torch.equal(a, c)


def test_inverse_softplus_round_trip():
    for y in (1e-8, 1e-3, 0.3, 5.0):
        assert math.isclose(torch.nn.functional.softplus(torch.tensor(inverse_softplus(y),
                                                                         dtype=torch.float64)).item(),
                            y, rel_tol=1e-9)
