"""The Kronecker-factored Laplace posterior and its linearised (GLM) predictive: torch-only maths.

Per covered layer l with K-FAC factors A_l (in' × in') and G_l (out × out) (see ``kfac``), the posterior
precision over its flattened weight is ``P_l = G_l ⊗ A_l + δ I`` (δ: one prior precision for every
layer, the prior being N(0, δ⁻¹ I)). With the eigendecompositions ``A = Q_A diag(α) Q_Aᵀ`` and
``G = Q_G diag(γ) Q_Gᵀ`` nothing is ever inverted: P_l's eigenvalues are ``γ_j α_i + δ``, and for
Jacobians J, J' (out × in') of two logits, ``vec(J)ᵀ P_l⁻¹ vec(J') = Σ_ji J̃_ji J̃'_ji / (γ_j α_i + δ)``
with ``J̃ = Q_Gᵀ J Q_A``.

The prior precision maximises the Laplace evidence (Immer et al. 2021)::

    log p(D | δ) ≈ log p(D | θ*) − ½ δ ‖θ*‖² − ½ Σ_l log det P_l + ½ D log δ

(the 2π terms cancel). In u = log δ it is concave, so Newton's method with backtracking climbs it
monotonically to its maximum. The predictive of the linearised model is N(f(x; θ*), J P⁻¹ Jᵀ) over the
logits, read either with the probit approximation (one deterministic pass) or by sampling the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["DELTA_MAX", "DELTA_MIN", "KronLaplace", "probit_logits", "sample_logits"]

DELTA_MIN, DELTA_MAX = 1e-8, 1e8


@dataclass
class KronLaplace:
    """Eigendecomposed K-FAC posterior precision of every covered layer, and the data it was fitted on."""

    eig_a: dict[str, Tensor]  # (in',)
    vec_a: dict[str, Tensor]  # (in', in')
    eig_g: dict[str, Tensor]  # (out,)
    vec_g: dict[str, Tensor]  # (out, out)
    theta_sq: float  # ‖θ*‖² of the covered parameters
    log_likelihood: float  # log p(D | θ*), summed over the fitting items
    prior_precision: float = 1.0

    @classmethod
    def from_factors(cls, factors: dict[str, tuple[Tensor, Tensor]], theta_sq: float, log_likelihood: float
                     ) -> "KronLaplace":
        """Eigendecompose (float64) each layer's (A, G); tiny negative eigenvalues from rounding become 0."""
        parts: dict[str, dict[str, Tensor]] = {"eig_a": {}, "vec_a": {}, "eig_g": {}, "vec_g": {}}
        for name, (a, g) in factors.items():
            for key, matrix in (("a", a), ("g", g)):
                values, vectors = torch.linalg.eigh(matrix.double())
                parts[f"eig_{key}"][name] = values.clamp(min=0.0)
                parts[f"vec_{key}"][name] = vectors
        return cls(**parts, theta_sq=float(theta_sq), log_likelihood=float(log_likelihood))

    @property
    def n_params(self) -> int:
        return sum(self.eig_a[n].numel() * self.eig_g[n].numel() for n in self.eig_a)

    def _curvatures(self) -> Tensor:
        """Every layer's GGN eigenvalue ``γ_j α_i``, concatenated (D,)."""
        return torch.cat([torch.outer(self.eig_g[n], self.eig_a[n].to(self.eig_g[n].device)).flatten().cpu()
                          for n in self.eig_a])

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        delta = self.prior_precision if prior_precision is None else prior_precision
        if not delta > 0:
            raise ValueError(f"the prior precision must be positive, got {delta!r}")
        lam = self._curvatures()
        return float(self.log_likelihood - 0.5 * delta * self.theta_sq - 0.5 * torch.log(lam + delta).sum()
                     + 0.5 * lam.numel() * math.log(delta))

    def tune_prior_precision(self, start: float = 1.0, max_steps: int = 100) -> list[tuple[float, float]]:
        """Maximise the evidence over δ (Newton on log δ, backtracking, δ in [DELTA_MIN, DELTA_MAX]); sets
        ``prior_precision`` and returns every accepted (δ, log evidence), which never decreases."""
        lam = self._curvatures()
        d = lam.numel()
        lo, hi = math.log(DELTA_MIN), math.log(DELTA_MAX)
        u = min(max(math.log(start), lo), hi)
        value = self.log_marginal_likelihood(math.exp(u))
        path = [(math.exp(u), value)]
        for _ in range(max_steps):
            delta = math.exp(u)
            ratio = delta / (lam + delta)
            grad = 0.5 * (d - delta * self.theta_sq - float(ratio.sum()))
            curv = -0.5 * (delta * self.theta_sq + float((ratio * (1 - ratio)).sum()))
            if abs(grad) <= 1e-10 * d or curv >= 0:
                break
            step = -grad / curv
            while True:
                trial = min(max(u + step, lo), hi)
                trial_value = self.log_marginal_likelihood(math.exp(trial))
                if trial_value >= value or abs(step) < 1e-12:
                    break
                step /= 2
            if trial_value < value or trial == u:
                break
            u, value = trial, trial_value
            path.append((math.exp(u), value))
        self.prior_precision = math.exp(u)
        return path

    def logit_covariance(self, jacobians: dict[str, Tensor], prior_precision: float | None = None) -> Tensor:
        """``J P⁻¹ Jᵀ`` (B, C, C) from per-layer Jacobians (B, C, out, in'); layers absent add nothing."""
        delta = self.prior_precision if prior_precision is None else prior_precision
        total = None
        for name, jac in jacobians.items():
            vec_g, vec_a, eig_g, eig_a = self._on(name, jac.device)
            rotated = vec_g.T @ jac.double() @ vec_a  # (B, C, out, in')
            inverse = 1.0 / (torch.outer(eig_g, eig_a) + delta)
            part = torch.einsum("bcoi,bdoi->bcd", rotated * inverse, rotated)
            total = part if total is None else total + part
        if total is None:
            raise ValueError("no Jacobians of covered layers were given")
        return total

    def _on(self, name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The layer's eigendecompositions on ``device`` (moved there once, then kept)."""
        parts = tuple(getattr(self, key)[name] for key in ("vec_g", "vec_a", "eig_g", "eig_a"))
        if parts[0].device != device:
            for key, value in zip(("vec_g", "vec_a", "eig_g", "eig_a"), parts):
                getattr(self, key)[name] = value.to(device)
            parts = tuple(getattr(self, key)[name] for key in ("vec_g", "vec_a", "eig_g", "eig_a"))
        return parts

    def tensors(self) -> dict[str, Tensor]:
        """The eigendecompositions as a flat dict for a safetensors file (float32)."""
        out = {}
        for key in ("eig_a", "vec_a", "eig_g", "vec_g"):
            for name, value in getattr(self, key).items():
                out[f"{name}::{key}"] = value.float().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], theta_sq: float, log_likelihood: float,
                     prior_precision: float, where: str) -> "KronLaplace":
        """The inverse of :meth:`tensors`; every layer must have its four tensors with matching shapes."""
        parts: dict[str, dict[str, Tensor]] = {"eig_a": {}, "vec_a": {}, "eig_g": {}, "vec_g": {}}
        for key, value in tensors.items():
            name, _, kind = key.rpartition("::")
            if kind not in parts or not name:
                raise ValueError(f"{where}: unexpected tensor {key!r}")
            parts[kind][name] = value.double()
        for name in set().union(*(p.keys() for p in parts.values())):
            try:
                ea, va, eg, vg = (parts[k][name] for k in ("eig_a", "vec_a", "eig_g", "vec_g"))
            except KeyError:
                raise ValueError(f"{where}: layer {name!r} lacks one of its four tensors") from None
            if va.shape != (ea.numel(), ea.numel()) or vg.shape != (eg.numel(), eg.numel()):
                raise ValueError(f"{where}: layer {name!r} has eigenvectors that do not match its eigenvalues")
        return cls(**parts, theta_sq=theta_sq, log_likelihood=log_likelihood, prior_precision=prior_precision)


