"""DeepSpeed ZeRO (stages 1, 2 and 3) for adapter training: ``accelerate launch --config_file zero2.yaml``
(or ``zero3.yaml``).

ZeRO-2 partitions the trainable parameters' gradients and their AdamW state (moments and DeepSpeed's
float32 master copy) across ranks; the frozen base and the adapter weights stay whole on every rank, so
the posterior sampler reads every factor as one process would. DeepSpeed's engine averages the gradients
over ranks (the KL term, added identically on every rank, counts once per step), clips them by the global
norm (``--max-grad-norm`` becomes its ``gradient_clipping``) and steps; the trainer keeps its own
micro-batch accumulation (row-weighted losses, DeepSpeed's gradient-accumulation boundary on the last one)
and its own learning-rate schedule (on the AdamW object DeepSpeed wraps).

ZeRO-3 also partitions the frozen base: each rank stores 1/N of it (transformers already loads it
partitioned, under DeepSpeed's ``zero.Init``) and DeepSpeed's module hooks gather each module's weights
around its forward and backward. The adapter's weights stay whole on every rank, as under FSDP2: the
sampler draws every factor once at the model's root, outside any module whose hook would gather it, and
runs the flows inside ``torch.func.vmap``, which ZeRO-3's output wrappers cannot enter. So the trainable
parameters join DeepSpeed's "persistent" parameters (whole on every rank, gathered again after each step)
and the modules holding only trainable parameters lose ZeRO-3's module hooks
(:meth:`ZeroRedundancy.after_prepare`); their gradients still go through DeepSpeed's per-parameter
reduction into partitions. Every rank validates (a partitioned forward is a collective).

Checkpoints stay the single-process format: :class:`GatheredZeroState` (stages 1, 2) assembles each
parameter's moments from the ranks' partitions (one all-reduce) and scatters them back on load, through
the parameter-to-partition map DeepSpeed itself keeps for universal checkpoints (``param._hp_mapping``);
:class:`GatheredZero3State` does the same through ZeRO-3's per-parameter accessors. A ZeRO run therefore
resumes with any number of processes, or under another engine, and nothing is pickled (DeepSpeed's own
``save_checkpoint`` is ``torch.save``).

Checkpoints store DeepSpeed's float32 master weights (under bf16 the module holds rounded copies) and
a resume restores them (:meth:`ZeroRedundancy.after_load`).

Refused by name (:meth:`ZeroRedundancy.check`): ``round_robin_gradients``, under which DeepSpeed's
parameter-to-partition map does not match its layout; offload and ZeRO-3's hierarchical partitioning
(MiCS, hpZ) (untested); fp16, whose loss scale is not checkpointed. A step DeepSpeed skips (a non-finite
gradient norm) stops the run.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .sharding import Replicated

__all__ = ["GatheredZeroState", "ZeroRedundancy"]

SUPPORTED_STAGES = (1, 2, 3)
ZERO3_TESTED = "0.19"  # the DeepSpeed release whose ZeRO-3 internals after_prepare relies on (tested: 0.19.8)


def _on(value) -> bool:
    """A DeepSpeed config flag as DeepSpeed reads it (True or the string "true")."""
    return str(value).lower() == "true"


class ZeroRedundancy(Replicated):
    """The trainer's engine under a DeepSpeed launch config (module doc)."""

    @property
    def optimizer_shards(self) -> int:
        return self.acc.num_processes

    @property
    def stage(self) -> int | None:
        stage = self.plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
        return stage if stage is not None else getattr(self.plugin, "zero_stage", None)

    @property
    def base_shards(self) -> int:
        return self.acc.num_processes if self.stage == 3 else 1

    @property
    def validates_on_every_rank(self) -> bool:
        return self.stage == 3  # a forward over a partitioned base is a collective

    @property
    def plugin(self):
        return self.acc.state.deepspeed_plugin

    @classmethod
    def switch_accelerate(cls, acc) -> None:
        """On CPUs, turn Accelerate's MULTI_CPU fallback into DeepSpeed with the launch config's plugin;
        DeepSpeed's communication layer wraps the gloo process group Accelerate already started."""
        import deepspeed
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DeepSpeedPlugin, DistributedType

        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        plugin = DeepSpeedPlugin()  # reads the launch config's ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(acc.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state = AcceleratorState()
        state.deepspeed_plugins = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        acc.deepspeed_engine_wrapped = None

    def check(self) -> None:
        config = self.plugin.deepspeed_config
        zero = config.get("zero_optimization", {})
        stage = zero.get("stage")
        if stage not in SUPPORTED_STAGES:
            raise ValueError(f"DeepSpeed zero_optimization.stage {stage!r}: the trainer supports stages "
                             f"{', '.join(map(str, SUPPORTED_STAGES))} (zero2.yaml, zero3.yaml)")
        if stage == 3:
            import deepspeed
            from packaging.version import Version

            if Version(deepspeed.__version__) < Version(ZERO3_TESTED):
                raise ValueError(f"DeepSpeed ZeRO-3 needs deepspeed>={ZERO3_TESTED} here (the trainer keeps the "
                                 f"adapter whole through its internals as of that release); found "
                                 f"{deepspeed.__version__}: upgrade, or launch with zero2.yaml or fsdp.yaml")
        for key in ("mics_shard_size", "zero_hpz_partition_size"):
            if stage == 3 and int(zero.get(key) or -1) > 1:
                raise ValueError(f"DeepSpeed config: zero_optimization.{key} {zero[key]!r} (hierarchical "
                                 "partitioning) is not supported by the trainer yet (untested); remove it")
        if zero.get("round_robin_gradients"):
            # DeepSpeed then lays the partitions out in round-robin order but maps parameters to them in
            # the original order (unless parameters are padded): checkpoints would gather the wrong slices
            raise ValueError("DeepSpeed config: zero_optimization.round_robin_gradients is not supported "
                             "(checkpoints read each parameter's partition through DeepSpeed's map, which is "
                             "wrong in that layout); remove it")
        for key in ("offload_optimizer", "offload_param"):
            device = (zero.get(key) or {}).get("device", "none")
            if device not in (None, "none"):
                raise ValueError(f"DeepSpeed config: zero_optimization.{key}.device {device!r}: offload is not "
                                 "supported by the trainer yet (untested); set it to none")
        if _on(zero.get("cpu_offload")):
            raise ValueError("DeepSpeed config: zero_optimization.cpu_offload (offload) is not supported by the "
                             "trainer yet (untested); remove it")
        if _on((config.get("fp16") or {}).get("enabled")):
            raise ValueError("DeepSpeed fp16 is not supported: its dynamic loss scale is not checkpointed; use "
                             "--mixed-precision bf16 or no")
        if _on((config.get("bf16") or {}).get("bf16_master_weights_and_grads")):
            raise ValueError("DeepSpeed config: bf16.bf16_master_weights_and_grads keeps bf16 masters; the "
                             "trainer checkpoints float32 masters: remove it")
        if "grad_accum_dtype" in (config.get("data_types") or {}):
            raise ValueError("DeepSpeed config: data_types.grad_accum_dtype selects DeepSpeed's BF16_Optimizer, "
                             "whose partitions the trainer's checkpoints cannot read; remove it")

    def before_prepare(self, module: nn.Module, optimizer, cfg) -> None:
        """The DeepSpeed config from the run's options, which are the one home of these settings."""
        config = self.plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", cfg.batch_size),
                           ("train_batch_size", cfg.batch_size * self.acc.num_processes)):
            if config.get(key, "auto") not in ("auto", value):
                raise ValueError(f"DeepSpeed config: {key} {config[key]!r} differs from the run's {value} "
                                 "(--batch-size per process); leave it out of the config")
        accumulation = config.get("gradient_accumulation_steps", "auto")
        if accumulation not in ("auto", 1):
            raise ValueError(f"DeepSpeed config: gradient_accumulation_steps {accumulation!r}; set it to 1 (or "
                             "auto) and pass --grad-accum: the trainer accumulates micro-batches itself")
        clipping = config.get("gradient_clipping", "auto")
        if clipping not in ("auto", None, cfg.max_grad_norm):
            raise ValueError(f"DeepSpeed config: gradient_clipping {clipping!r} differs from --max-grad-norm "
                             f"{cfg.max_grad_norm}; leave it out of the config and pass --max-grad-norm")
        config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=1,
                      train_batch_size=cfg.batch_size * self.acc.num_processes,
                      gradient_clipping=float(cfg.max_grad_norm))
        self.groups = [list(group["params"]) for group in optimizer.param_groups]
        if self.stage == 3:
            scalars = [n for n, p in module.named_parameters() if p.dim() == 0]
            if scalars:
                raise ValueError(f"DeepSpeed ZeRO-3 partitions every parameter as a flat byte view, which the "
                                 f"0-d parameters {scalars[:3]} cannot be: reshape them to (1,) or use zero2.yaml")
        else:
            self._broadcast_scalars(module)

    def after_prepare(self, module: nn.Module) -> None:
        """Under ZeRO-3, keep every trainable tensor whole on every rank (module doc): DeepSpeed's
        "persistent" parameters are the ones it never releases after a module's forward and gathers again
        after each optimizer step; the trainable ones join them here and are gathered once now."""
        if self.stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import z3_leaf_module

        for name, m in module.named_modules():
            if z3_leaf_module(m) and any(p.requires_grad for p in m.parameters()):
                # DeepSpeed gathers and releases a leaf's whole subtree, persistent parameters included
                raise ValueError(f"DeepSpeed ZeRO-3: {name or 'the model'} is a ZeRO-3 leaf module (as MoE blocks "
                                 "are made) holding adapter parameters, which the trainer must keep whole: "
                                 "adapt modules outside it, or launch with zero2.yaml or fsdp.yaml")
        persistent = self.engine.optimizer.persistent_parameters  # the list the step re-gathers
        whole = [p for p in module.parameters() if p.requires_grad] + _saved_beside_adapters(module)
        for p in whole:
            if not p.ds_persist:
                p.ds_persist = True
                persistent.append(p)
        partitioned = [p for p in whole if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if partitioned:
            partitioned[0].all_gather(partitioned)
        self._unhook_whole_subtrees(module, {id(p) for p in whole})

    def _unhook_whole_subtrees(self, module: nn.Module, whole: set[int]) -> None:
        """Take ZeRO-3's module hooks off every module whose parameters are all kept whole (the Bayesian
        factors and their flows, plain LoRA factors, an encoder's head, a head PEFT saves beside the
        adapter), and off everything inside them.

        ZeRO-3 hooks every module to gather its parameters around its forward and to release them after
        it (persistent ones too, whenever the order of module calls changes, as it does between training
        and validation), and wraps the outputs for its backward. These parameters must stay whole
        (:meth:`after_prepare`), and the sampler runs the flows inside ``torch.func.vmap``, which those
        wrappers cannot enter. Gradients still reach DeepSpeed's per-parameter reduction hooks, which do
        not depend on module hooks; the rest of the frozen base keeps its hooks."""
        roots = [m for m in module.modules()
                 if any(True for _ in m.parameters()) and all(id(p) in whole for p in m.parameters())]
        dicts = {id(d) for root in roots for m in root.modules() for d in (m._forward_pre_hooks, m._forward_hooks)}
        offload = self.engine.optimizer.parameter_offload
        for hooks in (offload.forward_hooks, offload.backward_hooks):
            kept = []
            for handle in hooks:
                target = handle.hooks_dict_ref()
                if target is not None and id(target) in dicts:
                    handle.remove()
                else:
                    kept.append(handle)
            hooks[:] = kept

    @staticmethod
    def _broadcast_scalars(module: nn.Module) -> None:
        """DeepSpeed's ZeRO-1/2 engine broadcasts rank 0's parameters as bytes (``p.view(torch.uint8)``),
        which a 0-d tensor cannot do (each factor's λ was one; a base model may hold others): broadcast those
        here and mark them so the engine skips them (``ds_optim_param`` is the mark it gives parameters it
        must not broadcast). The engine still broadcasts every other parameter."""
        scalars = [p for p in module.parameters() if p.dim() == 0]
        for p in scalars:
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(p.data, src=0)
            p.ds_optim_param = True

    @property
    def engine(self):
        return self.acc.deepspeed_engine_wrapped.engine

    def no_sync(self, wrapped: nn.Module, last: bool):
        return nullcontext()  # the accumulation boundary (below) tells DeepSpeed when to reduce

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=last)
        self.engine.backward(loss)

    def step(self, module: nn.Module, wrapped: nn.Module, optimizer, max_grad_norm: float) -> None:
        self.engine.step()  # reduce (at the boundary), clip, AdamW step, zero the gradients
        if not self.engine.was_step_applied():
            # DeepSpeed skips a step whose gradient norm is not finite; one process would write NaNs. Either
            # way the run is lost, and a silently skipped step would still advance the schedule
            raise FloatingPointError("DeepSpeed skipped an optimizer step: the gradient norm is not finite "
                                     "(NaN or inf gradients); lower --lr or check the data")

    def checkpointable(self, module: nn.Module, optimizer) -> "GatheredZeroState | GatheredZero3State":
        """The partitioned AdamW state in the single-process format, for this stage."""
        state = GatheredZero3State if self.stage == 3 else GatheredZeroState
        return state(self.engine.optimizer, self.groups)

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The float32 master weights (under bf16 the module's own are rounded copies): collective."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        masters = self.checkpointable(module, None).masters([p for _, p in named])
        return {n: m.cpu().contiguous() for (n, _), m in zip(named, masters)}

    def after_load(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """The float32 masters from the checkpoint's float32 weights (not from the rounded module copy)."""
        state = self.checkpointable(module, None)
        for name, p in module.named_parameters():
            if p.requires_grad:
                state.set_master(p, weights[name].to(p.device, torch.float32))
        # (under ZeRO-3 the module's whole copies were restored by the checkpoint load; the step writes its
        # partitions from these masters before it gathers them again)


def _saved_beside_adapters(module: nn.Module) -> list[nn.Parameter]:
    """Frozen parameters that PEFT writes into the adapter files (with lm_head or an embedding among the
    targets, its ``save_embedding_layers`` saves the base weight too): kept whole under ZeRO-3 so that
    rank 0 saves them without a collective."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    found: dict[int, nn.Parameter] = {}
    for model in (m for m in module.modules() if isinstance(m, PeftModel)):
        state = model.state_dict(keep_vars=True)
        for adapter in model.peft_config:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT's note that it saves the embedding layers
                saved = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter)
            found.update({id(v): v for v in saved.values() if isinstance(v, nn.Parameter) and not v.requires_grad})
    return list(found.values())


def _check_saved_groups(saved: dict[str, Any], groups: list[list[nn.Parameter]]) -> None:
    """A saved optimizer state has the run's parameter groups, each with its number of parameters."""
    if len(saved["param_groups"]) != len(groups):
        raise ValueError(f"optimizer state: {len(saved['param_groups'])} parameter groups saved, "
                         f"the run has {len(groups)}")
    for params, group in zip(groups, saved["param_groups"]):
        if len(group["params"]) != len(params):
            raise ValueError(f"optimizer state: a group of {len(group['params'])} parameters saved where the "
                             f"run has {len(params)}")


def per_element(key: str, value: Any) -> bool:
    """Whether a saved AdamW state entry has one value per parameter element (the moments) rather than one
    per parameter (its ``step``). Decided by name, not by shape: a 1-element parameter's moments, and those
    of checkpoints that stored each factor's λ 0-d, are shaped like a step count."""
    return torch.is_tensor(value) and key != "step"


class GatheredZeroState:
    """A ZeRO-partitioned AdamW state read and written in torch's single-process ``state_dict`` format.

    ``groups`` are the trainer's parameter groups as built (before DeepSpeed flattened them); group i is
    DeepSpeed's flat partition i. Each rank holds, per group, one flat float32 partition and its AdamW
    state; ``param._hp_mapping`` says which slice of a parameter lies in this rank's partition and where.
    :meth:`state_dict` and :meth:`masters` are collective (every rank calls them, in the same order);
    :meth:`load_state_dict` is local."""

    def __init__(self, zero_optimizer, groups: list[list[nn.Parameter]]) -> None:
        self.zero, self.groups = zero_optimizer, groups
        self.base = zero_optimizer.optimizer  # the torch AdamW the trainer built
        partitions = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
        if partitions is None:
            raise TypeError(f"DeepSpeed chose {type(zero_optimizer).__name__}, not its ZeRO-1/2 optimizer: the "
                            "trainer's checkpoints cannot read its partitions")
        if len(partitions) != len(groups):
            raise ValueError(f"DeepSpeed holds {len(partitions)} parameter groups, the trainer built {len(groups)}")
        self.partitions = partitions

    @staticmethod
    def _slices(p: nn.Parameter):
        """(slice of the flattened parameter, slice of this rank's partition), or None if none is here."""
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        return slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel)

    def _gather(self, pieces: list[tuple[nn.Parameter, torch.Tensor]]) -> list[torch.Tensor]:
        """Whole float32 tensors from per-partition flat tensors: ``pieces`` pairs a parameter with the
        flat tensor (its group's partition, or a state of that size) its slice is read from. One
        all-reduce: every element lies in exactly one rank's partition."""
        device = self.partitions[0].device if self.partitions else torch.device("cpu")
        flat_all = torch.zeros(sum(p.numel() for p, _ in pieces), dtype=torch.float32, device=device)
        offset = 0
        for p, source in pieces:
            where = self._slices(p)
            if where is not None:
                flat_all[offset:offset + p.numel()][where[0]] = source[where[1]]
            offset += p.numel()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat_all)
        out, offset = [], 0
        for p, _ in pieces:
            out.append(flat_all[offset:offset + p.numel()].view(p.shape).clone())
            offset += p.numel()
        return out

    @staticmethod
    def set_master(p: nn.Parameter, value: torch.Tensor) -> None:
        """Write ``p``'s float32 master weights from the whole ``value`` (local)."""
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value)

    def masters(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """Each parameter's float32 master weights, whole."""
        group_of = {id(p): gi for gi, group in enumerate(self.groups) for p in group}
        return self._gather([(p, self.partitions[group_of[id(p)]]) for p in params])

    def state_dict(self) -> dict[str, Any]:
        states = [self.base.state.get(flat, {}) for flat in self.partitions]
        keys = [sorted(k for k, v in s.items() if torch.is_tensor(v) and v.shape == flat.shape)
                for s, flat in zip(states, self.partitions)]
        gathered = iter(self._gather([(p, s[k]) for params, ks, s in zip(self.groups, keys, states)
                                      for k in ks for p in params]))
        state: dict[int, dict[str, Any]] = {}
        param_groups, index = [], 0
        for gi, (params, ks, s) in enumerate(zip(self.groups, keys, states)):
            ids = list(range(index, index + len(params)))
            per_param: list[dict[str, Any]] = [{} for _ in params]
            for k in ks:
                for j in range(len(params)):
                    per_param[j][k] = next(gathered)  # float32, as AdamW keeps it for float32 weights
            scalars = {k: v for k, v in s.items() if k not in ks}  # AdamW's step count
            for j in range(len(params)):
                if per_param[j]:
                    state[ids[j]] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()},
                                     **per_param[j]}
            group = {k: v for k, v in self.base.param_groups[gi].items() if k != "params"}
            param_groups.append({**group, "params": ids})
            index += len(params)
        return {"state": state, "param_groups": param_groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Each partition's AdamW state from the full per-parameter state, and the groups'
        hyperparameters (the float32 masters are :meth:`ZeroRedundancy.after_load`'s)."""
        _check_saved_groups(saved, self.groups)
        for gi, (params, group, flat) in enumerate(zip(self.groups, saved["param_groups"], self.partitions)):
            entries = [saved["state"].get(i) for i in group["params"]]
            self.base.param_groups[gi].update({k: v for k, v in group.items() if k != "params"})
            if not any(entries):
                self.base.state.pop(flat, None)  # saved before the first step: AdamW starts it lazily
                continue
            first = next(e for e in entries if e)
            new: dict[str, Any] = {}
            for k, v in first.items():
                if per_element(k, v):
                    buffer = torch.zeros_like(flat)
                    for p, e in zip(params, entries):
                        where = self._slices(p)
                        if where is not None and e:
                            buffer[where[1]] = e[k].reshape(-1)[where[0]].to(buffer.dtype)
                    new[k] = buffer
                else:
                    new[k] = v.to(flat.device) if torch.is_tensor(v) else v
            self.base.state[flat] = new
        if hasattr(self.zero, "_hp_optimizer_states_linked"):
            # DeepSpeed relinks its per-parameter views onto these new tensors after its next step
            self.zero._hp_optimizer_states_linked = False


def set_zero3_slice(zero_optimizer, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write this rank's slice of the whole ``value`` into ZeRO-3's float32 master of ``p`` (``key`` None)
    or into its AdamW state ``key``. DeepSpeed's own ``set_full_hp_param`` reads past the end of a tensor
    whose size the ranks do not divide (measured: "start (41) + length (41) exceeds dimension size (81)");
    here the last rank's padding is written as zeros."""
    if value.numel() != p.ds_numel:
        raise ValueError(f"a parameter of {p.ds_numel} elements cannot take a saved tensor of {value.numel()}")
    read = zero_optimizer._get_fp32_opt_state_partition
    swap = {"release_swap_buffers": False} if "release_swap_buffers" in inspect.signature(read).parameters else {}
    part, _ = read(p, optim_state_key=key, **swap)  # (DeepSpeed 0.16 has no release_swap_buffers)
    start = part.numel() * zero_optimizer._get_param_partition_rank(p)
    piece = value.reshape(-1)[start:start + part.numel()].to(part.device, part.dtype)
    with torch.no_grad():  # the master partition is the leaf DeepSpeed's AdamW steps
        part.zero_()
        part[:piece.numel()].copy_(piece)


class GatheredZero3State:
    """A ZeRO-3-partitioned AdamW state read and written in torch's single-process ``state_dict`` format.

    ZeRO-3 keeps, per sub-group of each parameter group, one flat float32 partition and its AdamW state;
    DeepSpeed's own per-parameter accessors (``get_full_hp_param`` / ``set_full_hp_param`` of its ZeRO-3
    optimizer) read a parameter's whole master or moment (one all-gather each) and write this rank's slice
    of it. :meth:`state_dict` and :meth:`masters` are collective; :meth:`load_state_dict` is local."""

    def __init__(self, zero_optimizer, groups: list[list[nn.Parameter]]) -> None:
        if not hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
            raise TypeError(f"DeepSpeed chose {type(zero_optimizer).__name__}, not its ZeRO-3 optimizer: the "
                            "trainer's checkpoints cannot read its partitions")
        self.zero, self.groups = zero_optimizer, groups
        self.base = zero_optimizer.optimizer  # the torch AdamW the trainer built, over DeepSpeed's flat partitions
        if len(self.base.param_groups) != len(groups):
            raise ValueError(f"DeepSpeed holds {len(self.base.param_groups)} parameter groups, the trainer built "
                             f"{len(groups)}")

    def set_master(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Write ``p``'s float32 master weights from the whole ``value`` (local)."""
        set_zero3_slice(self.zero, p, value)

    def masters(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """Each parameter's float32 master weights, whole."""
        return [self.zero.get_full_hp_param(p).float().reshape(p.ds_shape).clone() for p in params]

    def _flats(self, gi: int) -> list[torch.Tensor]:
        """Group ``gi``'s flat float32 partitions (DeepSpeed lends them to the group only during its step)."""
        owner = self.zero.sub_group_to_group_id
        return [flat for s, flat in enumerate(self.zero.fp32_partitioned_groups_flat) if owner[s] == gi]

    def _state_keys(self, gi: int) -> tuple[list[str], dict[str, Any]]:
        """Group ``gi``'s per-element state keys (the moments) and its scalars (AdamW's step count)."""
        flats = self._flats(gi)
        state = self.base.state.get(flats[0], {}) if flats else {}
        keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flats[0].shape)
        return keys, {k: v for k, v in state.items() if k not in keys}

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, dict[str, Any]] = {}
        param_groups, index = [], 0
        for gi, params in enumerate(self.groups):
            keys, scalars = self._state_keys(gi)
            ids = list(range(index, index + len(params)))
            if keys:
                for i, p in zip(ids, params):
                    state[i] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()},
                                **{k: self.zero.get_full_hp_param(p, k).float().reshape(p.ds_shape).clone()
                                   for k in keys}}
            group = {k: v for k, v in self.base.param_groups[gi].items() if k != "params"}
            param_groups.append({**group, "params": ids})
            index += len(params)
        return {"state": state, "param_groups": param_groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Each partition's AdamW state from the full per-parameter state, and the groups'
        hyperparameters (the float32 masters are :meth:`ZeroRedundancy.after_load`'s)."""
        _check_saved_groups(saved, self.groups)
        for gi, (params, group) in enumerate(zip(self.groups, saved["param_groups"])):
            self.base.param_groups[gi].update({k: v for k, v in group.items() if k != "params"})
            entries = [saved["state"].get(i) for i in group["params"]]
            flats = self._flats(gi)
            if not any(entries):
                for flat in flats:
                    self.base.state.pop(flat, None)  # saved before the first step: AdamW starts it lazily
                continue
            first = next(e for e in entries if e)
            for flat in flats:  # fresh tensors, then each parameter's slice written into them
                self.base.state[flat] = {k: (torch.zeros_like(flat) if per_element(k, v)
                                             else (v.clone().to(flat.device) if torch.is_tensor(v) else v))
                                         for k, v in first.items()}
            for p, e in zip(params, entries):
                for k, v in (e or {}).items():
                    if per_element(k, v):
                        set_zero3_slice(self.zero, p, v, k)
