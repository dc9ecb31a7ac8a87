"""Posterior-scale calibration: widen or narrow a trained posterior by one factor τ chosen on val.

Every draw's spread is multiplied by τ (Bayesian-LoRA: σ_U → τσ_U and λ → τλ, see
:meth:`bayeslora.core.StackedFactors.widened`); the posterior mean, and so mean mode and the merged
weights, stay as trained. It is the Bayesian counterpart of temperature scaling, and of Laplace-LoRA's
prior-precision tuning: held-back data, not the ELBO, chooses how wide the posterior should be (narrower
or wider than trained; on MiniLM ARC-Easy it picks τ < 1, see the README's training notes).

Search (on the val NLL of sample mode, with the same draw seeds for every τ): factors of 2 from τ = 1,
upwards while the NLL falls, else downwards, within [TAU_MIN, TAU_MAX]; then τ·√2^±1 around the best.
Costs a handful of val passes (each ``samples`` draws).
"""

from __future__ import annotations

import math
from typing import Any

from .base import Calibration, Fitting, positive_param, register_calibration, val_metrics

__all__ = ["PosteriorScale", "TAU_MAX", "TAU_MIN", "search_scale"]

TAU_MIN, TAU_MAX = 1 / 64, 1024.0


def search_scale(nll_at, start: float = 1.0) -> tuple[float, list[tuple[float, float]]]:
    """Minimise ``nll_at(τ)`` over τ as described above; returns (best τ, every (τ, NLL) tried)."""
    tried: dict[float, float] = {}

    def at(tau: float) -> float:
        if tau not in tried:
            value = float(nll_at(tau))
            tried[tau] = value if math.isfinite(value) else math.inf
        return tried[tau]

    best = start
    for step in (2.0, 0.5):
        tau = best * step
        while TAU_MIN <= tau <= TAU_MAX and at(tau) < at(best):
            best, tau = tau, tau * step
        if best != start:
            break
    for tau in (best * math.sqrt(2), best / math.sqrt(2)):
        if TAU_MIN <= tau <= TAU_MAX and at(tau) < at(best):
            best = tau
    return best, sorted(tried.items())


@register_calibration
class PosteriorScale(Calibration):
    name = "posterior-scale"
    help = "one factor τ on the spread of every posterior draw, chosen by the sample-mode NLL on val"

    def applies_to(self, method: Any) -> bool:
        return bool(getattr(method, "has_posterior_scale", False))

    def fit(self, fitting: Fitting) -> dict[str, Any]:
        if fitting.mode != "sample":
            raise ValueError(f"posterior-scale acts on draws: fit it in sample mode, not {fitting.mode!r}")
        results = {}

        def nll_at(tau: float) -> float:
            fitting.method.set_posterior_scale(fitting.model, tau)
            results[tau] = fitting.predict()
            return val_metrics(results[tau])["nll"]

        try:
            best, tried = search_scale(nll_at)
        finally:
            fitting.method.set_posterior_scale(fitting.model, 1.0)
        return {"params": {"scale": best}, "val_before": val_metrics(results[1.0]),
                "val_after": val_metrics(results[best]),
                "search": [{"scale": tau, "nll": nll} for tau, nll in tried]}

    def prepare(self, method: Any, model, params: dict[str, Any], tensors=None) -> Any:
        method.set_posterior_scale(model, params["scale"])
        return method

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        return {"scale": positive_param(params, "scale", where)}
