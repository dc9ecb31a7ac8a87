"""``add_weighted_adapter`` on models with Bayesian adapters: a plain LoRA adapter from posterior means.

PEFT's ``LoraModel.add_weighted_adapter`` reads the ``lora_A``/``lora_B`` weights of its sources. A
Bayesian adapter has none, so PEFT alone would inject a fresh (random) Bayesian adapter and skip every
layer, silently. Combining posteriors has no standard meaning; combining posterior means (the weights
``merge_and_unload`` merges, scaling · E[B] E[A]) does. So :func:`install` (called by
``bayeslora.attach``) gives the model's ``LoraModel`` this method: each Bayesian source becomes a
temporary plain adapter holding E[A], E[B] (same rank, alpha and targets), PEFT's own method combines
them with any of its combination types, and the temporaries are deleted. The result is a **plain,
deterministic LoRA adapter**; its config has ``bayesian_modules=[]``.
"""

from __future__ import annotations

import dataclasses
import types

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .layer import BayesLoraLinear

__all__ = ["add_weighted_adapter", "install"]

_SUFFIX = "__posterior_mean"


def _layers(lora_model: nn.Module) -> list[BayesLoraLinear]:
    return [m for m in lora_model.model.modules() if isinstance(m, BayesLoraLinear)]


def _as_plain_adapter(lora_model: LoraModel, adapter: str) -> str:
    """Add a plain adapter holding ``adapter``'s posterior means (plain layers copied); its name."""
    name = adapter + _SUFFIX
    if name in lora_model.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter name {name!r} is taken; it is needed for a temporary")
    lora_model.peft_config[name] = dataclasses.replace(lora_model.peft_config[adapter], bayesian_modules=[])
    lora_model.inject_adapter(lora_model.model, name)
    with torch.no_grad():
        for layer in _layers(lora_model):
            if name not in layer.lora_A:
                continue
            if adapter in layer.lora_bayes:
                means = layer.mean_weights(adapter, refresh=True)
                source_a, source_b = means["A"], means["B"]
            elif adapter in layer.lora_A:
                source_a, source_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            else:
                continue
            target_a, target_b = layer.lora_A[name].weight, layer.lora_B[name].weight
            target_a.copy_(source_a.to(target_a.dtype))
            target_b.copy_(source_b.to(target_b.dtype))
    return name


def add_weighted_adapter(self: LoraModel, adapters: list[str], weights: list[float], adapter_name: str,
                         *args, **kwargs) -> None:
    """PEFT's ``add_weighted_adapter``; Bayesian sources enter through their posterior means."""
    bayesian = {a for layer in _layers(self) for a in layer.lora_bayes if a in adapters}
    if not bayesian or adapter_name in self.peft_config:
        return LoraModel.add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs)
    missing = [a for a in adapters if a not in self.peft_config]
    if missing:
        raise ValueError(f"add_weighted_adapter: adapter {missing[0]!r} does not exist")
    temporaries: list[str] = []
    try:
        sources = []
        for adapter in adapters:
            if adapter in bayesian:
                temporaries.append(_as_plain_adapter(self, adapter))
                sources.append(temporaries[-1])
            else:
                sources.append(adapter)
        LoraModel.add_weighted_adapter(self, sources, weights, adapter_name, *args, **kwargs)
    finally:
        for name in temporaries:
            self.delete_adapter(name)


def install(lora_model: nn.Module) -> None:
    """Give this ``LoraModel`` instance the method above (``PeftModel`` forwards to it)."""
    if isinstance(lora_model, LoraModel):
        lora_model.__dict__["add_weighted_adapter"] = types.MethodType(add_weighted_adapter, lora_model)
