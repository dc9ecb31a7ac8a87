"""A GGUF checkpoint de-quantised once into a cached Hugging Face folder, keyed by the file's sha256.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package)
by de-quantising every tensor to float32: about 30 s for SmolLM2-135M on two cores, at every load.
The first load writes the result (config, safetensors weights, tokenizer) to
``<cache>/gguf/<sha256[:16]>/``: into a temporary folder that is renamed into place once complete, so
an interrupted conversion never leaves a half-written cache. Later loads are a plain
``from_pretrained`` of that folder. ``<cache>`` is ``$BAYESLORA_CACHE``, else
``$XDG_CACHE_HOME/bayeslora``, else ``~/.cache/bayeslora``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MARKER", "cache_root", "dequantised_folder", "file_sha256"]

MARKER = "bayeslora-gguf.json"  # written last: a folder without it is not a finished conversion


def cache_root() -> Path:
    if os.environ.get("BAYESLORA_CACHE"):
        return Path(os.environ["BAYESLORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bayeslora"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a GGUF checkpoint needs the `gguf` package: pip install gguf")


def dequantised_folder(gguf_path: str | os.PathLike) -> Path:
    """The cached float32 Hugging Face folder for ``gguf_path``, converting it on first use."""
    source = Path(gguf_path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: GGUF file not found")
    digest = file_sha256(source)
    target = cache_root() / "gguf" / digest[:16]
    if (target / MARKER).is_file():
        return target
    _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest[:16]}."))
    os.chmod(scratch, 0o755)  # mkdtemp makes it private; a cache folder is an ordinary one
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        # The tensors are plain float32 now; transformers still flags the model as GGUF-quantised and
        # refuses to save it, so drop that flag (and any quantization_config) before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / MARKER).write_text(json.dumps({"source": str(source), "sha256": digest}, indent=2))
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first, or a stale unfinished folder is in the way
            if (target / MARKER).is_file():
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                shutil.rmtree(target, ignore_errors=True)
                os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target
