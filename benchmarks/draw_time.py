"""The fixed cost of one posterior draw, before and after each change, side by side in one run.

What it measures
----------------
The Bayesian factors of the ``step_time.py`` model (a random Llama, LoRA r=8 on q_proj, v_proj and
lm_head, q_proj and lm_head Bayesian) are grouped as the sampler groups them. One *draw* is what a
training step spends on the posterior: stack each group's parameters, draw every factor's weights and
its flow KL, and backpropagate a fixed gradient of the weights (what the LoRA forward's backward
hands them) and the KL into the posterior parameters. Variants, timed
as interleaved rounds (each round runs every variant once, in turn) so they see the same machine:

* ``before``: the draw as it was (T_r = Z_rᵀK_r⁻¹ and T_c = K_c⁻¹Z_c formed by Cholesky solves with
  d-sized right-hand sides; the prior inducing draw with its d_o×C noise e2; the flows by
  ``torch.func.vmap`` over zuko), kept here as the reference; it shares the current kernel (Z Zᵀ with its
  one-product backward) and stacking (a lone factor as views), so after/before understates those;
* ``projection``: :func:`bayeslora.core.draw_group` (solves on R×C matrices only, every small product
  on the R×C core before one d-sized product by Z per wide side, Z Zᵀ with a one-product backward, a
  lone factor's parameters as views, not stacked copies; (Z_r e2 + D_r e4) replaced by L_r η of the
  same law) with the flows still by vmap;
* ``per_group``: ``draw_group`` on each group in turn, with the hand-batched MADE conditioners
  (``core.flow._batched_flows``): the draw until the R×C cores were batched across groups;
* ``after``: :func:`bayeslora.core.draw_groups` over all groups at once, as the sampler draws now: the
  products with Z and e1 per group, every R×R, C×C and R×C step (kernels, Cholesky, flows, flow KL) once
  over the factors of all groups;
* ``autograd_z``: ``after`` with Z's products by plain autograd (Z_r Z_rᵀ, Z_r e1 and Z_rᵀ X each giving
  Z_r a gradient of its size, one of them a transposed view) instead of ``_GramAndNoiseProduct`` and
  ``_TransposedProduct`` (one gradient buffer in Z's layout), and the noise term added out of place
  (``_PlusScaledNoise`` now sums into the projection in place): that change, side by side;
* ``sampler``: the whole ``PosteriorSampler.draw`` of the model (layer walk, grouping, every group),
  forward only, which is what sample-mode evaluation pays per forward;
* ``label_rows`` (``--label-rows N``, default 5): ``after`` on the same model with its lm_head adapter
  restricted to N output rows (``BayesLoraConfig.output_rows``): the lm_head B factor is N×r, not 32000×r.

Every variant starts with no gradients (``zero_grad(set_to_none=True)``), as a training step does. It
prints the median milliseconds of each variant with min/max over rounds, and the ratios.

Usage::

    python benchmarks/draw_time.py                  # CPU, hidden 64 and 512, 1 thread (as the sampler runs)
    python benchmarks/draw_time.py --device cuda --hidden 2048 --layers 16 --rounds 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import (  # noqa: E402
    add_preset_argument, build_bayes, build_pair, label_rows, load_average, timed_call,
)

from bayeslora.core import StackedFactors, draw_group, draw_groups  # noqa: E402
from bayeslora.core import flow as flow_module  # noqa: E402
from bayeslora.core.kl import flow_kl_sample  # noqa: E402
from bayeslora.core.posterior import GroupDraw, _kernel, _whitened  # noqa: E402
import bayeslora  # noqa: E402
from bayeslora.surgery.sampler import PosteriorSampler  # noqa: E402


def before_draw_group(p: StackedFactors, n: int) -> GroupDraw:
    """The draw before this change, for the side-by-side timing (same law, other arithmetic)."""
    s = p.shape
    g, rows, cols, d_o, d_i = len(p.factors), s.rows, s.cols, s.d_out, s.d_in
    sizes = [rows * cols, d_o * d_i, d_o * cols, rows * d_i, rows * cols]
    noise = torch.randn((g, n, sum(sizes)), device=p.mean.device, dtype=p.mean.dtype)
    eps, e1, e2, e3, e4 = noise.split(sizes, dim=-1)
    eps = eps.view(g, n, rows, cols)
    e1, e2 = e1.view(g, n, d_o, d_i), e2.view(g, n, d_o, cols)
    e3, e4 = e3.view(g, n, rows, d_i), e4.view(g, n, rows, cols)
    chol_r, d_r, _, _ = _kernel(p.z_rows, p.d_rows, s.jitter)
    chol_c, d_c, _, _ = _kernel(p.z_cols, p.d_cols, s.jitter)
    proj_rows = torch.cholesky_solve(p.z_rows, chol_r).transpose(-1, -2)
    proj_cols = torch.cholesky_solve(p.z_cols, chol_c)
    u_w, ladj = _whitened(p, eps)
    u = chol_r.unsqueeze(1) @ u_w @ chol_c.unsqueeze(1).transpose(-1, -2)
    z_r, z_c = p.z_rows.unsqueeze(1), p.z_cols.unsqueeze(1)
    d_r, d_c = d_r[:, None, :, None], d_c[:, None, None, :]
    u_prior = z_r @ (e1 @ z_c.transpose(-1, -2) + e2 * d_c) + (d_r * e3) @ z_c.transpose(-1, -2)
    u_prior = u_prior + d_r * e4 * d_c
    lam = p.lam[:, None, None, None]
    inner = (u - lam * u_prior) @ proj_cols.unsqueeze(1)
    weights = s.prior_scale * (proj_rows.unsqueeze(1) @ inner + lam * e1)
    if p.offset is not None:  # a point factor W₀ (the default preset), as the current draw adds it
        weights = weights + p.offset.unsqueeze(1)
    return GroupDraw(weights, flow_kl_sample(eps, p.sigma.log(), ladj, u_w))


@contextlib.contextmanager
def vmap_flows():
    """The flows by torch.func.vmap over zuko, as before the hand-batched conditioners."""
    saved = flow_module._batched_agrees
    flow_module._batched_agrees = lambda flows, like: False
    try:
        yield
    finally:
        flow_module._batched_agrees = saved


@contextlib.contextmanager
def autograd_z_products():
    """Z's products by plain autograd and the noise sum out of place, as before the one-buffer gradients
    of Z (the clone stands for the fresh output ``torch.addcmul`` allocated)."""
    from types import SimpleNamespace

    from bayeslora.core import posterior

    saved = posterior._GramAndNoiseProduct, posterior._TransposedProduct, posterior._PlusScaledNoise
    posterior._GramAndNoiseProduct = SimpleNamespace(apply=lambda z, e1: (posterior._Gram.apply(z), z.unsqueeze(1) @ e1))
    posterior._TransposedProduct = SimpleNamespace(apply=lambda z, x: z.transpose(-1, -2) @ x)
    posterior._PlusScaledNoise = SimpleNamespace(apply=lambda p, c, e: saved[2].apply(p.clone(), c, e))
    try:
        yield
    finally:
        posterior._GramAndNoiseProduct, posterior._TransposedProduct, posterior._PlusScaledNoise = saved


def with_autograd_z(fn):
    def run():
        with autograd_z_products():
            fn()
    return run


def with_vmap(fn):
    def run():
        with vmap_flows():
            fn()
    return run


_UPSTREAM: dict = {}  # (group key, weights shape) -> a fixed gradient for the drawn weights


def training_draw(groups, draw, together: bool = False) -> None:
    """Stack, draw, and backpropagate: a training step's posterior work.

    ``draw`` takes one group (``draw_group``'s signature), or with ``together`` the list of all groups
    (``draw_groups``'s, as the sampler calls it). The drawn weights receive a fixed upstream gradient, as
    the LoRA forward's backward hands them one in a training step, so no stand-in loss adds work of its
    own (a loss such as ``W.square().mean()`` would add three passes over a 32k-row B factor to every
    variant)."""
    stacked = [StackedFactors.of([r.factor for r in refs], key[1]) for key, refs in groups.items()]
    if together:  # one call per R×C core, as the sampler buckets them
        index = {key: i for i, key in enumerate(groups)}
        drawn = [None] * len(stacked)
        for keys in PosteriorSampler.cores(groups):
            members = [index[key] for key in keys]
            for i, out in zip(members, draw([stacked[i] for i in members], 1)):
                drawn[i] = out
    else:
        drawn = [draw(p, 1) for p in stacked]
    outputs, grads = [], []
    for key, out in zip(groups, drawn):
        upstream = _UPSTREAM.get((key, out.weights.shape))
        if upstream is None:
            upstream = _UPSTREAM[(key, out.weights.shape)] = torch.randn_like(out.weights.detach()) * 1e-3
        outputs += [out.weights, out.kl_flow.sum()]
        grads += [upstream, torch.ones((), dtype=out.kl_flow.dtype, device=out.kl_flow.device)]
    torch.autograd.backward(outputs, grads)


def measure(args, hidden: int, device: torch.device) -> dict:
    bayes, _, base = build_pair(args, hidden, device, torch.float32)
    sampler = bayeslora.get_sampler(bayes)
    groups = sampler.groups(sampler.active_factors())
    variants = {
        "before": with_vmap(lambda: training_draw(groups, before_draw_group)),
        "projection": with_vmap(lambda: training_draw(groups, draw_group)),
        "per_group": lambda: training_draw(groups, draw_group),
        "after": lambda: training_draw(groups, draw_groups, together=True),
        "autograd_z": with_autograd_z(lambda: training_draw(groups, draw_groups, together=True)),
        "sampler": lambda: _no_grad(sampler.draw),
    }
    if args.label_rows:  # the same posterior work with the lm_head's B on label rows only
        restricted = build_bayes(args, base, rows=label_rows(args))
        restricted_sampler = bayeslora.get_sampler(restricted)
        restricted_groups = restricted_sampler.groups(restricted_sampler.active_factors())
        variants["label_rows"] = lambda: training_draw(restricted_groups, draw_groups, together=True)
    times = {name: [] for name in variants}
    load_before = load_average()
    for round_ in range(args.warmup + args.rounds):
        for name, fn in variants.items():
            # every variant starts as a training step does (the engine's zero_grad(set_to_none=True)): no
            # gradient to accumulate into, or each variant after the first would pay an add per parameter
            bayes.zero_grad(set_to_none=True)
            if args.label_rows:
                restricted.zero_grad(set_to_none=True)
            t = timed_call(fn, device)
            if round_ >= args.warmup:
                times[name].append(t)
    out = {name: {"ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t), "ms_max": 1e3 * max(t)}
           for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    out["after_over_before"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    ratios = [a / b for a, b in zip(times["after"], times["per_group"])]
    out["after_over_per_group"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    ratios = [a / b for a, b in zip(times["after"], times["autograd_z"])]
    out["after_over_autograd_z"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    if args.label_rows:
        ratios = [a / b for a, b in zip(times["label_rows"], times["after"])]
        out["label_rows_over_after"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    out["groups"] = {str(k[0].key()): len(v) for k, v in groups.items()}
    out["load"] = [load_before, load_average()]
    return out


def _no_grad(fn) -> None:
    with torch.no_grad():
        fn()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 512])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--label-rows", type=int, default=5,
                   help="also time the draw with the lm_head's B on this many output rows (output_rows); 0 = skip")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the sampler draws on 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    add_preset_argument(p)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": args.threads, "cpus": os.cpu_count(), "preset": args.preset}
    print("environment:", json.dumps(env))
    results = {"environment": env}
    for hidden in args.hidden:
        r = measure(args, hidden, device)
        results[f"hidden_{hidden}"] = r
        print(f"hidden {hidden} ({args.layers} layers, vocab {args.vocab}; groups {r['groups']}; load "
              f"{r['load'][0]:.1f} -> {r['load'][1]:.1f}):")
        for name in ("before", "projection", "autograd_z", "per_group", "after", "sampler", "label_rows"):
            if name in r:
                v = r[name]
                print(f"  {name:10s} {v['ms_median']:8.2f} ms  (min {v['ms_min']:.2f}, max {v['ms_max']:.2f})")
        for name, what in (("after_over_before", "after / before"), ("after_over_per_group", "after / per_group"),
                           ("after_over_autograd_z", "after / autograd_z"),
                           ("label_rows_over_after", "label_rows / after")):
            if name in r:
                a = r[name]
                print(f"  {what}: x{a['median']:.3f} (min {a['min']:.3f}, max {a['max']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
