"""BLoB (Wang et al. 2024): a Gaussian posterior on LoRA's A, B deterministic, trained by backprop.

q(A) = N(μ, σ²) element-wise with μ = LoRA's A and σ = ρ² (ρ ~ U[ε/√2, ε] at init, ε = BLOB_EPS); B is
PEFT's own zero-initialised B, so training starts at the base model. The prior is N(0, BLOB_PRIOR_STD²)
and the KL is closed-form in float64. A draw adds ``scaling · B((x ⊙ r)(σ ⊙ ε)ᵀ ⊙ s)`` to each adapted
layer's output, where ε ~ N(0, 1) is the A-noise and r, s are Flipout's random signs per row (``--flipout``,
on by default as in the authors' code; off, every row of a draw shares one noise matrix). One draw per
training step; S draws at test, batched as an S×B pass whose chunk s uses the generator of seed s, so
batched and sequential prediction agree. Mean mode (the authors' N = 0) drops the noise: it is plain
LoRA with A = μ, and merges like it.

The KL weight is the authors' default, 1/M per step with M steps per epoch (the ``blob`` recipe); their
code takes the KL step with a separate SGD optimizer (lr 0.02), which this single-AdamW loop does not
reproduce. The means are saved as a normal PEFT LoRA adapter (PEFT alone loads the posterior mean; its
save also copies ρ into ``adapter_model.safetensors``, which its loader ignores), and ``load`` reads ρ
from ``blob_rho.safetensors`` beside it. Neither μ nor ρ gets weight decay (they are variational).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..evaluation import log_softmax_over_choices
from ..scoring import ChoiceScorer
from ..seeding import mix_seed
from .base import TrainOutputs, predict_draws, register_method
from .lora import LoraMethod

__all__ = ["BLOB_EPS", "BLOB_PRIOR_STD", "BlobMethod", "blob_kl"]

BLOB_EPS = 0.05
BLOB_PRIOR_STD = 0.2
RHO_FILE = "blob_rho.safetensors"


@dataclass
class BlobState:
    """How the adapted layers perturb their output: on or off, how many draws, from which seeds."""

    layers: list[tuple[str, LoraLayer]]
    flipout: bool
    sampling: bool = True
    seeds: Optional[list[int]] = None  # one per draw; None: torch's global RNG
    handles: list = field(default_factory=list)

    def seeded(self, seeds: list[int]) -> contextlib.AbstractContextManager:
        """Draw chunk s of the next forwards from ``seeds[s]`` (for :func:`predict_draws`)."""
        self.seeds = seeds
        return contextlib.nullcontext()


def _sigma(layer: LoraLayer, adapter: str) -> Tensor:
    return layer.blob_rho[adapter].square()


def _noise_hook(state: BlobState, index: int):
    def hook(layer: LoraLayer, args, output: Tensor) -> Tensor:
        if not state.sampling or layer.disable_adapters or layer.merged:
            return output
        x = args[0]
        draws = 1 if state.seeds is None else len(state.seeds)
        for adapter in layer.active_adapters:
            if adapter not in getattr(layer, "blob_rho", {}):
                continue
            a = layer.lora_A[adapter].weight
            sigma = _sigma(layer, adapter)
            chunks = layer.lora_dropout[adapter](x.to(a.dtype)).chunk(draws, dim=0)
            parts = []
            for s, chunk in enumerate(chunks):
                gen = None
                if state.seeds is not None:
                    gen = torch.Generator(device=a.device).manual_seed(mix_seed(state.seeds[s], index))
                eps = torch.randn(a.shape, generator=gen, device=a.device, dtype=a.dtype)
                noise_a = sigma * eps
                if state.flipout:
                    rows = chunk.shape[:-1]
                    r = torch.randint(0, 2, (*rows, a.shape[1]), generator=gen, device=a.device).to(a.dtype) * 2 - 1
                    sgn = torch.randint(0, 2, (*rows, a.shape[0]), generator=gen, device=a.device).to(a.dtype) * 2 - 1
                    hidden = ((chunk * r) @ noise_a.T) * sgn
                else:
                    hidden = chunk @ noise_a.T
                parts.append(layer.lora_B[adapter](hidden) * layer.scaling[adapter])
            output = output + torch.cat(parts, 0).to(output.dtype)
        return output

    return hook


def blob_kl(model: nn.Module, prior_std: float = BLOB_PRIOR_STD) -> Tensor:
    """Σ KL(N(μ, σ²) ‖ N(0, prior_std²)) over every entry of every A, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for _, layer in _layers(model):
        for adapter, rho in layer.blob_rho.items():
            mu = layer.lora_A[adapter].weight.to(torch.float64)
            var = rho.to(torch.float64).pow(4)
            kl = math.log(prior_std) - 0.5 * var.log() + (var + mu.square()) / (2 * prior_std ** 2) - 0.5
            total = total.to(kl.device) + kl.sum()
    return total


