"""MLE LoRA: plain PEFT LoRA trained on the task NLL, deterministic at test time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
from torch import nn

from .base import Method, register_method

__all__ = ["LoraMethod", "lora_config_kwargs"]


def lora_config_kwargs(lora: dict[str, Any]) -> dict[str, Any]:
    """The PEFT LoraConfig fields shared by every LoRA-based method."""
    return {"r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
            "target_modules": lora["target_modules"]}


@register_method
class LoraMethod(Method):
    name = "lora"
    modes = ("mean", "merged")

    def build(self, base_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        return peft.get_peft_model(base_model, peft.LoraConfig(**lora_config_kwargs(lora)))

    def load(self, base_model: nn.Module, directory: Path, lora: dict[str, Any]) -> nn.Module:
        return peft.PeftModel.from_pretrained(base_model, str(directory))

    def prepare_eval(self, model: nn.Module, mode: str) -> nn.Module:
        super().prepare_eval(model, mode)
        return model.merge_and_unload() if mode == "merged" else model
