"""The one interface every fine-tuning method implements, and the registry the CLI reads.

The trainer and the evaluator only call this interface, so a new method (a baseline, or a toy one in
a test) slots in by subclassing :class:`Method` and decorating it with :func:`register_method`.
A method decides how to build and save its model, what it outputs for the loss (per-draw log-probs
over the choices, and KL terms if it has a posterior), and how it predicts in each evaluation mode.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Optional

import torch
from torch import Tensor, nn

from ..evaluation import log_softmax_over_choices
from ..scoring import ChoiceScorer

__all__ = ["METHODS", "Method", "TrainOutputs", "get_method", "predict_draws", "register_method"]

METHODS: dict[str, type["Method"]] = {}


@dataclass
class TrainOutputs:
    """What a training forward produced: log-probs (S, B, C) and, for posteriors, KL terms."""

    log_probs: Tensor
    kl_flow: Optional[Tensor] = None
    kl_cond: Optional[Tensor] = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def kl(self) -> Optional[Tensor]:
        if self.kl_flow is None and self.kl_cond is None:
            return None
        return sum(t for t in (self.kl_flow, self.kl_cond) if t is not None)


def predict_draws(model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], seeds: list[int], batched: bool,
                  seeded: Callable[[list[int]], ContextManager]) -> Tensor:
    """Per-draw log-probs (S, B, C) in float64: one S×B pass under ``seeded(seeds)``, or S passes under
    ``seeded([seed])``; the same draws either way when ``seeded`` draws chunk s from ``seeds[s]``."""
    if batched:
        with seeded(list(seeds)):
            logits, mask = scorer.choice_logits(model, batch, len(seeds))
        return log_softmax_over_choices(logits, mask)
    out = []
    for seed in seeds:
        with seeded([seed]):
            logits, mask = scorer.choice_logits(model, batch, 1)
        out.append(log_softmax_over_choices(logits, mask))
    return torch.cat(out, 0)


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to the trainer, the evaluator and the CLI."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, options: Optional[dict[str, Any]] = None) -> "Method":
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](options or {})


class Method:
    """Base class. ``options`` is a JSON-serialisable dict recorded in the run folder."""

    name: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = ("mean",)
    default_mode: ClassVar[str] = "mean"
    stochastic: ClassVar[bool] = False  # whether several predictive samples differ
    has_posterior_scale: ClassVar[bool] = False  # whether set_posterior_scale can widen its draws
    # whether a backward that recomputes each block (--gradient-checkpointing) sees the forward's weights
    supports_gradient_checkpointing: ClassVar[bool] = True

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)

    # ---- command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Method-specific flags (common LoRA flags are added by the CLI for every method)."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    @classmethod
    def flag_value(cls, dest: str, options: dict[str, Any]) -> Any:
        """The value flag ``dest`` had for a run that recorded these resolved ``options`` (None where the run
        has no such value), so a resume can tell a flag repeated with its recorded value from a changed one."""
        return options.get(dest)

    def training_defaults(self) -> dict[str, Any]:
        """TrainConfig values this method uses when the user gives none (``recipe``, ``lr``, ...)."""
        return {"recipe": "elbo"}

    @classmethod
    def stored_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Method options read back from a run's ``config.json``: an option the run predates takes the value
        it was trained with (the method's own defaults may have changed since); by default, as recorded."""
        return dict(options)

    def resolved_options(self) -> dict[str, Any]:
        """The method options with every default filled in, as recorded in the run config."""
        if self.options:
            raise ValueError(f"method {self.name!r} takes no options, got {sorted(self.options)}")
        return {}

    def check(self, lora: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the option when this configuration cannot work, without a model: a
        suite or comparison checks every cell before its first unit trains."""
        self.resolved_options()

    # ---- model
    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))

    def load(self, base_model: nn.Module, directory: Path, lora: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def no_decay_parameters(self, model: nn.Module) -> set[str]:
        """Names of parameters that must not get weight decay (variational parameters)."""
        return set()

    def lr_factors(self, model: nn.Module, lr: float) -> dict[str, float]:
        """Per-parameter multipliers of the run's learning rate ``lr`` (names absent get 1)."""
        return {}

    # ---- training
    def train_outputs(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any],
                      num_samples: int) -> TrainOutputs:
        logits, mask = scorer.choice_logits(model, batch, 1)
        return TrainOutputs(log_probs=log_softmax_over_choices(logits, mask, dtype=None))

    def before_step(self, model: nn.Module, seed: int) -> None:
        """Called before each training forward with a seed derived from (run seed, global step)."""

    def check_health(self, model: nn.Module) -> None:
        """Raise with a clear error if the trained state cannot work (called on every rank at each epoch
        end, before validation and before the adapter is saved)."""

    def epoch_stats(self, model: nn.Module) -> dict[str, Any]:
        return {}

    # ---- prediction
    def prepare_eval(self, model: nn.Module, mode: str) -> nn.Module:
        if mode not in self.modes:
            raise ValueError(f"--mode {mode!r} is not available for method {self.name!r} "
                             f"(available: {', '.join(self.modes)})")
        return model

    def draws(self, mode: str, samples: int) -> int:
        """How many predictive draws one prediction makes: ``samples`` in sample mode if stochastic, else 1."""
        return samples if (self.stochastic and mode == "sample") else 1

    def set_posterior_scale(self, model: nn.Module, scale: float) -> None:
        """Multiply the spread of every posterior draw by ``scale`` (post-hoc calibration)."""
        raise ValueError(f"method {self.name!r} has no posterior whose spread can be scaled")

    def predict(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], mode: str,
                samples: int, seeds: list[int], batched: bool) -> Tensor:
        """Per-draw log-probs (S, B, C) in float64; deterministic methods return S = 1."""
        logits, mask = scorer.choice_logits(model, batch, 1)
        return log_softmax_over_choices(logits, mask)
