"""Model surgery: the only place that touches PEFT and transformers internals."""

from .api import (
    attach, count_parameters, fixed_sample, get_model, get_sampler, kl_breakdown, kl_divergence, load,
    load_adapter, posterior_stats, set_draw_seed, set_draw_seeds, set_mode, set_posterior_scale, using_mode,
)
from .inject import resolve_targets
from .layer import BayesLoraLinear
from .sampler import PosteriorSampler

__all__ = [
    "BayesLoraLinear", "PosteriorSampler", "attach", "count_parameters", "fixed_sample", "get_model",
    "get_sampler", "kl_breakdown", "kl_divergence", "load", "load_adapter", "posterior_stats",
    "set_draw_seed", "set_draw_seeds", "set_mode", "set_posterior_scale", "using_mode",
]
