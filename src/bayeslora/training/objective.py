"""Training objectives and their schedules, as plain functions of the step (METHOD.md section 3).

* ``elbo``: the per-example ELBO, NLL averaged over the S draws of the step (the ELBO averages
  log-likelihoods, not probabilities) + β·KL with β = 1/N_train, optionally ramped up linearly over
  ``kl_warmup_steps``; ``--kl-scale`` multiplies β (a tempered ELBO, reported in the run config). No
  weight decay on variational parameters (that would add a second prior). Off by default, the paper's
  calibrating regularisers (label smoothing, entropy bonus) are options of every recipe
  (``--label-smoothing``, ``--entropy-bonus``), so a method and LoRA can be compared with the same ones.
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

__all__ = ["LossParts", "beta_at", "data_term", "elbo_loss", "paper_kl_weight", "paper_loss",
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


def data_term(log_probs: Tensor, labels: Tensor, mask: Optional[Tensor], label_smoothing: float = 0.0,
              entropy_bonus: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss, nll): the NLL, label-smoothed over each item's own choices (``mask``, (B, C)), minus
    ``entropy_bonus`` × the mean entropy of each draw's prediction; both averaged over the S draws."""
    nll = _nll(log_probs, labels)
    if not label_smoothing and not entropy_bonus:
        return nll, nll
    if mask is None:
        mask = torch.isfinite(log_probs[0])
    valid = mask.unsqueeze(0).expand_as(log_probs)
    finite = log_probs.masked_fill(~valid, 0.0)
    loss = nll
    if label_smoothing:
        n_choices = mask.sum(-1).to(log_probs.dtype)  # (B,)
        uniform_ce = -(finite.sum(-1) / n_choices).mean()
        loss = (1 - label_smoothing) * nll + label_smoothing * uniform_ce
    if entropy_bonus:
        loss = loss - entropy_bonus * (-(finite.exp() * finite).sum(-1).mean())
    return loss, nll


def elbo_loss(log_probs: Tensor, labels: Tensor, kl_flow: Optional[Tensor], kl_cond: Optional[Tensor],
              beta: float, mask: Optional[Tensor] = None, label_smoothing: float = 0.0,
              entropy_bonus: float = 0.0) -> LossParts:
    loss, nll = data_term(log_probs, labels, mask, label_smoothing, entropy_bonus)
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
               kl_cond: Optional[Tensor], kl_weight: float, label_smoothing: float = PAPER.label_smoothing,
               entropy_bonus: float = PAPER.entropy_bonus) -> LossParts:
    """Label-smoothed CE over each item's own choices, minus an entropy bonus, plus w·KL: the
    :func:`elbo_loss` with the paper's regularisers and its KL weight w in place of β."""
    return elbo_loss(log_probs, labels, kl_flow, kl_cond, kl_weight, mask, label_smoothing, entropy_bonus)
