"""Predictive distributions over answer choices: one normalisation, one average.

Every method (plain LoRA, Bayesian-LoRA in sample or mean mode, the baselines) ends in the same two
steps, and they live here so that no method can do them differently:

1. ``log_softmax_over_choices`` turns a scorer's logits into log-probabilities over the *valid*
   choices of each item (padded choices get exactly ``-inf``). It is applied to every forward pass,
   whatever the method and whatever the number of samples S. (METHOD.md section 9: one reference
   evaluator normalised only when S > 1, so its S = 1 and S > 1 NLLs were not comparable.)
2. ``average_log_probs`` averages S per-sample distributions in probability space,
   ``log p̄ = logsumexp_s log p_s - log S`` (METHOD.md section 4: average probabilities, not logits),
   in float64.

Shapes are sample-first: per-sample log-probabilities are ``(S, B, C)``; a deterministic method passes
``S = 1``. A mask is a boolean ``(B, C)`` tensor, ``True`` where the choice exists; when no mask is
given, choices whose log-probability is ``-inf`` in every sample are simply impossible ones.

The uncertainty decomposition (predictive entropy = expected entropy + mutual information) is computed
per example in nats, float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

#: Largest tolerated |log Σ_c p_c| (per sample, per item) before a distribution counts as unnormalised.
#: Loose enough for float32 log-softmax, tight enough to catch logits that were never normalised
#: over the choices (their sums over a few label tokens are typically far from 1).
NORMALISATION_ATOL = 1e-5


def _check_mask(mask: Tensor, trailing_shape: torch.Size) -> Tensor:
    """Validate a choice mask: boolean, matching the trailing dims, at least one valid choice per item."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = valid choice), got dtype {mask.dtype}")
    if mask.shape != trailing_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the trailing dims {tuple(trailing_shape)}")
    if mask.ndim >= 1 and not bool(mask.any(dim=-1).all()):
        rows = (~mask.any(dim=-1)).nonzero().flatten().tolist()[:5]
        raise ValueError(f"every item needs at least one valid choice; items without any: {rows}")
    return mask


def log_softmax_over_choices(
    logits: Tensor, mask: Tensor | None = None, *, dtype: torch.dtype | None = torch.float64
) -> Tensor:
    """Log-softmax over the valid choices of each item; padded choices get exactly ``-inf``.

    This is the one normalisation every scorer uses, for every method and every number of samples,
    so NLLs of different methods are comparable.

    Args:
        logits: ``(..., C)`` scores, e.g. ``(S, B, C)`` label-token logits or ``(B, C)`` head outputs.
            Values at padded positions are ignored (they may be anything, even NaN).
        mask: boolean ``(B, C)`` (or any shape equal to the trailing dims of ``logits``), ``True`` where
            the choice exists; broadcast over the leading (sample) dims. ``None``: all choices valid.
        dtype: computation and output dtype; float64 by default for evaluation. ``None`` keeps the
            input dtype (e.g. inside a training loss).

    Returns:
        log-probabilities with the shape of ``logits``; ``exp`` sums to 1 over the valid choices.
    """
    if dtype is not None:
        logits = logits.to(dtype)
    if mask is not None:
        mask = _check_mask(mask.to(logits.device), logits.shape[logits.ndim - mask.ndim :])
        logits = torch.where(mask, logits, torch.full_like(logits, -math.inf))
    return torch.log_softmax(logits, dim=-1)


def _check_sample_log_probs(log_probs: Tensor, mask: Tensor | None, atol: float) -> Tensor:
    """Validate ``(S, B, C)`` per-sample log-probabilities and return them as float64."""
    if log_probs.ndim != 3:
        raise ValueError(
            f"expected sample-first log-probabilities of shape (S, B, C), got {tuple(log_probs.shape)}; "
            "a deterministic method passes log_probs[None] (S = 1)"
        )
    if log_probs.shape[0] == 0:
        raise ValueError("need at least one sample (S >= 1)")
    lp = log_probs.to(torch.float64)
    if torch.isnan(lp).any() or (lp == math.inf).any() or (lp > atol).any():
        raise ValueError(
            "log-probabilities must be <= 0 and free of NaN / +inf (raw logits? normalise them with "
            "log_softmax_over_choices first)"
        )
    if mask is not None:
        mask = _check_mask(mask.to(lp.device), lp.shape[1:])
        if (lp[:, ~mask] != -math.inf).any():
            raise ValueError("a padded choice has non-zero probability; use log_softmax_over_choices(logits, mask)")
    total = torch.logsumexp(lp, dim=-1)  # (S, B)
    bad = ~(total.abs() <= atol)  # also catches rows that are all -inf (total = -inf)
    if bad.any():
        s, b = bad.nonzero()[0].tolist()
        raise ValueError(
            f"per-sample log-probabilities are not normalised over the choices (sample {s}, item {b}: "
            f"log sum p = {total[s, b].item():.3g}); normalise every sample with log_softmax_over_choices, "
            "whatever S is"
        )
    return lp


