"""Fully sharded data parallel (FSDP2, ``accelerate launch --config_file fsdp.yaml``) for adapter training.

The frozen base is sharded across ranks (each holds 1/N of it between blocks); every trainable tensor
(plain LoRA factors, the Bayesian inducing parameters and flows, an encoder's head) stays whole on every
rank, through FSDP2's ``ignored_params``. Two reasons: the posterior sampler draws every Bayesian factor
once at the model's root, before any block's forward would un-shard it; and adapters are < 1% of a base,
so replicating them costs little while keeping checkpoints, optimizer states and PEFT saves exactly what
a single process writes (plain tensors, resumable with any number of processes). FSDP does not reduce
ignored parameters' gradients, so :meth:`Sharding.reduce_gradients` averages them (one flat all-reduce)
before clipping, as DDP would: the KL term, added identically on every rank, then counts once per step.

Accelerate maps an FSDP config to plain CPU data parallel when there is no GPU; torch's ``fully_shard``
itself runs on CPU over gloo, so on CPUs :func:`setup` switches Accelerate's shared state to FSDP with the
plugin it read from the launch config. That is what lets the test suite run the same code path as a GPU
cluster. Every rank runs validation (a sharded forward is a collective); rank 0 writes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["Sharding", "fsdp_requested"]


def fsdp_requested() -> bool:
    """True under ``accelerate launch`` with an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def trainable_owners(module: nn.Module) -> list[nn.Module]:
    """The modules that directly own a trainable parameter (what FSDP is told to leave unsharded)."""
    return [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


class Sharding:
    """What the trainer does differently under FSDP; a no-op object under DDP or one process."""

    def __init__(self, acc) -> None:
        from accelerate.utils import DistributedType

        self.acc = acc
        self.sharded = acc.distributed_type == DistributedType.FSDP

    @classmethod
    def setup(cls, acc) -> "Sharding":
        """Turn Accelerate's CPU fallback into FSDP when an FSDP config was launched (see module doc)."""
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        if fsdp_requested() and acc.distributed_type == DistributedType.MULTI_CPU:
            plugin = FullyShardedDataParallelPlugin()  # reads the launch config's FSDP_* variables
            if acc.mixed_precision != "no":
                plugin.set_mixed_precision(acc.mixed_precision)
            state = AcceleratorState()
            state.fsdp_plugin = plugin
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        sharding = cls(acc)
        if sharding.sharded and acc.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError("FSDP: set fsdp_version: 2 in the launch config (the shipped fsdp.yaml does); "
                             "FSDP1 cannot leave the Bayesian factors unsharded")
        if sharding.sharded and acc.state.fsdp_plugin.cpu_ram_efficient_loading:
            raise ValueError("FSDP: set fsdp_cpu_ram_efficient_loading: false (every rank loads the base and "
                             "builds the adapter, so the seeded adapter initialisation agrees without a broadcast)")
        return sharding

    def exclude_trainable(self, module: nn.Module) -> None:
        """Before ``prepare``: FSDP leaves every trainable tensor whole (module doc)."""
        if self.sharded:
            self.acc.state.fsdp_plugin.ignored_modules = trainable_owners(module)

    @staticmethod
    def held_parameters(module: nn.Module) -> int:
        """Parameter elements this process stores (a sharded tensor counts its local shard only)."""
        from torch.distributed.tensor import DTensor

        return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())

    def reduce_gradients(self, module: nn.Module) -> None:
        """Average the unsharded (trainable) parameters' gradients over ranks: one flat all-reduce.

        Every trainable parameter takes part in a fixed order (a missing gradient as zeros), so the
        buffer has the same size on every rank whatever each one's backward reached; a parameter no rank
        reached keeps ``grad = None`` (AdamW then skips it, as one process would)."""
        if not self.sharded:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return
        device = params[0].device
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        flat = torch.cat([reached] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                      for p in params])
        torch.distributed.all_reduce(flat)
        reached, values = flat[:len(params)], flat[len(params):] / self.acc.num_processes
        offset = 0
        for p, any_rank in zip(params, reached.tolist()):
            part = values[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if any_rank:
                p.grad = part.to(p.dtype).clone() if p.grad is None else p.grad.copy_(part)
