"""Row-wise masked autoregressive flow on the whitened inducing matrix (METHOD.md section 2, step 2).

The flow is zuko's masked autoregressive transform with residual MADE conditioners. We use it in the
IAF direction: ``U_w = T(U0)`` is the transform's *forward* call, one conditioner pass per layer, and
its log-determinant comes from the same pass (``call_and_ladj``). Sampling therefore never runs the C
sequential passes a MAF needs for its inverse. Default width 16 and residual blocks reproduce the
authors' flow exactly (1,554 parameters for C = 9).

Same-shaped flows of many factors are evaluated together, instead of one small call per factor: by
:func:`_batched_flows`, which runs the MADE conditioners as batched matrix products over the stacked
masked weights and applies zuko's monotonic affine step itself, or by ``torch.func.vmap`` over zuko's
own modules. The batched path relies on zuko's internals (``MaskedMLP``, ``Residual``,
``MonotonicAffineTransform``), so each architecture is checked once against the vmap path on random
input and falls back to it, with a warning, if they ever disagree (a zuko release that changed them).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.nn import MaskedLinear, Residual
from zuko.transforms import MonotonicAffineTransform

__all__ = ["RowFlow", "apply_flows"]

# Scale of the conditioners' last layer at init: the flow starts close to the identity (so the
# posterior starts at q0) while every layer still receives a gradient from the first step.
_LAST_LAYER_INIT_SCALE = 1e-2


class RowFlow(nn.Module):
    """A stack of ``depth`` masked autoregressive transforms on vectors of length ``features``.

    Consecutive layers reverse the variable order, as in MAF/IAF stacks.
    """

    def __init__(self, features: int, depth: int, hidden: int, identity: bool = False) -> None:
        """``identity=True`` zeroes the conditioners' last layers, so the flow starts exactly at the
        identity (its last layers still get a gradient at the first step, the others from the second)."""
        super().__init__()
        if depth < 1:
            raise ValueError(f"flow_depth must be >= 1 for a RowFlow, got {depth}")
        self.architecture = (features, depth, hidden)  # what the batched path's agreement check is keyed on
        order = torch.arange(features)
        self.transforms = nn.ModuleList(
            MaskedAutoregressiveTransform(
                features,
                order=order if i % 2 == 0 else order.flip(0),
                hidden_features=(hidden, hidden),
                residual=True,
            )
            for i in range(depth)
        )
        with torch.no_grad():
            for transform in self.transforms:
                last = transform.hyper[-1]
                last.weight.mul_(0.0 if identity else _LAST_LAYER_INIT_SCALE)
                last.bias.zero_()

    def forward(self, u0: Tensor) -> tuple[Tensor, Tensor]:
        """Map base draws ``u0`` (..., C) to ``(u_w, log|det J|)`` with shapes (..., C) and (...)."""
        u = u0
        ladj = u0.new_zeros(u0.shape[:-1])
        for transform in self.transforms:
            u, step_ladj = transform().call_and_ladj(u)
            ladj = ladj + step_ladj
        return u, ladj


_ACTIVATIONS = (nn.ReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU)
_ZUKO_SLOPE = 1e-3  # MonotonicAffineTransform's default minimum slope, which the flows use
_BATCHED_OK: dict[tuple, bool] = {}  # architecture -> the batched path agreed with the vmap path


def _supported(flow: RowFlow) -> bool:
    for transform in flow.transforms:
        if transform.univariate is not MonotonicAffineTransform or tuple(transform.shapes) != ((), ()):
            return False
        for layer in transform.hyper:
            inner = list(layer) if isinstance(layer, Residual) else [layer]
            if not all(isinstance(m, (MaskedLinear, *_ACTIVATIONS)) for m in inner):
                return False
    return True


def _masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    """``F.linear`` of zuko's MaskedLinear for G stacked layers: x (G, N, in), weight (G, out, in)."""
    return torch.baddbmm(bias.unsqueeze(1), x, (mask * weight).transpose(1, 2))


