"""How the trainer's state is spread over ranks: replicated (one process or DDP), FSDP2 or DeepSpeed ZeRO.

The trainer asks one object (:func:`engine_for`) to prepare, backpropagate, step and checkpoint, so the
loop has no engine branches. What each engine does:

- **Replicated** (``ddp.yaml`` or one process): Accelerate's own DDP; nothing extra.
- **FSDP2** (``fsdp.yaml``): the frozen base is sharded across ranks (each holds 1/N of it between
  blocks); every trainable tensor (plain LoRA factors, the Bayesian inducing parameters and flows, an
  encoder's head) stays whole on every rank, through FSDP2's ``ignored_params``. Two reasons: the
  posterior sampler draws every Bayesian factor once at the model's root, before any block's forward
  would un-shard it; and adapters are < 1% of a base, so replicating them costs little while keeping
  checkpoints, optimizer states and PEFT saves exactly what a single process writes. FSDP does not
  reduce ignored parameters' gradients, so :meth:`FullyShardedBase.reduce_gradients` averages them (one
  flat all-reduce) before clipping, as DDP would: the KL term, added identically on every rank, then
  counts once per step. Every rank runs validation (a sharded forward is a collective); rank 0 writes.
- **ZeRO-2** (``zero2.yaml``, :mod:`.zero`): the adapter's gradients and AdamW state (with its float32
  master copy) are partitioned across ranks; the base and the adapter weights stay whole. DeepSpeed's
  engine reduces, clips and steps; checkpoints gather the partitioned state into the single-process
  format, so a ZeRO-2 run resumes with any number of processes (or none).
- **ZeRO-3** (``zero3.yaml``, :mod:`.zero`): ZeRO-2's partitioning plus the frozen base's, gathered module
  by module; the adapter's weights stay whole, as under FSDP2.

Accelerate maps FSDP and DeepSpeed configs to plain CPU data parallel when there is no GPU, although
torch's ``fully_shard`` and DeepSpeed's ZeRO optimizer both run on CPU over gloo: on CPUs
:func:`engine_for` switches Accelerate's shared state to the engine the launch config asked for, so the
test suite runs the same code path as a GPU cluster.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["FullyShardedBase", "Replicated", "engine_for", "fsdp_requested", "trainable_owners"]


def fsdp_requested() -> bool:
    """True under ``accelerate launch`` with an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def trainable_owners(module: nn.Module) -> list[nn.Module]:
    """The modules that directly own a trainable parameter (what FSDP is told to leave unsharded)."""
    return [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def held_parameters(module: nn.Module) -> int:
    """Parameter elements this process stores (a sharded tensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    def held(p: nn.Parameter) -> int:
        if isinstance(p, DTensor):
            return p.to_local().numel()
        if hasattr(p, "ds_tensor") and p.numel() == 0:  # a ZeRO-3 partition, its whole tensor released
            return p.ds_tensor.numel()
        return p.numel()

    return sum(held(p) for p in module.parameters())


class Replicated:
    """One process or DDP: every rank holds everything; Accelerate does the rest."""

    validates_on_every_rank = False  # rank 0 alone runs validation

    def __init__(self, acc) -> None:
        self.acc = acc

    @property
    def base_shards(self) -> int:
        """Processes the frozen base is split over (the memory estimate divides by it)."""
        return 1

    @property
    def optimizer_shards(self) -> int:
        """Processes the optimizer state (and gradients) are split over."""
        return 1

    def before_prepare(self, module: nn.Module, optimizer, cfg) -> None:
        """Engine settings that must be in place before ``acc.prepare``."""

    def after_prepare(self, module: nn.Module) -> None:
        """Engine set-up that needs the prepared (wrapped, partitioned) model."""

    def no_sync(self, wrapped: nn.Module, last: bool):
        """Skip the gradient all-reduce on micro-batches before the last (DDP's ``no_sync``)."""
        return nullcontext() if last else self.acc.no_sync(wrapped)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.acc.backward(loss)

    def step(self, module: nn.Module, wrapped: nn.Module, optimizer, max_grad_norm: float) -> None:
        """Clip and apply the accumulated gradients, then clear them."""
        if max_grad_norm > 0:
            self.acc.clip_grad_norm_(wrapped.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def checkpointable(self, module: nn.Module, optimizer):
        """What the checkpoint saves and loads the optimizer state through (``state_dict`` and
        ``load_state_dict`` in torch's single-process format). Every rank calls it: it may gather."""
        return optimizer

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable weights a checkpoint stores, by parameter name. Every rank calls it: it may gather."""
        from .checkpoint import trainable_state

        return trainable_state(module)

    def after_load(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """After a resume restored ``weights`` into the module (and the optimizer state)."""


class FullyShardedBase(Replicated):
    """FSDP2 with the base sharded and the trainable tensors whole (module doc)."""

    validates_on_every_rank = True  # a sharded forward is a collective

    @property
    def base_shards(self) -> int:
        return self.acc.num_processes

    @classmethod
    def switch_accelerate(cls, acc) -> None:
        """On CPUs, turn Accelerate's MULTI_CPU fallback into FSDP with the launch config's plugin."""
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # reads the launch config's FSDP_* variables
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        state = AcceleratorState()
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def check(self) -> None:
        plugin = self.acc.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP: set fsdp_version: 2 in the launch config (the shipped fsdp.yaml does); "
                             "FSDP1 cannot leave the Bayesian factors unsharded")
        if plugin.cpu_ram_efficient_loading:
            raise ValueError("FSDP: set fsdp_cpu_ram_efficient_loading: false (every rank loads the base and "
                             "builds the adapter, so the seeded adapter initialisation agrees without a broadcast)")

    def before_prepare(self, module: nn.Module, optimizer, cfg) -> None:
        """FSDP leaves every trainable tensor whole (module doc)."""
        self.acc.state.fsdp_plugin.ignored_modules = trainable_owners(module)

    def step(self, module: nn.Module, wrapped: nn.Module, optimizer, max_grad_norm: float) -> None:
        self.reduce_gradients(module)
        super().step(module, wrapped, optimizer, max_grad_norm)

    def reduce_gradients(self, module: nn.Module) -> None:
        """Average the unsharded (trainable) parameters' gradients over ranks: one flat all-reduce.

        Every trainable parameter takes part in a fixed order (a missing gradient as zeros), so the
        buffer has the same size on every rank whatever each one's backward reached; a parameter no rank
        reached keeps ``grad = None`` (AdamW then skips it, as one process would)."""
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


def engine_for(acc):
    """The engine object for this Accelerator (module doc); on CPUs it first switches Accelerate's state
    to the FSDP or DeepSpeed engine the launch config asked for."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.MULTI_CPU:
        if fsdp_requested():
            FullyShardedBase.switch_accelerate(acc)
        elif deepspeed_requested():
            from .zero import ZeroRedundancy

            ZeroRedundancy.switch_accelerate(acc)
    if acc.distributed_type == DistributedType.FSDP:
        engine = FullyShardedBase(acc)
        engine.check()
        return engine
    if acc.distributed_type == DistributedType.DEEPSPEED:
        from .zero import ZeroRedundancy

        engine = ZeroRedundancy(acc)
        engine.check()
        return engine
    return Replicated(acc)
