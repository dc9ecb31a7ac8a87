"""How much a difference between two methods means: paired intervals and the ECE noise floor.

* :func:`paired_difference`: per-example scores of two methods on the same examples (one row per seed,
  the seeds paired): the mean of (a − b) with a 95% interval whose variance adds an example term (paired
  bootstrap over examples) and a seed term (the per-seed means' spread), with a t quantile.
* :func:`ece_ratio_interval`: one ECE over another's (seeds averaged) with a paired bootstrap over examples.
* :func:`ece_noise_floor`: the ECE a perfectly calibrated predictor with the same confidences would
  score on n examples: labels drawn as Bernoulli(confidence), ECE averaged over draws. At n = 300 with
  15 bins it is ~5 points, so an ECE near it says "calibrated within noise", not "better".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .metrics import DEFAULT_BINS, calibration_bins

__all__ = ["PairedDifference", "ece_noise_floor", "ece_ratio_interval", "paired_difference"]


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # observed mean of a − b over seeds and examples
    low: float  # 95% interval
    high: float
    seeds: int
    df: float  # degrees of freedom of the t quantile (Welch–Satterthwaite); inf = examples only, normal
    examples_only: bool  # one seed: the interval says nothing about another training run

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: Tensor, b: Tensor, resamples: int = 2000, seed: int = 0) -> PairedDifference:
    """Mean of ``a − b`` with a 95% interval that holds for another eval set *and* another training run.

    ``a``, ``b``: (seeds, n) or (n,) per-example scores (e.g. −log p_y) of two methods on the same n
    examples; seed i of ``a`` is paired with seed i of ``b``. Two variances add:

    * examples: the variance of the mean of the seed-averaged per-example differences, from a paired
      bootstrap over examples (the same resampled indices for both methods and every seed);
    * seeds: the sample variance of the per-seed mean differences over S (training randomness; the
      examples are the same for every seed, so it holds no example noise).

    The interval is mean ± t_ν(0.975)·se, ν by Welch–Satterthwaite (near S − 1 where the seeds dominate,
    large where the examples do). Simulated under no difference (n = 570, per-example sd 0.1, seed sd 0.02
    as the benchmark measures; 3,000 cases each) it excludes 0 in 12.7% (2 seeds), 7.2% (3), 6.3% (5) of
    cases, 5.3% without a seed effect: estimating ν makes it somewhat liberal at 2-3 seeds (t with S − 1
    degrees of freedom instead excluded 0 in 0-1%: no power at all). The two-level percentile bootstrap it
    replaces (a bootstrap over 2-3 seeds is never wider than their range and shrinks their variance by
    (S − 1)/S) excluded 0 in 28% and 21% of such cases. One seed: the example term only, ``examples_only``
    set (the table says so).
    """
    from scipy.stats import t as student_t

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).reshape(-1, a.shape[-1])  # (seeds, n)
    seeds, n = diff.shape
    if n == 0:
        raise ValueError("no examples to bootstrap")
    if not bool(torch.isfinite(diff).all()):
        raise ValueError("paired scores hold NaN or infinity: no interval")
    gen = torch.Generator().manual_seed(seed)
    examples = torch.randint(0, n, (resamples, n), generator=gen)
    per_example = diff.mean(0)  # (n,) seed-averaged
    v_examples = float(per_example[examples].mean(1).var()) if n > 1 else 0.0
    v_seeds = float(diff.mean(1).var() / seeds) if seeds > 1 else 0.0
    total = v_examples + v_seeds
    if total == 0.0:  # identical differences everywhere: no spread to speak of
        d = float(diff.mean())
        return PairedDifference(d, d, d, seeds, float("inf"), seeds == 1)
    parts = (v_examples ** 2 / (n - 1) if n > 1 else 0.0) + (v_seeds ** 2 / (seeds - 1) if seeds > 1 else 0.0)
    df = total ** 2 / parts if parts > 0 else float("inf")
    half = float(student_t.ppf(0.975, df)) * total ** 0.5
    d = float(diff.mean())
    return PairedDifference(d, d - half, d + half, seeds, df, seeds == 1)


def ece_ratio_interval(own: list[tuple[Tensor, Tensor]], reference: list[tuple[Tensor, Tensor]],
                       n_bins: int = DEFAULT_BINS, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): the mean ECE of ``own`` over its seeds divided by the reference's, with a 95%
    percentile interval from a paired bootstrap over examples (the same resampled indices for both and every
    seed). Each list holds one (confidence (n,), correct (n,)) per seed, seed i paired with seed i. The
    examples only: how far another eval set could move the ratio (two calibrated predictors' ECEs differ by
    up to 2x at n = 500), not another training run. NaN bounds where a resample's reference ECE is 0."""
    if len(own) != len(reference) or not own:
        raise ValueError(f"pair seeds one by one: got {len(own)} and {len(reference)}")
    n = own[0][0].numel()
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, torch.randint(0, n, (resamples, n), generator=gen), torch.ones(resamples, n, dtype=torch.float64))
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)

    def mean_ece(pairs: list[tuple[Tensor, Tensor]], weights: Tensor) -> Tensor:
        total = torch.zeros(weights.shape[0], dtype=torch.float64)
        for confidence, correct in pairs:
            conf = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1)
            if conf.numel() != n:
                raise ValueError(f"paired examples differ in number: {conf.numel()} and {n}")
            gap = conf - torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
            index = (torch.bucketize(conf, edges, right=True) - 1).clamp_min(0)  # as calibration_bins buckets
            onehot = torch.nn.functional.one_hot(index, n_bins + 1).to(torch.float64)  # (n, bins + 1)
            total += ((weights * gap) @ onehot).abs().sum(1) / n
        return total / len(pairs)

    ratio = float(mean_ece(own, torch.ones(1, n, dtype=torch.float64)) / mean_ece(reference, torch.ones(1, n, dtype=torch.float64)))
    stats = mean_ece(own, counts) / mean_ece(reference, counts)
    stats = stats[torch.isfinite(stats)]
    if stats.numel() < resamples // 2:
        return ratio, math.nan, math.nan
    low, high = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return ratio, low, high


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
