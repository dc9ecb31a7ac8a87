"""Predicting a list of examples with any method, in any mode, with S Monte Carlo samples.

Used by ``bayeslora evaluate`` and by the trainer's per-epoch dev evaluation. The method object is
duck-typed (``draws``, ``predict``): this module imports no model code. Sample s of batch b is
drawn with seed ``mix_seed(seed, b, s)``, so batched Monte Carlo (S×B rows, one pass) and S sequential
passes give the same draws; batched falls back to sequential when the accelerator runs out of memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..peak_memory import PeakMemory
from ..seeding import mix_seed

__all__ = ["PredictionResult", "predict_examples"]


@dataclass
class PredictionResult:
    log_probs: Tensor  # (N, S, C) float64, -inf on padded choices
    mask: Tensor  # (N, C)
    labels: Tensor  # (N,)
    uids: list[str]
    truncated: int
    seconds: float
    peak_memory_bytes: int | None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def predict_examples(method: Any, model: torch.nn.Module, scorer: torch.nn.Module, examples: Sequence[Any],
                     collator: Callable, *, mode: str, samples: int, batch_size: int, seed: int,
                     batched: bool = True, device: torch.device | str = "cpu",
                     progress: Callable[[int], None] | None = None) -> PredictionResult:
    """Per-example, per-sample log-probabilities over the choices; every example is kept."""
    if not examples:
        raise ValueError("no examples to predict")
    device = torch.device(device)
    draws = method.draws(mode, samples)
    was_training = model.training
    model.eval()
    scorer.eval()
    peak = PeakMemory(device).start()
    start = time.perf_counter()
    chunks, masks, labels, uids, truncated = [], [], [], [], 0
    with torch.no_grad():
        for index in range(0, len(examples), batch_size):
            batch = _to_device(collator(examples[index:index + batch_size]), device)
            seeds = [mix_seed(seed, index, s) for s in range(draws)]
            try:
                lp = method.predict(model, scorer, batch, mode, draws, seeds, batched)
            except RuntimeError as exc:
                if not (batched and _is_oom(exc)):
                    raise
                torch.cuda.empty_cache()
                lp = method.predict(model, scorer, batch, mode, draws, seeds, False)
            chunks.append(lp.transpose(0, 1).double().cpu())
            mask = batch.get("label_mask", batch.get("choice_mask"))
            masks.append(mask.cpu())
            labels.append(batch["labels"].cpu())
            uids += list(batch["uids"])
            truncated += int(batch["truncated"])
            if progress is not None:
                progress(len(batch["uids"]))
    seconds = time.perf_counter() - start
    model.train(was_training)
    width = max(c.shape[-1] for c in chunks)
    log_probs = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[-1]), value=float("-inf"))
                           for c in chunks])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[-1]), value=False) for m in masks])
    return PredictionResult(log_probs, mask, torch.cat(labels), uids, truncated, seconds, peak.bytes())