def _centred(mu: Tensor, cov: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the direction that moves every valid choice alike (the softmax ignores it)."""
    m = mask.double()
    k = m.sum(-1, keepdim=True).clamp(min=1.0)
    proj = torch.diag_embed(m) - m[:, :, None] * m[:, None, :] / k[:, :, None]  # (B, C, C)
    mu = torch.where(mask, mu.double(), torch.zeros((), dtype=torch.float64))
    return (proj @ mu[..., None])[..., 0], proj @ cov @ proj.transpose(1, 2)


def probit_logits(mu: Tensor, cov: Tensor, mask: Tensor) -> Tensor:
    """Logits of the probit approximation ``softmax(μ_c / sqrt(1 + π/8 Σ_cc))`` (B, C), -inf on padding,
    taken on the centred Gaussian so a shift shared by all choices cannot flatten the prediction."""
    mu_c, cov_c = _centred(mu, cov, mask)
    var = torch.diagonal(cov_c, dim1=-2, dim2=-1).clamp(min=0.0)
    return (mu_c / torch.sqrt(1.0 + math.pi / 8.0 * var)).masked_fill(~mask, float("-inf"))


def sample_logits(mu: Tensor, cov: Tensor, mask: Tensor, seeds: Sequence[int]) -> Tensor:
    """S draws of the logits from N(μ, Σ) (S, B, C), draw s from its own CPU generator seeded ``seeds[s]``
    (the same draws on every device)."""
    mu_c, cov_c = _centred(mu, cov, mask)
    values, vectors = torch.linalg.eigh(cov_c)
    root = vectors * values.clamp(min=0.0).sqrt()[:, None, :]  # (B, C, C), root rootᵀ = Σ
    draws = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        eps = torch.randn(mu_c.shape, generator=gen, dtype=torch.float64).to(mu.device)
        draws.append(mu_c + (root @ eps[..., None])[..., 0])
    return torch.stack(draws).masked_fill(~mask, float("-inf"))
