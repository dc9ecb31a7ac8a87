"""Laplace-LoRA (Yang et al. 2024): a post-hoc Kronecker-factored Laplace posterior over a trained LoRA.

Fitted on a ``lora`` or ``map`` run, training-free: one pass over the run's *training* rows (train less
the val slice, as the paper fits on the training set) collects the K-FAC factors of the GGN of the
choice NLL (``kfac``: one forward and one backward per choice column per batch), the prior precision
is tuned on the Laplace evidence (``kron_laplace``), and prediction uses the linearised model: the
logits are Gaussian, N(f(x; θ*), J P⁻¹ Jᵀ), with J the exact per-item Jacobian (one backward per choice
column at prediction too). ``mean`` mode reads that Gaussian with the probit approximation (one
deterministic prediction, laplace-torch's default ``link_approx``); ``sample`` mode draws S logit
vectors from it (seeded), so the mutual information is reported.

Covered: every LoRA A and B of the run's adapter whose sides are at most ``LAPLACE_MAX_WIDTH`` (a full
K-FAC factor of a 49k-row lm_head B would be ~10 GB), and an encoder's scoring head. The rest (wider
layers, embedding LoRA) stay at their trained values; the fitted file lists both. laplace-torch is not
used: it requires torchvision and a pinned asdfghjkl, and curvlinops requires backpack (torchvision too),
which would replace this project's CPU torch build; their Hugging Face support also expects one row per
item, while our pair and log-likelihood scorers use one row per choice.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ..evaluation import log_softmax_over_choices
from .base import Fitting, LoraPostHoc, positive_param, register_calibration, val_metrics
from .kfac import KfacFactors, LayerTape, choice_hessians
from .kron_laplace import KronLaplace, probit_logits, sample_logits

__all__ = ["LAPLACE_MAX_WIDTH", "Laplace", "LaplacePredictor", "covered_layers"]

LAPLACE_MAX_WIDTH = 4096


def covered_layers(model: nn.Module, scorer: nn.Module) -> tuple[dict[str, nn.Linear], list[str]]:
    """(the layers the posterior covers, by name; the names of adapter layers it leaves at their values)."""
    covered: dict[str, nn.Linear] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        for adapter in module.active_adapters:
            for side in ("lora_A", "lora_B"):
                sides = getattr(module, side)
                if adapter not in sides:
                    continue
                layer = sides[adapter]
                key = f"{name}.{side}.{adapter}"
                if isinstance(layer, nn.Linear) and max(layer.in_features, layer.out_features) <= LAPLACE_MAX_WIDTH:
                    covered[key] = layer
                else:
                    skipped.append(key)
            if adapter in getattr(module, "lora_embedding_A", {}):
                skipped.append(f"{name}.lora_embedding.{adapter}")
    for name, module in scorer.named_modules():
        if isinstance(module, nn.Linear):
            covered[f"scorer.{name}"] = module
    if not covered:
        raise ValueError("laplace found no LoRA layers to cover: it needs a LoRA run in mean mode (not merged)")
    return covered, skipped


def _weight(layer: nn.Linear) -> Tensor:
    """The layer's parameters as one (out, in') matrix, the bias as its last column."""
    w = layer.weight.detach().double()
    return w if layer.bias is None else torch.cat([w, layer.bias.detach().double()[:, None]], 1)


class _Layers:
    """The covered layers of the model a predictor is used with, found at its first batch (the scorer
    arrives with the batch); their parameters are made to require grad while it is in use."""

    def __init__(self) -> None:
        self.layers: Optional[dict[str, nn.Linear]] = None
        self.skipped: list[str] = []
        self._frozen: list[nn.Parameter] = []

    def find(self, model: nn.Module, scorer: nn.Module) -> dict[str, nn.Linear]:
        if self.layers is None:
            self.layers, self.skipped = covered_layers(model, scorer)
            for layer in self.layers.values():
                for p in layer.parameters():
                    if not p.requires_grad:
                        p.requires_grad_(True)
                        self._frozen.append(p)
        return self.layers

    def close(self) -> None:
        for p in self._frozen:
            p.requires_grad_(False)
        self._frozen.clear()


def _forward(layers: dict[str, nn.Linear], model: nn.Module, scorer: Any, batch: dict[str, Any], jacobians: bool):
    with torch.enable_grad(), LayerTape(layers) as tape:
        logits, mask = scorer.choice_logits(model, batch, 1)
        pieces = tape.per_item(logits[0], mask, batch, jacobians=jacobians)
    return logits[0].detach(), mask, pieces


class _CurvatureCollector:
    """A predictor that accumulates the K-FAC factors of the batches it predicts (the LoRA's own
    predictions), for the Laplace fit."""

    stochastic = False

    def __init__(self) -> None:
        self.found = _Layers()
        self.factors = KfacFactors()

    def draws(self, mode: str, samples: int) -> int:
        return 1

    def predict(self, model: nn.Module, scorer: Any, batch: dict[str, Any], mode: str, samples: int,
                seeds: list[int], batched: bool) -> Tensor:
        logits, mask, pieces = _forward(self.found.find(model, scorer), model, scorer, batch, jacobians=True)
        _, hessians = choice_hessians(logits, mask)
        lp = log_softmax_over_choices(logits[None], mask)
        labels = batch["labels"].to(lp.device)
        self.factors.add(pieces, hessians, mask, lp[0].gather(1, labels[:, None])[:, 0])
        return lp

    def theta_sq(self) -> float:
        return float(sum((_weight(layer) ** 2).sum() for layer in (self.found.layers or {}).values()))


class LaplacePredictor:
    """The linearised Laplace predictive: probit in mean mode, S seeded logit draws in sample mode."""

    stochastic = True

    def __init__(self, posterior: KronLaplace) -> None:
        self.posterior = posterior
        self.found = _Layers()

    def draws(self, mode: str, samples: int) -> int:
        return samples if mode == "sample" else 1

    def predict(self, model: nn.Module, scorer: Any, batch: dict[str, Any], mode: str, samples: int,
                seeds: list[int], batched: bool) -> Tensor:
        layers = self.found.find(model, scorer)
        if set(layers) != set(self.posterior.eig_a):
            missing, extra = sorted(set(layers) - set(self.posterior.eig_a)), sorted(set(self.posterior.eig_a) - set(layers))
            raise ValueError(f"the Laplace factors do not fit this model (no factors for {missing[:3]}; factors of "
                             f"layers it lacks: {extra[:3]}): refit it with bayeslora calibrate")
        logits, mask, pieces = _forward(layers, model, scorer, batch, jacobians=True)
        cov = self.posterior.logit_covariance({n: p["jac"] for n, p in pieces.items()})
        if mode == "sample":
            z = sample_logits(logits, cov, mask, seeds)
        else:
            z = probit_logits(logits, cov, mask)[None]
        return log_softmax_over_choices(z, mask)

    def close(self) -> None:
        self.found.close()


@register_calibration
class Laplace(LoraPostHoc):
    name = "laplace"
    help = ("Laplace-LoRA: K-FAC GGN posterior over the LoRA factors fitted on the training rows, prior "
            "precision by the Laplace evidence, linearised predictive (mean mode: probit; sample mode: S draws)")

    def mode_for(self, method: Any) -> str:
        return "mean"

    def draws(self, method: Any, mode: str, samples: int) -> int:
        return samples if mode == "sample" else 1

    def fit(self, fitting: Fitting) -> dict[str, Any]:
        if fitting.mode not in ("mean", "sample"):
            raise ValueError(f"laplace predicts through the unmerged LoRA layers: fit it in mean (probit) or "
                             f"sample mode, not {fitting.mode!r}")
        rows = list(fitting.train_examples)
        if not rows:
            raise ValueError("laplace needs the run's training rows to fit its curvature")
        collector = _CurvatureCollector()
        try:
            fitting.predict(collector, rows, desc="laplace: curvature")
        finally:
            collector.found.close()
        factors = collector.factors
        posterior = KronLaplace.from_factors(factors.factors(), collector.theta_sq(), factors.log_likelihood)
        path = posterior.tune_prior_precision()
        before = val_metrics(fitting.predict())
        predictor = LaplacePredictor(posterior)
        try:
            after = val_metrics(fitting.predict(predictor, desc="laplace: val"))
        finally:
            predictor.close()
        params = {"prior_precision": posterior.prior_precision, "theta_sq": posterior.theta_sq,
                  "log_likelihood": posterior.log_likelihood, "n_items": factors.n_items}
        return {"params": params, "tensors": posterior.tensors(), "val_before": before, "val_after": after,
                "fitted_split": "train", "fitted_rows": len(rows), "kfac": factors.choices,
                "n_params": posterior.n_params, "covered": sorted(collector.found.layers or {}),
                "not_covered": collector.found.skipped,
                "evidence": [{"prior_precision": d, "log_evidence": v} for d, v in path]}

    def prepare(self, method: Any, model: nn.Module, params: dict[str, Any],
                tensors: Optional[dict[str, Tensor]] = None) -> Any:
        if tensors is None:
            raise ValueError("laplace needs its fitted factors (the .safetensors file beside its .json, named by "
                             "its tensors_sha256): refit it with bayeslora calibrate")
        return LaplacePredictor(self._posterior(tensors, params, "the laplace factors"))

    @staticmethod
    def _posterior(tensors: dict[str, Tensor], params: dict[str, Any], where: str) -> KronLaplace:
        return KronLaplace.from_tensors(tensors, params["theta_sq"], params["log_likelihood"],
                                        params["prior_precision"], where)

    def check_tensors(self, tensors: dict[str, Tensor], params: dict[str, Any], where: str) -> dict[str, Tensor]:
        self._posterior(tensors, params, where)
        return tensors

    def fitted_values(self, params: dict[str, Any]) -> int:
        return 1  # the prior precision; theta_sq, log_likelihood and n_items are bookkeeping (factors: tensors)

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        checked = {"prior_precision": positive_param(params, "prior_precision", where)}
        for key in ("theta_sq", "log_likelihood"):
            value = params.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: params.{key} must be a finite number, got {value!r}")
            checked[key] = float(value)
        n_items = params.get("n_items")
        if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
            raise ValueError(f"{where}: params.n_items must be a positive integer, got {n_items!r}")
        return {**checked, "n_items": n_items}
