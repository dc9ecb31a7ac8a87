"""Atomic, resumable training checkpoints: trainable weights, optimizer, scheduler, RNGs, position.

A checkpoint is a folder written in full under a temporary name and swapped in with ``os.replace``,
so a run killed at any instant (even SIGKILL mid-write) leaves the previous checkpoint intact.
Only trainable tensors are stored (the frozen base model is reloaded from its source), as
safetensors. Nothing is ever unpickled: the optimizer and scheduler states are split into their tensors
(safetensors) and everything else (JSON, see :mod:`.state_codec`); the RNG states are JSON (Python's
and NumPy's) and safetensors (torch's).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layout import RunFolder, previous_version
from .state_codec import decode_state, encode_state

__all__ = ["atomic_dir", "existing_dir", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

def atomic_dir(target: Path, write) -> None:
    """Write a folder via ``write(tmp_path)`` then swap it in place of ``target``."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    old = previous_version(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rng(folder: Path, states: list[dict[str, Any]]) -> None:
    """Per rank: Python's and NumPy's states as JSON, torch's (CPU and CUDA) as uint8 safetensors."""
    tensors, meta = {}, []
    for rank, state in enumerate(states):
        version, internal, gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        meta.append({"python": [version, list(internal), gauss],
                     "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
                     "cuda": len(state.get("cuda", []))})
        tensors[f"{rank}.torch"] = state["torch"]
        for i, t in enumerate(state.get("cuda", [])):
            tensors[f"{rank}.cuda.{i}"] = t.cpu()
    save_file(tensors, str(folder / "rng.safetensors"))
    (folder / "rng.json").write_text(json.dumps(meta))


def _load_rng(folder: Path, rank: int) -> dict[str, Any] | None:
    if not (folder / "rng.json").exists():
        return None  # an older checkpoint (pickled rng.pt): resume without replaying its RNG
    meta = json.loads((folder / "rng.json").read_text())
    tensors = load_file(str(folder / "rng.safetensors"))
    rank = rank if rank < len(meta) else 0
    m = meta[rank]
    version, internal, gauss = m["python"]
    name, keys, pos, has_gauss, cached = m["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
             "torch": tensors[f"{rank}.torch"]}
    if m["cuda"]:
        state["cuda"] = [tensors[f"{rank}.cuda.{i}"] for i in range(m["cuda"])]
    return state


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any], scheduler,
                    position: dict[str, Any], rng_states: list[dict[str, Any]] | None = None) -> None:
    """Write the checkpoint: ``weights`` the trainable tensors by name (:func:`trainable_state`),
    ``optimizer_state`` a ``state_dict()`` in torch's single-process format (both gathered first where an
    engine partitions them), ``rng_states`` one RNG state per data-parallel rank."""
    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        meta = encode_state({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tensors)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        _save_rng(tmp, rng_states or [rng_state()])
        (tmp / "state.json").write_text(json.dumps(position, indent=2))

    atomic_dir(RunFolder(run_dir).checkpoint, write)


def existing_dir(target: Path) -> Path:
    """``target``, or the previous version kept by :func:`atomic_dir` if a kill landed mid-swap."""
    target = Path(target)
    old = previous_version(target)
    return old if not target.exists() and old.exists() else target


def _shaped_like_parameters(optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """The saved per-parameter states reshaped to their parameters' shapes where only the shape changed:
    checkpoints from before each factor's λ became a 1-element tensor hold its AdamW moments 0-d. (An
    engine's own state object reshapes as it scatters.)"""
    groups = getattr(optimizer, "param_groups", None)
    if not groups or len(groups) != len(saved.get("param_groups", [])):
        return saved  # the optimizer's own load reports a mismatch
    for group, saved_group in zip(groups, saved["param_groups"]):
        for p, i in zip(group["params"], saved_group["params"]):
            entry = saved["state"].get(i, {})
            for k, v in entry.items():
                if (k != "step" and torch.is_tensor(v) and v.shape != p.shape and v.numel() == p.numel()):
                    entry[k] = v.reshape(p.shape)
    return saved


def load_checkpoint(run_dir: Path, module: nn.Module, optimizer, scheduler,
                    rank: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights, the optimizer (anything with ``load_state_dict``), scheduler and this rank's RNGs;
    returns the saved position and the weights as stored (float32 where the module may hold a rounded copy)."""
    folder = existing_dir(RunFolder(run_dir).checkpoint)
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"{folder}: no checkpoint to resume from")
    weights = load_file(str(folder / "trainable.safetensors"))
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"{folder}: checkpoint tensors do not match the model "
                         f"(missing {sorted(expected - set(weights))[:3]}, extra {sorted(set(weights) - expected)[:3]})")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if not (folder / "optimizer.json").exists():
        raise FileNotFoundError(f"{folder}: no optimizer.json (a checkpoint from before optimizer states were "
                                "stored as safetensors + JSON cannot be resumed; its trainable.safetensors can "
                                "still be evaluated, or start the run again)")
    states = decode_state(json.loads((folder / "optimizer.json").read_text()),
                          load_file(str(folder / "optimizer.safetensors")), source=folder / "optimizer.json")
    optimizer.load_state_dict(_shaped_like_parameters(optimizer, states["optimizer"]))
    scheduler.load_state_dict(states["scheduler"])
    state = _load_rng(folder, rank)
    if state is None:
        import warnings

        warnings.warn(f"{folder}: the checkpoint predates JSON RNG states; resuming without them (the data "
                      "order is replayed, dropout and draws are not bit-identical)")
    else:
        set_rng_state(state)
    return json.loads((folder / "state.json").read_text()), weights