def average_log_probs(log_probs: Tensor, mask: Tensor | None = None, *, atol: float = NORMALISATION_ATOL) -> Tensor:
    """Average S predictive distributions in probability space, in log space: ``log p̄``.

    ``log p̄ = logsumexp_s log p_s - log S``, i.e. the log of the mean of the probabilities (not of the
    logits), computed without leaving log space so that tiny probabilities keep their precision.

    Args:
        log_probs: ``(S, B, C)`` per-sample log-probabilities, each normalised over the valid choices
            (the output of ``log_softmax_over_choices``); padded choices hold ``-inf``.
        mask: optional boolean ``(B, C)``, ``True`` = valid; if given, padded entries must be ``-inf``.
        atol: tolerance of the per-sample normalisation check (see ``NORMALISATION_ATOL``).

    Returns:
        ``(B, C)`` float64 log-probabilities of the predictive mean p̄; padded choices stay ``-inf``.

    Raises:
        ValueError: wrong shape, NaN, a padded choice with probability, or an unnormalised sample.
    """
    lp = _check_sample_log_probs(log_probs, mask, atol)
    return torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])


def entropy(log_p: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dim, ``-Σ_c p_c log p_c``, with ``0 · log 0 = 0``.

    Args:
        log_p: ``(..., C)`` normalised log-probabilities (padded choices ``-inf``).

    Returns:
        ``(...)`` float64 entropies.
    """
    lp = log_p.to(torch.float64)
    finite = lp.masked_fill(torch.isneginf(lp), 0.0)  # exp(-inf) = 0 kills the term; avoid 0 * -inf = NaN
    return -(lp.exp() * finite).sum(dim=-1)


def predictive_entropy(log_p_bar: Tensor) -> Tensor:
    """Total uncertainty ``H[p̄]`` of the averaged predictive, per example.

    Args:
        log_p_bar: ``(B, C)`` output of ``average_log_probs``.

    Returns:
        ``(B,)`` float64, in nats, between 0 and log(number of valid choices).
    """
    if log_p_bar.ndim != 2:
        raise ValueError(f"expected (B, C) averaged log-probabilities, got {tuple(log_p_bar.shape)}")
    return entropy(log_p_bar)


def expected_entropy(log_probs: Tensor, mask: Tensor | None = None, *, atol: float = NORMALISATION_ATOL) -> Tensor:
    """Aleatoric part ``E_s H[p_s]``: the mean over samples of each sample's entropy, per example.

    Args:
        log_probs: ``(S, B, C)`` per-sample log-probabilities (see ``average_log_probs``).
        mask: optional boolean ``(B, C)``, ``True`` = valid.

    Returns:
        ``(B,)`` float64, in nats.
    """
    lp = _check_sample_log_probs(log_probs, mask, atol)
    return entropy(lp).mean(dim=0)


class PredictiveSummary(NamedTuple):
    """The averaged predictive of one batch and its uncertainty decomposition (all float64).

    Attributes:
        log_probs: ``(B, C)`` log p̄, padded choices ``-inf``.
        entropy: ``(B,)`` total uncertainty H[p̄].
        expected_entropy: ``(B,)`` aleatoric part E_s H[p_s].
        mutual_information: ``(B,)`` epistemic part H[p̄] - E_s H[p_s] (0 when S = 1 or samples agree).
    """

    log_probs: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor


def summarise_samples(log_probs: Tensor, mask: Tensor | None = None, *, atol: float = NORMALISATION_ATOL) -> PredictiveSummary:
    """Average ``(S, B, C)`` per-sample log-probabilities and decompose the uncertainty, validating once.

    Mutual information is non-negative by Jensen's inequality; float64 rounding can push it a few ulp
    below zero, so it is clamped at 0 (a true negative value cannot occur for valid inputs, which are
    checked here).
    """
    lp = _check_sample_log_probs(log_probs, mask, atol)
    log_p_bar = torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])
    total = entropy(log_p_bar)
    aleatoric = entropy(lp).mean(dim=0)
    return PredictiveSummary(log_p_bar, total, aleatoric, (total - aleatoric).clamp_min(0.0))


def mutual_information(log_probs: Tensor, mask: Tensor | None = None, *, atol: float = NORMALISATION_ATOL) -> Tensor:
    """Epistemic uncertainty ``H[p̄] - E_s H[p_s]`` (the BALD score), per example, ``>= 0``.

    Args:
        log_probs: ``(S, B, C)`` per-sample log-probabilities (see ``average_log_probs``).
        mask: optional boolean ``(B, C)``, ``True`` = valid.

    Returns:
        ``(B,)`` float64, in nats; exactly 0 for S = 1, ~0 when all samples agree.
    """
    return summarise_samples(log_probs, mask, atol=atol).mutual_information
