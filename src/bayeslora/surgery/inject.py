"""Putting Bayesian-LoRA layers into a model through PEFT's custom-module dispatch.

PEFT's ``LoraConfig._register_custom_module`` lets a config map base-layer types to LoRA layer
classes; we map ``nn.Linear`` and GPT-2's ``Conv1D`` to :class:`BayesLoraLinear`. Everything else
(target matching, ``modules_to_save``, freezing, the PeftModel wrapper) is PEFT's own code. Before
injecting, we resolve the targets ourselves so that a bad config fails *before* the user's model is
modified, with an error that names the field.
"""

from __future__ import annotations

import copy
from typing import Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import BayesLoraConfig, matches_module
from .layer import BayesLoraLinear, is_quantized

__all__ = ["adapter_layers", "prepare_config", "resolve_targets", "undo_injection", "untie_targets"]


def dispatch_bayeslora(target: nn.Module, adapter_name: str, config, **kwargs):
    """PEFT custom-module factory: a BayesLoraLinear for Linear/Conv1D targets (plain or Bayesian)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    key = kwargs.get("target_name", "")
    if is_quantized(base):
        if not (isinstance(config, BayesLoraConfig) and config.is_bayesian(key)):
            return None  # PEFT's own quantized LoRA layers handle plain adapters
        # A Bayesian factor never touches the base weight: the quantized layer computes its own output
        # and the posterior's delta is added in float32 (merging is refused, see BayesLoraLinear.merge).
        config.fan_in_fan_out = False
        return BayesLoraLinear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, Conv1D):
        kwargs["is_target_conv_1d_layer"] = True
        config.fan_in_fan_out = True
    elif isinstance(base, nn.Linear):
        config.fan_in_fan_out = False  # per layer, as PEFT does; a GPT-2 lm_head is an nn.Linear
    return BayesLoraLinear(target, adapter_name, config=config, **kwargs)


def register_layers(config: BayesLoraConfig) -> None:
    """Route Linear and Conv1D targets of ``config`` to BayesLoraLinear (PEFT custom-module dispatch)."""
    config._register_custom_module({nn.Linear: dispatch_bayeslora, Conv1D: dispatch_bayeslora})


def prepare_config(config: BayesLoraConfig) -> BayesLoraConfig:
    """Validate (fields may have been changed since construction) and register our layer class."""
    if not isinstance(config, BayesLoraConfig):
        raise TypeError(f"expected a BayesLoraConfig, got {type(config).__name__}")
    config.validate()
    register_layers(config)
    return config


def resolve_targets(model: nn.Module, config: BayesLoraConfig) -> list[str]:
    """Names of the modules PEFT will wrap; raises ValueError naming the field on a bad config."""
    resolved = copy.copy(config)
    if resolved.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ValueError(
                f"BayesLoraConfig.target_modules is None and there are no defaults for model type "
                f"{model_type!r}: give target_modules explicitly"
            )
        resolved.target_modules = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    resolved = _maybe_include_all_linear_layers(resolved, model)
    keys = [k for k, _ in model.named_modules() if k and check_target_module_exists(resolved, k)]
    targets = resolved.target_modules
    if not isinstance(targets, str):
        for name in sorted(targets):
            if not any(matches_module([name], k) for k in keys):
                raise ValueError(f"BayesLoraConfig.target_modules: {name!r} matches no module of the model"
                                 + _excluded_by_layers(model, resolved, [name]))
    if not keys:
        raise ValueError(f"BayesLoraConfig.target_modules: {targets!r} matches no module of the model"
                         + _excluded_by_layers(model, resolved, targets if isinstance(targets, str) else list(targets)))
    bayes = config.bayesian_modules
    if bayes is not None:
        patterns = [bayes] if isinstance(bayes, str) else bayes
        for pattern in patterns:
            probe = pattern if isinstance(bayes, str) else [pattern]
            if not any(matches_module(probe, k) for k in keys):
                raise ValueError(
                    f"BayesLoraConfig.bayesian_modules: {pattern!r} is not among the targeted modules "
                    f"({', '.join(sorted(keys)[:8])}{', ...' if len(keys) > 8 else ''})"
                )
    _check_target_kinds(model, config, keys)
    for name, rows in (config.output_rows or {}).items():
        if not any(matches_module([name], k) and config.is_bayesian(k) for k in keys):
            raise ValueError(f"BayesLoraConfig.output_rows: {name!r} is not a Bayesian target of the model "
                             "(add it to target_modules and bayesian_modules)")
        for k in keys:
            size = _out_features(_base(model.get_submodule(k)))
            if matches_module([name], k) and size is not None and max(rows) >= size:
                raise ValueError(f"BayesLoraConfig.output_rows for {k!r}: row {max(rows)} is outside its {size} "
                                 "outputs")
    return keys


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _out_features(module: nn.Module):
    if isinstance(module, Conv1D):
        return module.nf
    return getattr(module, "out_features", None)


def _check_target_kinds(model: nn.Module, config: BayesLoraConfig, keys: list[str]) -> None:
    """Only Linear and Conv1D layers carry a Bayesian adapter (other targets get PEFT's plain LoRA): a
    Bayesian target of another kind, or no Bayesian target at all, would silently be a plain LoRA."""
    bayesian = []
    for key in keys:
        module = _base(model.get_submodule(key))
        if isinstance(module, (nn.Linear, Conv1D)):
            bayesian += [key] if config.is_bayesian(key) else []
        elif config.bayesian_modules is not None and config.is_bayesian(key):
            raise ValueError(f"BayesLoraConfig.bayesian_modules: {key} is a {type(module).__name__}; only "
                             "Linear and Conv1D layers can be Bayesian (it may stay a plain LoRA target)")
    if not bayesian and config.bayesian_modules != []:
        raise ValueError("BayesLoraConfig.target_modules: no target is a Linear or Conv1D layer, so no factor would "
                         f"be Bayesian (targets: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})")


def _excluded_by_layers(model: nn.Module, resolved: BayesLoraConfig, patterns: Union[str, list[str]]) -> str:
    """Why target ``patterns`` (a regex or names) that exist matched nothing: ``layers_to_transform``."""
    if resolved.layers_to_transform is None:
        return ""
    if any(matches_module(patterns, k) for k, _ in model.named_modules() if k):
        return (f" within layers_to_transform={resolved.layers_to_transform!r}"
                f"{f' (layers_pattern={resolved.layers_pattern!r})' if resolved.layers_pattern else ''}: "
                "the model has such modules, but not in those layers")
    return ""


def adapter_layers(model: nn.Module) -> dict[int, set[str]]:
    """The adapter-wrapped layers of ``model`` (by id) and the adapters each holds: what
    :func:`undo_injection` leaves in place."""
    return {id(m): _adapters_of(m) for m in model.modules() if isinstance(m, BaseTunerLayer)}


def _adapters_of(layer: BaseTunerLayer) -> set[str]:
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr, {})}


def undo_injection(model: nn.Module, before: dict[int, set[str]]) -> None:
    """Undo a PEFT injection that failed part way (PEFT refuses a target it has no layer for only after
    wrapping those before it): a layer it wrapped gets its base layer back in its place, a layer wrapped
    ``before`` (:func:`adapter_layers`) loses only the adapters it did not hold then."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    new = [name for name, m in wrapped if id(m) not in before]
    for name, layer in wrapped:
        if id(layer) in before:
            for adapter in _adapters_of(layer) - before[id(layer)]:
                layer.delete_adapter(adapter)
        elif not any(name.startswith(outer + ".") for outer in new):  # inside another new one: goes with it
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())


def _whole_copy(weight: nn.Parameter) -> torch.Tensor:
    """A detached copy of ``weight``, gathered first where DeepSpeed ZeRO-3 partitioned it as the base
    loaded (its local tensor is then empty)."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight.detach().clone()


def untie_targets(model: nn.Module) -> list[str]:
    """Give adapter layers whose base weight is shared (tied lm_head) a private copy.

    Merging into a tied weight would silently change the input embeddings too. The copy is made
    before any merge, and the model config stops declaring the tie so that saving and reloading the
    merged model keeps the merged head. Returns the names of the layers that were untied.
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    untied = []
    for name, module in model.named_modules():
        if not isinstance(module, BayesLoraLinear):
            continue
        base = module.get_base_layer()
        if owners.get(id(base.weight), 0) > 1:
            base.weight = nn.Parameter(_whole_copy(base.weight), requires_grad=False)
            untied.append(name)
    if untied:
        for cfg in (getattr(model, "config", None),):
            if cfg is not None:
                cfg.tie_word_embeddings = False
                text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
                if text is not None:
                    text.tie_word_embeddings = False
    return untied
