"""Per-item Jacobians and Kronecker-factored GGN curvature of chosen ``nn.Linear`` layers, by hooks.

Laplace-LoRA needs, for the trained LoRA factors (and an encoder's scoring head), two things from the
same backward passes: the K-FAC factors of the generalised Gauss-Newton (GGN) of the training NLL, and
the exact Jacobian of every item's choice logits for the linearised predictive. Both come from one
forward with hooks that keep each layer's input ``a`` and output, then one backward per choice column
``c`` (the gradient of ``Σ_n f_{n,c}``) taken with respect to the layer outputs, giving ``g_c``.

An item is scored from several rows (one per choice for pair and log-likelihood scoring) and several
token positions per row, all sharing the layer's weight W (out × in). Per item n:

* the exact Jacobian of logit c is ``J_{n,c} = Σ_{rows r of n} Σ_t g_c[r, t] a[r, t]ᵀ`` (out × in), and
  the exact GGN of the summed NLL is ``Σ_n Σ_cd H_n[c, d] vec(J_{n,c}) vec(J_{n,d})ᵀ`` with ``H_n =
  diag(p_n) − p_n p_nᵀ`` the Hessian of the choice cross-entropy;
* K-FAC-reduce (Eschenhagen et al. 2023) replaces each ``J_{n,c}`` by one Kronecker product, and there
  are two ways to do it for an item whose choices are scored on their own rows:
  - ``inputs`` shared: ``J_{n,c} ≈ ĝ_{n,c} ā_nᵀ`` with ``ā_n`` the mean input over every real position
    of the item and ``ĝ_{n,c}`` the summed output gradient; then ``A = (1/N) Σ ā āᵀ``, ``G = Σ Ĝᵀ H Ĝ``;
  - ``gradients`` shared: ``J_{n,c} ≈ ḡ_n ā_{n,c}ᵀ`` with ``ā_{n,c}`` the mean input of choice c's row
    and ``ḡ_n`` the mean over choices of ``ĝ_{n,c}``; then ``A = Σ Āᵀ H Ā``, ``G = (1/N) Σ ḡ ḡᵀ``.
  The first is exact when a layer's input does not depend on the choice (one row per item: label
  scoring), the second when its output gradient does not (an encoder's scoring head, whose gradient is
  1 for every choice; the first gives it no curvature at all). Per layer the variant whose trace
  ``tr A · tr G`` is nearer the exact GGN's trace (computed in the same pass from the exact Jacobians)
  is kept and scaled to that trace. Both keep the softmax's shift invariance (H 1 = 0).
A bias is handled as an extra input column of ones. Everything is accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["KfacFactors", "LayerTape", "choice_hessians", "row_items"]


def row_items(batch: dict[str, Any], n_items: int, n_rows: int) -> tuple[Tensor, Optional[Tensor]]:
    """(item of every model row, choice of every row or None): items scored on one row per choice are
    laid out item-major with ``n_choices`` rows each; else a row is an item (label-token scoring)."""
    device = batch["input_ids"].device
    if n_rows == n_items:
        return torch.arange(n_items, device=device), None
    counts = batch.get("n_choices")
    if counts is None or int(counts.sum()) != n_rows:
        raise RuntimeError(f"a covered layer saw {n_rows} rows for {n_items} items; neither one row per item "
                           "nor one row per choice")
    counts = counts.long().to(device)
    items = torch.repeat_interleave(torch.arange(n_items, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return items, torch.arange(n_rows, device=device) - starts[items]


def choice_hessians(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(p, H): the softmax over valid choices (B, C) and the cross-entropy's Hessian in the logits,
    ``diag(p) − p pᵀ`` (B, C, C), zero on padded choices. float64."""
    z = logits.double().masked_fill(~mask, float("-inf"))
    p = torch.softmax(z, -1).masked_fill(~mask, 0.0)
    return p, torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


@dataclass
class _Record:
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


