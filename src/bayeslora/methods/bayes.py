"""Bayesian-LoRA: the ELBO-trained adapter of this package, with sample, mean and merged prediction."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
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

def _flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _std_or_lora(text: str) -> float | str:
    if text == "lora":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'lora', got {text!r}") from None


def _as_flag(value: Any, name: str) -> bool:
    """A boolean option given as a bool or, from a JSON cell or suite, as "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return _flag(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"bayeslora option {name}: {err}") from None
    raise ValueError(f"bayeslora option {name} must be true or false, got {value!r}")


# BayesLoraConfig fields on the command line as --<name with dashes>; default and help come from the config.
POSTERIOR_FIELDS = {
    "inducing_rows": int, "inducing_cols": int, "flow_depth": int, "flow_hidden": int, "prior_std": float,
    "lambda_init": float, "lambda_max": float, "sigma_u_init": float, "sigma_u_max": float,
    "init_lora_weights": _flag, "inducing_diag_init": float, "jitter": float, "inducing_dtype": str,
    "mean_samples": int, "prior_at_init": _flag, "mean_init_std": _std_or_lora, "lora_offset": _flag,
}

# PEFT's own help of a field it declares, where Bayesian-LoRA accepts less than PEFT does.
HELP_OVERRIDES = {
    "init_lora_weights": "true: E[B] = 0 at init, so the adapter starts at the base model; false: random inducing "
                         "means (the paper's init). PEFT's other schemes (gaussian, pissa, loftq, ...) are not "
                         "supported for Bayesian factors",
}

LABEL_ROWS_HELP = ("true: the Bayesian output head (lm_head: add it to --target-modules and --bayesian-modules) "
                   "changes only the rows of the answer-label tokens, so its B factor is labels×r instead of "
                   "vocabulary×r, the largest draw of a causal LM; needs --scoring labels (the other protocols "
                   "read every row)")

# Parameter roles of an inducing factor, each with its own learning-rate multiplier (--<role>-lr-factor).
ROLES = {"inducing_mean": "mean", "inducing_rho": "scale", "lambda_raw": "scale", "z_rows": "geometry",
         "z_cols": "geometry", "delta_rows": "geometry", "delta_cols": "geometry"}
LR_FACTOR_HELP = {
    "mean": "inducing means m",
    "geometry": "inducing locations Z and diagonals D",
    "flow": "flow conditioners",
}
# The scales (ρ_U behind σ_U, and ℓ behind λ) are log-like: Adam moves them by about their learning rate
# per step whatever the task's lr, so theirs is absolute (None = the run's lr).
SCALE_LR_HELP = "absolute learning rate of the posterior scales ρ_U (σ_U) and ℓ (λ); unset = the run's lr"


@dataclass(frozen=True)
class Preset:
    """A named set of Bayesian-LoRA defaults: posterior fields, lr multipliers and training options."""

    posterior: dict[str, Any]
    lr_factors: dict[str, float]
    scale_lr: float | None
    training: dict[str, Any]


PRESETS = {
    # ours, measured on the val slices (README, training notes): the posterior is centred on a LoRA point
    # factor W₀ that trains as LoRA's factors do (lora_offset), with the paper's prior scale; λ is left to
    # the ELBO (its KL is least at the prior's own conditional, λ = 1; the bound of 10 is never reached)
    "default": Preset(posterior={"lora_offset": True, "prior_std": 0.1, "lambda_max": 10.0},
                      lr_factors={"mean": 10.0, "geometry": 10.0, "flow": 10.0}, scale_lr=0.1,
                      training={"recipe": "elbo", "lr": 1e-3}),
    # the default of stops 19 to 28: METHOD.md's construction (the inducing mean carries E[W]) with A
    # started at PEFT's random-A norm and its prior centred there (README, "Why it is under-confident")
    "inducing-mean": Preset(posterior={"mean_init_std": "lora", "prior_at_init": True},
                            lr_factors={"mean": 10.0, "geometry": 10.0, "flow": 10.0}, scale_lr=0.1,
                            training={"recipe": "elbo", "lr": 1e-3}),
    # the authors' settings (METHOD.md sections 2 and 3)
    "paper": Preset(
        posterior={"prior_std": 0.1, "sigma_u_init": 1e-3, "sigma_u_max": 0.1, "lambda_init": 1e-3,
                   "lambda_max": 0.03, "init_lora_weights": False, "flow_depth": 1},
        lr_factors={"mean": 1.0, "geometry": 1.0, "flow": 1.0}, scale_lr=None,
        training={"recipe": "paper"},
    ),
}


