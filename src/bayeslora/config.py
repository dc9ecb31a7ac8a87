"""BayesLoraConfig: what a Bayesian-LoRA adapter is, persisted next to its weights.

It *is* a PEFT ``LoraConfig`` (every LoRA field keeps its PEFT meaning: ``r``, ``lora_alpha``,
``target_modules`` with names, a regex or "all-linear", ``None`` for per-architecture defaults, ...)
plus the fields of the Bayesian posterior. In memory its ``peft_type`` is LORA, so PEFT's LoRA
machinery (injection, save, merge, ``disable_adapter``) runs unchanged; on disk ``adapter_config.json``
says ``"peft_type": "BAYESLORA"``, so plain ``PeftModel.from_pretrained`` refuses the folder instead of
silently loading a plain LoRA (load it with :func:`bayeslora.load`, or pass
``config=BayesLoraConfig.from_pretrained(path)``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from peft import LoraConfig

from .atomic import atomic_write

__all__ = ["BayesLoraConfig", "SAVED_PEFT_TYPE", "matches_module"]

SAVED_PEFT_TYPE = "BAYESLORA"
CONFIG_NAME = "adapter_config.json"


def matches_module(patterns: Union[list[str], str], key: str) -> bool:
    """PEFT's matching rule: a string is a regex (full match); a list matches names or dotted suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith(f".{p}") for p in patterns)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class BayesLoraConfig(LoraConfig):
    """A LoRA config whose chosen factors get a Kronecker inducing posterior with a flow."""

    bayesian_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Which targets are Bayesian (names, dotted suffixes or a regex, as target_modules). "
                  "None = every Linear/Conv1D target; [] = plain PEFT LoRA."},
    )
    output_rows: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={"help": "Per Bayesian target (a name or dotted suffix, as target_modules): the only output rows "
                  "its adapter changes, the rest keep the base weights. For an lm_head scored on answer-label "
                  "tokens, the labels' token ids: B becomes labels×r instead of vocabulary×r."},
    )
    inducing_rows: int = field(default=9, metadata={"help": "R: rows of each factor's inducing matrix."})
    inducing_cols: int = field(default=9, metadata={"help": "C: columns of the inducing matrix (flow width)."})
    flow_depth: int = field(default=1, metadata={"help": "Masked autoregressive flow layers; 0 = no flow."})
    flow_hidden: int = field(default=16, metadata={"help": "Hidden width of each flow conditioner."})
    prior_std: float = field(default=1.0, metadata={"help": "Prior std; σ_p = prior_std / sqrt(d_in) (1 = the "
                                                    "LeCun scale of LoRA's own init; the paper: 0.1)."})
    lambda_init: float = field(default=1e-3, metadata={"help": "Initial conditional-noise scale λ."})
    lambda_max: float = field(default=0.03, metadata={"help": (
        "Upper clamp of λ (the paper's 0.03). With the factors centred on W₀ (lora_offset; the CLI's default preset "
        "sets the bound to 10) the ELBO settles λ near 1, below the bound; in the paper's construction an "
        "unclamped λ grew and drove the predictions to chance.")})
    sigma_u_init: float = field(default=1e-3, metadata={"help": "Initial inducing std σ_U."})
    sigma_u_max: float = field(default=1.0, metadata={"help": "Upper clamp of σ_U (1 = the prior's; the paper: 0.1)."})
    prior_at_init: bool = field(
        default=False, metadata={"help": "Centre each factor's prior at its initial posterior mean (T(m) at "
                                 "init) instead of 0, so the KL pulls toward the initial adapter (PEFT's "
                                 "random A, zero B) rather than shrinking A to zero; off = the paper's prior."})
    mean_init_std: Union[float, str] = field(
        default=1.0, metadata={"help": "Std of the inducing mean m at init (m ~ N(0, std²); METHOD.md: 1), or "
                               "'lora': per A factor, the std that starts |E[A]| near PEFT's random A (√(r/3); "
                               "at 1 it is a third of that on a 384-wide input, a tenth at 2048). E[B] starts "
                               "at 0 under PEFT's default init either way."})
    lora_offset: bool = field(
        default=False, metadata={"help": "Centre each factor's posterior and prior on a point-estimated LoRA "
                                 "factor W₀ (A kaiming-uniform as PEFT draws it, B zero; trained as LoRA trains "
                                 "its factors): the inducing posterior models the deviation W − W₀ (its mean "
                                 "starts at 0). Off = METHOD.md's construction, where the inducing mean alone "
                                 "carries E[W]."})
    inducing_diag_init: float = field(default=1e-3, metadata={"help": "Initial D = softplus(δ)."})
    jitter: float = field(default=1e-5, metadata={"help": "Relative jitter added to K's diagonal."})
    inducing_dtype: str = field(
        default="float32", metadata={"help": "Precision of the inducing maths: float32 or float64."}
    )
    mean_samples: int = field(
        default=4096, metadata={"help": "Flow evaluations averaged for the posterior mean (mean mode)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the CPU generator behind the mean-mode average."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()
        # Every BayesLoraConfig dispatches Linear/Conv1D targets to our layer, however PEFT receives
        # it (get_model, PeftModel.from_pretrained(config=...), add_adapter): never a silent plain LoRA.
        from .surgery.inject import register_layers

        register_layers(self)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the configuration cannot work."""
        for name in ("r", "inducing_rows", "inducing_cols", "flow_hidden"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"BayesLoraConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _is_int(self.mean_samples) or self.mean_samples < 2:  # the control variate's β is 0/0 at one
            raise ValueError(f"BayesLoraConfig.mean_samples must be an integer >= 2 (the mean-mode average's "
                             f"control variate needs two draws), got {self.mean_samples!r}")
        if not _is_int(self.flow_depth) or self.flow_depth < 0:
            raise ValueError(f"BayesLoraConfig.flow_depth must be an integer >= 0, got {self.flow_depth!r}")
        if not _is_int(self.seed):
            raise ValueError(f"BayesLoraConfig.seed must be an integer, got {self.seed!r}")
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in (patterns or {}).items():
                if not (_is_int(value) and value > 0 if name == "rank_pattern" else _is_finite_number(value)):
                    raise ValueError(f"BayesLoraConfig.{name}[{key!r}] must be a "
                                     f"{'positive integer' if name == 'rank_pattern' else 'number'}, got {value!r}")
        if not _is_finite_number(self.lora_alpha):
            raise ValueError(f"BayesLoraConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not _is_finite_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"BayesLoraConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.mean_init_std != "lora" and (not _is_finite_number(self.mean_init_std)
                                             or not self.mean_init_std > 0):
            raise ValueError(f"BayesLoraConfig.mean_init_std must be > 0 or 'lora', got {self.mean_init_std!r}")
        for name in ("prior_std", "lambda_init", "lambda_max", "sigma_u_init", "sigma_u_max",
                     "inducing_diag_init", "jitter"):
            value = getattr(self, name)
            if not (_is_finite_number(value) or name in ("lambda_max", "sigma_u_max") and value == math.inf):
                raise ValueError(f"BayesLoraConfig.{name} must be a finite number"
                                 f"{' (or inf: no clamp)' if name.endswith('_max') else ''}, got {value!r}")
            if name != "jitter" and not value > 0:
                raise ValueError(f"BayesLoraConfig.{name} must be > 0, got {value!r}")
        if not self.jitter >= 0:
            raise ValueError(f"BayesLoraConfig.jitter must be >= 0, got {self.jitter!r}")
        if self.lambda_init > self.lambda_max:
            raise ValueError(
                f"BayesLoraConfig.lambda_init ({self.lambda_init}) must not exceed lambda_max ({self.lambda_max})"
            )
        if self.sigma_u_init > self.sigma_u_max:
            raise ValueError(
                f"BayesLoraConfig.sigma_u_init ({self.sigma_u_init}) must not exceed sigma_u_max ({self.sigma_u_max})"
            )
        if self.inducing_dtype not in ("float32", "float64"):
            raise ValueError(
                f"BayesLoraConfig.inducing_dtype must be 'float32' or 'float64', got {self.inducing_dtype!r}"
            )
        if self.bayesian_modules is not None and not isinstance(self.bayesian_modules, str):
            self.bayesian_modules = list(self.bayesian_modules)
        self._validate_output_rows()
        for name in ("lora_offset", "prior_at_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BayesLoraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.lora_offset and (self.prior_at_init or self.mean_init_std != 1.0):
            raise ValueError("BayesLoraConfig.lora_offset centres the posterior and its prior on a LoRA point factor "
                             "W₀ and starts the inducing mean at 0: prior_at_init and mean_init_std (METHOD.md's "
                             "construction) have no effect with it; leave them at False and 1.0")
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                "BayesLoraConfig.init_lora_weights must be True (E[B] = 0: the adapter starts at the base "
                f"model) or False (random inducing means, the paper's init), got {self.init_lora_weights!r}"
            )
        if self.use_dora:
            raise ValueError("BayesLoraConfig.use_dora: DoRA cannot be combined with Bayesian-LoRA")

    def _validate_output_rows(self) -> None:
        if self.output_rows is None:
            return
        if not isinstance(self.output_rows, dict) or not self.output_rows:
            raise ValueError("BayesLoraConfig.output_rows must be None or a non-empty dict {target name: "
                             f"[row, ...]}}, got {self.output_rows!r}")
        clean = {}
        for name, rows in self.output_rows.items():
            if not isinstance(name, str) or isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
                raise ValueError(f"BayesLoraConfig.output_rows[{name!r}] must be a list of row indices, got {rows!r}")
            rows = list(rows)
            if not rows or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in rows):
                raise ValueError(f"BayesLoraConfig.output_rows[{name!r}] must be a non-empty list of integers "
                                 f">= 0, got {rows!r}")
            if len(set(rows)) != len(rows):
                raise ValueError(f"BayesLoraConfig.output_rows[{name!r}] repeats a row: {rows!r}")
            clean[name] = rows
        self.output_rows = clean

    def rows_of(self, key: str) -> Optional[list[int]]:
        """The output rows the adapter of target ``key`` may change (None: all of them)."""
        for name, rows in (self.output_rows or {}).items():
            if matches_module([name], key):
                return rows
        return None

    def is_bayesian(self, key: str) -> bool:
        """Whether the target module called ``key`` carries a Bayesian adapter."""
        if self.bayesian_modules is None:
            return True
        return matches_module(self.bayesian_modules, key)

    # Persistence: the folder must never be mistaken for a plain LoRA adapter.
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` atomically with ``peft_type`` BAYESLORA."""
        os.makedirs(save_directory, exist_ok=True)
        output = self.to_dict()
        output = {k: (sorted(v) if isinstance(v, set) else v) for k, v in output.items()}
        output["peft_type"] = SAVED_PEFT_TYPE
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            output["auto_mapping"] = auto_mapping
        text = json.dumps(output, indent=2, sort_keys=True, default=str).encode("utf-8")
        atomic_write(os.path.join(save_directory, CONFIG_NAME), lambda fh: fh.write(text))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs) -> "BayesLoraConfig":
        """Read a saved Bayesian-LoRA config from a local folder or a Hub repository."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            from huggingface_hub import hf_hub_download  # the Hub path real users have

            config_file = hf_hub_download(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder,
                                          revision=kwargs.get("revision"), token=kwargs.get("token"))
        with open(config_file) as handle:
            data = json.load(handle)
        peft_type = data.pop("peft_type", None)
        if peft_type != SAVED_PEFT_TYPE:
            raise ValueError(
                f"{config_file}: field 'peft_type' is {peft_type!r}, not {SAVED_PEFT_TYPE!r}: "
                "this is not a Bayesian-LoRA adapter"
            )
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{config_file}: ignoring fields unknown to this bayeslora version: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})
