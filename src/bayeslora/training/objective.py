"""Training objectives and their schedules, as plain functions of the step (METHOD.md section 3).

* ``elbo``: the per-example ELBO, NLL averaged over the S draws of the step (the ELBO averages
  log-likelihoods, not probabilities) + β·KL with β = 1/N_train, optionally ramped up linearly over
  ``kl_warmup_steps``; ``--kl-scale`` multiplies β (a tempered ELBO, reported in the run config). No weight decay on variational parameters (that would add a second prior).
* ``paper``: the authors' recipe, offered by name and recorded with every number it produces:
  cross-entropy with label smoothing 0.05 − 0.05 × predictive entropy + w·KL with
  w = 0.1/steps_per_epoch from (0-based) epoch 2, lr ×1, 1, 0.1, 0.1, 0.01, 0.01, weight decay
  0.027 on everything, 6 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LossParts", "beta_at", "elbo_loss", "paper_kl_weight", "paper_loss",
           "paper_lr_factor", "PAPER"]

@dataclass(frozen=True)
class PaperRecipe:
    label_smoothing: float = 0.05
    entropy_bonus: float = 0.05
    kl_scale: float = 0.1
    kl_start_epoch: int = 2
    weight_decay: float = 0.027
    lr: float = 7.39e-4
    epochs: int = 6


PAPER = PaperRecipe()


@dataclass
class LossParts:
    loss: Tensor
    nll: Tensor
    kl_flow: Optional[Tensor]
    kl_cond: Optional[Tensor]
    kl_weight: float


def _nll(log_probs: Tensor, labels: Tensor) -> Tensor:
    """Mean over draws and examples of −log p_s(y); ``log_probs`` is (S, B, C)."""
    index = labels.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return -log_probs.gather(-1, index).mean()


def beta_at(step: int, n_train: int, warmup_steps: int = 0) -> float:
    """β for the per-example ELBO: 1/N_train, linearly ramped from 0 over ``warmup_steps``."""
    if n_train <= 0:
        raise ValueError(f"the training set is empty (N_train={n_train})")
    ramp = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return ramp / n_train


def elbo_loss(log_probs: Tensor, labels: Tensor, kl_flow: Optional[Tensor], kl_cond: Optional[Tensor],
              beta: float) -> LossParts:
    nll = _nll(log_probs, labels)
    loss = nll
    for term in (kl_flow, kl_cond):
        if term is not None:
            loss = loss + beta * term
    return LossParts(loss, nll.detach(), kl_flow, kl_cond, beta)


def paper_kl_weight(epoch: int, steps_per_epoch: int) -> float:
    """0, 0, w, w, w, w with w = 0.1/steps_per_epoch over 0-based epochs."""
    return 0.0 if epoch < PAPER.kl_start_epoch else PAPER.kl_scale / steps_per_epoch


def paper_lr_factor(epoch: int) -> float:
    """×1, 1, 0.1, 0.1, 0.01, 0.01 over 0-based epochs (÷10 at epochs 2 and 4)."""
    return 0.1 ** (epoch // 2)


def paper_loss(log_probs: Tensor, labels: Tensor, mask: Tensor, kl_flow: Optional[Tensor],
               kl_cond: Optional[Tensor], kl_weight: float) -> LossParts:
    """Label-smoothed CE over each item's own choices, minus an entropy bonus, plus w·KL."""
    valid = mask.unsqueeze(0).expand_as(log_probs)
    finite = log_probs.masked_fill(~valid, 0.0)
    n_choices = mask.sum(-1).to(log_probs.dtype)  # (B,)
    nll = _nll(log_probs, labels)
    uniform_ce = -(finite.sum(-1) / n_choices).mean()
    smoothed = (1 - PAPER.label_smoothing) * nll + PAPER.label_smoothing * uniform_ce
    entropy = -(finite.exp() * finite).sum(-1).mean()
    loss = smoothed - PAPER.entropy_bonus * entropy
    for term in (kl_flow, kl_cond):
        if term is not None:
            loss = loss + kl_weight * term
    return LossParts(loss, nll.detach(), kl_flow, kl_cond, kl_weight)
