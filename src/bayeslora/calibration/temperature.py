"""Temperature scaling (Guo et al. 2017): one temperature T for every draw's logits, fitted by NLL on val.

Each draw's distribution over the choices becomes softmax(log p_s / T) (the same as dividing that draw's
logits by T, since log p_s differs from them by a constant per item), and the predictive is their
average, so a stochastic method keeps its draws and its uncertainty decomposition. T is found by
L-BFGS on log T in float64 from T = 1 and kept inside [T_MIN, T_MAX] (a bound where the NLL is lower there:
the NLL of a val set that is all right falls as T -> 0); if the optimiser ends worse than T = 1 on the
fitting data, T = 1 is kept, so fitting never raises the fitting NLL. Predictions whose NLL at T = 1 is not
finite (an answer at probability 0) are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..evaluation import log_softmax_over_choices
from .base import Calibration, Fitting, positive_param, register_calibration, val_metrics

__all__ = ["TemperatureScaling", "T_MAX", "T_MIN", "fit_temperature", "tempered"]

T_MIN, T_MAX = 1e-2, 1e2


def tempered(log_probs: Tensor, mask: Tensor, temperature: float | Tensor) -> Tensor:
    """Per-draw log-probabilities (N, S, C) at temperature T, renormalised over the valid choices."""
    # a choice a draw gives probability 0 stays at 0 in that draw; as padding, it is kept out of autograd
    # (-inf / T has a NaN gradient in T, which sent the fit to a bound). NaN is refused, not masked.
    valid = mask[:, None, :].to(log_probs.device)
    if bool(torch.isnan(log_probs).logical_and(valid).any()):
        raise ValueError("the predictions hold NaN log-probabilities: no temperature can be fitted or applied")
    valid = valid & (log_probs != float("-inf"))
    finite = torch.where(valid, log_probs, torch.zeros((), dtype=log_probs.dtype))
    return log_softmax_over_choices(finite / temperature, valid)


def _nll(log_probs: Tensor, mask: Tensor, labels: Tensor, temperature: Tensor) -> Tensor:
    lp = tempered(log_probs, mask, temperature)
    index = labels[:, None, None].expand(-1, lp.shape[1], 1)
    # only the answer's column: padded choices are -inf in every draw, and logsumexp's gradient is NaN there
    log_p_answer = torch.logsumexp(lp.gather(2, index)[..., 0], dim=1) - math.log(lp.shape[1])
    return -log_p_answer.mean()


def fit_temperature(log_probs: Tensor, mask: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """(T, NLL at T = 1, NLL at T) minimising the NLL of the averaged tempered predictive."""
    log_probs = log_probs.to(torch.float64)
    at = lambda t: float(_nll(log_probs, mask, labels, torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    with torch.no_grad():
        start = at(1.0)
    if not math.isfinite(start):
        raise ValueError(f"the val NLL at T = 1 is {start}: an answer has probability 0 (or the scores hold NaN), "
                         "so no temperature can be fitted on these predictions")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    bound = math.log(T_MAX)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _nll(log_probs, mask, labels, log_t.clamp(-bound, bound).exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().clamp(math.log(T_MIN), bound).exp())
    with torch.no_grad():
        # where the NLL falls all the way to a bound (a val set every answer of which is right: it falls as
        # T -> 0), L-BFGS stops wherever the gradient got small; the bound is the minimiser, and says so.
        # Where L-BFGS failed (a non-finite step), a log-spaced grid over the bounds stands in for it.
        grid = torch.logspace(math.log10(T_MIN), math.log10(T_MAX), 161).tolist() if not math.isfinite(temperature) else []
        found = [(nll, t) for t in (temperature, T_MIN, T_MAX, *grid) if math.isfinite(t) and math.isfinite(nll := at(t))]
    end, temperature = min(found) if found else (math.inf, 1.0)
    if end > start:
        return 1.0, start, start
    return temperature, start, end


@register_calibration
class TemperatureScaling(Calibration):
    name = "temperature"
    help = "one temperature for every draw's logits, fitted by NLL on the val slice (any method)"

    def fit(self, fitting: Fitting) -> dict[str, Any]:
        result = fitting.predict()
        temperature, _, _ = fit_temperature(result.log_probs, result.mask, result.labels)
        params = {"temperature": temperature}
        return {"params": params, "val_before": val_metrics(result),
                "val_after": val_metrics(result, self.transform(result.log_probs, result.mask, params))}

    def search_bounds(self) -> dict[str, tuple[float, float]]:
        return {"temperature": (T_MIN, T_MAX)}

    def transform(self, log_probs: Tensor, mask: Tensor, params: dict[str, Any]) -> Tensor:
        return tempered(log_probs, mask, params["temperature"]).detach()

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        return {"temperature": positive_param(params, "temperature", where)}
