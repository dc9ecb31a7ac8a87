"""Sampling, mean and KL of many same-shaped Bayesian factors at once (METHOD.md sections 2 to 4).

Everything here works on a *group*: G factors with one :class:`FactorShape`, their parameters stacked
along a leading dimension, so a model's whole posterior is drawn with a handful of batched kernels
(batched Cholesky, solves, one flow call) rather than many tiny per-factor ones. The inducing maths
runs in ``dtype`` (float32 or float64) whatever the dtype of the base model. No host synchronisation
happens on the sampling path.

Notation per factor: K_r = Z_r Z_rᵀ + D_r², K_c = Z_c Z_cᵀ + D_c² (jitter folded into D),
L = chol(K), T_r = Z_rᵀ K_r⁻¹ (d_o×R), T_c = K_c⁻¹ Z_c (C×d_i).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn.functional import softplus

from .factor import FactorShape, InducingFactor
from .flow import apply_flows
from .kl import conditional_kl, flow_kl_sample

__all__ = ["Geometry", "GroupDraw", "StackedFactors", "core_key", "draw_group", "draw_groups", "mean_group",
           "mean_flow_noise"]


@dataclass
class StackedFactors:
    """The parameters of G same-shaped factors, stacked and cast to the inducing dtype."""

    shape: FactorShape
    factors: list[InducingFactor]
    mean: Tensor  # (G, R, C)
    sigma: Tensor  # (G, R, C)
    z_rows: Tensor  # (G, R, d_o)
    z_cols: Tensor  # (G, C, d_i)
    d_rows: Tensor  # (G, R)  softplus(δ_r), before jitter
    d_cols: Tensor  # (G, C)
    lam: Tensor  # (G,)
    prior_mean: Tensor  # (G, R, C)  the prior's mean of U_w (zero unless prior_at_init)
    offset: Optional[Tensor] = None  # (G, d_o, d_i)  the point-estimated centre W₀ (lora_offset), or None

    @classmethod
    def of(cls, factors: list[InducingFactor], dtype: torch.dtype) -> "StackedFactors":
        def stack(name: str) -> Tensor:  # a lone factor is a view: no copy forward, none backward
            if len(factors) == 1:
                return getattr(factors[0], name).unsqueeze(0).to(dtype)
            return torch.stack([getattr(f, name) for f in factors]).to(dtype)

        shape = factors[0].shape
        if len({f.offset is None for f in factors}) > 1:
            raise ValueError("factors with and without a point factor W₀ (lora_offset) cannot be stacked in one group")
        return cls(
            shape=shape,
            factors=factors,
            mean=stack("inducing_mean"),
            sigma=softplus(stack("inducing_rho")).clamp(max=shape.sigma_u_max),
            z_rows=stack("z_rows"),
            z_cols=stack("z_cols"),
            d_rows=softplus(stack("delta_rows")),
            d_cols=softplus(stack("delta_cols")),
            lam=softplus(stack("lambda_raw").reshape(len(factors))).clamp(max=shape.lambda_max),
            prior_mean=stack("prior_mean"),
            offset=None if factors[0].offset is None else stack("offset"),
        )

    def widened(self, scale: float) -> "StackedFactors":
        """The same posterior with its spread multiplied by ``scale``: σ_U → τσ_U and λ → τλ.

        The means, the geometry, the flow and any point factor W₀ stay as trained, so τ = 1 is the trained
        posterior and τ → 0 collapses every draw onto W₀ plus the flow's image of m. Used post hoc (``bayeslora calibrate
        --calibration posterior-scale``), with τ chosen on held-back data, like Laplace-LoRA's prior
        precision; the training clamps apply before the scale, so a widened posterior may pass them.
        """
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"posterior scale must be a positive finite number, got {scale!r}")
        if scale == 1:
            return self
        return dataclasses.replace(self, sigma=self.sigma * scale, lam=self.lam * scale)


@dataclass
class Geometry:
    """Cholesky factors and projections derived from Z and D (one set per factor in the group)."""

    chol_rows: Tensor  # (G, R, R)
    chol_cols: Tensor  # (G, C, C)
    proj_rows: Tensor  # T_r (G, d_o, R)
    proj_cols: Tensor  # T_c (G, C, d_i)
    diag_rows: Tensor  # D_r with jitter folded in, (G, R)
    diag_cols: Tensor  # (G, C)


NOT_POSITIVE_DEFINITE = ("inducing kernel K = Z Zᵀ + D² is not positive definite (non-finite parameters?); "
                         "check the learning rate or raise `jitter`")


class _Gram(torch.autograd.Function):
    """Z Zᵀ with a one-product backward, (G + Gᵀ) Z, where autograd's own takes two products of
    Z's size and a sum: on a 32k-row lm_head B factor Z is the largest tensor of the draw."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z @ z.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ z


