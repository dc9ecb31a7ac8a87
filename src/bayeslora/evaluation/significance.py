"""How much a difference between two methods means: paired bootstrap intervals and the ECE noise floor.

* :func:`paired_bootstrap`: per-example scores of two methods on the same examples (one row per seed,
  the seeds paired); a two-level bootstrap resamples seeds and examples with replacement, and the
  statistic is the mean over seeds and examples of (a − b). Returns the observed difference and a
  percentile 95% interval.
* :func:`ece_noise_floor`: the ECE a perfectly calibrated predictor with the same confidences would
  score on n examples: labels drawn as Bernoulli(confidence), ECE averaged over draws. At n = 300 with
  15 bins it is ~5 points, so an ECE near it says "calibrated within noise", not "better".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .metrics import DEFAULT_BINS, calibration_bins

__all__ = ["BootstrapResult", "ece_noise_floor", "paired_bootstrap"]


@dataclass(frozen=True)
class BootstrapResult:
    difference: float  # observed mean of a − b
    low: float  # 2.5th percentile
    high: float  # 97.5th percentile
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(a: Tensor, b: Tensor, resamples: int = 2000, seed: int = 0) -> BootstrapResult:
    """Mean of ``a − b`` with a 95% bootstrap interval over examples.

    ``a``, ``b``: (seeds, n) or (n,) per-example scores (e.g. −log p_y) of two methods on the same n
    examples; seed i of ``a`` is paired with seed i of ``b``. Each resample draws the seeds (with
    replacement) and n example indices (the same for every seed), so seed-to-seed and
    example-to-example variation both enter. With 2 seeds the seed level is coarse: read it as such.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).reshape(-1, a.shape[-1])  # (seeds, n)
    seeds, n = diff.shape
    if n == 0:
        raise ValueError("no examples to bootstrap")
    gen = torch.Generator().manual_seed(seed)
    examples = torch.randint(0, n, (resamples, n), generator=gen)
    per_seed = torch.stack([diff[s][examples].mean(1) for s in range(seeds)], 1)  # (resamples, seeds)
    picked = torch.randint(0, seeds, (resamples, seeds), generator=gen)
    stats = per_seed.gather(1, picked).mean(1)
    low, high = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return BootstrapResult(float(diff.mean()), low, high, resamples)


def ece_noise_floor(confidence: Tensor, n_bins: int = DEFAULT_BINS, draws: int = 200, seed: int = 0) -> float:
    """Expected ECE of a perfectly calibrated predictor whose top-label confidences are ``confidence`` (n,)."""
    conf = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1)
    if conf.numel() == 0:
        raise ValueError("no confidences given")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        correct = torch.rand(conf.shape, generator=gen, dtype=torch.float64) < conf
        total += calibration_bins(conf, correct, n_bins).ece
    return total / draws
