"""``add_weighted_adapter`` on models with Bayesian adapters: a plain LoRA adapter from posterior means.

PEFT's ``LoraModel.add_weighted_adapter`` reads the ``lora_A``/``lora_B`` weights of its sources. A
Bayesian adapter has none, so PEFT alone would inject a fresh (random) Bayesian adapter and skip every
layer, silently. Combining posteriors has no standard meaning; combining posterior means (the weights
``merge_and_unload`` merges, scaling · E[B] E[A]) does. So :func:`install` (called by
``bayeslora.attach``) makes the model's ``LoraModel`` a :class:`BayesLoraModel`, a subclass whose only
change is this method (a class, so it survives pickling and ``deepcopy``): each Bayesian source becomes a
temporary plain adapter holding E[A], E[B] (same rank, alpha and targets), PEFT's own method combines
them with any of its combination types, and the temporaries are deleted. The result is a **plain,
deterministic LoRA adapter**; its config has ``bayesian_modules=[]``.
"""

from __future__ import annotations

import dataclasses

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .layer import BayesLoraLinear

__all__ = ["BayesLoraModel", "install"]

_SUFFIX = "__posterior_mean"


def _layers(lora_model: nn.Module) -> list[BayesLoraLinear]:
    return [m for m in lora_model.model.modules() if isinstance(m, BayesLoraLinear)]


def _as_plain_adapter(lora_model: LoraModel, adapter: str) -> str:
    """Add a plain adapter holding ``adapter``'s posterior means (plain layers copied); its name."""
    name = adapter + _SUFFIX
    if name in lora_model.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter name {name!r} is taken; it is needed for a temporary")
    lora_model.peft_config[name] = dataclasses.replace(lora_model.peft_config[adapter], bayesian_modules=[],
                                                       output_rows=None)
    lora_model.inject_adapter(lora_model.model, name)
    with torch.no_grad():
        for layer in _layers(lora_model):
            if name not in layer.lora_A:
                continue
            if adapter in layer.lora_bayes:
                means = layer.mean_weights(adapter, refresh=True)
                source_a, source_b = means["A"], layer.full_rows(adapter, means["B"])
            elif adapter in layer.lora_A:
                source_a, source_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            else:
                continue
            target_a, target_b = layer.lora_A[name].weight, layer.lora_B[name].weight
            target_a.copy_(source_a.to(target_a.dtype))
            target_b.copy_(source_b.to(target_b.dtype))
    return name


class BayesLoraModel(LoraModel):
    """PEFT's LoraModel; ``add_weighted_adapter`` also takes Bayesian sources (their posterior means)."""

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             *args, **kwargs) -> None:
        bayesian = {a for layer in _layers(self) for a in layer.lora_bayes if a in adapters}
        if not bayesian or adapter_name in self.peft_config:
            return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"add_weighted_adapter: adapter {missing[0]!r} does not exist")
        temporaries: dict[str, str] = {}
        try:
            for adapter in dict.fromkeys(adapters):  # each source once, even when listed twice
                if adapter in bayesian:
                    temporaries[adapter] = _as_plain_adapter(self, adapter)
            sources = [temporaries.get(a, a) for a in adapters]
            super().add_weighted_adapter(sources, weights, adapter_name, *args, **kwargs)
        finally:
            for name in temporaries.values():
                self.delete_adapter(name)


def install(tuner: nn.Module) -> None:
    """Make a PeftModel's ``LoraModel`` a :class:`BayesLoraModel` (same state, one more capability);
    anything else (a model with injected layers, another LoraModel subclass) is left as it is."""
    if type(tuner) is LoraModel:
        tuner.__class__ = BayesLoraModel