def _batched_flows(flows: list[RowFlow], u0: Tensor) -> tuple[Tensor, Tensor]:
    """All G flows at once: u0 (G, ..., C) -> (u_w, ladj); the MADE conditioners as batched products."""
    g, shape = u0.shape[0], u0.shape
    u = u0.reshape(g, -1, shape[-1])
    ladj = u.new_zeros(u.shape[:-1])
    params = [dict(f.named_parameters()) for f in flows]

    def stacked(name: str) -> Tensor:
        return torch.stack([p[name] for p in params]).to(u.dtype)

    log_slope = math.log(_ZUKO_SLOPE)
    for t, transform in enumerate(flows[0].transforms):
        h = u
        for i, layer in enumerate(transform.hyper):
            prefix = f"transforms.{t}.hyper.{i}"
            if isinstance(layer, MaskedLinear):
                h = _masked_linear(h, stacked(f"{prefix}.weight"), layer.mask.to(u.dtype), stacked(f"{prefix}.bias"))
            elif isinstance(layer, Residual):
                r = h
                for j, sub in enumerate(layer):
                    if isinstance(sub, MaskedLinear):
                        r = _masked_linear(r, stacked(f"{prefix}.{j}.weight"), sub.mask.to(u.dtype),
                                           stacked(f"{prefix}.{j}.bias"))
                    else:
                        r = sub(r)
                h = h + r
            else:
                h = layer(h)
        phi = h.unflatten(-1, (-1, transform.total))
        shift, scale = phi[..., 0], phi[..., 1]
        log_scale = scale / (1 + abs(scale / log_slope))
        u = u * log_scale.exp() + shift
        ladj = ladj + log_scale.sum(-1)
    return u.reshape(shape), ladj.reshape(shape[:-1])


def _vmap_flows(flows: list[RowFlow], u0: Tensor) -> tuple[Tensor, Tensor]:
    template = flows[0]
    names = [name for name, _ in template.named_parameters()]
    per_flow = [dict(flow.named_parameters()) for flow in flows]
    stacked = {name: torch.stack([p[name] for p in per_flow]).to(u0.dtype) for name in names}
    buffers = dict(template.named_buffers())

    def one(params: dict[str, Tensor], u: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(template, (params, buffers), (u,))

    return vmap(one)(stacked, u0)


def _batched_agrees(flows: list[RowFlow], like: Tensor) -> bool:
    """Once per architecture: the batched path against the vmap path on random input, in float64."""
    key = flows[0].architecture
    if key not in _BATCHED_OK:
        ok = _supported(flows[0])
        if ok:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():  # randomised copies: an identity flow (a fresh B factor) would prove nothing
                clones = [copy.deepcopy(f).double() for f in flows[:2]]
                for clone in clones:
                    for p in clone.parameters():
                        p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
                clones = [c.to(like.device) for c in clones]
                probe = torch.randn((len(clones), 3, like.shape[-1]), dtype=torch.float64, generator=gen).to(like.device)
                a, la = _batched_flows(clones, probe)
                b, lb = _vmap_flows(clones, probe)
                ok = torch.allclose(a, b, rtol=1e-9, atol=1e-12) and torch.allclose(la, lb, rtol=1e-9, atol=1e-12)
            if not ok:
                warnings.warn("the batched flow disagrees with zuko's own modules (a changed zuko release?); "
                              "using torch.func.vmap over zuko instead")
        _BATCHED_OK[key] = ok
    return _BATCHED_OK[key]


def apply_flows(flows: list[RowFlow], u0: Tensor) -> tuple[Tensor, Tensor]:
    """Apply flow ``g`` to ``u0[g]`` for every g in one batched call.

    ``u0`` has shape (G, ..., C); returns ``(u_w, ladj)`` of shapes (G, ..., C) and (G, ...). The
    flows must share one architecture (same features, depth and width), which grouping guarantees.
    Parameters are cast to ``u0``'s dtype so the flow runs in the inducing precision.
    """
    if len(flows) != u0.shape[0]:
        raise ValueError(f"got {len(flows)} flows for a batch of {u0.shape[0]} factors")
    template = flows[0]
    if len(flows) == 1:
        if next(template.parameters()).dtype == u0.dtype:
            u, ladj = template(u0[0])
            return u.unsqueeze(0), ladj.unsqueeze(0)
    if _batched_agrees(flows, u0):
        return _batched_flows(flows, u0)
    return _vmap_flows(flows, u0)
