"""What a training run will hold in memory, estimated before it starts, so a run that cannot fit fails
in seconds instead of after the model is loaded on every rank.

The parts (bytes): the frozen base in its own dtype; the trainable parameters, their gradients and
AdamW's two moment tensors (float32 for float32 parameters); the posterior draws a Bayesian step keeps
for its backward (the drawn weight and the noise it came from, per factor and training draw); and the
activations the backward needs. Activations follow Korthikanti et al. (2022): a transformer layer keeps
about 17 values per token and hidden unit (their 34 bytes at 16 bits) with a fused attention kernel,
plus heads × tokens² attention probabilities where attention is materialised (``eager``); when the loss
reads the language-model head, four float32 tensors of (rows × positions read) × vocabulary: the
logits, their log-softmax, and the gradients of both (the positions are every token for a language-modelling
loss, the last one for answer-label scoring, the continuation for choice log-likelihood) (an adapted head adds its delta to the logits). Each row is one sequence the model runs: an encoder scoring (context, choice)
pairs and a causal LM scoring choice log-likelihoods run one row per choice.

Under FSDP (``base_shards`` = processes) each process stores 1/N of the frozen base and gathers whole
copies of what is running: the model's own unit (embeddings, head; gathered for the whole forward and
backward) and up to two blocks (the current one and the prefetched next). ZeRO-3 is estimated the same
way, not bounded: it gathers module by module, but keeps whole every tensor under its persistence
threshold (DeepSpeed's default 1e5 elements), prefetches, and holds up to ``stage3_max_live_parameters``
gathered. Under DeepSpeed ZeRO-2 and ZeRO-3
(``optimizer_shards`` = processes) each holds 1/N of the AdamW moments plus 1/N float32 master weights;
gradients are counted whole (the backward makes them whole before they are reduced into partitions).

It is an estimate, checked against measured peaks by ``benchmarks/memory_estimate.py`` (README,
Performance): allocator caching and framework overhead come on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["MemoryEstimate", "estimate_training_memory", "numel"]

ACTIVATION_VALUES_PER_TOKEN_HIDDEN = 17  # per layer, fused attention (Korthikanti et al. 2022: 34 bytes / 2)
LOGITS_TENSORS = 4  # tokens × vocabulary float32 tensors a full-position loss keeps (module docstring)
DRAW_TENSORS_PER_FACTOR = 3  # the drawn weight, the e1 noise and the projected term, each d_o × d_i


@dataclass(frozen=True)
class MemoryEstimate:
    base: int
    trainable: int
    gradients: int
    optimizer: int
    draws: int
    activations: int

    @property
    def total(self) -> int:
        return self.base + self.trainable + self.gradients + self.optimizer + self.draws + self.activations

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        def mb(v: int) -> str:
            return f"{v / 2**20:,.0f} MB"

        return (f"memory estimate {mb(self.total)}: base {mb(self.base)}, trainable {mb(self.trainable)}, "
                f"gradients {mb(self.gradients)}, AdamW state {mb(self.optimizer)}, posterior draws "
                f"{mb(self.draws)}, activations {mb(self.activations)}")


def _config_value(config, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also one that DeepSpeed ZeRO-3 has partitioned (its ``ds_numel``)."""
    return getattr(p, "ds_numel", None) or p.numel()


def estimate_training_memory(model: nn.Module, *, rows: int, seq: int, train_samples: int = 1,
                             activation_bytes: Optional[int] = None, full_logits: bool = False,
                             checkpointing: bool = False, head_positions: int = 0,
                             base_shards: int = 1, optimizer_shards: int = 1) -> MemoryEstimate:
    """Estimate the peak of one training step of ``model`` (a PEFT-wrapped transformers model).

    Args:
        rows: sequences per forward (batch × choices where each choice is its own row, × the training
            draws where the scorer repeats the batch per draw, as ours do).
        seq: tokens per row (after truncation).
        train_samples: posterior draws per step (ELBO particles).
        activation_bytes: bytes per activation value (default: the base's parameter dtype; 2 under
            bf16 autocast is the caller's to pass).
        full_logits: the loss reads the LM head at every position (a language-modelling loss); our
            multiple-choice scorers read it at a few positions and leave this off.
        head_positions: positions per row at which the scorer reads the LM head (the last one for
            answer-label scoring, the continuation's K + 1 for choice log-likelihood; 0 for encoders):
            each adds the same four tokens × vocabulary float32 tensors as ``full_logits`` (which is
            ``head_positions = seq``).
        checkpointing: gradient checkpointing per block: each block keeps only its input (tokens ×
            hidden values) and one block at a time holds its full activations during the backward.
        base_shards: processes the frozen base is sharded over (FSDP, ZeRO-3; module docstring), 1 otherwise.
        optimizer_shards: processes the trainable parameters' gradients and AdamW state are partitioned
            over (DeepSpeed ZeRO-2 and 3, which also keep a float32 master copy of its partition), 1 otherwise.
    """
    from .surgery.layer import BayesLoraLinear

    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = sum(numel(p) * p.element_size() for p in frozen) + sum(b.numel() * b.element_size()
                                                                   for b in model.buffers())
    if base_shards > 1:
        base = _sharded_base(model, base, base_shards)
    train_bytes = sum(numel(p) * p.element_size() for p in trainable)
    optimizer = sum(2 * numel(p) * max(4, p.element_size()) for p in trainable)
    if optimizer_shards > 1:  # ZeRO: 1/N of the moments plus 1/N float32 master weights
        optimizer = (optimizer + sum(4 * numel(p) for p in trainable)) // optimizer_shards
    draws = 0
    for module in model.modules():
        if isinstance(module, BayesLoraLinear):
            for adapter, pair in module.lora_bayes.items():
                size = module.bayes_settings[adapter]["dtype"].itemsize  # float32 or float64 inducing maths
                for factor in pair.values():
                    draws += DRAW_TENSORS_PER_FACTOR * factor.shape.d_out * factor.shape.d_in * size * train_samples
    config = getattr(model, "config", None)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model") or 0
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    heads = _config_value(config, "num_attention_heads", "n_head") or 0
    vocab = _config_value(config, "vocab_size") or 0
    value_bytes = activation_bytes or (frozen[0].element_size() if frozen else 4)
    tokens = rows * seq
    per_layer = ACTIVATION_VALUES_PER_TOKEN_HIDDEN * tokens * hidden
    if getattr(config, "_attn_implementation", None) == "eager":
        per_layer += heads * rows * seq * seq
    if checkpointing and layers:
        activations = (layers * tokens * hidden + per_layer) * value_bytes
    else:
        activations = layers * per_layer * value_bytes
    positions = seq if full_logits else min(head_positions, seq)
    activations += LOGITS_TENSORS * rows * positions * vocab * 4
    return MemoryEstimate(base=base, trainable=train_bytes, gradients=train_bytes, optimizer=optimizer,
                          draws=draws, activations=activations)


def _sharded_base(model: nn.Module, whole: int, shards: int) -> int:
    """Bytes of the frozen base one FSDP process holds at its peak (module docstring)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [sum(numel(p) * p.element_size() for p in m.parameters() if not p.requires_grad)
              for m in model.modules() if type(m).__name__ in names]
    outside = whole - sum(blocks)
    gathered = (outside + 2 * max(blocks, default=0)) * (shards - 1) // shards  # beyond its own shard
    return whole // shards + gathered
