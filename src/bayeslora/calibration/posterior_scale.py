"""Posterior-scale calibration: widen or narrow a trained posterior by one factor τ chosen on val.

Every draw's spread is multiplied by τ (Bayesian-LoRA: σ_U → τσ_U and λ → τλ, see
:meth:`bayeslora.core.StackedFactors.widened`); the posterior mean, and so mean mode and the merged
weights, stay as trained. It is the Bayesian counterpart of temperature scaling, and of Laplace-LoRA's
prior-precision tuning: held-back data, not the ELBO, chooses how wide the posterior should be (narrower
or wider than trained; on MiniLM ARC-Easy it picks τ < 1, see the README's training notes).

Search (on the val NLL of sample mode, with the same draw seeds for every τ): factors of 2 from τ = 1,
upwards while the NLL falls, else downwards, within [TAU_MIN, TAU_MAX]; then τ·√2^±1 around the best.
Costs a handful of val passes (each ``samples`` draws).

``posterior-widen`` is the same knob under a rule instead of a minimum: the *widest* τ on the ladder 1,
√2, 2, 2√2, … (≤ TAU_MAX) whose val NLL is at most ``WIDEN_TOLERANCE`` (relative) *above* the trained
posterior's (τ = 1; one-sided: a lower NLL always passes), stopping at the first τ beyond it. The number
is TFB's (Shi et al. 2025, the widest noise keeping the NLL within 0.3%; TFB's test is two-sided, on
training rows). Why: near τ = 1 the val NLL of a few hundred rows is flat within its noise, so its
minimum lands anywhere from 1/64 to 2 from seed to seed on OpenBookQA (RESULTS §7c, which proposed this
rule after seeing those val curves), while twice the trained width helped out of distribution there; the
rule says once, for every run, how much val fit may be traded for width. It never narrows the posterior.
One val pass per step (each ``samples`` draws); on MiniLM the NLL leaves the tolerance by τ ≈ 2–3.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Calibration, Fitting, positive_param, register_calibration, val_metrics
from .tfb import TFB_THRESHOLD

__all__ = ["PosteriorScale", "PosteriorWiden", "TAU_MAX", "TAU_MIN", "WIDEN_TOLERANCE", "search_scale",
           "widest_scale"]

TAU_MIN, TAU_MAX = 1 / 64, 1024.0
WIDEN_TOLERANCE = TFB_THRESHOLD


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


def widest_scale(nll_at, tolerance: float = WIDEN_TOLERANCE) -> tuple[float, list[tuple[float, float]]]:
    """The widest τ = √2^k (k ≥ 0, τ ≤ TAU_MAX) whose ``nll_at(τ)`` exceeds ``nll_at(1)`` by at most
    ``tolerance`` relative, climbing until the first τ beyond it (or a non-finite NLL); returns (τ, every
    (τ, NLL) tried). Stopping at the first failure keeps the rule from jumping over a bad region."""
    if not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    base = float(nll_at(1.0))
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"the val NLL of the trained posterior (τ = 1) is {base}: no relative tolerance around it "
                         "to widen within (it must be finite and > 0)")
    tried, best, k = [(1.0, base)], 1.0, 1
    while (tau := 2.0 ** (k / 2)) <= TAU_MAX:
        value = float(nll_at(tau))
        tried.append((tau, value if math.isfinite(value) else math.inf))
        if not math.isfinite(value) or (value - base) / base > tolerance:
            break
        best, k = tau, k + 1
    return best, tried


@register_calibration
class PosteriorScale(Calibration):
    name = "posterior-scale"
    help = "one factor τ on the spread of every posterior draw, chosen by the sample-mode NLL on val"

    def applies_to(self, method: Any) -> bool:
        return bool(getattr(method, "has_posterior_scale", False))

    def search(self, nll_at) -> tuple[float, list[tuple[float, float]]]:
        """How τ is chosen from ``nll_at(τ)``: here its minimum (:func:`search_scale`)."""
        return search_scale(nll_at)

    def fit(self, fitting: Fitting) -> dict[str, Any]:
        if fitting.mode != "sample":
            raise ValueError(f"{self.name} acts on draws: fit it in sample mode, not {fitting.mode!r}")
        results = {}

        def nll_at(tau: float) -> float:
            fitting.method.set_posterior_scale(fitting.model, tau)
            results[tau] = fitting.predict(desc=f"{self.name}: val at τ = {tau:.3g}")
            return val_metrics(results[tau])["nll"]

        try:
            best, tried = self.search(nll_at)
        finally:
            fitting.method.set_posterior_scale(fitting.model, 1.0)
        return {"params": {"scale": best}, "val_before": val_metrics(results[1.0]),
                "val_after": val_metrics(results[best]), **self.record_extras(),
                "search": [{"scale": tau, "nll": nll} for tau, nll in tried]}

    def record_extras(self) -> dict[str, Any]:
        """Fields of the fitted record beside params, val metrics and the search."""
        return {}

    def search_bounds(self) -> dict[str, tuple[float, float]]:
        return {"scale": (TAU_MIN, TAU_MAX)}

    def prepare(self, method: Any, model, params: dict[str, Any], tensors=None) -> Any:
        method.set_posterior_scale(model, params["scale"])
        return method

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        return {"scale": positive_param(params, "scale", where)}


@register_calibration
class PosteriorWiden(PosteriorScale):
    name = "posterior-widen"
    help = (f"the widest τ (steps of √2 from 1) on the spread of every posterior draw whose sample-mode val NLL "
            f"is at most {WIDEN_TOLERANCE:.1%} above the trained posterior's (TFB's number); never narrows")

    def search(self, nll_at) -> tuple[float, list[tuple[float, float]]]:
        return widest_scale(nll_at)

    def record_extras(self) -> dict[str, Any]:
        return {"tolerance": WIDEN_TOLERANCE}

    def search_bounds(self) -> dict[str, tuple[float, float]]:
        return {"scale": (0.0, TAU_MAX)}  # τ = 1 (no widening) is a choice, not the range's end

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        scale = positive_param(params, "scale", where)
        if not 1.0 <= scale <= TAU_MAX:
            raise ValueError(f"{where}: params.scale of posterior-widen must lie in [1, {TAU_MAX:g}] (it never "
                             f"narrows the posterior), got {scale!r}")
        return {"scale": scale}
