"""From a model and a collated batch to logits over each item's choices (METHOD.md section 7).

One small interface for both model kinds, so every method and metric works for both:

* causal LMs, protocol ``labels`` (the paper's): next-token logits at the last prompt position (prompts
  are left-padded), restricted to the answer-label tokens;
* causal LMs, protocols ``loglik`` and ``loglik-norm`` (the default for causal LMs): the summed (or
  per-token mean) log-probability of each choice's text given a context, one row per choice, as
  lm-evaluation-harness scores multiple choice; the same cross-entropy over choices trains them;
* encoders: a trainable linear head on the mean-pooled final hidden state of each (context, choice)
  pair; the head is trained with the adapter and saved beside it.

``choice_logits`` takes ``num_samples`` S for batched Monte Carlo: the batch is repeated S times
sample-major (S×B rows) so a Bayesian adapter with S draws per forward scores every draw in one pass.
Logits come back as (S, B, C) with ``-inf`` where an item has fewer than C choices; normalise them with
:func:`bayeslora.evaluation.log_softmax_over_choices`, the same way for every method.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .data import CausalChoiceCollator, CausalCollator, EncoderCollator, regroup_pair_scores

__all__ = ["CausalLoglikScorer", "CausalScorer", "ChoiceScorer", "EncoderScorer", "PROTOCOLS", "make_scorer",
           "SCORER_FILE", "default_protocol", "legacy_protocol"]

PROTOCOLS = {"causal": ("loglik", "loglik-norm", "labels"), "encoder": ("pairs",)}  # the first is the default

SCORER_FILE = "scorer.safetensors"
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def _repeat(batch: dict[str, Any], keys: tuple[str, ...], samples: int) -> dict[str, Tensor]:
    return {k: batch[k].repeat(samples, *([1] * (batch[k].dim() - 1))) for k in keys if k in batch}


@functools.lru_cache(maxsize=None)
def _forward_params(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _base_forward_params(model: nn.Module) -> frozenset[str]:
    """Forward arguments of the wrapped model, looked up once per class (this is on the hot path)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_params(type(base))


