"""Classification metrics of a predictive distribution: ACC, ECE, NLL, Brier, in float64.

Inputs are the final (already sample-averaged) predictive over choices, ``(B, C)``, given either as
probabilities or as log-probabilities (e.g. the output of ``predictive.average_log_probs``). Pass
log-probabilities when you have them: the NLL is then read off exactly instead of through ``log(exp(.))``.

Nothing is dropped silently (METHOD.md section 7): a NaN, a negative probability, a row that does not
sum to 1, a padded choice with probability, or a label outside the valid choices raises ``ValueError``.
A gold probability of exactly 0 gives an infinite NLL; it is reported, not clipped.

ECE binning (chosen to reproduce torchmetrics ``MulticlassCalibrationError(num_classes=C, n_bins=15,
norm="l1")`` and ``CalibrationError(task="multiclass", ...)``): the top-label confidence is bucketed with
``torch.bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1``. Bin k therefore holds
``k/n <= conf < (k+1)/n`` (left-closed, right-open, not ``(lo, hi]``), and a confidence of exactly 1.0
(or rounding above it) lands in an extra bucket ``k = n_bins``, as in torchmetrics. So there are
``n_bins + 1`` buckets, the last one usually empty. ECE = Σ_k (count_k / N) |acc_k - conf_k|. We compute
in float64 where torchmetrics casts confidences to float32, so results agree to ~1e-7 except for a
confidence within float32 rounding of a bin edge. Ties for the top label go to the lowest index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .predictive import NORMALISATION_ATOL

InputKind = Literal["auto", "probs", "log_probs"]
DEFAULT_BINS = 15


@dataclass(frozen=True)
class Predictions:
    """Validated predictive distribution and labels, float64, on CPU.

    Attributes:
        probs: ``(B, C)`` probabilities; padded choices exactly 0.
        log_probs: ``(B, C)`` log-probabilities; padded choices ``-inf``.
        labels: ``(B,)`` int64 gold indices, each a valid choice.
        mask: ``(B, C)`` bool, ``True`` = valid choice.
    """

    probs: Tensor
    log_probs: Tensor
    labels: Tensor
    mask: Tensor


def _detect_kind(x: Tensor, atol: float) -> Literal["probs", "log_probs"]:
    """Probabilities are never negative; normalised log-probabilities are never positive and are
    negative somewhere unless every row is one-hot (then reading them as probabilities fails the sum
    check, so a misread is never silent)."""
    if not bool((x < 0).any()):
        return "probs"
    if bool((x > atol).any()):
        raise ValueError(
            "input has negative and positive entries: neither probabilities nor log-probabilities "
            "(raw logits? normalise them with log_softmax_over_choices)"
        )
    return "log_probs"


def prepare_predictions(
    probs_or_log_probs: Any,
    labels: Any,
    mask: Tensor | None = None,
    *,
    kind: InputKind = "auto",
    atol: float = NORMALISATION_ATOL,
) -> Predictions:
    """Validate a ``(B, C)`` predictive and its labels; convert both ways in float64.

    Args:
        probs_or_log_probs: ``(B, C)`` probabilities or log-probabilities (tensor, array or nested list).
        labels: ``(B,)`` integer gold choice indices.
        mask: optional boolean ``(B, C)``, ``True`` = valid choice; padded choices must carry
            probability 0 (log-probability ``-inf``). ``None``: every column is a valid choice.
        kind: ``"probs"``, ``"log_probs"`` or ``"auto"`` (log-probs iff any entry is negative; safe,
            because the normalisation check below rejects a misread input).
        atol: tolerance on ``|Σ_c p_c - 1|`` per row.

    Raises:
        ValueError: on any malformed input (see the module docstring); the message names the row.
    """
    x = torch.as_tensor(probs_or_log_probs).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"expected a non-empty (B, C) predictive, got shape {tuple(x.shape)}; average (S, B, C) "
            "samples first with predictive.average_log_probs"
        )
    if torch.isnan(x).any():
        raise ValueError(f"predictive contains NaN (first row {_first_row(torch.isnan(x))})")
    kind = _detect_kind(x, atol) if kind == "auto" else kind
    if kind == "log_probs":
        if (x > atol).any():
            raise ValueError(f"log-probabilities must be <= 0 (first bad row {_first_row(x > atol)})")
        log_probs, probs = x, x.exp()
    elif kind == "probs":
        if (x < 0).any() or torch.isinf(x).any():
            raise ValueError(f"probabilities must be finite and >= 0 (first bad row {_first_row((x < 0) | torch.isinf(x))})")
        probs, log_probs = x, x.log()
    else:
        raise ValueError(f"kind must be 'auto', 'probs' or 'log_probs', got {kind!r}")

    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask).to("cpu")
        if mask.dtype != torch.bool or mask.shape != x.shape:
            raise ValueError(f"mask must be a boolean tensor of shape {tuple(x.shape)} (True = valid choice)")
        if (probs[~mask] != 0).any():
            raise ValueError(f"a padded choice has non-zero probability (first row {_first_row((probs != 0) & ~mask)})")
    sums = probs.sum(dim=1)
    bad = ~((sums - 1).abs() <= atol)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"row {row} does not sum to 1 over its choices (sum = {sums[row].item():.6g})")

    y = torch.as_tensor(labels).detach().to("cpu")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.to(torch.int64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels shape {tuple(y.shape)} must be ({x.shape[0]},)")
    out_of_range = (y < 0) | (y >= x.shape[1])
    if out_of_range.any():
        row = int(out_of_range.nonzero()[0])
        raise ValueError(f"label {int(y[row])} of row {row} is outside 0..{x.shape[1] - 1}")
    on_padding = ~mask.gather(1, y[:, None]).squeeze(1)
    if on_padding.any():
        row = int(on_padding.nonzero()[0])
        raise ValueError(f"label {int(y[row])} of row {row} points at a padded choice")
    return Predictions(probs, log_probs, y, mask)


def _first_row(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def top_label(pred: Predictions) -> tuple[Tensor, Tensor]:
    """``(confidence, prediction)``, each ``(B,)``: the largest valid probability and its index.

    Padded choices have probability 0 and each row sums to 1, so they never win; ties go to the lowest
    index (``torch.argmax`` returns the first maximum).
    """
    prediction = pred.probs.argmax(dim=1)
    return pred.probs.gather(1, prediction[:, None]).squeeze(1), prediction


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin reliability data: ``n_bins + 1`` buckets (the last holds confidence exactly 1.0).

    Attributes:
        edges: ``(n_bins + 1,)`` float64, ``linspace(0, 1, n_bins + 1)``; bucket k < n_bins covers
            ``[edges[k], edges[k+1])``, bucket n_bins holds ``conf >= 1``.
        counts: ``(n_bins + 1,)`` int64 examples per bucket.
        mean_confidence: ``(n_bins + 1,)`` float64 mean top-label confidence, NaN where empty.
        accuracy: ``(n_bins + 1,)`` float64 fraction correct, NaN where empty.
    """

    edges: Tensor
    counts: Tensor
    mean_confidence: Tensor
    accuracy: Tensor

    @property
    def n(self) -> int:
        """Number of examples binned."""
        return int(self.counts.sum())

    @property
    def ece(self) -> float:
        """Count-weighted L1 gap between accuracy and confidence, a fraction in [0, 1]."""
        full = self.counts > 0
        weights = self.counts[full].to(torch.float64) / self.n
        return float((weights * (self.accuracy[full] - self.mean_confidence[full]).abs()).sum())

    def to_dict(self) -> dict[str, list[float | int | None]]:
        """JSON-ready lists; empty buckets' confidence/accuracy become ``None``."""

        def clean(t: Tensor) -> list[float | None]:
            return [None if math.isnan(v) else v for v in t.tolist()]

        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "mean_confidence": clean(self.mean_confidence),
            "accuracy": clean(self.accuracy),
        }


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int = DEFAULT_BINS) -> CalibrationBins:
    """Bucket top-label confidences the torchmetrics way (see the module docstring).

    Args:
        confidence: ``(N,)`` top-label probabilities in (0, 1].
        correct: ``(N,)`` bool or 0/1, whether the top label was the gold one.
        n_bins: number of equal-width bins over [0, 1].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = confidence.to(torch.float64).flatten()
    hit = correct.to(torch.float64).flatten()
    if conf.numel() == 0 or conf.shape != hit.shape:
        raise ValueError(f"need matching non-empty confidence/correct, got {tuple(conf.shape)} and {tuple(hit.shape)}")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges, right=True) - 1  # in 0..n_bins, since conf > 0
    index = index.clamp_min(0)  # conf == 0 cannot be a top label of a normalised row; keep it in bin 0
    counts = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros_like(counts).scatter_add_(0, index, conf)
    hit_sum = torch.zeros_like(counts).scatter_add_(0, index, hit)
    empty = counts == 0
    nan = torch.full_like(counts, math.nan)
    return CalibrationBins(
        edges=edges,
        counts=counts.to(torch.int64),
        mean_confidence=torch.where(empty, nan, conf_sum / counts),
        accuracy=torch.where(empty, nan, hit_sum / counts),
    )


def accuracy(pred: Predictions) -> float:
    """Fraction of examples whose top label (lowest index on ties) is the gold one."""
    return float((top_label(pred)[1] == pred.labels).to(torch.float64).mean())


def negative_log_likelihood(pred: Predictions) -> float:
    """Mean of ``-log p̄_y`` over all examples (``inf`` if some gold probability is exactly 0)."""
    return float(-pred.log_probs.gather(1, pred.labels[:, None]).mean())


def brier_score(pred: Predictions) -> float:
    """Mean over examples of ``Σ_c (p̄_c - 1[c = y])²`` over the valid choices (range [0, 2])."""
    onehot = torch.nn.functional.one_hot(pred.labels, pred.probs.shape[1]).to(torch.float64)
    sq = ((pred.probs - onehot) ** 2).masked_fill(~pred.mask, 0.0)
    return float(sq.sum(dim=1).mean())


def reliability_bins(
    probs_or_log_probs: Any,
    labels: Any,
    mask: Tensor | None = None,
    *,
    n_bins: int = DEFAULT_BINS,
    kind: InputKind = "auto",
) -> CalibrationBins:
    """Per-bin data for the reliability diagram; inputs as in ``compute_metrics``."""
    pred = prepare_predictions(probs_or_log_probs, labels, mask, kind=kind)
    conf, prediction = top_label(pred)
    return calibration_bins(conf, prediction == pred.labels, n_bins)


def compute_metrics(
    probs_or_log_probs: Any,
    labels: Any,
    mask: Tensor | None = None,
    *,
    n_bins: int = DEFAULT_BINS,
    kind: InputKind = "auto",
) -> dict[str, float | int]:
    """ACC, ECE, NLL and Brier of a ``(B, C)`` predictive, in float64, every example counted.

    Args:
        probs_or_log_probs: ``(B, C)`` sample-averaged probabilities or log-probabilities.
        labels: ``(B,)`` integer gold indices.
        mask: optional boolean ``(B, C)``, ``True`` = valid choice (padded choices must have p = 0).
        n_bins: ECE bins (15 by convention; binning as torchmetrics, see the module docstring).
        kind: ``"auto"``, ``"probs"`` or ``"log_probs"``.

    Returns:
        ``{"acc", "ece", "nll", "brier"}`` as Python floats (ACC and ECE are fractions, not ×100) and
        ``"n"``, the number of examples.
    """
    pred = prepare_predictions(probs_or_log_probs, labels, mask, kind=kind)
    conf, prediction = top_label(pred)
    bins = calibration_bins(conf, prediction == pred.labels, n_bins)
    return {
        "acc": accuracy(pred),
        "ece": bins.ece,
        "nll": negative_log_likelihood(pred),
        "brier": brier_score(pred),
        "n": int(pred.labels.shape[0]),
    }
