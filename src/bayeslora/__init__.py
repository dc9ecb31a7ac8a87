"""bayeslora: Bayesian-LoRA fine-tuning of Hugging Face models with calibrated uncertainty.

Public API (see README): ``BayesLoraConfig``, ``get_model``, ``load``, ``set_mode``, ``using_mode``,
``fixed_sample``, ``kl_divergence``, ``kl_breakdown``, ``posterior_stats``, ``count_parameters``.
"""

from .config import BayesLoraConfig
from .surgery import (
    BayesLoraLinear, attach, count_parameters, fixed_sample, get_model, get_sampler, kl_breakdown,
    kl_divergence, load, posterior_stats, set_draw_seed, set_draw_seeds, set_mode, using_mode,
)

__version__ = "0.1.0"

__all__ = [
    "BayesLoraConfig", "BayesLoraLinear", "attach", "count_parameters", "fixed_sample", "get_model",
    "get_sampler", "kl_breakdown", "kl_divergence", "load", "posterior_stats", "set_draw_seed", "set_draw_seeds",
    "set_mode", "using_mode",
]
