"""Per-item Jacobians and Kronecker-factored GGN curvature of chosen ``nn.Linear`` layers, by hooks.

Laplace-LoRA needs, for the trained LoRA factors (and an encoder's scoring head), two things from the
same backward passes: the K-FAC factors of the generalised Gauss-Newton (GGN) of the training NLL, and
the exact Jacobian of every item's choice logits for the linearised predictive. Both come from one
forward with hooks that keep each layer's input ``a`` and output, then one backward per choice column
``c`` (the gradient of ``Σ_n f_{n,c}``) taken with respect to the layer outputs, giving ``g_c``.

An item is scored from several rows (one per choice for pair and log-likelihood scoring) and several
token positions per row, all sharing the layer's weight W (out × in). Per item n:

* the exact Jacobian of logit c is ``J_{n,c} = Σ_{rows r of n} Σ_t g_c[r, t] a[r, t]ᵀ`` (out × in);
* K-FAC-reduce (Eschenhagen et al. 2023) treats every position of every row of the item as the shared
  dimension: ``ā_n`` = the mean of ``a`` over the item's real (unpadded) positions, ``ĝ_{n,c}`` = the
  sum of ``g_c``. Then ``A = (1/N) Σ_n ā_n ā_nᵀ`` and ``G = Σ_n Ĝ_nᵀ H_n Ĝ_n`` with ``H_n = diag(p_n) −
  p_n p_nᵀ`` the Hessian of the choice cross-entropy, so ``G ⊗ A`` approximates the GGN ``Σ_n J_nᵀ H_n
  J_n`` of the summed NLL over ``vec(W)`` flattened row-major (exact for one item whose input is the same
  at every position). Keeping all of an item's choices in one ``ĝ`` keeps the softmax's shift
  invariance: a direction that moves every choice's score alike gets no curvature.

A bias is handled as an extra input column of ones. Everything is accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["KfacFactors", "LayerTape", "choice_hessians", "row_items"]


def row_items(batch: dict[str, Any], n_items: int) -> Tensor:
    """For every model row of ``batch``, the index of the item it scores: items with several rows
    (one per choice) are laid out item-major with ``n_choices`` rows each; else one row per item."""
    if "n_choices" in batch:
        counts = batch["n_choices"].long()
        return torch.repeat_interleave(torch.arange(n_items, device=counts.device), counts)
    return torch.arange(n_items, device=batch["input_ids"].device)


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

    def per_item(self, logits: Tensor, mask: Tensor, batch: dict[str, Any], jacobians: bool = False
                 ) -> dict[str, dict[str, Tensor]]:
        """Backpropagate ``Σ_n f_{n,c}`` for every choice column c (B items, C columns).

        Returns per layer ``{"a": (B, in') item-mean inputs, "g": (B, C, out) summed output gradients}``
        and, if ``jacobians``, ``"jac": (B, C, out, in')`` the exact per-item Jacobians, with in' = in + 1
        for a layer with a bias. float64.
        """
        n_items, n_cols = logits.shape
        items = row_items(batch, n_items)
        names = [n for n in self.layers if self.records[n].outputs]
        if len(names) != len(self.layers):
            missing = sorted(set(self.layers) - set(names))
            raise RuntimeError(f"layers covered by the Laplace approximation did not run: {missing[:3]}")
        outputs = [self.records[n].outputs[0] for n in names]
        inputs = {n: self._augmented(n, self.records[n].inputs[0]) for n in names}
        positions = {n: self._position_weights(inputs[n], batch, items) for n in names}
        out: dict[str, dict[str, Tensor]] = {}
        for n in names:
            a, w = inputs[n], positions[n]
            dims = tuple(range(1, a.dim() - 1))
            row_sum = (a * w[..., None]).sum(dims) if dims else a * w[..., None]
            count = w.sum(dims) if dims else w
            a_bar = _per_item(row_sum, items, n_items) / _per_item(count, items, n_items).clamp(min=1.0)[:, None]
            out[n] = {"a": a_bar, "g": a.new_zeros(n_items, n_cols, self.layers[n].out_features, dtype=torch.float64)}
            if jacobians:
                out[n]["jac"] = a.new_zeros(n_items, n_cols, self.layers[n].out_features, a.shape[-1],
                                            dtype=torch.float64)
        for c in range(n_cols):
            valid = mask[:, c]
            if not valid.any():
                continue
            target = logits[:, c].masked_fill(~valid, 0.0).sum()
            grads = torch.autograd.grad(target, outputs, retain_graph=c < n_cols - 1, allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                g = g.double()
                dims = tuple(range(1, g.dim() - 1))
                out[n]["g"][:, c] = _per_item(g.sum(dims) if dims else g, items, n_items)
                if jacobians:
                    a = inputs[n]
                    flat_g, flat_a = g.reshape(g.shape[0], -1, g.shape[-1]), a.reshape(a.shape[0], -1, a.shape[-1])
                    out[n]["jac"][:, c] = _per_item(torch.einsum("rto,rti->roi", flat_g, flat_a), items, n_items)
        return out

    def _augmented(self, name: str, a: Tensor) -> Tensor:
        a = a.double()
        if self.layers[name].bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        return a

    @staticmethod
    def _position_weights(a: Tensor, batch: dict[str, Any], items: Tensor) -> Tensor:
        """1 on a row's real positions, 0 on padding (from the attention mask when it fits ``a``)."""
        if a.shape[0] != items.shape[0]:
            raise RuntimeError(f"a covered layer saw {a.shape[0]} rows for {items.shape[0]} scored rows; "
                               "batched Monte Carlo must be off while fitting Laplace")
        mask = batch.get("attention_mask")
        if a.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(a.shape[:2]):
            return mask.to(torch.float64)
        return a.new_ones(a.shape[:-1], dtype=torch.float64)


def _per_item(rows: Tensor, items: Tensor, n_items: int) -> Tensor:
    """Sum the leading (row) dimension into items."""
    return rows.new_zeros(n_items, *rows.shape[1:]).index_add_(0, items, rows)


class KfacFactors:
    """Running sums of K-FAC-reduce factors: ``A = (1/N) Σ ā āᵀ`` and ``G = Σ Ĝᵀ H Ĝ`` per layer."""

    def __init__(self) -> None:
        self.a_sum: dict[str, Tensor] = {}
        self.g_sum: dict[str, Tensor] = {}
        self.n_items = 0
        self.log_likelihood = 0.0

    def add(self, pieces: dict[str, dict[str, Tensor]], hessians: Tensor, log_p_label: Tensor) -> None:
        """Add one batch: ``pieces`` from :meth:`LayerTape.per_item`, ``hessians`` (B, C, C) and the
        log-probability of each item's label (B,)."""
        for name, piece in pieces.items():
            a, g = piece["a"], piece["g"]
            aa = a.T @ a
            gg = torch.einsum("nco,ncd,ndp->op", g, hessians, g)
            self.a_sum[name] = self.a_sum[name] + aa if name in self.a_sum else aa
            self.g_sum[name] = self.g_sum[name] + gg if name in self.g_sum else gg
        self.n_items += int(hessians.shape[0])
        self.log_likelihood += float(log_p_label.double().sum())

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer (A (in', in'), G (out, out)), so that ``kron(G, A)`` approximates the GGN."""
        if not self.n_items:
            raise ValueError("no items were seen: the Laplace fit needs training rows")
        return {name: (self.a_sum[name] / self.n_items, self.g_sum[name]) for name in self.a_sum}
