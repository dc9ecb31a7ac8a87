"""BayesLoraLinear: a PEFT LoRA layer whose adapters may be Bayesian (METHOD.md sections 1 to 4).

It subclasses PEFT's ``lora.Linear`` (so it *is* a ``LoraLayer`` and PEFT's save/load, ``set_adapter``,
``disable_adapter``, ``delete_adapter`` and ``merge_and_unload`` drive it). A plain adapter takes PEFT's
own code path unchanged. A Bayesian adapter owns no ``lora_A``/``lora_B``: it owns two
:class:`~bayeslora.core.InducingFactor` modules under ``lora_bayes[adapter]["A"|"B"]`` and reads, at
each forward, weights that the model-level :class:`~bayeslora.surgery.sampler.PosteriorSampler`
drew for every factor at once before the forward started. Without a sampler attached the layer draws
its own factors (correct, but unbatched and not safe under gradient checkpointing).

The merge delta of a Bayesian adapter is the posterior mean, scaling · E[B] E[A]. A row-restricted
adapter (``BayesLoraConfig.output_rows``, e.g. an lm_head scored on its answer-label rows only) has a B
of those rows alone and adds its delta to them; every other output is the base layer's.

PEFT names checkpoint tensors by stripping the adapter name where it is the last or second-to-last part
of a key. A factor's parameters sit deeper (``lora_bayes.<adapter>.A.flow.transforms.0...``), so a
:class:`FactorPair` saves everything below it under one flat part (``lora_bayes.<adapter>.A__flow__...``):
PEFT's own save and load then work for any adapter name, and older nested checkpoints still load
under the name they were saved with.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.other import transpose
from torch import Tensor, nn

from ..config import BayesLoraConfig
from ..core import FactorShape, InducingFactor, StackedFactors, draw_group, lora_matching_std, mean_group

__all__ = ["BayesLoraLinear", "FactorPair", "MODES"]

MODES = ("sample", "mean")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FactorPair(nn.ModuleDict):
    """The "A" and "B" factors of one Bayesian adapter; its state-dict keys are flat below it."""

    SEP = "__"

    def __init__(self, factors: dict[str, nn.Module]) -> None:
        super().__init__(factors)
        self._register_state_dict_hook(FactorPair._flatten_keys)

    def _nested_names(self) -> list[str]:
        """Every key of the nested state dict (shared tensors, e.g. zuko's masks, under each name)."""
        names = [n for n, _ in self.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in self.named_buffers(remove_duplicate=False)]
        if any(self.SEP in n for n in names):  # flat keys must map back to one nested name each
            raise ValueError(f"a factor parameter name contains {self.SEP!r}: {[n for n in names if self.SEP in n]}")
        return names

    def __getattr__(self, name: str):
        """``pair.A__flow__transforms__0__...`` is ``pair.A.flow.transforms[0]...``: a flat state-dict key
        stays an attribute path, as ``torch.distributed.checkpoint`` requires of every key."""
        if self.SEP in name and not name.startswith("_"):
            target = self
            for part in name.split(self.SEP):
                target = getattr(target, part)
            return target
        return super().__getattr__(name)

    @staticmethod
    def _flatten_keys(module: "FactorPair", state_dict: dict, prefix: str, local_metadata: dict) -> None:
        nested = [k for k in list(state_dict) if k.startswith(prefix) and "." in k[len(prefix):]]
        for key in nested:
            state_dict[prefix + key[len(prefix):].replace(".", module.SEP)] = state_dict.pop(key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for name in self._nested_names():
            flat = prefix + name.replace(".", self.SEP)
            if flat in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(flat)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def is_quantized(module: nn.Module) -> bool:
    """bitsandbytes 4/8-bit layers (detected by their class or weight class, without importing bnb)."""
    names = (type(module).__module__, type(getattr(module, "weight", None)).__name__)
    return names[0].startswith("bitsandbytes") or names[1] in ("Params4bit", "Int8Params")


class BayesLoraLinear(LoraLinear):
    """``lora.Linear`` (nn.Linear or GPT-2 Conv1D base) with optional Bayesian adapters."""

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_bayes",)
    other_param_names = LoraLinear.other_param_names + ("bayes_settings",)

    def _ensure_bayes_state(self) -> None:
        if "lora_bayes" not in self._modules:
            self.lora_bayes = nn.ModuleDict()
            self.bayes_settings: dict[str, dict[str, Any]] = {}
            self.bayes_mode = "sample"
            self.bayes_num_samples = 1
            self._bayes_draws: dict[str, dict[str, Tensor]] = {}
            self._bayes_mean_cache: dict[str, tuple[Any, dict[str, Tensor]]] = {}
            self._bayes_row_index: dict[tuple[str, tuple[int, ...], torch.device], Tensor] = {}
            self._warned_no_sampler = False

    # ----------------------------------------------------------------------------------- creation
    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        self._ensure_bayes_state()
        target = kwargs.get("target_name", "")
        if not (isinstance(config, BayesLoraConfig) and config.is_bayesian(target)):
            if isinstance(config, BayesLoraConfig) and config.rows_of(target) is not None:
                raise ValueError(f"BayesLoraConfig.output_rows names {target!r}, a plain LoRA target: only a "
                                 "Bayesian target's rows can be restricted (add it to bayesian_modules)")
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            return
        rows = config.rows_of(target)
        if rows is not None and max(rows) >= self.out_features:
            raise ValueError(f"BayesLoraConfig.output_rows for {target!r}: row {max(rows)} is outside its "
                             f"{self.out_features} outputs")
        if r <= 0:
            raise ValueError(f"BayesLoraConfig.r must be a positive integer, got {r}")
        if config.lora_bias:
            raise ValueError("BayesLoraConfig.lora_bias is not supported for Bayesian modules")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (r**0.5 if config.use_rslora else r)

        def factor(d_out: int, d_in: int, zero_mean: bool = False, lora_a: bool = False) -> InducingFactor:
            shape = FactorShape(
                d_out, d_in, config.inducing_rows, config.inducing_cols, config.flow_depth,
                config.flow_hidden, config.prior_std, config.sigma_u_max, config.lambda_max, config.jitter,
            )
            std = config.mean_init_std
            if std == "lora":  # A at PEFT's norm; a random B (init_lora_weights=False) keeps METHOD.md's 1
                std = lora_matching_std(shape) if lora_a else 1.0
            offset = None
            if config.lora_offset:  # PEFT's own init of the point factor: A kaiming-uniform, B zero (or,
                offset = torch.zeros(d_out, d_in)  # init_lora_weights=False, nn.Linear's init for B too)
                if lora_a or not zero_mean:
                    nn.init.kaiming_uniform_(offset, a=5 ** 0.5)
            return InducingFactor(shape, sigma_u_init=config.sigma_u_init, lambda_init=config.lambda_init,
                                  d_init=config.inducing_diag_init, zero_mean=zero_mean or config.lora_offset,
                                  prior_at_init=config.prior_at_init,
                                  mean_init_std=std, offset_init=offset)

        # init_lora_weights=True (PEFT's default: B = 0) means E[B] = 0, so the adapter starts at the
        # pretrained function in mean mode; False keeps the paper's random inducing mean for both.
        zero_b = config.init_lora_weights is not False
        d_out = self.out_features if rows is None else len(rows)  # a row-restricted B holds only its rows
        pair = FactorPair({"A": factor(r, self.in_features, lora_a=True), "B": factor(d_out, r, zero_b)})
        self.lora_bayes[adapter_name] = pair.float()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.bayes_settings[adapter_name] = {
            "dtype": _DTYPES[config.inducing_dtype],
            "mean_samples": config.mean_samples,
            "seed": config.seed,
            "rows": None if rows is None else tuple(rows),
        }
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """PEFT's move to the base layer's device and dtype, except that a Bayesian pair only changes
        device: its inducing parameters stay float32 whatever the base dtype. Meta (not yet loaded,
        ``low_cpu_mem_usage=True``) parameters stay where they are, as PEFT does."""
        bayes = self._modules.get("lora_bayes")
        pair = bayes[adapter_name] if bayes is not None and adapter_name in bayes else None
        if pair is None:
            return super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        bayes[adapter_name] = nn.Identity()  # PEFT's loop must not cast it; the slot keeps its order
        try:
            super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        finally:
            bayes[adapter_name] = pair
        if any(t.is_meta for t in pair.parameters()):
            return
        target = device if device is not None else self._get_base_layer_device_and_dtype(self.get_base_layer())[0]
        if target is not None:
            pair.to(device=target, dtype=torch.float32)

    # ----------------------------------------------------------------------------------- posterior
    def bayes_factors(self, adapter: str) -> dict[str, InducingFactor]:
        return dict(self.lora_bayes[adapter].items())

    def set_drawn_weights(self, adapter: str, weights: dict[str, Tensor]) -> None:
        """Called by the sampler: weights for this forward, each (n, d_o, d_i) in the inducing dtype."""
        self._bayes_draws[adapter] = weights

    def clear_drawn_weights(self) -> None:
        self._bayes_draws.clear()

    def forget_mean_weights(self) -> None:
        """Drop the cached posterior means (they are otherwise recomputed only when a parameter's version
        changes, which a write through ``.data`` does not do)."""
        self._bayes_mean_cache.clear()

    def mean_version(self, adapter: str) -> tuple:
        return tuple(f.version() for f in self.lora_bayes[adapter].values())

    def mean_is_fresh(self, adapter: str) -> bool:
        """A cached mean is reusable if no parameter changed, it holds no autograd graph, and no graph
        is wanted now (a mean cached under no_grad must not silently cut gradients later)."""
        cached = self._bayes_mean_cache.get(adapter)
        wants_graph = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.lora_bayes[adapter].parameters()
        )
        return (
            cached is not None
            and cached[0] == self.mean_version(adapter)
            and not any(t.requires_grad for t in cached[1].values())
            and not wants_graph
        )

    def mean_weights(self, adapter: str, refresh: bool = False) -> dict[str, Tensor]:
        """Posterior means E[A], E[B]; recomputed when a parameter changed, a graph is needed, or
        ``refresh`` is set (merging always recomputes)."""
        if not refresh and self.mean_is_fresh(adapter):
            return self._bayes_mean_cache[adapter][1]
        cached = self._bayes_mean_cache.get(adapter)
        if (not refresh and cached is not None and cached[0] == self.mean_version(adapter)
                and torch.is_grad_enabled() and any(t.requires_grad for t in cached[1].values())):
            # computed with a graph by the sampler for this forward (it recomputes before every one)
            return cached[1]
        settings = self.bayes_settings[adapter]
        means = {}
        with torch.autocast(device_type=self._bayes_device_type(adapter), enabled=False):
            for name, f in self.bayes_factors(adapter).items():
                stacked = StackedFactors.of([f], settings["dtype"])
                means[name] = mean_group(stacked, settings["mean_samples"], settings["seed"])[0]
        self.store_mean_weights(adapter, means)
        return means

    def store_mean_weights(self, adapter: str, means: dict[str, Tensor]) -> None:
        self._bayes_mean_cache[adapter] = (self.mean_version(adapter), means)

    def _sampled_weights(self, adapter: str) -> dict[str, Tensor]:
        drawn = self._bayes_draws.get(adapter)
        if drawn is not None:
            return drawn
        if not self._warned_no_sampler:
            warnings.warn(
                "a Bayesian-LoRA layer ran without a model-level sampler: it draws its own factors (no "
                "batching, unsafe under gradient checkpointing). Use bayeslora.get_model / bayeslora.load, "
                "or bayeslora.attach(model) on a model loaded another way.",
                stacklevel=3,
            )
            self._warned_no_sampler = True
        dtype = self.bayes_settings[adapter]["dtype"]
        with torch.autocast(device_type=self._bayes_device_type(adapter), enabled=False):
            return {
                name: draw_group(StackedFactors.of([f], dtype), self.bayes_num_samples).weights[0]
                for name, f in self.bayes_factors(adapter).items()
            }

    def _bayes_device_type(self, adapter: str) -> str:
        return self.lora_bayes[adapter]["A"].inducing_mean.device.type

    def posterior_weights(self, adapter: str) -> tuple[Tensor, Tensor]:
        """(A, B) for the current mode: (n, r, d_in), (n, d_out, r) in sample mode, 2-D in mean mode."""
        if self.bayes_mode == "mean":
            w = self.mean_weights(adapter)
        elif self.bayes_mode == "sample":
            w = self._sampled_weights(adapter)
        else:
            raise ValueError(f"unknown bayeslora mode {self.bayes_mode!r}; expected one of {MODES}")
        return w["A"], w["B"]

    # ----------------------------------------------------------------------------------- forward
    def _bayes_delta(self, adapter: str, x: Tensor) -> Tensor:
        weight_a, weight_b = self.posterior_weights(adapter)
        h = self.lora_dropout[adapter](x).to(weight_a.dtype)
        if weight_a.dim() == 3 and weight_a.shape[0] == 1:
            weight_a, weight_b = weight_a[0], weight_b[0]
        # the scaling multiplies the rank-r intermediate, not the d_o-wide output: on an lm_head that saves
        # a pass and a temporary of the logits' size, forward and backward (benchmarks/memory_estimate.py)
        scaling = self.scaling[adapter]
        if weight_a.dim() == 2:
            return F.linear(F.linear(h, weight_a) * scaling, weight_b)
        n = weight_a.shape[0]  # n draws: dim 0 holds sample-major blocks of the batch (S×B rows; batch-first)
        if h.shape[0] % n:
            raise ValueError(
                f"batched Monte Carlo with {n} samples needs a batch that is a multiple of {n} "
                f"(sample-major S×B rows), got {h.shape[0]} rows"
            )
        blocks = h.reshape(n, -1, h.shape[-1])
        out = ((blocks @ weight_a.transpose(-1, -2)) * scaling) @ weight_b.transpose(-1, -2)
        return out.reshape(*h.shape[:-1], weight_b.shape[-2])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._ensure_bayes_state()
        bayes_active = [a for a in self.active_adapters if a in self.lora_bayes]
        if kwargs.get("adapter_names") is not None and any(
            a in self.lora_bayes for a in kwargs["adapter_names"]
        ):
            raise ValueError("mixed-adapter batches (adapter_names=...) are not supported for Bayesian adapters")
        if self.merged and not self.disable_adapters and self.bayes_mode == "sample" and any(
            a in self.lora_bayes for a in self.merged_adapters
        ):
            raise RuntimeError(
                "a Bayesian adapter is merged into the base weights (its posterior mean): sample mode cannot "
                "run on a merged model; unmerge first or use mean mode"
            )
        result = super().forward(x, *args, **kwargs)
        if self.disable_adapters or self.merged or not bayes_active:
            return result
        for adapter in bayes_active:
            delta = self._bayes_delta(adapter, x).to(result.dtype)
            index = self.output_row_index(adapter, result.device)
            result = result + delta if index is None else result.index_add(result.dim() - 1, index, delta)
        return result

    def output_rows(self, adapter: str) -> Optional[tuple[int, ...]]:
        """The output rows a row-restricted Bayesian adapter changes (``BayesLoraConfig.output_rows``), or None."""
        return self.bayes_settings[adapter].get("rows")

    def full_rows(self, adapter: str, weight_b: Tensor) -> Tensor:
        """A B weight over every output row: a row-restricted adapter's rows in place, zeros elsewhere (the
        rows it leaves to the base); any other B unchanged. Merging and combining read B through this."""
        rows = self.output_rows(adapter)
        if rows is None:
            return weight_b
        full = weight_b.new_zeros(self.out_features, weight_b.shape[-1])
        full[list(rows)] = weight_b
        return full

    def output_row_index(self, adapter: str, device: torch.device) -> Optional[Tensor]:
        rows = self.output_rows(adapter)
        if rows is None:
            return None
        key = (adapter, rows, device)  # the rows too: an adapter deleted and re-added may have others
        if key not in self._bayes_row_index:  # made once per device: no host-to-device copy per forward
            self._bayes_row_index[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._bayes_row_index[key]

    # ----------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter: str) -> Tensor:
        if adapter not in self.lora_bayes:
            return super().get_delta_weight(adapter)
        with torch.no_grad():
            means = self.mean_weights(adapter, refresh=True)
            delta = self.full_rows(adapter, means["B"]) @ means["A"]
            delta = transpose(delta, self.fan_in_fan_out) * self.scaling[adapter]
            if not torch.isfinite(delta).all():  # one check per merge: never write NaN into the base weights
                raise ValueError(f"the posterior mean of Bayesian adapter {adapter!r} is not finite (a diverged "
                                 "posterior?): refusing to merge it")
        weight = self.get_base_layer().weight
        return delta if weight.dtype in (torch.uint8, torch.int8) else delta.to(weight.dtype)

    @property
    def base_is_quantized(self) -> bool:
        return is_quantized(self.get_base_layer())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_bayes:
                super().merge(safe_merge=safe_merge, adapter_names=[adapter])
                continue
            if self.base_is_quantized:
                raise NotImplementedError(
                    f"merging Bayesian adapter {adapter!r} into a bitsandbytes-quantized layer "
                    f"({type(self.get_base_layer()).__name__}) would round its posterior mean to the base's "
                    "bits: use mean mode (the same prediction, one small extra matmul) or load the base "
                    "unquantized to merge")
            base = self.get_base_layer()
            merged = base.weight.data + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights of Bayesian adapter {adapter!r}")
            base.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters[-1]
            rest = self.merged_adapters[:-1]
            if adapter in self.lora_bayes:
                weight = self.get_base_layer().weight
                weight.data = weight.data - self.get_delta_weight(adapter)
            else:
                self.merged_adapters = [adapter]
                super().unmerge()
            self.merged_adapters = rest

    def __repr__(self) -> str:
        return "bayes" + super().__repr__()
