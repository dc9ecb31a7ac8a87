"""The two KL terms of the Bayesian-LoRA ELBO (METHOD.md section 3), per factor.

Direction: KL(q ‖ p), posterior against prior. Both are summed over a factor's entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["conditional_kl", "flow_kl_sample"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def conditional_kl(lam: Tensor, numel: int) -> Tensor:
    """Closed-form KL of the conditional noise: ``d_o·d_i·(λ²/2 − log λ − 1/2)``.

    The conditional N(M, σ_p²λ²(I − P)) against the prior's conditional N(M, σ_p²(I − P)) has this
    KL whatever P is, so it is independent of U. ``lam`` may be batched (G,).
    """
    return numel * (0.5 * lam.square() - torch.log(lam) - 0.5)


def flow_kl_sample(eps: Tensor, log_sigma: Tensor, ladj: Tensor, u_w: Tensor) -> Tensor:
    """One-sample estimate of KL(q_φ(U_w) ‖ N(0, I)) from the draw that made the forward pass.

    ``log q0(U0) − log|det J| − log N(U_w; 0, I)`` with ``U0 = m + σ ⊙ ε``, so that
    ``log q0(U0) = Σ(−ε²/2 − log σ − ½log 2π)``. Shapes: ``eps``, ``u_w`` (G, n, R, C); ``log_sigma``
    (G, R, C); ``ladj`` (G, n, R) (summed over C by the flow). Returns the mean over the n draws, (G,).
    """
    log_q0 = (-0.5 * eps.square() - _HALF_LOG_2PI).sum((-2, -1)) - log_sigma.sum((-2, -1)).unsqueeze(1)
    log_prior = (-0.5 * u_w.square() - _HALF_LOG_2PI).sum((-2, -1))
    return (log_q0 - ladj.sum(-1) - log_prior).mean(1)
