"""TFB (Shi et al. 2025), training-free Bayesianization of a trained LoRA adapter: post hoc, no gradient.

For every LoRA layer, B = U diag(d) Vᵀ (SVD); re-writing B' = U diag(d), A' = Vᵀ A leaves ΔW = B'A'
unchanged, and TFB puts isotropic Gaussian noise of std σ/d_i on row i of A'. Then B'·noise = U E with
E ~ N(0, σ²) entry-wise, so a draw adds ``scaling · (x Eᵀ) Uᵀ`` to the layer's output: ΔW-space noise
of std σ within the column space of B (only U is kept). σ is the largest value whose relative change of
the NLL on an anchor set stays within ``TFB_THRESHOLD``: bisection on log σ over [SIGMA_MIN, SIGMA_MAX]
in ``TFB_STEPS`` steps. The anchor set is ``TFB_ANCHOR`` rows of the run's *training* rows (a seeded
sample, as the paper), and every σ is judged with the same draw seeds. The calibrated predictor runs
in sample mode with S draws on the run's mean-mode model; σ = 0 is the LoRA run itself.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ..methods.base import predict_draws
from ..seeding import mix_seed
from .base import Fitting, LoraPostHoc, register_calibration, val_metrics

__all__ = ["SIGMA_MAX", "SIGMA_MIN", "TFB_ANCHOR", "TFB_STEPS", "TFB_THRESHOLD", "Tfb", "TfbPredictor",
           "bisect_sigma"]

TFB_THRESHOLD = 0.003
TFB_ANCHOR = 256
TFB_STEPS = 12
SIGMA_MIN, SIGMA_MAX = 1e-5, 1.0


def bisect_sigma(relative_change, threshold: float = TFB_THRESHOLD, steps: int = TFB_STEPS
                 ) -> tuple[float, list[tuple[float, float]]]:
    """The largest σ in [SIGMA_MIN, SIGMA_MAX] with ``relative_change(σ) <= threshold`` (bisection on
    log σ, assuming the change grows with σ); 0 if even SIGMA_MIN exceeds it. Returns (σ, every try)."""
    tried = []

    def ok(sigma: float) -> bool:
        value = float(relative_change(sigma))
        tried.append((sigma, value))
        return math.isfinite(value) and value <= threshold

    if ok(SIGMA_MAX):
        return SIGMA_MAX, tried
    if not ok(SIGMA_MIN):
        return 0.0, tried
    lo, hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(math.exp(mid)) else (lo, mid)
    return math.exp(lo), tried


@dataclass
class TfbPredictor:
    """A LoRA model with TFB noise on every adapted layer: sample mode, S seeded draws per forward."""

    method: Any
    model: nn.Module
    sigma: float = 0.0
    seeds: Optional[list[int]] = None
    handles: list = field(default_factory=list)

    stochastic = True

    def __post_init__(self) -> None:
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise ValueError("tfb needs a run with LoRA layers in mean mode (not merged)")
        for index, layer in enumerate(layers):
            bases = {}
            for adapter, lin in layer.lora_B.items():
                u, _, _ = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
                bases[adapter] = u.to(lin.weight.dtype)
            self.handles.append(layer.register_forward_hook(self._hook(index, bases)))

    def _hook(self, index: int, bases: dict[str, Tensor]):
        def hook(layer: LoraLayer, args, output: Tensor) -> Tensor:
            if self.sigma == 0 or layer.disable_adapters or layer.merged:
                return output
            x = args[0]
            draws = 1 if self.seeds is None else len(self.seeds)
            for adapter in layer.active_adapters:
                if adapter not in bases:
                    continue
                u = bases[adapter]
                chunks = x.to(u.dtype).chunk(draws, dim=0)
                parts = []
                for s, chunk in enumerate(chunks):
                    gen = None
                    if self.seeds is not None:
                        gen = torch.Generator(device=u.device).manual_seed(mix_seed(self.seeds[s], index))
                    noise = self.sigma * torch.randn((u.shape[1], chunk.shape[-1]), generator=gen,
                                                     device=u.device, dtype=u.dtype)
                    parts.append((chunk @ noise.T) @ u.T * layer.scaling[adapter])
                output = output + torch.cat(parts, 0).to(output.dtype)
            return output

        return hook

    def close(self) -> None:
        """Remove the noise hooks: the model predicts as the LoRA run again."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def draws(self, mode: str, samples: int) -> int:
        return samples

    def seeded(self, seeds: list[int]) -> contextlib.AbstractContextManager:
        """Draw chunk s of the next forwards from ``seeds[s]`` (for :func:`predict_draws`)."""
        self.seeds = seeds
        return contextlib.nullcontext()

    def predict(self, model: nn.Module, scorer, batch: dict[str, Any], mode: str, samples: int,
                seeds: list[int], batched: bool) -> Tensor:
        return predict_draws(model, scorer, batch, seeds, batched, self.seeded)


@register_calibration
class Tfb(LoraPostHoc):
    name = "tfb"
    help = ("training-free Bayesianization of a LoRA run: ΔW-space noise in B's column space, its σ the largest "
            f"that keeps the relative NLL change on {TFB_ANCHOR} training rows within {TFB_THRESHOLD}")

    def mode_for(self, method: Any) -> str:
        return "sample"

    def draws(self, method: Any, mode: str, samples: int) -> int:
        return samples

    def fit(self, fitting: Fitting) -> dict[str, Any]:
        if fitting.mode != "sample":
            raise ValueError(f"tfb predicts by sampling: fit it in sample mode, not {fitting.mode!r}")
        rows = list(fitting.train_examples)
        if not rows:
            raise ValueError("tfb needs the run's training rows for its anchor set")
        anchor = random.Random(fitting.seed).sample(rows, min(TFB_ANCHOR, len(rows)))
        predictor = TfbPredictor(fitting.method, fitting.model)
        try:
            base = val_metrics(fitting.predict(predictor, anchor))["nll"]

            def relative_change(sigma: float) -> float:
                predictor.sigma = sigma
                return abs(val_metrics(fitting.predict(predictor, anchor))["nll"] - base) / base

            sigma, tried = bisect_sigma(relative_change)
            predictor.sigma = 0.0
            before = val_metrics(fitting.predict(predictor))
            predictor.sigma = sigma
            after = val_metrics(fitting.predict(predictor))
        finally:
            predictor.close()
        return {"params": {"sigma": sigma}, "val_before": before, "val_after": after, "anchor_nll": base,
                "fitted_split": "train", "fitted_rows": len(anchor),
                "anchor_size": len(anchor), "threshold": TFB_THRESHOLD,
                "search": [{"sigma": s, "relative_nll_change": v} for s, v in tried]}

    def search_bounds(self) -> dict[str, tuple[float, float]]:
        return {"sigma": (SIGMA_MIN, SIGMA_MAX)}  # 0 (even SIGMA_MIN changed the anchor NLL too much) is below

    def prepare(self, method: Any, model: nn.Module, params: dict[str, Any], tensors=None) -> Any:
        return TfbPredictor(method, model, params["sigma"])

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        sigma = params.get("sigma")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
            raise ValueError(f"{where}: params.sigma must be a finite number >= 0, got {sigma!r}")
        return {"sigma": float(sigma)}
