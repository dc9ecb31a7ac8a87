"""MC-dropout LoRA (Gal & Ghahramani 2016): LoRA trained with dropout on its input, kept on at test.

Sample mode runs S forwards with only the LoRA dropout layers in training mode (the base model's own
dropout stays off, as ``model.eval()`` leaves it), each draw seeded: batched, the S×B repeated batch is
one pass whose per-row masks come from one generator seeded by the draws' seeds; sequential, draw s is a
pass seeded by seed s. Either way the same seeds give the same predictions, and a draw never touches
torch's global RNG. Mean mode (and merged) is plain LoRA with dropout off: the standard deterministic
approximation of the MC-dropout predictive.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..evaluation import log_softmax_over_choices
from ..scoring import ChoiceScorer
from ..seeding import mix_seed
from .base import register_method
from .lora import LoraMethod

__all__ = ["MCDROPOUT_RATE", "McDropoutMethod"]

MCDROPOUT_RATE = 0.1


def lora_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """The dropout layers on the LoRA inputs of every adapted module (PEFT's ``lora_dropout`` dicts)."""
    out = []
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if isinstance(table, nn.ModuleDict):
            out += [m for m in table.values() if isinstance(m, nn.Dropout)]
    return out


@contextlib.contextmanager
def dropout_on(model: nn.Module, seed: int) -> Iterator[None]:
    """LoRA dropout active, drawing from torch's RNG forked and seeded with ``seed`` (restored after)."""
    layers = lora_dropouts(model)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for layer in layers:
            layer.train()
        try:
            yield
        finally:
            for layer in layers:
                layer.eval()


@register_method
class McDropoutMethod(LoraMethod):
    name = "mcdropout"
    modes = ("sample", "mean", "merged")
    default_mode = "sample"
    stochastic = True

    def training_defaults(self) -> dict[str, Any]:
        return {"recipe": "elbo", "lora_dropout": MCDROPOUT_RATE}

    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        if not lora["dropout"] > 0:
            raise ValueError("--method mcdropout needs --lora-dropout > 0 (its samples are dropout masks)")
        return super().build(base_model, lora)

    def predict(self, model: nn.Module, scorer: ChoiceScorer, batch: dict[str, Any], mode: str,
                samples: int, seeds: list[int], batched: bool) -> Tensor:
        if mode != "sample":
            return super().predict(model, scorer, batch, mode, samples, seeds, batched)
        if not lora_dropouts(model):
            raise ValueError("this mcdropout run has no LoRA dropout layers (was it trained with --lora-dropout 0?)")
        if batched:
            with dropout_on(model, mix_seed(*seeds)):
                logits, mask = scorer.choice_logits(model, batch, samples)
            return log_softmax_over_choices(logits, mask)
        out = []
        for seed in seeds:
            with dropout_on(model, seed):
                logits, mask = scorer.choice_logits(model, batch, 1)
            out.append(log_softmax_over_choices(logits, mask))
        return torch.cat(out, 0)