class _GramAndNoiseProduct(torch.autograd.Function):
    """(Z Zᵀ, Z e1) for Z (G, R, d) and noise e1 (G, n, d, k), with Z's gradient built in one (G, R, d) buffer:
    (G + Gᵀ) Z, then each draw's g e1ᵀ added in place. Autograd's own would give Z three gradients of its
    size (the two products' and their sum), fresh memory each; on a 32k-row lm_head B factor those
    passes were a measurable part of the draw (benchmarks/draw_time.py)."""

    @staticmethod
    def forward(ctx, z: Tensor, e1: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(z, e1)
        return z @ z.transpose(-1, -2), z.unsqueeze(1) @ e1

    @staticmethod
    def backward(ctx, grad_gram: Tensor, grad_product: Tensor):
        z, e1 = ctx.saved_tensors
        grad_z = (grad_gram + grad_gram.transpose(-1, -2)) @ z
        for i in range(e1.shape[1]):
            grad_z.baddbmm_(grad_product[:, i], e1[:, i].transpose(-1, -2))
        return grad_z, None


class _TransposedProduct(torch.autograd.Function):
    """Zᵀ X for Z (..., R, d) and X (..., R, k), whose backward returns Z's gradient X Gᵀ in Z's own (R, d)
    layout. Autograd's returns it as a transposed (d, R) view, which every later sum and the final
    accumulation then copies with a strided pass over Z's size."""

    @staticmethod
    def forward(ctx, z: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(z, x)
        return z.transpose(-1, -2) @ x

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, x = ctx.saved_tensors
        grad_z = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_z = x @ grad.transpose(-1, -2)
            if grad_z.shape != z.shape:  # Z broadcast over the draws
                grad_z = grad_z.sum_to_size(z.shape)
        if ctx.needs_input_grad[1]:
            grad_x = z @ grad
            if grad_x.shape != x.shape:
                grad_x = grad_x.sum_to_size(x.shape)
        return grad_z, grad_x


class _PlusScaledNoise(torch.autograd.Function):
    """P + c·e for a per-factor scale c (G, 1, 1, 1) and fixed noise e (G, n, d_o, d_i): one pass forward,
    and c's gradient Σ g·e as one dot product per draw, where ``addcmul``'s backward takes three passes
    over e's size (on a 32k-row lm_head B factor, e is the draw's largest tensor). P is updated in place
    (``mark_dirty``), so the sum takes no fresh memory of P's size: callers pass a P nothing else keeps
    (autograd's version check would raise, not mis-differentiate, if something saved it)."""

    @staticmethod
    def forward(ctx, p: Tensor, c: Tensor, e: Tensor) -> Tensor:
        ctx.save_for_backward(c, e)
        ctx.mark_dirty(p)
        return p.addcmul_(c, e)

    @staticmethod
    def backward(ctx, grad: Tensor):
        c, e = ctx.saved_tensors
        grad_c = None
        if ctx.needs_input_grad[1]:
            g, n = e.shape[:2]
            dots = grad.reshape(g * n, 1, -1) @ e.reshape(g * n, -1, 1)  # (G·n, 1, 1)
            grad_c = dots.reshape(g, n).sum(1).reshape(c.shape)
        grad_e = grad * c if ctx.needs_input_grad[2] else None
        return grad, grad_c, grad_e


def _kernel(z: Optional[Tensor], diag: Tensor, jitter: float, defer: bool = False,
            gram: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K = Z Zᵀ + D² + jitter·mean(diag K)·I, its Cholesky factor, the jittered D, and whether any
    factorisation failed (a 0-d bool tensor). On the CPU a failure raises at once unless ``defer``; on
    accelerators it never does here (that would sync the host): the caller checks the flag when it
    chooses (:meth:`PosteriorSampler.check_posterior`). ``gram``: Z Zᵀ when the caller has formed it (then ``z``
    is not read and may be None)."""
    gram = _Gram.apply(z) if gram is None else gram
    d2 = diag.square()
    jit = jitter * (gram.diagonal(dim1=-2, dim2=-1) + d2).mean(-1, keepdim=True)
    d2 = d2 + jit
    kernel = gram + torch.diag_embed(d2)
    chol, info = torch.linalg.cholesky_ex(kernel)
    # CUDA's cholesky_ex reports info = 0 for NaN input (pytorch#64818): a non-finite factor counts too
    failed = (info != 0).any() | ~torch.isfinite(chol.diagonal(dim1=-2, dim2=-1)).all()
    if chol.device.type == "cpu" and not defer and bool(failed):  # free on the CPU; a host sync elsewhere
        raise FloatingPointError(NOT_POSITIVE_DEFINITE)
    return chol, d2.sqrt(), kernel, failed


def geometry(p: StackedFactors) -> Geometry:
    """Cholesky factors L_r, L_c and projections T_r, T_c by Cholesky solves (never inverses)."""
    chol_r, d_r, _, _ = _kernel(p.z_rows, p.d_rows, p.shape.jitter)
    chol_c, d_c, _, _ = _kernel(p.z_cols, p.d_cols, p.shape.jitter)
    proj_rows = torch.cholesky_solve(p.z_rows, chol_r).transpose(-1, -2)
    proj_cols = torch.cholesky_solve(p.z_cols, chol_c)
    return Geometry(chol_r, chol_c, proj_rows, proj_cols, d_r, d_c)


@dataclass
class GroupDraw:
    """Weights drawn for a group, (G, n, d_o, d_i), the one-sample flow KL of each factor, (G,), and
    whether a kernel failed to factorise (0-d bool; only ever True when checks are deferred): from
    :func:`draw_groups`, any kernel of any group of the call, the same flag in each group's draw."""

    weights: Tensor
    kl_flow: Tensor
    failed: Optional[Tensor] = None


def _whitened(p: StackedFactors, eps: Tensor) -> tuple[Tensor, Tensor]:
    """U0 = m + σ ⊙ ε and U_w = T_φ(U0) row-wise; returns (U_w, ladj) with ladj (G, n, R)."""
    return _whitened_core(p.mean, p.sigma, [f.flow for f in p.factors], eps)


def _whitened_core(mean: Tensor, sigma: Tensor, flows: list, eps: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_whitened` on stacked m, σ (G, R, C) and the G factors' flows (all None without a flow)."""
    u0 = mean.unsqueeze(1) + sigma.unsqueeze(1) * eps
    if flows[0] is None:
        return u0, u0.new_zeros(u0.shape[:-1])
    return apply_flows(flows, u0)


def _narrow(z: Tensor) -> bool:
    """Whether a side's width d is at most its inducing size (Z is (..., R, d)).

    With d ≤ R, K = Z Zᵀ + D² is nearly rank-deficient (D is small), so K⁻¹X would blow the parts of X
    outside Z's range up by 1/D² before Zᵀ cancels them, in rounding; T = Zᵀ K⁻¹ = (K⁻¹ Z)ᵀ stays in
    range and costs only R²·d, so it is formed. With d > R (a wide layer, where forming T costs a
    solve with d right-hand sides) the solve runs on X, which is then well conditioned."""
    return z.shape[-1] <= z.shape[-2]


def _project(x: Tensor, z_rows: Tensor, z_cols: Tensor, chol_rows: Tensor, chol_cols: Tensor,
             scale: float) -> Tensor:
    """scale · T_r X T_c = scale · Z_rᵀ [K_r⁻¹ X K_c⁻¹] Z_c for X (..., R, C): (..., d_o, d_i).

    Every product that stays small runs first, on the R×C core: the solves of a wide side (see
    :func:`_narrow`), the formed T of a narrow side and ``scale``; only then does Z of each wide side
    multiply, the cheaper order first when both are wide. So a wide side costs one d-sized product
    (and one in backward), e.g. a 32k-row lm_head B is one (d_o×R)(R×d_i) product, not two."""
    wide_rows, wide_cols = not _narrow(z_rows), not _narrow(z_cols)
    if wide_rows:
        x = torch.cholesky_solve(x, chol_rows)
    else:
        x = torch.cholesky_solve(z_rows, chol_rows).transpose(-1, -2) @ x
    if wide_cols:
        x = torch.cholesky_solve(x.transpose(-1, -2), chol_cols).transpose(-1, -2)
    else:
        x = x @ torch.cholesky_solve(z_cols, chol_cols)
    x = x * scale
    if wide_rows and wide_cols:  # Z_c first when that order takes fewer multiply-adds
        (rows, cols), d_o, d_i = x.shape[-2:], z_rows.shape[-1], z_cols.shape[-1]
        if rows * d_i * (cols + d_o) <= d_o * cols * (rows + d_i):
            return _TransposedProduct.apply(z_rows, x @ z_cols)
    if wide_rows:
        x = _TransposedProduct.apply(z_rows, x)
    if wide_cols:
        x = x @ z_cols
    return x


def draw_group(
    p: StackedFactors, n: int, generator: torch.Generator | list[torch.Generator] | None = None,
    defer_check: bool = False,
) -> GroupDraw:
    """Draw n weights per factor by METHOD.md section 2, steps 1 to 6 (exact Matheron rule).

    W = σ_p (T_r (U − λŪ) T_c + λ e1), which is M + λξ with M = T_r U T_c and ξ = e1 − T_r Ū T_c
    folded into one projection (:func:`_project`). Ū = [Z_r D_r] [[e1, e2], [e3, e4]] [Z_c D_c]ᵀ is a
    prior draw of the inducing matrix made jointly with e1, so ξ has covariance I − P_r ⊗ P_c and no
    d×d matrix forms. e2 and e4 appear only in (Z_r e2 + D_r e4) D_c, whose columns before D_c are
    independent N(0, Z_r Z_rᵀ + D_r²) = N(0, K_r): the same law as L_r η with η (R×C) standard normal,
    which replaces the d_o×C draw of e2 and its product with Z_r (checked by Monte Carlo in the tests).
    All noise comes from one ``randn`` call (torch's global RNG unless ``generator`` is given); with a
    list of n generators, draw i uses only generator i, so n draws made together equal the same draws
    made one at a time to float rounding (batched Monte Carlo == sequential; the batched products may
    sum in another order).
    """
    return draw_groups([p], n, [generator], defer_check)[0]


def core_key(shape: FactorShape) -> tuple:
    """What groups of different (d_o, d_i) must share for :func:`draw_groups` to draw their R×C cores as one
    batch: the inducing sizes, the flow's architecture, and the jitter (one number per kernel call)."""
    return shape.rows, shape.cols, shape.flow_depth, shape.flow_hidden, shape.jitter


@dataclass
class _Noise:
    eps: Tensor  # (G, n, R, C)  the flow's base noise
    e1: Tensor  # (G, n, d_o, d_i)
    e3: Tensor  # (G, n, R, d_i)
    eta: Tensor  # (G, n, R, C)  stands in for (Z_r e2 + D_r e4) through L_r (see draw_group)


def _group_noise(p: StackedFactors, n: int, generator: torch.Generator | list[torch.Generator] | None) -> _Noise:
    """All of a group's noise from one ``randn`` call (one per generator when given a list of n)."""
    s = p.shape
    g, rows, cols, d_o, d_i = len(p.factors), s.rows, s.cols, s.d_out, s.d_in
    sizes = [rows * cols, d_o * d_i, rows * d_i, rows * cols]
    like = dict(device=p.mean.device, dtype=p.mean.dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} draws")
        noise = torch.cat([torch.randn((g, 1, sum(sizes)), generator=gen, **like) for gen in generator], 1)
    else:
        noise = torch.randn((g, n, sum(sizes)), generator=generator, **like)
    eps, e1, e3, eta = noise.split(sizes, dim=-1)
    return _Noise(eps.view(g, n, rows, cols), e1.view(g, n, d_o, d_i), e3.view(g, n, rows, d_i),
                  eta.view(g, n, rows, cols))


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def draw_groups(
    groups: list[StackedFactors], n: int,
    generators: Optional[list[torch.Generator | list[torch.Generator] | None]] = None, defer_check: bool = False,
) -> list[GroupDraw]:
    """:func:`draw_group` for several groups at once, e.g. a model's A factors (r×d_i), B factors (d_o×r)
    and lm_head: (G_k, n, d_o, d_i) weights per group.

    The kernels' jitter and Cholesky factors, the flows, L_r U_w L_cᵀ, the prior's η term and the flow KL
    run once over the factors of all groups; what involves a group's d_o or d_i (the products with Z and
    e1, a narrow side's formed T) and the R×C solves of the projection stay per group. The shapes must
    agree on :func:`core_key` and share one dtype and device. Each group's noise is still its own
    ``randn`` call, in the order given, with ``generators[k]`` as :func:`draw_group`'s ``generator``, so
    every group draws what it would alone, up to float rounding (the batched kernels may sum in another
    order). On a small model those R×C steps are mostly per-call overhead, once per group
    (benchmarks/draw_time.py). Every group's noise (e1 is the size of its weights) is held until the last
    group is projected, where drawing group by group freed it after each: without gradients (sample-mode
    evaluation) the peak grows by the other groups' e1.
    """
    if not groups:
        return []
    generators = [None] * len(groups) if generators is None else list(generators)
    if len(generators) != len(groups):
        raise ValueError(f"got {len(generators)} generators for {len(groups)} groups")
    first = groups[0]
    for p in groups[1:]:
        if core_key(p.shape) != core_key(first.shape) or p.mean.dtype != first.mean.dtype \
                or p.mean.device != first.mean.device:
            raise ValueError(f"groups with shapes {first.shape} and {p.shape} (dtype {first.mean.dtype} and "
                             f"{p.mean.dtype}) do not share an R×C core; draw them separately")
    noise = [_group_noise(p, n, gen) for p, gen in zip(groups, generators)]
    sizes = [len(p.factors) for p in groups]
    jitter = first.shape.jitter

    # d-sized: Z_r's two products (one gradient buffer) and Z_c Z_cᵀ, per group
    gram_r, z_r_e1 = zip(*(_GramAndNoiseProduct.apply(p.z_rows, e.e1) for p, e in zip(groups, noise)))
    gram_c = [_Gram.apply(p.z_cols) for p in groups]
    # R×C core: every factor of every group at once
    chol_r, d_r, _, failed_r = _kernel(None, _cat([p.d_rows for p in groups]), jitter, defer_check,
                                       gram=_cat(list(gram_r)))
    chol_c, d_c, _, failed_c = _kernel(None, _cat([p.d_cols for p in groups]), jitter, defer_check,
                                       gram=_cat(gram_c))
    chol_r, chol_c = chol_r.unsqueeze(1), chol_c.unsqueeze(1)
    eps = _cat([e.eps for e in noise])
    flows = [f.flow for p in groups for f in p.factors]
    sigma = _cat([p.sigma for p in groups])
    u_w, ladj = _whitened_core(_cat([p.mean for p in groups]), sigma, flows, eps)
    u = chol_r @ u_w @ chol_c.transpose(-1, -2)
    d_r, d_c = d_r[:, None, :, None], d_c[:, None, None, :]
    # the prior draw Ū: its d_i-sized term per group, its η term on the core
    prior_wide = [(zr_e1 + dr * e.e3) @ p.z_cols.unsqueeze(1).transpose(-1, -2)
                  for p, e, zr_e1, dr in zip(groups, noise, z_r_e1, d_r.split(sizes))]
    u_prior = _cat(prior_wide) + (chol_r @ _cat([e.eta for e in noise])) * d_c
    lam = _cat([p.lam for p in groups])[:, None, None, None]
    inner = u - lam * u_prior
    prior_mean = _cat([p.prior_mean for p in groups])
    kl = flow_kl_sample(eps, sigma.log(), ladj, u_w - prior_mean.unsqueeze(1))
    failed = failed_r | failed_c

    out = []
    for p, e, x, l_r, l_c, lam_k, kl_k in zip(groups, noise, inner.split(sizes), chol_r.split(sizes),
                                             chol_c.split(sizes), lam.split(sizes), kl.split(sizes)):
        scale = p.shape.prior_scale
        weights = _PlusScaledNoise.apply(_project(x, p.z_rows.unsqueeze(1), p.z_cols.unsqueeze(1), l_r, l_c, scale),
                                         scale * lam_k, e.e1)
        if p.offset is not None:  # in place: _PlusScaledNoise keeps no copy of its output
            weights.add_(p.offset.unsqueeze(1))
        out.append(GroupDraw(weights=weights, kl_flow=kl_k, failed=failed))
    return out


def mean_flow_noise(shape: FactorShape, num_samples: int, seed: int, like: Tensor) -> Tensor:
    """The fixed ε (K, R, C) that averages the flow in mean mode.

    Drawn on a CPU generator so every device agrees, and the same for every factor of a shape, so a
    factor's mean does not depend on which other factors it was grouped with (merge and mean mode match).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((num_samples, shape.rows, shape.cols), generator=gen, dtype=torch.float64)
    return eps.to(device=like.device, dtype=like.dtype)


def mean_group(p: StackedFactors, mean_samples: int, seed: int) -> Tensor:
    """Posterior mean E_q[W] of every factor, (G, d_o, d_i) (METHOD.md section 4).

    E[W] = σ_p T_r L_r E[U_w] L_cᵀ T_c since the conditional noise has mean zero. Without a flow
    E[U_w] = m exactly. With one, E[U_w] is averaged over ``mean_samples`` fixed draws
    (:func:`mean_flow_noise` with ``seed``) with U0 as a control variate (E[U0] = m is known):
    E[U_w] ≈ m + mean(T(U0) − U0) + (1 − β)(mean(U0) − m), with β = Cov(T(U0), U0)/Var(U0) per entry
    estimated from the same draws. An identity flow gives β = 1 and E[U_w] = m to the last bit (a
    fresh ``init_lora_weights=True`` adapter is exactly the base model in mean mode); a flow that
    rescales its input gets β ≈ its scale, so the estimate is never worse than the plain average.
    """
    if p.factors[0].flow is None:
        mean_w = p.mean
    else:
        eps = mean_flow_noise(p.shape, mean_samples, seed, p.mean)
        eps = eps.expand(len(p.factors), *eps.shape)
        u_w, _ = _whitened(p, eps)
        u0 = p.mean.unsqueeze(1) + p.sigma.unsqueeze(1) * eps
        centred_u0 = u0 - u0.mean(1, keepdim=True)
        beta = (centred_u0 * (u_w - u_w.mean(1, keepdim=True))).sum(1) / centred_u0.square().sum(1)
        mean_w = p.mean + (u_w - u0).mean(1) + (1 - beta) * (u0.mean(1) - p.mean)
    chol_r, _, _, _ = _kernel(p.z_rows, p.d_rows, p.shape.jitter)
    chol_c, _, _, _ = _kernel(p.z_cols, p.d_cols, p.shape.jitter)
    u = chol_r @ mean_w @ chol_c.transpose(-1, -2)
    mean = _project(u, p.z_rows, p.z_cols, chol_r, chol_c, p.shape.prior_scale)
    return mean if p.offset is None else mean + p.offset


def conditional_kl_group(p: StackedFactors) -> Tensor:
    """KL_cond of every factor in the group, (G,)."""
    return conditional_kl(p.lam, p.shape.d_out * p.shape.d_in)