class ChoiceScorer(nn.Module):
    """Base class: ``choice_logits(model, batch, num_samples)`` -> ((S, B, C) logits, (B, C) mask)."""

    kind: str = ""
    protocol: str = ""

    def make_collator(self, tokenizer: Any, max_length: int | None = None) -> Callable:
        raise NotImplementedError

    def choice_logits(self, model: nn.Module, batch: dict[str, Any], num_samples: int = 1) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def head_positions(self, model: nn.Module, batch: dict[str, Any]) -> int:
        """Positions per row at which a forward computes the LM head's logits (for the memory estimate);
        0 for a scorer that reads no LM head."""
        return 0

    def save(self, directory: str | Path) -> None:
        """Write the scorer's parameters (if any) as safetensors into ``directory``."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if state:
            save_file(state, str(Path(directory) / SCORER_FILE))

    def load(self, directory: str | Path) -> "ChoiceScorer":
        path = Path(directory) / SCORER_FILE
        if any(True for _ in self.parameters()):
            if not path.exists():
                raise FileNotFoundError(f"{path}: the {self.kind} scoring head is missing from the adapter folder")
            self.load_state_dict(load_file(str(path)))
        return self


class CausalScorer(ChoiceScorer):
    """Last-position logits over the answer-label tokens; has no parameters."""

    kind = "causal"
    protocol = "labels"

    def make_collator(self, tokenizer: Any, max_length: int | None = None) -> Callable:
        return CausalCollator(tokenizer, max_length)

    def head_positions(self, model: nn.Module, batch: dict[str, Any]) -> int:
        return 1 if "logits_to_keep" in _base_forward_params(model) else batch["input_ids"].shape[-1]

    def choice_logits(self, model: nn.Module, batch: dict[str, Any], num_samples: int = 1) -> tuple[Tensor, Tensor]:
        inputs = _repeat(batch, ("input_ids", "attention_mask", "position_ids"), num_samples)
        if "logits_to_keep" in _base_forward_params(model):
            inputs["logits_to_keep"] = 1  # the last position only: no (B, L, vocab) tensor
        last = model(**inputs).logits[:, -1, :]
        b, c = batch["label_token_ids"].shape
        last = last.view(num_samples, b, -1).float()
        index = batch["label_token_ids"].unsqueeze(0).expand(num_samples, b, c)
        logits = last.gather(-1, index)
        mask = batch["label_mask"]
        return logits.masked_fill(~mask, float("-inf")), mask


class CausalLoglikScorer(ChoiceScorer):
    """Log-likelihood of each choice's continuation tokens given its context; has no parameters.

    Rows are left-padded, so every continuation ends at the last position and only the last K + 1
    positions' logits are computed (``logits_to_keep``), never a (rows, L, vocab) tensor.
    ``normalise`` divides each sum by the continuation's token count (``loglik-norm``).
    """

    kind = "causal"

    def __init__(self, normalise: bool = False) -> None:
        super().__init__()
        self.normalise = normalise
        self.protocol = "loglik-norm" if normalise else "loglik"

    def make_collator(self, tokenizer: Any, max_length: int | None = None) -> Callable:
        return CausalChoiceCollator(tokenizer, max_length)

    def head_positions(self, model: nn.Module, batch: dict[str, Any]) -> int:
        if "logits_to_keep" in _base_forward_params(model):
            return batch["continuation_mask"].shape[1] + 1  # the K continuation tokens and the one before
        return batch["input_ids"].shape[-1]

    def choice_logits(self, model: nn.Module, batch: dict[str, Any], num_samples: int = 1) -> tuple[Tensor, Tensor]:
        inputs = _repeat(batch, ("input_ids", "attention_mask", "position_ids"), num_samples)
        cont = batch["continuation_mask"]  # (N, K)
        k = cont.shape[1]
        if "logits_to_keep" in _base_forward_params(model):
            inputs["logits_to_keep"] = k + 1
        logits = model(**inputs).logits[:, -(k + 1):-1, :]  # positions predicting the last K tokens
        targets = inputs["input_ids"][:, -k:]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = cont.repeat(num_samples, 1).to(logp.dtype)
        scores = (logp * mask).sum(-1)
        if self.normalise:
            scores = scores / mask.sum(-1)
        return regroup_pair_scores(scores.view(num_samples, -1), batch["n_choices"])


class EncoderScorer(ChoiceScorer):
    """A linear head on the mean-pooled last hidden state of each (context, choice) pair."""

    kind = "encoder"
    protocol = "pairs"

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)

    def make_collator(self, tokenizer: Any, max_length: int | None = None) -> Callable:
        return EncoderCollator(tokenizer, max_length)

    def choice_logits(self, model: nn.Module, batch: dict[str, Any], num_samples: int = 1) -> tuple[Tensor, Tensor]:
        inputs = _repeat(batch, ("input_ids", "attention_mask", "token_type_ids"), num_samples)
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        scores = self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()
        logits, choice_mask = regroup_pair_scores(scores.view(num_samples, -1), batch["n_choices"])
        return logits, choice_mask


def legacy_protocol(kind: str) -> str:
    """The protocol of runs recorded before the scoring option existed: causal LMs were scored by their
    label tokens, encoders by (context, choice) pairs."""
    return "labels" if kind == "causal" else "pairs"


def default_protocol(kind: str) -> str:
    if kind not in PROTOCOLS:
        raise ValueError(f"unknown model kind {kind!r}")
    return PROTOCOLS[kind][0]


def make_scorer(kind: str, model: nn.Module, protocol: str | None = None) -> ChoiceScorer:
    """The scorer for a model kind ("causal" or "encoder") and scoring protocol (None: the kind's
    default, see ``PROTOCOLS``); encoder heads are sized from the config."""
    protocol = protocol or default_protocol(kind)
    if protocol not in PROTOCOLS.get(kind, ()):
        raise ValueError(f"--scoring {protocol!r} does not apply to {kind} models; "
                         f"choose one of {', '.join(PROTOCOLS.get(kind, ()))}")
    if protocol == "labels":
        return CausalScorer()
    if protocol in ("loglik", "loglik-norm"):
        return CausalLoglikScorer(normalise=protocol == "loglik-norm")
    return EncoderScorer(model.config.hidden_size)