class LayerTape:
    """Forward hooks on named ``nn.Linear`` layers that keep their inputs and outputs for one forward.

    Use as a context manager around one forward with autograd on; then :meth:`per_item` backpropagates
    each choice column and returns, per layer, the item means ``ā`` and sums ``Ĝ`` (and optionally the
    exact per-item Jacobians). A layer must be called once per forward.
    """

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.layers = layers
        self.records: dict[str, _Record] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerTape":
        self.records = {name: _Record() for name in self.layers}
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output: Tensor) -> None:
            record = self.records[name]
            if record.inputs:
                raise RuntimeError(f"{name}: a layer covered by the Laplace approximation ran twice in one forward")
            record.inputs.append(args[0].detach())
            record.outputs.append(output)

        return hook

    def per_item(self, logits: Tensor, mask: Tensor, batch: dict[str, Any], jacobians: bool = True
                 ) -> dict[str, dict[str, Tensor]]:
        """Backpropagate ``Σ_n f_{n,c}`` for every choice column c (B items, C columns).

        Returns per layer, in float64 (in' = in + 1 for a layer with a bias): ``"a"`` (B, in') the item
        mean input, ``"a_choice"`` (B, C, in') each choice's row mean input (the item mean when an item is
        one row), ``"g"`` (B, C, out) the summed output gradients, and if ``jacobians`` ``"jac"``
        (B, C, out, in') the exact per-item Jacobians.
        """
        n_items, n_cols = logits.shape
        names = [n for n in self.layers if self.records[n].outputs]
        if len(names) != len(self.layers):
            missing = sorted(set(self.layers) - set(names))
            raise RuntimeError(f"layers covered by the Laplace approximation did not run: {missing[:3]}")
        outputs = [self.records[n].outputs[0] for n in names]
        out: dict[str, dict[str, Tensor]] = {}
        inputs = {}
        for n in names:
            a = self._augmented(n, self.records[n].inputs[0])
            items, choice = row_items(batch, n_items, a.shape[0])
            w = self._position_weights(a, batch)
            dims = tuple(range(1, a.dim() - 1))
            row_sum = (a * w[..., None]).sum(dims) if dims else a * w[..., None]
            count = w.sum(dims) if dims else w
            a_bar = _per_item(row_sum, items, n_items) / _per_item(count, items, n_items).clamp(min=1.0)[:, None]
            if choice is None:
                a_choice = a_bar[:, None, :].expand(n_items, n_cols, a.shape[-1]).clone()
            else:
                a_choice = a.new_zeros(n_items, n_cols, a.shape[-1], dtype=torch.float64)
                a_choice[items, choice] = row_sum / count.clamp(min=1.0)[:, None]
            out[n] = {"a": a_bar, "a_choice": a_choice,
                      "g": a.new_zeros(n_items, n_cols, self.layers[n].out_features, dtype=torch.float64)}
            if jacobians:
                out[n]["jac"] = a.new_zeros(n_items, n_cols, self.layers[n].out_features, a.shape[-1],
                                            dtype=torch.float64)
            inputs[n] = (a, items)
        for c in range(n_cols):
            valid = mask[:, c]
            if not valid.any():
                continue
            target = logits[:, c].masked_fill(~valid, 0.0).sum()
            grads = torch.autograd.grad(target, outputs, retain_graph=c < n_cols - 1, allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                a, items = inputs[n]
                g = g.double()
                dims = tuple(range(1, g.dim() - 1))
                out[n]["g"][:, c] = _per_item(g.sum(dims) if dims else g, items, n_items)
                if jacobians:
                    flat_g, flat_a = g.reshape(g.shape[0], -1, g.shape[-1]), a.reshape(a.shape[0], -1, a.shape[-1])
                    out[n]["jac"][:, c] = _per_item(torch.einsum("rto,rti->roi", flat_g, flat_a), items, n_items)
        return out

    def _augmented(self, name: str, a: Tensor) -> Tensor:
        a = a.double()
        if self.layers[name].bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        return a

    @staticmethod
    def _position_weights(a: Tensor, batch: dict[str, Any]) -> Tensor:
        """1 on a row's real positions, 0 on padding (from the attention mask when it fits ``a``)."""
        mask = batch.get("attention_mask")
        if a.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(a.shape[:2]):
            return mask.to(torch.float64)
        return a.new_ones(a.shape[:-1], dtype=torch.float64)


def _per_item(rows: Tensor, items: Tensor, n_items: int) -> Tensor:
    """Sum the leading (row) dimension into items."""
    return rows.new_zeros(n_items, *rows.shape[1:]).index_add_(0, items, rows)


class KfacFactors:
    """Running sums of both K-FAC-reduce variants per layer and of the exact GGN's trace (see the module
    docstring); :meth:`factors` picks a variant per layer and scales it to the exact trace."""

    VARIANTS = ("inputs", "gradients")

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, Tensor]] = {}
        self.n_items = 0
        self.log_likelihood = 0.0
        self.choices: dict[str, dict[str, float | str]] = {}

    def add(self, pieces: dict[str, dict[str, Tensor]], hessians: Tensor, mask: Tensor, log_p_label: Tensor) -> None:
        """Add one batch: ``pieces`` from :meth:`LayerTape.per_item` (with Jacobians), ``hessians``
        (B, C, C), the valid choices (B, C) and the log-probability of each item's label (B,). All or
        nothing: a failure part-way leaves the sums as they were."""
        update = {}
        for name, piece in pieces.items():
            a, a_choice, g = piece["a"], piece["a_choice"], piece["g"]
            valid = mask.to(g.device)
            count = valid.sum(-1, keepdim=True).clamp(min=1).to(g.dtype)
            g_mean = (g * valid[..., None]).sum(1) / count
            jac = piece["jac"]
            update[name] = {
                "inputs_a": a.T @ a,
                "inputs_g": torch.einsum("nco,ncd,ndp->op", g, hessians, g),
                "gradients_a": torch.einsum("nci,ncd,ndj->ij", a_choice, hessians, a_choice),
                "gradients_g": g_mean.T @ g_mean,
                "trace": torch.einsum("ncoi,ncd,ndoi->", jac, hessians, jac),
            }
        for name, parts in update.items():
            if name not in self.sums:
                self.sums[name] = parts
            else:
                for key, value in parts.items():
                    self.sums[name][key] = self.sums[name][key] + value
        self.n_items += int(hessians.shape[0])
        self.log_likelihood += float(log_p_label.double().sum())

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer (A (in', in'), G (out, out)), so that ``kron(G, A)`` approximates the GGN; records
        in ``choices`` which variant each layer took and the factor that matched its trace."""
        if not self.n_items:
            raise ValueError("no items were seen: the Laplace fit needs training rows")
        out = {}
        for name, s in self.sums.items():
            exact = float(s["trace"])
            candidates = {"inputs": (s["inputs_a"] / self.n_items, s["inputs_g"]),
                          "gradients": (s["gradients_a"], s["gradients_g"] / self.n_items)}
            traces = {k: float(torch.trace(a) * torch.trace(g)) for k, (a, g) in candidates.items()}

            def distance(kind: str) -> float:
                t = traces[kind]
                return abs(math.log(t / exact)) if t > 0 and exact > 0 else math.inf

            kind = min(self.VARIANTS, key=distance)
            a, g = candidates[kind]
            scale = exact / traces[kind] if math.isfinite(distance(kind)) else 1.0
            out[name] = (a, g * scale)
            self.choices[name] = {"variant": kind, "trace_scale": scale, "exact_trace": exact}
        return out
