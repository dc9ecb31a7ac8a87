"""Bayesian-LoRA: the ELBO-trained adapter of this package, with sample, mean and merged prediction."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import surgery
from ..config import BayesLoraConfig
from ..evaluation import log_softmax_over_choices
from ..scoring import ChoiceScorer
from .base import Method, TrainOutputs, register_method
from .lora import lora_config_kwargs

__all__ = ["BayesLoraMethod"]

# BayesLoraConfig fields exposed on the command line as --<name with dashes>
_POSTERIOR_FIELDS = {
    "inducing_rows": int, "inducing_cols": int, "flow_depth": int, "flow_hidden": int, "prior_std": float,
    "lambda_init": float, "lambda_max": float, "sigma_u_init": float, "sigma_u_max": float,
}


@register_method
class BayesLoraMethod(Method):
    name = "bayeslora"
    modes = ("sample", "mean", "merged")
    default_mode = "sample"
    stochastic = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("bayeslora posterior")
        group.add_argument("--bayesian-modules", nargs="*", default=None,
                           help="which targets are Bayesian (default: all targets)")
        defaults = BayesLoraConfig.__dataclass_fields__
        for name, kind in _POSTERIOR_FIELDS.items():
            group.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name].default,
                               help=defaults[name].metadata.get("help"))

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        options = {name: getattr(args, name) for name in _POSTERIOR_FIELDS}
        options["bayesian_modules"] = args.bayesian_modules
        return options

    def config(self, lora: dict[str, Any]) -> BayesLoraConfig:
        return BayesLoraConfig(**lora_config_kwargs(lora), **self.options)

    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        return surgery.get_model(base_model, self.config(lora))

    def load(self, base_model: nn.Module, directory: Path, lora: dict[str, Any]) -> nn.Module:
        return surgery.load(base_model, directory)

    def no_decay_parameters(self, model: nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad and "lora_bayes" in n}

    def before_step(self, model: nn.Module, seed: int) -> None:
        surgery.set_draw_seed(model, seed)

    def train_outputs(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any],
                      num_samples: int) -> TrainOutputs:
        surgery.set_mode(model, "sample", num_samples)
        logits, mask = scorer.choice_logits(model, batch, num_samples)
        rows = surgery.kl_breakdown(model)
        kl_flow = torch.stack([r["kl_flow"] for r in rows]).sum()
        kl_cond = torch.stack([r["kl_cond"] for r in rows]).sum()
        return TrainOutputs(log_probs=log_softmax_over_choices(logits, mask, dtype=None),
                            kl_flow=kl_flow, kl_cond=kl_cond)

    def epoch_stats(self, model: nn.Module) -> dict[str, Any]:
        stats = surgery.posterior_stats(model)
        return {f"{s['module']}.{s['factor']}": {"lambda": s["lambda"], "sigma_u_mean": s["sigma_u_mean"]}
                for s in stats}

    def prepare_eval(self, model: nn.Module, mode: str) -> nn.Module:
        super().prepare_eval(model, mode)
        if mode == "merged":
            surgery.set_mode(model, "mean")
            return model.merge_and_unload()
        surgery.set_mode(model, mode)
        return model

    def predict(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], mode: str,
                samples: int, seeds: list[int], batched: bool) -> Tensor:
        if mode != "sample":
            return super().predict(model, scorer, batch, mode, samples, seeds, batched)
        sampler = surgery.get_sampler(model)
        state = (sampler.mode, sampler.num_samples, sampler.draw_seed, sampler.draw_seeds)
        try:
            return self._predict_samples(model, scorer, batch, samples, seeds, batched)
        finally:  # leave the model's sampling as the caller had it
            sampler.set_mode(*state[:2])
            sampler.draw_seed, sampler.draw_seeds = state[2], state[3]

    def _predict_samples(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], samples: int,
                         seeds: list[int], batched: bool) -> Tensor:
        if batched:
            surgery.set_mode(model, "sample", samples)
            surgery.set_draw_seeds(model, seeds)
            logits, mask = scorer.choice_logits(model, batch, samples)
            return log_softmax_over_choices(logits, mask)
        surgery.set_mode(model, "sample", 1)
        out = []
        for seed in seeds:
            surgery.set_draw_seeds(model, [seed])
            logits, mask = scorer.choice_logits(model, batch, 1)
            out.append(log_softmax_over_choices(logits, mask))
        return torch.cat(out, 0)