def _layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "blob_rho")]


@register_method
class BlobMethod(LoraMethod):
    name = "blob"
    modes = ("sample", "mean", "merged")
    default_mode = "sample"
    stochastic = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("blob")
        group.add_argument("--no-flipout", action="store_true",
                           help="blob: one A-noise per draw for every row, instead of Flipout's per-row signs")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"flipout": False} if args.no_flipout else {}

    @classmethod
    def flag_value(cls, dest: str, options: dict[str, Any]) -> Any:
        return not options.get("flipout", True) if dest == "no_flipout" else options.get(dest)

    def resolved_options(self) -> dict[str, Any]:
        unknown = sorted(set(self.options) - {"flipout", "eps", "prior_std"})
        if unknown:
            raise ValueError(f"blob: unknown method options {unknown}")
        out = {"flipout": bool(self.options.get("flipout", True)), "eps": self.options.get("eps", BLOB_EPS),
               "prior_std": self.options.get("prior_std", BLOB_PRIOR_STD)}
        for key in ("eps", "prior_std"):
            if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or not out[key] > 0:
                raise ValueError(f"blob: option {key} must be a positive number, got {out[key]!r}")
        return out

    def training_defaults(self) -> dict[str, Any]:
        return {"recipe": "blob"}

    def _attach(self, model: nn.Module, rho: Optional[dict[str, Tensor]] = None) -> nn.Module:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        for name, layer in layers:
            layer.blob_rho = nn.ParameterDict()
            for adapter, lin in layer.lora_A.items():
                eps = self.resolved_options()["eps"]
                init = torch.empty_like(lin.weight, dtype=torch.float32).uniform_(eps / math.sqrt(2), eps)
                if rho is not None:
                    key = f"{name}.{adapter}"
                    if key not in rho or rho[key].shape != lin.weight.shape:
                        raise ValueError(f"{RHO_FILE}: no ρ of shape {tuple(lin.weight.shape)} for layer {key}")
                    init = rho[key].float()
                layer.blob_rho[adapter] = nn.Parameter(init.to(lin.weight.device))
        state = BlobState(layers, flipout=self.resolved_options()["flipout"])
        state.handles = [layer.register_forward_hook(_noise_hook(state, i)) for i, (_, layer) in enumerate(layers)]
        model._blob_state = state
        return model

    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        return self._attach(super().build(base_model, lora))

    def save(self, model: nn.Module, directory: Path) -> None:
        super().save(model, directory)
        rho = {f"{n}.{a}": p.detach().cpu().contiguous() for n, layer in _layers(model) for a, p in layer.blob_rho.items()}
        save_file(rho, str(Path(directory) / RHO_FILE))

    def load(self, base_model: nn.Module, directory: Path, lora: dict[str, Any]) -> nn.Module:
        path = Path(directory) / RHO_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: a blob adapter needs its posterior scales ρ")
        try:
            return self._attach(super().load(base_model, directory, lora), load_file(str(path)))
        except ValueError as err:
            raise ValueError(f"{directory}: {err}") from err

    @staticmethod
    def state(model: nn.Module) -> BlobState:
        return model._blob_state

    def no_decay_parameters(self, model: nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if "blob_rho" in n or ".lora_A." in n}

    def before_step(self, model: nn.Module, seed: int) -> None:
        state = self.state(model)
        state.sampling, state.seeds = True, [seed]

    def train_outputs(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any],
                      num_samples: int) -> TrainOutputs:
        state = self.state(model)
        state.sampling = True
        if state.seeds is not None and len(state.seeds) != num_samples:
            state.seeds = [mix_seed(state.seeds[0], s) for s in range(num_samples)]
        logits, mask = scorer.choice_logits(model, batch, num_samples)
        kl = blob_kl(model, self.resolved_options()["prior_std"]).to(logits.device)
        return TrainOutputs(log_probs=log_softmax_over_choices(logits, mask, dtype=None), kl_cond=kl)

    def prepare_eval(self, model: nn.Module, mode: str) -> nn.Module:
        if mode != "merged":
            self.state(model).sampling = mode == "sample"
        return super().prepare_eval(model, mode)  # merged: the means merged, a plain model without hooks

    def predict(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], mode: str,
                samples: int, seeds: list[int], batched: bool) -> Tensor:
        if mode != "sample":
            state = getattr(model, "_blob_state", None)
            if state is not None:
                state.sampling = False
            return super().predict(model, scorer, batch, mode, samples, seeds, batched)
        state = self.state(model)
        state.sampling = True
        return predict_draws(model, scorer, batch, seeds, batched, state.seeded)
