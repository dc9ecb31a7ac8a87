"""Ranking by uncertainty: selective prediction (risk-coverage, AURC) and OOD detection (AUROC).

Both ask whether an uncertainty score orders examples well, so both treat ties the same way: as the
expectation over a random order within a tie (a constant score then ranks nothing). float64 throughout.

* ``risk_coverage(certainty, correct)``: answer the k most certain examples, k = 1..N; the selective
  risk at coverage k/N is their error rate. AURC (Geifman et al. 2019) is the mean of the N risks:
  lower is better; a perfect ranking of a model with accuracy a scores about ``(1 − a) + a ln a``, a
  random one (or a constant score) its error rate ``1 − a``.
* ``auroc(in_scores, out_scores)``: the probability that an OOD example scores higher (more uncertain)
  than an in-distribution one, ties counting one half (the Mann-Whitney U statistic over n_in·n_out).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RiskCoverage", "auroc", "risk_coverage"]


class RiskCoverage(NamedTuple):
    coverage: Tensor  # (N,) k/N for k = 1..N
    risk: Tensor  # (N,) expected error rate of the k most certain examples
    aurc: float  # mean risk over the N coverages

    def accuracy_at(self, coverage: float) -> float:
        """Selective accuracy when answering the most certain ``coverage`` fraction (at least one)."""
        k = max(1, min(len(self.risk), round(coverage * len(self.risk))))
        return 1.0 - float(self.risk[k - 1])


def risk_coverage(certainty: Tensor, correct: Tensor) -> RiskCoverage:
    """Risk-coverage curve of answering in order of decreasing ``certainty`` (N,), ties in random order."""
    certainty, errors = certainty.double().flatten(), (~correct.bool().flatten()).double()
    _check_finite(certainty, "risk_coverage")
    n = certainty.numel()
    if n == 0 or errors.numel() != n:
        raise ValueError(f"risk_coverage needs as many certainties as outcomes, got {n} and {errors.numel()}")
    order = torch.argsort(certainty, descending=True, stable=True)
    values, errs = certainty[order], errors[order]
    _, group = torch.unique_consecutive(values, return_inverse=True)
    sizes = torch.bincount(group).double()
    group_errors = torch.zeros_like(sizes).index_add_(0, group, errs)
    before = torch.cumsum(sizes, 0) - sizes  # examples ranked above each group
    errors_before = torch.cumsum(group_errors, 0) - group_errors
    k = torch.arange(1, n + 1, dtype=torch.float64)
    expected = errors_before[group] + (k - before[group]) * group_errors[group] / sizes[group]
    risk = expected / k
    return RiskCoverage(k / n, risk, float(risk.mean()))


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """P(score of an OOD example > score of an ID one) + ½ P(equal): higher scores mean 'more OOD'."""
    a, b = in_scores.double().flatten(), out_scores.double().flatten()
    if not a.numel() or not b.numel():
        raise ValueError("auroc needs in-distribution and out-of-distribution scores")
    _check_finite(torch.cat([a, b]), "auroc")
    both = torch.cat([a, b])
    ranks = _average_ranks(both)
    u = float(ranks[a.numel():].sum()) - b.numel() * (b.numel() + 1) / 2
    return u / (a.numel() * b.numel())


def _check_finite(x: Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: scores must be finite (got {int((~torch.isfinite(x)).sum())} that are not)")


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    values = x[order]
    _, group = torch.unique_consecutive(values, return_inverse=True)
    sizes = torch.bincount(group).double()
    ends = torch.cumsum(sizes, 0)
    average = ends - (sizes - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = average[group]
    return ranks
