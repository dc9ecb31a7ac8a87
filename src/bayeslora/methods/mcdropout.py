"""MC-dropout LoRA (Gal & Ghahramani 2016): LoRA trained with dropout on its input, kept on at test.

Sample mode swaps each LoRA dropout layer for a :class:`SeededDropout` for the duration of a prediction:
the S×B repeated batch is cut into its S draws and draw s takes its masks from a generator seeded by
(seed s, layer), so one batched pass equals S sequential ones, the same seeds give the same predictions,
and no global RNG (CPU or CUDA) is consumed. The base model's own dropout stays off, as ``model.eval()``
leaves it. Mean mode (and merged) is plain LoRA with dropout off: the standard deterministic
approximation of the MC-dropout predictive.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..scoring import ChoiceScorer
from ..seeding import mix_seed
from .base import predict_draws, register_method
from .lora import LoraMethod

__all__ = ["MCDROPOUT_RATE", "McDropoutMethod", "SeededDropout", "seeded_dropout"]

MCDROPOUT_RATE = 0.1


class SeededDropout(nn.Module):
    """Inverted dropout whose input holds ``len(seeds)`` draws stacked on dim 0, each masked from its own
    generator seeded by (seed, ``index``)."""

    def __init__(self, p: float, index: int, seeds: list[int]) -> None:
        super().__init__()
        self.p, self.index, self.seeds = p, index, seeds

    def forward(self, x: Tensor) -> Tensor:
        out = []
        for seed, chunk in zip(self.seeds, x.chunk(len(self.seeds), dim=0)):
            gen = torch.Generator(device=x.device).manual_seed(mix_seed(seed, self.index))
            keep = torch.rand(chunk.shape, generator=gen, device=x.device) >= self.p
            out.append(chunk * keep.to(chunk.dtype) / (1 - self.p))
        return torch.cat(out, 0)


def _dropout_tables(model: nn.Module) -> list[tuple[nn.ModuleDict, str, nn.Dropout]]:
    """(PEFT ``lora_dropout`` dict, adapter, layer) for every LoRA input dropout with p > 0."""
    out = []
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if isinstance(table, nn.ModuleDict):
            out += [(table, name, m) for name, m in table.items() if isinstance(m, nn.Dropout) and m.p > 0]
    return out


def lora_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """The dropout layers on the LoRA inputs of every adapted module."""
    return [m for _, _, m in _dropout_tables(model)]


@contextlib.contextmanager
def seeded_dropout(model: nn.Module, seeds: list[int]) -> Iterator[None]:
    """LoRA dropout on, draw s of each forward masked from seed s; the original layers come back after."""
    tables = _dropout_tables(model)
    for index, (table, name, layer) in enumerate(tables):
        table[name] = SeededDropout(layer.p, index, list(seeds))
    try:
        yield
    finally:
        for table, name, layer in tables:
            table[name] = layer


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
        return predict_draws(model, scorer, batch, seeds, batched, lambda s: seeded_dropout(model, s))