def parameter_role(name: str) -> str | None:
    """The role of a Bayesian parameter from its name (None for anything that is not one)."""
    if "lora_bayes" not in name:
        return None
    if ".flow." in name:
        return "flow"
    return ROLES.get(name.rsplit(".", 1)[-1])


def _output_head_name(model: nn.Module) -> str:
    """The module name of the model's output embeddings (``lm_head`` in most causal LMs)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if m is head] if head is not None else []
    if not names:
        raise ValueError("--label-rows true needs a causal LM with an output head (get_output_embeddings)")
    return names[0]


@register_method
class BayesLoraMethod(Method):
    name = "bayeslora"
    modes = ("sample", "mean", "merged")
    default_mode = "sample"
    stochastic = True
    has_posterior_scale = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("bayeslora posterior (unset = the preset's value)")
        group.add_argument("--preset", choices=sorted(PRESETS), default="default",
                           help="named Bayesian-LoRA defaults: 'default' (ours, measured: centred on a LoRA "
                                "point factor), 'inducing-mean' (the previous default: METHOD.md's construction, "
                                "A at LoRA's norm) or 'paper' (the authors' posterior settings and recipe)")
        group.add_argument("--bayesian-modules", nargs="*", default=None,
                           help="which targets are Bayesian (default: all targets)")
        group.add_argument("--label-rows", type=_flag, default=None,
                           help=f"{LABEL_ROWS_HELP} (default false)")
        fields = BayesLoraConfig.__dataclass_fields__
        for name, kind in POSTERIOR_FIELDS.items():
            default = PRESETS["default"].posterior.get(name, fields[name].default)  # what an unset flag gets
            group.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                               help=f"{HELP_OVERRIDES.get(name, fields[name].metadata.get('help'))} "
                                    f"(default {default})")
        for role, what in LR_FACTOR_HELP.items():
            group.add_argument(f"--{role}-lr-factor", type=float, default=None,
                               help=f"learning-rate multiplier of the {what} "
                                    f"(default {PRESETS['default'].lr_factors[role]})")
        group.add_argument("--scale-lr", type=float, default=None,
                           help=f"{SCALE_LR_HELP} (default {PRESETS['default'].scale_lr})")

    @classmethod
    def flag_value(cls, dest: str, options: dict[str, Any]) -> Any:
        role = dest.removesuffix("_lr_factor")
        return options.get("lr_factors", {}).get(role) if role in LR_FACTOR_HELP else options.get(dest)

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        options = {name: getattr(args, name) for name in POSTERIOR_FIELDS if getattr(args, name) is not None}
        options["preset"] = args.preset
        options["bayesian_modules"] = args.bayesian_modules
        if args.label_rows is not None:
            options["label_rows"] = args.label_rows
        factors = {role: getattr(args, f"{role}_lr_factor") for role in LR_FACTOR_HELP}
        options["lr_factors"] = {k: v for k, v in factors.items() if v is not None}
        if args.scale_lr is not None:
            options["scale_lr"] = args.scale_lr
        return options

    @classmethod
    def stored_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """A run records every posterior field there was when it trained; one it predates was at its
        ``BayesLoraConfig`` default then (new fields default to the old behaviour), whatever today's preset
        says: a run of the stop-19 default has no ``lora_offset`` and was trained without one."""
        fields = BayesLoraConfig.__dataclass_fields__
        return {**{name: fields[name].default for name in POSTERIOR_FIELDS}, **options}

    def _preset(self) -> Preset:
        name = self.options.get("preset", "default")
        if name not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
        return PRESETS[name]

    def training_defaults(self) -> dict[str, Any]:
        return dict(self._preset().training)

    def resolved_options(self) -> dict[str, Any]:
        preset = self._preset()
        fields = BayesLoraConfig.__dataclass_fields__
        posterior = {name: fields[name].default for name in POSTERIOR_FIELDS}
        given = {k: v for k, v in self.options.items() if k in POSTERIOR_FIELDS}
        unknown = sorted(set(self.options) - set(POSTERIOR_FIELDS)
                         - {"preset", "bayesian_modules", "lr_factors", "scale_lr", "label_rows"})
        if unknown:
            raise ValueError(f"bayeslora: unknown method options {unknown}")
        factors = {**preset.lr_factors, **self.options.get("lr_factors", {})}
        scale_lr = self.options.get("scale_lr", preset.scale_lr)
        for flag, value in [*((f"--{role}-lr-factor", v) for role, v in factors.items()), ("--scale-lr", scale_lr)]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ValueError(f"{flag} must be a positive finite number, got {value!r} (AdamW divides the "
                                 "group's weight decay by it)")
        return {
            **posterior, **preset.posterior, **given,
            "preset": self.options.get("preset", "default"),
            "bayesian_modules": self.options.get("bayesian_modules"),
            "label_rows": _as_flag(self.options.get("label_rows", False), "label_rows"),
            "lr_factors": factors,
            "scale_lr": scale_lr,
        }

    def config(self, lora: dict[str, Any], output_rows: dict[str, list[int]] | None = None) -> BayesLoraConfig:
        options = self.resolved_options()
        fields = {k: v for k, v in options.items() if k in POSTERIOR_FIELDS or k == "bayesian_modules"}
        return BayesLoraConfig(**lora_config_kwargs(lora), **fields, output_rows=output_rows)

    def check(self, lora: dict[str, Any]) -> None:
        self.config(lora)  # BayesLoraConfig validates the posterior fields

    def lr_factors(self, model: nn.Module, lr: float) -> dict[str, float]:
        options = self.resolved_options()
        factors = dict(options["lr_factors"])
        factors["scale"] = 1.0 if options["scale_lr"] is None else options["scale_lr"] / lr
        out = {}
        for name, p in model.named_parameters():
            role = parameter_role(name)
            if p.requires_grad and role is not None:
                out[name] = factors[role]
        return out

    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        if not self.resolved_options()["label_rows"]:
            return surgery.get_model(base_model, self.config(lora))
        rows = lora.get("answer_rows")
        if rows is None:
            raise ValueError("--label-rows true needs --scoring labels: the choice log-likelihood protocols "
                             "read every vocabulary row of the lm_head")
        head = _output_head_name(base_model)
        config = self.config(lora, output_rows={head: list(rows)})
        try:
            surgery.resolve_targets(base_model, config)  # before the model is touched
        except ValueError as err:
            raise ValueError(f"--label-rows true: the output head {head!r} is not a Bayesian target; add it to "
                             f"--target-modules and --bayesian-modules ({err})") from err
        return surgery.get_model(base_model, config)

    def load(self, base_model: nn.Module, directory: Path, lora: dict[str, Any]) -> nn.Module:
        return surgery.load(base_model, directory)

    def no_decay_parameters(self, model: nn.Module) -> set[str]:
        """The variational parameters; a point factor W₀ (``lora_offset``) is a point estimate and decays as
        LoRA's factors do under ``--weight-decay``."""
        return {n for n, p in model.named_parameters()
                if p.requires_grad and "lora_bayes" in n and not n.endswith(".offset")}

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

    def check_health(self, model: nn.Module) -> None:
        surgery.get_sampler(model).check_posterior()  # a deferred factorisation failure surfaces by epoch end

    def epoch_stats(self, model: nn.Module) -> dict[str, Any]:
        stats = surgery.posterior_stats(model)
        keys = ("lambda", "sigma_u_mean", "mean_norm", "deviation_norm", "prior_norm")
        return {f"{s['module']}.{s['factor']}": {k: s[k] for k in keys} for s in stats}

    def prepare_eval(self, model: nn.Module, mode: str) -> nn.Module:
        super().prepare_eval(model, mode)
        if mode == "merged":
            surgery.set_mode(model, "mean")
            return model.merge_and_unload()
        surgery.set_mode(model, mode)
        return model

    def set_posterior_scale(self, model: nn.Module, scale: float) -> None:
        surgery.set_posterior_scale(model, scale)

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
