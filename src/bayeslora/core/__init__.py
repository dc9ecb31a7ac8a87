"""The maths of Bayesian-LoRA, torch only: inducing posterior, flow, Matheron sampling, KL terms.

Nothing in this package knows about Hugging Face or PEFT.
"""

from .factor import FactorShape, InducingFactor, inverse_softplus, lora_matching_std
from .flow import RowFlow, apply_flows
from .kl import conditional_kl, flow_kl_sample
from .posterior import (
    Geometry,
    GroupDraw,
    StackedFactors,
    conditional_kl_group,
    core_key,
    draw_group,
    draw_groups,
    geometry,
    mean_flow_noise,
    mean_group,
)

__all__ = [
    "FactorShape",
    "Geometry",
    "GroupDraw",
    "InducingFactor",
    "RowFlow",
    "StackedFactors",
    "apply_flows",
    "conditional_kl",
    "conditional_kl_group",
    "core_key",
    "draw_group",
    "draw_groups",
    "flow_kl_sample",
    "geometry",
    "inverse_softplus",
    "lora_matching_std",
    "mean_flow_noise",
    "mean_group",
]
