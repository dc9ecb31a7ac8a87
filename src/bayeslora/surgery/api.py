"""The public surface of the adapter: build, load, switch modes, read KL terms and statistics."""

from __future__ import annotations

import contextlib
import json
import operator
import os
from typing import Any, Iterable, Iterator, Optional

import peft
import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..config import BayesLoraConfig
from ..core import StackedFactors, conditional_kl_group, draw_group
from .combine import install as install_combination
from .inject import adapter_layers, prepare_config, resolve_targets, undo_injection, untie_targets
from .layer import BayesLoraLinear
from .sampler import PosteriorSampler, full_precision

__all__ = [
    "attach", "count_parameters", "fixed_sample", "get_model", "get_sampler", "kl_breakdown",
    "kl_divergence", "load", "load_adapter", "posterior_stats", "set_draw_seed", "set_draw_seeds",
    "set_mode", "set_posterior_scale", "using_mode",
]

_SAMPLER_ATTR = "_bayeslora_sampler"


def _inner_model(model: nn.Module) -> nn.Module:
    """The model PEFT wraps (PeftModel -> LoraModel -> model); the model itself otherwise."""
    if isinstance(model, peft.PeftModel):
        return model.base_model.model
    if isinstance(model, peft.tuners.lora.LoraModel):
        return model.model
    return model


def get_sampler(model: nn.Module) -> PosteriorSampler:
    """The sampler attached to ``model`` (a PeftModel, its LoraModel or the wrapped model)."""
    for module in model.modules():
        sampler = module.__dict__.get(_SAMPLER_ATTR)
        if sampler is not None:
            return sampler
    raise ValueError("this model has no Bayesian-LoRA sampler: build it with bayeslora.get_model or "
                     "bayeslora.load, or call bayeslora.attach(model)")


def attach(model: nn.Module) -> nn.Module:
    """Attach the model-level sampler (idempotent), untie tied adapter targets, and give the LoraModel
    an ``add_weighted_adapter`` that combines posterior means (:mod:`.combine`); returns ``model``."""
    inner = _inner_model(model)
    install_combination(model.base_model if isinstance(model, peft.PeftModel) else model)
    if inner.__dict__.get(_SAMPLER_ATTR) is None:
        inner.__dict__[_SAMPLER_ATTR] = PosteriorSampler(inner)
    untie_targets(inner)
    for module in inner.modules():
        if isinstance(module, BayesLoraLinear):
            for pair in module.lora_bayes.values():
                pair.float()  # the inducing parameters stay float32 whatever the base dtype
    return model


def get_model(model: nn.Module, config: BayesLoraConfig, adapter_name: str = "default",
              **peft_kwargs) -> peft.PeftModel:
    """Wrap ``model`` with a Bayesian-LoRA adapter; returns a ``peft.PeftModel``.

    Bad configurations raise ``ValueError`` naming the field before the model is touched; a target PEFT
    itself refuses (a kind it has no LoRA layer for) raises with the model restored as it was. The model
    starts in sample mode: every forward a fresh draw, in ``eval()`` too and for every token of ``generate``;
    use ``set_mode(model, "mean")`` or :func:`fixed_sample` for deterministic generation.
    """
    prepare_config(config)
    resolve_targets(model, config)
    before = adapter_layers(model)
    try:
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name, **peft_kwargs)
    except BaseException:
        undo_injection(model, before)
        raise
    return attach(peft_model)


def load(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
         is_trainable: bool = False, **peft_kwargs) -> peft.PeftModel:
    """Load a saved Bayesian-LoRA adapter onto a fresh base ``model``; returns a ``peft.PeftModel``.

    ``path`` is the folder ``save_pretrained`` wrote, or a Hub repository id. An existing path is local; a
    string of the form ``owner/name`` that does not exist here is a Hub id; anything else that does not
    exist (``out_typo``, ``./out``, ``/abs/out``, ``runs/a/out``, ``….safetensors``, a ``Path``) is a
    ``FileNotFoundError`` naming it, not a Hub look-up. A local folder is checked before the model is
    touched: a file instead of its folder, a missing or corrupt ``adapter_config.json`` and a missing or
    non-safetensors ``adapter_model.safetensors`` are errors naming the file. Checkpoint keys the model has
    no place for (an adapter of a deeper or different base) are a ``ValueError`` naming some of them.

    Like :func:`get_model`'s, the model comes back in sample mode (a fresh draw every forward, in ``eval()``
    and ``generate`` too): ``set_mode(model, "mean")`` or :func:`fixed_sample` for deterministic generation.
    """
    _check_local_adapter(path, peft_kwargs.get("subfolder"))
    config = prepare_config(BayesLoraConfig.from_pretrained(str(path)))
    unexpected: set[str] = set()
    # PeftModel.from_pretrained drops the result of its load_state_dict; the base model's post hook sees it
    hook = model.register_load_state_dict_post_hook(lambda _, keys: unexpected.update(keys.unexpected_keys))
    before = adapter_layers(model)
    try:
        peft_model = peft.PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config,
                                                    is_trainable=is_trainable, **peft_kwargs)
        _refuse_unexpected(path, unexpected)
    except BaseException:
        undo_injection(model, before)  # the base comes back as it was given
        raise
    finally:
        hook.remove()
    return attach(peft_model)


