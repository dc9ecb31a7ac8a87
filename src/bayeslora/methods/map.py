"""MAP LoRA: LoRA with weight decay, i.e. a Gaussian prior on the LoRA weights (METHOD.md section 8).

AdamW's decoupled decay of ``MAP_WEIGHT_DECAY`` per unit learning rate, on the LoRA factors and the
scorer head; with Adam this is a Gaussian prior only up to the learning-rate coupling (Loshchilov &
Hutter 2019), which is how the literature's "MAP" baseline is trained. ``--weight-decay`` overrides it.
"""

from __future__ import annotations

from typing import Any

from .base import register_method
from .lora import LoraMethod

__all__ = ["MAP_WEIGHT_DECAY", "MapMethod"]

MAP_WEIGHT_DECAY = 0.1


@register_method
class MapMethod(LoraMethod):
    name = "map"

    def training_defaults(self) -> dict[str, Any]:
        return {"recipe": "elbo", "weight_decay": MAP_WEIGHT_DECAY}
