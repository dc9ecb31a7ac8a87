"""PosteriorSampler: one model-level step before each forward that draws every factor at once.

Registered as a forward pre-hook on the innermost model (the one PEFT wraps), so it runs once per
model forward whatever the entry point (``PeftModel.__call__``, ``generate``, the bare model) and
*outside* any gradient-checkpointed block: a recomputed block reads the same drawn weights, so its
gradients are exact. Factors are grouped by :class:`~bayeslora.core.FactorShape` and inducing dtype
(one ``randn`` per group), and the groups whose R×C cores agree (usually all of a model's) are drawn by one
:func:`~bayeslora.core.draw_groups` call (one batched Cholesky per side, one flow call).

Draws use torch's global RNG on the factors' device, so ``torch.manual_seed(s)`` before a forward
reproduces it (groups take their noise in the order of :meth:`PosteriorSampler._draw_groups`);
:meth:`PosteriorSampler.set_draw_seed` switches to per-group generators seeded by (seed, group), identical
on every data-parallel rank.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..core import StackedFactors, conditional_kl_group, core_key, draw_groups, mean_group
from ..seeding import mix_seed
from .layer import MODES, BayesLoraLinear

__all__ = ["FactorRef", "PosteriorSampler"]


class _Structure:
    """A process-wide count of registrations that put a Bayesian-LoRA layer into a module or take one
    out (PEFT's injection, ``add_adapter``/``load_adapter`` on new targets, ``unload``, a user's
    ``setattr``: all go through torch's global registration hook), so a sampler can cache its walk over
    the model and redo it only then. Other registrations do not count: Llama's forward slices its
    ``ModuleList`` (a new list, registering every block) on every call. Not seen: a pre-built subtree
    holding Bayesian layers attached whole, and modules removed by ``del``/``delattr``/``ModuleList.pop``
    (a removed layer would still be drawn and its KL counted): call :meth:`PosteriorSampler.invalidate`
    after such hand surgery. PEFT's own operations are all seen."""

    generation = 0


def _module_registered(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    if isinstance(submodule, BayesLoraLinear) or isinstance(module._modules.get(name), BayesLoraLinear):
        _Structure.generation += 1


torch.nn.modules.module.register_module_module_registration_hook(_module_registered)


@dataclass(frozen=True)
class FactorRef:
    """Where one Bayesian factor lives: layer (and its module name), adapter, "A" or "B"."""

    name: str
    layer: BayesLoraLinear
    adapter: str
    which: str

    @property
    def factor(self):
        return self.layer.lora_bayes[self.adapter][self.which]


@contextlib.contextmanager
def _single_thread_on_cpu(active: bool) -> Iterator[None]:
    """Run the many tiny ops of a CPU draw on one intra-op thread.

    Each 9×9 solve or small bmm otherwise opens a parallel region that, on a loaded machine, waits for a
    descheduled worker: measured on 2 cores under load, the step overhead fell from ×1.24 to ×0.98 of
    plain LoRA (benchmarks/step_time.py); on a quiet machine the draw costs ~2 ms more.
    """
    if not active:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def full_precision(groups: dict[tuple, list[FactorRef]]) -> contextlib.ExitStack:
    """Switch autocast off on the groups' devices: the inducing maths stays in its own dtype (float32
    or float64) under bf16/fp16 mixed precision, as METHOD.md section 2 requires."""
    stack = contextlib.ExitStack()
    for device_type in sorted({key[2].type for key in groups}):
        stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack


def _uses_reentrant_checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers block that checkpoints with ``use_reentrant=True``."""
    func = module.__dict__.get("_gradient_checkpointing_func")
    if not (module.__dict__.get("gradient_checkpointing") and func is not None):
        return False
    return bool(getattr(func, "keywords", {}).get("use_reentrant", False))


class PosteriorSampler:
    """Holds the Bayesian-LoRA mode of a model and draws its factors before every forward."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.mode = "sample"
        self.num_samples = 1
        self.fixed = False
        self.draw_seed: Optional[int] = None
        self.draw_seeds: Optional[list[int]] = None
        self.posterior_scale = 1.0  # τ of StackedFactors.widened, applied to every draw
        # A kernel that fails to factorise raises at once on the CPU; elsewhere (or with defer_checks) its
        # flag accumulates on the device and is read every `check_every` draws and at check_posterior().
        self.defer_checks = False
        self.check_every = 50
        self._failed: dict[torch.device, Tensor] = {}  # one flag per device (groups live on several)
        self._unchecked = 0
        # KL terms of the factors drawn by the last forward, keyed by (layer id, adapter, "A"|"B")
        self.last_kl: dict[tuple[int, str, str], tuple[Tensor, Tensor]] = {}
        # (structure generation, adapter layers, modules that may checkpoint): the walk, cached
        self._walked: Optional[tuple[int, list[tuple[str, BayesLoraLinear]], list[nn.Module]]] = None
        self._handle = root.register_forward_pre_hook(self._before_forward)

    def detach(self) -> None:
        self._handle.remove()

    # ------------------------------------------------------------------------------ bookkeeping
    def _adopt(self, layer: BayesLoraLinear) -> None:
        """The mode belongs to the model: a layer created after ``set_mode`` (``add_adapter``,
        ``load_adapter`` on new targets) takes it at the next walk."""
        layer._ensure_bayes_state()
        layer.bayes_mode, layer.bayes_num_samples = self.mode, self.num_samples

    def _walk(self) -> tuple[list[tuple[str, BayesLoraLinear]], list[nn.Module]]:
        """The adapter layers and the modules that can gradient-checkpoint, from one walk, reused until
        the model's structure changes (a walk costs ~9 ms per forward at 32 layers)."""
        generation = _Structure.generation
        if self._walked is None or self._walked[0] != generation:
            layers, checkpointing = [], []
            for name, module in self.root.named_modules():
                if isinstance(module, BayesLoraLinear):
                    layers.append((name, module))
                elif "gradient_checkpointing" in module.__dict__ or hasattr(type(module), "gradient_checkpointing"):
                    checkpointing.append(module)
            self._walked = (generation, layers, checkpointing)
        return self._walked[1], self._walked[2]

    def invalidate(self) -> None:
        """Walk the model again at the next forward (after attaching a subtree that holds Bayesian layers)."""
        self._walked = None

    def layers(self) -> list[tuple[str, BayesLoraLinear]]:
        layers, _ = self._walk()
        for _, layer in layers:
            self._adopt(layer)
        return list(layers)

    def _scan(self, check_reentrant: bool) -> list[tuple[str, BayesLoraLinear]]:
        """Per forward: the adapter layers (which take the model's mode), and the reentrant-checkpoint
        check on the modules that can checkpoint (its flags are attributes, so they are read each time)."""
        layers = self.layers()
        if check_reentrant and any(_uses_reentrant_checkpointing(m) for m in self._walk()[1]):
            raise ValueError(
                "reentrant gradient checkpointing re-runs the backward of the shared posterior draw once "
                "per block, which is unsupported: enable it with gradient_checkpointing_kwargs="
                "{'use_reentrant': False} (the transformers default)"
            )
        return layers

    def active_factors(self, layers: Optional[list[tuple[str, BayesLoraLinear]]] = None) -> list[FactorRef]:
        """Factors of the active Bayesian adapters of layers that are neither disabled nor merged."""
        refs = []
        for name, layer in self.layers() if layers is None else layers:
            if layer.disable_adapters or layer.merged:
                continue
            for adapter in layer.active_adapters:
                if adapter in layer.lora_bayes:
                    refs += [FactorRef(name, layer, adapter, w) for w in ("A", "B")]
        return refs

    def all_factors(self) -> list[FactorRef]:
        return [
            FactorRef(name, layer, adapter, w)
            for name, layer in self.layers()
            for adapter in layer.lora_bayes
            for w in ("A", "B")
        ]

    @staticmethod
    def groups(refs: list[FactorRef], by_mean_settings: bool = False) -> dict[tuple, list[FactorRef]]:
        """Factors that can be computed together: same shape, inducing dtype and device, with or without a
        point factor W₀ (and, for means, the same Monte-Carlo settings): key (shape, dtype, device,
        has W₀[, mean_samples, seed])."""
        out: dict[tuple, list[FactorRef]] = {}
        for ref in refs:
            settings = ref.layer.bayes_settings[ref.adapter]
            key = (ref.factor.shape, settings["dtype"], ref.factor.inducing_mean.device, ref.factor.offset is not None)
            if by_mean_settings:
                key += (settings["mean_samples"], settings["seed"])
            out.setdefault(key, []).append(ref)
        return out

    # ------------------------------------------------------------------------------ modes
    def set_mode(self, mode: str, num_samples: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.mode, self.num_samples = mode, num_samples
        self.clear()  # walks the layers, which take the new mode

    def set_draw_seeds(self, seeds: Optional[list[int]]) -> None:
        """One seed per draw of each forward (``None``: torch's global RNG).

        Draw i of a group comes from a generator seeded by (seeds[i], group), so the same seeds give the
        same weights on every data-parallel rank, and batched draws equal sequential ones (to rounding).
        """
        self.draw_seeds = None if seeds is None else [int(s) for s in seeds]

    def set_draw_seed(self, seed: Optional[int]) -> None:
        """Shorthand: draw i of each forward uses the seed derived from (seed, i)."""
        self.draw_seed = seed
        self.draw_seeds = None

    def set_posterior_scale(self, scale: float) -> None:
        """Multiply the spread (σ_U and λ) of every draw by ``scale``; 1 restores the trained posterior.
        Mean mode and merging are unaffected: they use the trained posterior mean."""
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf")):
            raise ValueError(f"posterior scale must be a positive finite number, got {scale!r}")
        self.posterior_scale = float(scale)
        self.clear()

    def _generators(self, key: tuple, twin: bool = False, place: int = 0) -> Optional[list[torch.Generator]]:
        """Seeded generators for one draw group (streams by :meth:`group_stream`), or None for torch's
        global RNG."""
        if self.draw_seeds is not None:
            seeds = self.draw_seeds
            if len(seeds) != self.num_samples:
                raise ValueError(f"{len(seeds)} draw seeds for {self.num_samples} draws per forward")
        elif self.draw_seed is not None:
            seeds = [mix_seed(self.draw_seed, i) for i in range(self.num_samples)]
        else:
            return None
        group_id = self.group_stream(key, twin, place)
        return [torch.Generator(device=key[2]).manual_seed(mix_seed(s, group_id)) for s in seeds]

    @staticmethod
    def group_stream(key: tuple, twin: bool = False, place: int = 0) -> int:
        """What a draw group's seeds are mixed with: a hash of its shape, dtype and device *type*, not the
        device's index, so rank r on cuda:r draws what rank 0 draws on cuda:0. ``twin`` marks a W₀ group
        beside a group of the same shape without W₀ (two adapters of different constructions); ``place``
        is the group's device's position among the devices this process's factors occupy (first seen, first
        counted), so a model split over devices (``device_map``) does not give same-shaped groups on cuda:0
        and cuda:1 the same noise. A model of one construction on one device keeps the streams it always had."""
        shape, dtype, device = key[:3]
        tags = ("|w0" if twin else "") + (f"|place{place}" if place else "")
        return zlib.crc32(f"{shape.key()}|{dtype}|{torch.device(device).type}{tags}".encode())

    def clear(self, layers: Optional[list[tuple[str, BayesLoraLinear]]] = None) -> None:
        self.last_kl.clear()
        for _, layer in self.layers() if layers is None else layers:
            layer.clear_drawn_weights()

    # ------------------------------------------------------------------------------ drawing
    def _before_forward(self, module: nn.Module, args) -> None:
        layers = self._scan(check_reentrant=torch.is_grad_enabled())
        if self.fixed:
            return
        if self.mode == "sample":
            self.draw(layers=layers)
        else:
            self.clear(layers)
            self.refresh_means(layers)

    def draw(self, generator: Optional[torch.Generator] = None,
             layers: Optional[list[tuple[str, BayesLoraLinear]]] = None) -> None:
        """Draw ``num_samples`` weights for every active factor, one batched call per R×C core."""
        layers = self.layers() if layers is None else layers
        self.clear(layers)
        groups = self.groups(self.active_factors(layers))
        with _single_thread_on_cpu(any(key[2].type == "cpu" for key in groups)), full_precision(groups):
            self._draw_groups(groups, generator)

    def check_posterior(self) -> None:
        """Raise if a kernel failed to factorise since the last check (one host sync per device)."""
        flags, self._failed, self._unchecked = self._failed, {}, 0
        if any(bool(flag) for flag in flags.values()):
            from ..core.posterior import NOT_POSITIVE_DEFINITE

            raise FloatingPointError(f"{NOT_POSITIVE_DEFINITE} (found at a deferred check of the draws since "
                                     "the previous one)")

    @staticmethod
    def cores(groups: dict[tuple, list[FactorRef]]) -> list[list[tuple]]:
        """The group keys drawn together by one :func:`draw_groups` call: same R×C core, dtype and device, in
        the order first seen."""
        cores: dict[tuple, list[tuple]] = {}
        for key in groups:
            cores.setdefault((core_key(key[0]), key[1], key[2]), []).append(key)
        return list(cores.values())

    def _draw_groups(self, groups: dict[tuple, list[FactorRef]], generator: Optional[torch.Generator]) -> None:
        """Groups whose R×C cores agree (e.g. a model's A, B and lm_head factors) are drawn in one
        :func:`draw_groups` call. With draw seeds each group has its own generator (``_generators``), so the
        order does not matter. Without them every group of a device reads torch's global RNG in turn, core
        by core: where one device holds groups of different cores (several adapters of other R, C or flow),
        that order, and so an unseeded draw, differs from the releases that drew group by group (same law).
        ``torch.manual_seed`` seeds every CUDA device alike, so unseeded draws of a model split over devices
        may repeat across them; seed the draws there (``set_draw_seed``, as training and evaluation do)."""
        places: dict = {}  # device -> its position among this process's devices, first seen first
        for key in groups:
            places.setdefault(key[2], len(places))
        for keys in self.cores(groups):
            stacked = [StackedFactors.of([r.factor for r in groups[key]], key[1]).widened(self.posterior_scale)
                       for key in keys]
            gens = [generator if generator is not None
                    else self._generators(key, key[3] and key[:3] + (False,) in groups, places[key[2]])
                    for key in keys]
            for key, p, drawn in zip(keys, stacked, draw_groups(stacked, self.num_samples, gens, self.defer_checks)):
                device = drawn.failed.device
                self._failed[device] = drawn.failed if device not in self._failed else self._failed[device] | drawn.failed
                kl_cond = conditional_kl_group(p)
                for i, ref in enumerate(groups[key]):
                    ref.layer._bayes_draws.setdefault(ref.adapter, {})[ref.which] = drawn.weights[i]
                    self.last_kl[(id(ref.layer), ref.adapter, ref.which)] = (drawn.kl_flow[i], kl_cond[i])
        self._unchecked += 1
        if self._unchecked >= self.check_every:
            self.check_posterior()

    def refresh_means(self, layers: Optional[list[tuple[str, BayesLoraLinear]]] = None) -> None:
        """Recompute, group-wise, the posterior means of adapters whose parameters changed."""
        stale = [r for r in self.active_factors(layers) if not r.layer.mean_is_fresh(r.adapter)]
        pending: dict[tuple[BayesLoraLinear, str], dict[str, Tensor]] = {}
        groups = self.groups(stale, by_mean_settings=True)
        with full_precision(groups):
            self._mean_groups(groups, pending)
        if pending and not all(bool(torch.isfinite(w).all()) for means in pending.values() for w in means.values()):
            # means are recomputed only when the parameters changed, so this sync is rare; it keeps a NaN
            # posterior out of mean mode and out of merged weights on accelerators too
            from ..core.posterior import NOT_POSITIVE_DEFINITE

            raise FloatingPointError(f"the posterior mean is not finite: {NOT_POSITIVE_DEFINITE}")
        for (layer, adapter), means in pending.items():
            layer.store_mean_weights(adapter, means)

    @staticmethod
    def _mean_groups(groups: dict[tuple, list[FactorRef]], pending: dict) -> None:
        for key, refs in groups.items():
            stacked = StackedFactors.of([r.factor for r in refs], key[1])
            means = mean_group(stacked, *key[4:])
            for i, ref in enumerate(refs):
                pending.setdefault((ref.layer, ref.adapter), {})[ref.which] = means[i]
