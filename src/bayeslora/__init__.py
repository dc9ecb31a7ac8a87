"""bayeslora: Bayesian-LoRA fine-tuning of Hugging Face models with calibrated uncertainty.

Public API (see README): ``BayesLoraConfig``, ``get_model``, ``load``, ``load_adapter``, ``attach``,
``set_mode``, ``using_mode``, ``set_posterior_scale``, ``fixed_sample``, ``set_draw_seed(s)``, ``kl_divergence``, ``kl_breakdown``,
``posterior_stats``, ``count_parameters``, ``answer_questions`` (what ``bayeslora predict`` runs). They are imported on first use, so ``bayeslora.data``,
``bayeslora.evaluation`` and ``bayeslora report`` do not pay for importing transformers and PEFT.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BayesLoraConfig": "bayeslora.config",
    "answer_questions": "bayeslora.answers",
    **{name: "bayeslora.surgery" for name in (
        "BayesLoraLinear", "attach", "count_parameters", "fixed_sample", "get_model", "get_sampler",
        "kl_breakdown", "kl_divergence", "load", "load_adapter", "posterior_stats", "set_draw_seed",
        "set_draw_seeds", "set_mode", "set_posterior_scale", "using_mode",
    )},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bayeslora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
