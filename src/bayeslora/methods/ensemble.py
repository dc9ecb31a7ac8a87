"""Deep ensemble of LoRA adapters (Lakshminarayanan et al. 2017), trained as the members of one run.

K independently initialised PEFT LoRA adapters (``default``, ``member-1``, ... ``member-{K-1}``) live in
one PeftModel. Every training step runs each member on the same batch and averages their losses: with
Adam the 1/K weight is immaterial, so each member trains as it would alone, except that gradient
clipping acts on the members' joint gradient. Prediction averages the K members' probabilities (the
K draws of sample mode). Training and prediction cost K forwards: report the ensemble as K× LoRA.
An encoder's choice head belongs to the scorer and is shared by the members (the adapters differ).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from ..evaluation import log_softmax_over_choices
from ..scoring import ChoiceScorer
from .base import TrainOutputs, register_method
from .lora import LoraMethod, lora_config_kwargs

__all__ = ["ENSEMBLE_SIZE", "EnsembleMethod", "member_names"]

ENSEMBLE_SIZE = 3


def member_names(size: int) -> list[str]:
    """PEFT saves the adapter named ``default`` at the folder's root and the others in sub-folders."""
    return ["default"] + [f"member-{k}" for k in range(1, size)]


@contextlib.contextmanager
def active_member(model: nn.Module, name: str) -> Iterator[None]:
    """Route every LoRA layer through one member, without PEFT's set_adapter (which freezes the others)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m._active_adapter = p


@register_method
class EnsembleMethod(LoraMethod):
    name = "ensemble"
    modes = ("sample",)
    default_mode = "sample"
    stochastic = True
    # each member's forward switches the active adapter and restores it before the shared backward, so
    # a block recomputed there would run with the first member's weights
    supports_gradient_checkpointing = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ensemble")
        group.add_argument("--ensemble-size", type=int, default=None,
                           help=f"number of LoRA members K (default {ENSEMBLE_SIZE}); costs K× LoRA")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {} if args.ensemble_size is None else {"size": args.ensemble_size}

    @classmethod
    def flag_value(cls, dest: str, options: dict[str, Any]) -> Any:
        return options.get("size") if dest == "ensemble_size" else options.get(dest)

    def resolved_options(self) -> dict[str, Any]:
        unknown = sorted(set(self.options) - {"size"})
        if unknown:
            raise ValueError(f"ensemble: unknown method options {unknown}")
        size = self.options.get("size", ENSEMBLE_SIZE)
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"--ensemble-size must be an integer >= 2, got {size!r}")
        return {"size": size}

    @property
    def members(self) -> list[str]:
        return member_names(self.resolved_options()["size"])

    def draws(self, mode: str, samples: int) -> int:
        return len(self.members)

    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        config = peft.LoraConfig(**lora_config_kwargs(lora))
        model = peft.get_peft_model(base_model, config)
        for name in self.members[1:]:  # each draws its own A from the RNG stream: independent inits
            model.add_adapter(name, peft.LoraConfig(**lora_config_kwargs(lora)))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        return model

    def load(self, base_model: nn.Module, directory: Path, lora: dict[str, Any]) -> nn.Module:
        model = peft.PeftModel.from_pretrained(base_model, str(directory))
        for name in self.members[1:]:
            if not (Path(directory) / name).is_dir():
                raise FileNotFoundError(f"{directory / name}: ensemble member {name!r} is missing")
            model.load_adapter(str(Path(directory) / name), adapter_name=name)
        return model

    def prepare_eval(self, model: nn.Module, mode: str) -> nn.Module:
        return super(LoraMethod, self).prepare_eval(model, mode)

    def _member_log_probs(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any],
                          dtype: torch.dtype | None) -> Tensor:
        out = []
        for name in self.members:
            with active_member(model, name):
                logits, mask = scorer.choice_logits(model, batch, 1)
            out.append(log_softmax_over_choices(logits, mask, dtype=dtype))
        return torch.cat(out, 0)

    def train_outputs(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any],
                      num_samples: int) -> TrainOutputs:
        return TrainOutputs(log_probs=self._member_log_probs(model, scorer, batch, None))

    def predict(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], mode: str,
                samples: int, seeds: list[int], batched: bool) -> Tensor:
        super(LoraMethod, self).prepare_eval(model, mode)
        return self._member_log_probs(model, scorer, batch, torch.float64)