def load_adapter(model: peft.PeftModel, path: str | os.PathLike, adapter_name: str,
                 is_trainable: bool = False, **peft_kwargs) -> peft.PeftModel:
    """Load a saved Bayesian-LoRA adapter as a further adapter ``adapter_name`` of ``model``.

    PEFT's own ``model.load_adapter(path, name)`` reads the folder's ``peft_type`` and does not know
    BAYESLORA; this adds the adapter from its :class:`BayesLoraConfig` first, then lets PEFT load the
    weights (any name works: the checkpoint keys carry none). The new adapter is not made active.
    ``path`` and its errors are as in :func:`load`; on any error the model is left without the adapter.
    """
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
    _check_local_adapter(path, peft_kwargs.get("subfolder"))
    config = prepare_config(BayesLoraConfig.from_pretrained(str(path)))
    config.inference_mode = not is_trainable
    creation = {k: peft_kwargs[k] for k in ("low_cpu_mem_usage", "autocast_adapter_dtype") if k in peft_kwargs}
    model.add_adapter(adapter_name, config, **creation)
    try:
        result = model.load_adapter(str(path), adapter_name, is_trainable=is_trainable, **peft_kwargs)
        _refuse_unexpected(path, result.unexpected_keys)
    except BaseException:
        model.delete_adapter(adapter_name)  # never leave a half-built random adapter behind
        raise
    return attach(model)


_CONFIG_FILE, _WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _is_hub_id(path: str | os.PathLike) -> bool:
    """``owner/name`` and nothing more: the one form of a Hub repository id that is not also an obvious
    local path, so a typo in a local name fails at once instead of retrying the Hub for half a minute."""
    if not isinstance(path, str):
        return False  # a Path object is a path
    parts = path.split("/")
    return (len(parts) == 2 and all(parts) and not any(p in (".", "..") for p in parts) and "\\" not in path
            and not path.endswith((".safetensors", ".json")))


def _check_local_adapter(path: str | os.PathLike, subfolder: Optional[str] = None) -> None:
    """Fail with an error naming the file for a local adapter folder PEFT would misread (see :func:`load`);
    a Hub id passes through. Reads the config's text and the weights' header, never the tensors."""
    name = os.fspath(path)
    if not os.path.exists(name):
        if _is_hub_id(path):
            return
        raise FileNotFoundError(f"{name}: no such adapter folder (a Hub repository id has the form owner/name)")
    if not os.path.isdir(name):
        raise ValueError(f"{name} is a file: pass the folder that holds it ({os.path.dirname(name) or '.'}), "
                         f"with its {_CONFIG_FILE} and {_WEIGHTS_FILE}")
    config_file = os.path.join(name, _CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{name} has no {_CONFIG_FILE}: is it a folder save_pretrained wrote?")
    try:
        with open(config_file, encoding="utf-8") as handle:
            json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err.msg} at line {err.lineno}, "
                         f"column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{config_file} is not UTF-8 text ({err.reason})") from err
    folder = os.path.join(name, subfolder) if subfolder else name
    weights = os.path.join(folder, _WEIGHTS_FILE)
    if os.path.isfile(weights):
        try:
            with safe_open(weights, framework="pt"):
                pass  # the header only
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ValueError(f"{weights} is not a safetensors file ({err})") from err
    elif os.path.isfile(os.path.join(folder, peft.utils.WEIGHTS_NAME)):  # PEFT would fall back to unpickling it
        raise ValueError(f"{folder} holds {peft.utils.WEIGHTS_NAME} (a pickle) and no {_WEIGHTS_FILE}: bayeslora "
                         "loads safetensors only, never a pickle it may have been handed; convert it where you "
                         "trust its source (torch.load, then safetensors.torch.save_file)")
    else:
        raise FileNotFoundError(f"{folder} has no {_WEIGHTS_FILE}: is it a folder save_pretrained wrote?")


def _refuse_unexpected(path: str | os.PathLike, keys: Iterable[str]) -> None:
    """PEFT loads with strict=False, so checkpoint keys without a module here (a 2-layer adapter on a
    1-layer base) would be dropped silently."""
    keys = sorted(set(keys))
    if keys:
        shown = ", ".join(keys[:3])
        raise ValueError(f"{os.fspath(path)}: {len(keys)} checkpoint keys have no place in this model (is it "
                         f"the base the adapter was trained on?), e.g. {shown}")


