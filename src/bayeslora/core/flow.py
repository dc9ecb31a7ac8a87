"""Row-wise masked autoregressive flow on the whitened inducing matrix (METHOD.md section 2, step 2).

The flow is zuko's masked autoregressive transform with residual MADE conditioners. We use it in the
IAF direction: ``U_w = T(U0)`` is the transform's *forward* call, one conditioner pass per layer, and
its log-determinant comes from the same pass (``call_and_ladj``). Sampling therefore never runs the C
sequential passes a MAF needs for its inverse. Default width 16 and residual blocks reproduce the
authors' flow exactly (1,554 parameters for C = 9).

Same-shaped flows of many factors are evaluated in one batched call with ``torch.func.vmap`` over
their stacked parameters, instead of one small call per factor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from zuko.flows.autoregressive import MaskedAutoregressiveTransform

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
    names = [name for name, _ in template.named_parameters()]
    per_flow = [dict(flow.named_parameters()) for flow in flows]
    stacked = {name: torch.stack([p[name] for p in per_flow]).to(u0.dtype) for name in names}
    buffers = dict(template.named_buffers())

    def one(params: dict[str, Tensor], u: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(template, (params, buffers), (u,))

    return vmap(one)(stacked, u0)
