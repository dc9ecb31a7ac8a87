"""The variational parameters of one Bayesian LoRA factor (METHOD.md section 2).

A factor is a weight W of shape (d_out, d_in): for LoRA's A, (r, d_in); for B, (d_out, r). Its
posterior lives in an R×C inducing matrix mapped to full size by Kronecker-factored inducing
locations. This module only *holds* parameters; the maths that turns them into samples, means and KL
terms lives in :mod:`bayeslora.core.posterior`, which works on many same-shaped factors at once.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch
from torch import nn

from .flow import RowFlow

__all__ = ["FactorShape", "InducingFactor", "inverse_softplus", "lora_matching_std"]


def inverse_softplus(y: float) -> float:
    """x such that softplus(x) = y, for initialising positive parameters."""
    if y <= 0:
        raise ValueError(f"inverse_softplus needs a positive value, got {y}")
    return y + math.log(-math.expm1(-y))


@dataclass(frozen=True)
class FactorShape:
    """Everything that must agree for factors to be sampled together in one batched call."""

    d_out: int
    d_in: int
    rows: int
    cols: int
    flow_depth: int
    flow_hidden: int
    prior_std: float
    sigma_u_max: float
    lambda_max: float
    jitter: float

    @property
    def prior_scale(self) -> float:
        """σ_p = prior_std / √d_in."""
        return self.prior_std / math.sqrt(self.d_in)

    def key(self) -> str:
        """A stable text key (used to seed per-group generators identically on every rank)."""
        return "|".join(str(v) for v in astuple(self))


def lora_matching_std(shape: FactorShape) -> float:
    """The std of m ~ N(0, std²) that starts ‖E[W]‖_F near PEFT's random LoRA A of the same shape.

    PEFT draws A (r × d_in) kaiming-uniform with a = √5, entries of variance 1/(3·d_in), so ‖A‖_F ≈ √(r/3)
    at any width. The inducing mean reaches only min(d_out, R)·min(d_in, C) whitened directions at the
    prior scale σ_p, so ‖E[W]‖_F ≈ σ_p·std·√(min(d_out, R)·min(d_in, C)) (measured within ~10% for
    d_in 64 to 2048 and r 4 to 16 with the default flow): at std 1 a third of LoRA's norm on MiniLM
    (d_in 384) and a tenth at d_in 2048. Used by ``BayesLoraConfig(mean_init_std="lora")`` for A.
    """
    reach = min(shape.d_out, shape.rows) * min(shape.d_in, shape.cols)
    return math.sqrt(shape.d_out / 3) / (shape.prior_scale * math.sqrt(reach))


class InducingFactor(nn.Module):
    """Inducing mean m, std parameter ρ_U, locations Z_r, Z_c, diagonals δ_r, δ_c, noise scale ℓ, flow.

    Initialisation (METHOD.md section 2): m ~ N(0, 1) (× ``mean_init_std``), or m = 0 with an identity flow when
    ``zero_mean`` (E[W] = 0 at init, as LoRA's B = 0); σ_U = softplus(ρ_U) = sigma_u_init;
    Z_r ~ N(0, 1)/√R, Z_c ~ N(0, 1)/√C; softplus(δ) = d_init; λ = softplus(ℓ) = lambda_init.
    Parameters are created in float32 and draw from the global RNG in sequence, so same-shaped factors
    start different (the reference code re-seeded per factor and made them identical).
    """

    def __init__(
        self,
        shape: FactorShape,
        *,
        sigma_u_init: float,
        lambda_init: float,
        d_init: float = 1e-3,
        zero_mean: bool = False,
        prior_at_init: bool = False,
        mean_init_std: float = 1.0,
        offset_init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.shape = shape
        rows, cols = shape.rows, shape.cols
        mean = torch.randn(rows, cols) * mean_init_std  # drawn either way: the RNG stream does not depend on it
        self.inducing_mean = nn.Parameter(mean.zero_() if zero_mean else mean)
        self.inducing_rho = nn.Parameter(torch.full((rows, cols), inverse_softplus(sigma_u_init)))
        self.z_rows = nn.Parameter(torch.randn(rows, shape.d_out) / math.sqrt(rows))
        self.z_cols = nn.Parameter(torch.randn(cols, shape.d_in) / math.sqrt(cols))
        self.delta_rows = nn.Parameter(torch.full((rows,), inverse_softplus(d_init)))
        self.delta_cols = nn.Parameter(torch.full((cols,), inverse_softplus(d_init)))
        # shape (1,), not 0-d: ZeRO-3 broadcasts and partitions every parameter as a flat byte view
        self.lambda_raw = nn.Parameter(torch.full((1,), inverse_softplus(lambda_init)))
        self.flow = (RowFlow(cols, shape.flow_depth, shape.flow_hidden, identity=zero_mean)
                     if shape.flow_depth > 0 else None)
        # the prior's mean on the whitened U_w (METHOD.md section 3 uses 0). With ``prior_at_init`` it is
        # the initial posterior's transformed mean T(m), saved with the adapter; otherwise a zero buffer
        # kept out of the state dict, so adapters saved without it load unchanged.
        prior_mean = torch.zeros(rows, cols)
        if prior_at_init:
            with torch.no_grad():
                prior_mean = self.flow(self.inducing_mean)[0] if self.flow is not None else self.inducing_mean.clone()
        self.register_buffer("prior_mean", prior_mean, persistent=prior_at_init)
        # a point-estimated factor W₀ that posterior and prior are both centred on (BayesLoraConfig.lora_offset)
        self.offset = None if offset_init is None else nn.Parameter(offset_init.detach().float().clone())

    def sigma_u(self) -> torch.Tensor:
        """σ_U = clamp(softplus(ρ_U), max=sigma_u_max), in float32."""
        return nn.functional.softplus(self.inducing_rho.float()).clamp(max=self.shape.sigma_u_max)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Adapters saved before λ became a 1-element tensor stored it 0-d: read those as (1,)."""
        key = prefix + "lambda_raw"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lam(self) -> torch.Tensor:
        """λ = clamp(softplus(ℓ), max=lambda_max), shape (1,), in float32."""
        return nn.functional.softplus(self.lambda_raw.float()).clamp(max=self.shape.lambda_max)

    def version(self) -> tuple:
        """Identity, storage and in-place version of every parameter: changes when an optimizer steps,
        a state dict is loaded, or the module moves device or dtype. Not seen: writes through ``p.data``
        (a tensor with its own version counter); after them, ``set_mode(model, "mean")`` recomputes the mean."""
        return tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in self.parameters())

    def extra_repr(self) -> str:
        s = self.shape
        return f"d_out={s.d_out}, d_in={s.d_in}, inducing={s.rows}x{s.cols}, flow_depth={s.flow_depth}"
