"""Optimizer and scheduler states as safetensors + JSON, so a resumed checkpoint never unpickles.

``state_dict()`` of a torch optimizer or scheduler is a tree of dicts (string or integer keys), lists,
tuples, tensors and plain numbers. :func:`encode_state` moves every tensor into a flat dict (saved as
safetensors) and leaves a JSON tree that names them; :func:`decode_state` rebuilds the exact tree,
integer keys and tuples included (``Adam``'s ``betas``), and refuses anything it does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["decode_state", "encode_state"]

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_PLAIN = (bool, int, float, str, type(None))


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of ``obj``; its tensors go into ``tensors`` under their path in the tree."""
    if isinstance(obj, torch.Tensor):
        name = path or "root"
        if name in tensors:
            raise ValueError(f"state {name}: two entries share this name (a key containing '.')")
        tensors[name] = obj.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _ITEMS} & set(obj):
            return {k: encode_state(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state {path or 'root'}: key {k!r} is neither a string nor an integer")
        return {_ITEMS: [[k, encode_state(v, tensors, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [encode_state(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, _PLAIN):
        return obj
    raise TypeError(f"state {path or 'root'}: cannot store a {type(obj).__name__} without pickling it")


def decode_state(meta: Any, tensors: dict[str, torch.Tensor], source: Path | str = "state") -> Any:
    """Rebuild the tree :func:`encode_state` wrote; ``source`` names the file in errors."""
    if isinstance(meta, dict):
        if _TENSOR in meta:
            name = meta[_TENSOR]
            if name not in tensors:
                raise ValueError(f"{source}: tensor {name!r} is missing from its safetensors file")
            return tensors[name]
        if _TUPLE in meta:
            return tuple(decode_state(v, tensors, source) for v in meta[_TUPLE])
        if _ITEMS in meta:
            return {k: decode_state(v, tensors, source) for k, v in meta[_ITEMS]}
        return {k: decode_state(v, tensors, source) for k, v in meta.items()}
    if isinstance(meta, list):
        return [decode_state(v, tensors, source) for v in meta]
    if isinstance(meta, _PLAIN):
        return meta
    raise ValueError(f"{source}: unexpected value {meta!r}")