# ------------------------------------------------------------------------------------- modes
def set_mode(model: nn.Module, mode: str, num_samples: int = 1) -> None:
    """``"sample"`` (a fresh draw every forward, whatever ``train()``/``eval()``) or ``"mean"`` (the
    deterministic posterior mean, the weights merge_and_unload merges).

    ``num_samples=S`` makes S draws per forward for batched Monte Carlo over S×B rows in sample-major
    order, ``x.repeat(S, 1)``: draw s sees rows s·B … (s+1)·B−1. ``repeat_interleave`` would put an
    example's S copies under one draw (or a few), with no error.

    ``set_mode(model, "mean")`` also drops the cached posterior means (recomputed at the next forward), so
    it picks up parameter writes through ``p.data``; :func:`using_mode` and :func:`fixed_sample` keep them.
    """
    sampler = get_sampler(model)
    sampler.set_mode(mode, num_samples)
    if mode == "mean":  # recomputed at the next forward: picks up writes no version counter saw (``p.data``)
        for _, layer in sampler.layers():
            layer.forget_mean_weights()


@contextlib.contextmanager
def using_mode(model: nn.Module, mode: str, num_samples: int = 1) -> Iterator[None]:
    """Temporarily switch the mode; the previous mode is restored on exit."""
    sampler = get_sampler(model)
    previous = (sampler.mode, sampler.num_samples)
    sampler.set_mode(mode, num_samples)
    try:
        yield
    finally:
        sampler.set_mode(*previous)


@contextlib.contextmanager
def fixed_sample(model: nn.Module, seed: Optional[int] = None, num_samples: int = 1) -> Iterator[None]:
    """Draw once on entry and reuse that draw for every forward inside (e.g. ``generate``).

    Meant for inference: under autograd every forward inside shares the one draw's graph. If the entry
    draw fails (a bad ``seed``, a non-finite posterior), the model keeps its mode, seeds and draws; a
    ``fixed_sample`` inside another gives the outer one its draw back on exit.
    """
    sampler = get_sampler(model)
    seed = None if seed is None else _check_seed(seed, "seed")
    previous = (sampler.mode, sampler.num_samples, sampler.fixed, sampler.draw_seed, sampler.draw_seeds)
    found = _current_draws(sampler)
    try:
        sampler.set_mode("sample", num_samples)
        if seed is not None:
            sampler.set_draw_seed(seed)
        sampler.draw()
    except BaseException:
        _restore(sampler, previous, found)
        raise
    sampler.fixed = True
    try:
        yield
    finally:
        if previous[2]:  # inside another fixed_sample: its draw (and number of draws) comes back
            _restore(sampler, previous, found)
        else:
            sampler.fixed = False
            sampler.draw_seed, sampler.draw_seeds = previous[3], previous[4]
            sampler.set_mode(*previous[:2])


def _current_draws(sampler: PosteriorSampler) -> tuple[list[tuple[BayesLoraLinear, dict]], dict]:
    """The layers' current draws and their KL terms: what ``kl_divergence`` and a fixed outer draw read."""
    return [(layer, dict(layer._bayes_draws)) for _, layer in sampler.layers()], dict(sampler.last_kl)


def _restore(sampler: PosteriorSampler, settings: tuple, found: tuple[list, dict]) -> None:
    """Put back what a ``fixed_sample`` changed (after a failed entry draw, or on leaving one nested in
    another), without the clearing ``set_mode`` does."""
    sampler.mode, sampler.num_samples, sampler.fixed, sampler.draw_seed, sampler.draw_seeds = settings
    layers, last_kl = found
    sampler.layers()  # the layers take the restored mode again
    for layer, draws in layers:
        layer._bayes_draws.clear()
        layer._bayes_draws.update(draws)
    sampler.last_kl.clear()
    sampler.last_kl.update(last_kl)


def _check_seed(seed: Any, name: str) -> int:
    """A draw seed is an integer: a str or float would otherwise be converted, or fail, only inside a
    later forward, and a bool is more likely a mistake than the seed 0 or 1."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        return operator.index(seed)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {seed!r}") from None


def set_draw_seed(model: nn.Module, seed: Optional[int]) -> None:
    """Seed draws by (seed, draw index, factor group) instead of the global RNG; ``None`` restores it.

    This fixes the draw: every forward reuses the same weights until the seed changes. Monte Carlo over
    repeated forwards needs a seed per forward (or ``num_samples``), and training a new seed every step, as
    the trainer's ``before_step`` (methods/bayes.py) sets one per step.
    """
    get_sampler(model).set_draw_seed(None if seed is None else _check_seed(seed, "seed"))


def set_draw_seeds(model: nn.Module, seeds: Optional[list[int]]) -> None:
    """One explicit seed per draw of each forward (batched S draws == S single draws with these seeds)."""
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
            raise ValueError(f"seeds must be a list of integers or None, got {seeds!r}")
        seeds = [_check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)]
    get_sampler(model).set_draw_seeds(seeds)


def set_posterior_scale(model: nn.Module, scale: float) -> None:
    """Widen (τ > 1) or narrow (τ < 1) every draw's spread, σ_U → τσ_U and λ → τλ; 1 = as trained.

    A post-hoc calibration knob (``bayeslora calibrate --calibration posterior-scale`` picks τ on the
    val slice); mean mode and merged weights do not change.
    """
    get_sampler(model).set_posterior_scale(scale)


# ------------------------------------------------------------------------------------- KL
def kl_breakdown(model: nn.Module) -> list[dict]:
    """Per factor: module, adapter, factor, ``kl_flow`` and ``kl_cond`` (differentiable tensors).

    ``kl_flow`` is the one-sample estimate from the draws of the most recent forward (averaged over
    its draws when it made several). When the last forward drew nothing (mean mode, or no forward
    yet), a fresh draw is made for the estimate, from the global RNG.
    """
    sampler = get_sampler(model)
    refs = sampler.active_factors()
    known = dict(sampler.last_kl)
    missing = [r for r in refs if (id(r.layer), r.adapter, r.which) not in known]
    groups = sampler.groups(missing)
    with full_precision(groups):
        for key, group in groups.items():
            stacked = StackedFactors.of([r.factor for r in group], key[1])
            drawn, kl_cond = draw_group(stacked, 1), conditional_kl_group(stacked)
            for i, ref in enumerate(group):
                known[(id(ref.layer), ref.adapter, ref.which)] = (drawn.kl_flow[i], kl_cond[i])
    rows = []
    for ref in refs:
        flow, cond = known[(id(ref.layer), ref.adapter, ref.which)]
        rows.append({"module": ref.name, "adapter": ref.adapter, "factor": ref.which, "kl_flow": flow,
                     "kl_cond": cond})
    return rows


def kl_divergence(model: nn.Module) -> Tensor:
    """KL(q ‖ p) summed over every active Bayesian factor: Σ (KL_flow + KL_cond). Differentiable."""
    rows = kl_breakdown(model)
    if not rows:
        return torch.zeros(())
    return torch.stack([r["kl_flow"] + r["kl_cond"] for r in rows]).sum()


# ------------------------------------------------------------------------------------- statistics
@torch.no_grad()
def posterior_stats(model: nn.Module) -> list[dict]:
    """Per factor: λ and mean σ_U (the usual failure is λ stuck at its floor or σ_U collapsing), and the
    Frobenius norm of the posterior mean E[W] beside that of a typical prior draw, σ_p·√(d_o·d_i): how far
    the KL has let the mean grow (a mean far below LoRA's factor norms is an adapter held near zero). With a
    point factor W₀ (``lora_offset``) the KL sees only the deviation E[W] − W₀, whose norm is
    ``deviation_norm`` (equal to ``mean_norm`` without W₀)."""
    sampler = get_sampler(model)
    rows = []
    for r in sampler.all_factors():
        shape = r.factor.shape
        mean = r.layer.mean_weights(r.adapter)[r.which]
        rows.append({"module": r.name, "adapter": r.adapter, "factor": r.which,
                     "lambda": float(r.factor.lam()), "sigma_u_mean": float(r.factor.sigma_u().mean()),
                     "mean_norm": float(mean.norm()),
                     "deviation_norm": float((mean if r.factor.offset is None else mean - r.factor.offset).norm()),
                     "prior_norm": shape.prior_scale * (shape.d_out * shape.d_in) ** 0.5,
                     "shape": (shape.d_out, shape.d_in)})
    return rows


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters, and the overhead over plain LoRA of the same rank and targets.

    A Bayesian factor replaces a d_o×d_i LoRA matrix by its variational parameters, so
    ``extra = Σ_factors (numel(factor parameters) − d_o·d_i)``, with LoRA's full d_o for a B whose rows are
    restricted (``output_rows``: then ``extra`` is negative when the restriction saves more than the
    inducing overhead costs); works on the meta device.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = 0
    bayes_factors = 0
    for module in model.modules():
        if isinstance(module, BayesLoraLinear):
            for pair in module.lora_bayes.values():
                for which, factor in pair.items():
                    bayes_factors += 1
                    extra += sum(p.numel() for p in factor.parameters())
                    # plain LoRA's B has every output row, also where this adapter restricts its rows
                    d_out = module.out_features if which == "B" else factor.shape.d_out
                    extra -= d_out * factor.shape.d_in
    return {"trainable": trainable, "plain_lora": trainable - extra, "extra": extra,
            "bayesian_factors": bayes_factors}
