"""The training-memory estimate: each part is what it says for a known model, activations scale with the
rows and tokens, and every run prints it and records it in config.json."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_encoder, tiny

import bayeslora
from bayeslora.memory_estimate import (ACTIVATION_VALUES_PER_TOKEN_HIDDEN, DRAW_TENSORS_PER_FACTOR, LOGITS_TENSORS,
                                       estimate_training_memory)


def model():
    return bayeslora.get_model(tiny("llama", 0), bayeslora.BayesLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"]))


def test_each_part_counts_what_it_names():
    m = model()
    est = estimate_training_memory(m, rows=2, seq=8)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert est.base == 4 * frozen + buffers and est.trainable == est.gradients == 4 * trainable
    assert est.optimizer == 2 * 4 * trainable
    factors = [f for mod in m.modules() if isinstance(mod, bayeslora.BayesLoraLinear)
               for pair in mod.lora_bayes.values() for f in pair.values()]
    assert factors and est.draws == sum(DRAW_TENSORS_PER_FACTOR * f.shape.d_out * f.shape.d_in * 4 for f in factors)
    config = m.config
    scores = config.num_attention_heads * 2 * 8 * 8 if config._attn_implementation == "eager" else 0
    assert est.activations == config.num_hidden_layers * (ACTIVATION_VALUES_PER_TOKEN_HIDDEN * 16 * config.hidden_size
                                                          + scores) * 4
    assert est.total == sum(est.to_dict()[k] for k in ("base", "trainable", "gradients", "optimizer", "draws",
                                                       "activations"))


def test_activations_scale_with_rows_tokens_and_logits():
    m = model()
    one = estimate_training_memory(m, rows=1, seq=8).activations
    assert estimate_training_memory(m, rows=3, seq=8).activations == 3 * one  # rows enter every term linearly
    full = estimate_training_memory(m, rows=1, seq=8, full_logits=True).activations
    assert full - one == LOGITS_TENSORS * 8 * m.config.vocab_size * 4
    # a scorer reading the head at 3 positions of each row pays for those 3 only
    three = estimate_training_memory(m, rows=2, seq=8, head_positions=3).activations
    assert three - 2 * one == LOGITS_TENSORS * 2 * 3 * m.config.vocab_size * 4
    assert estimate_training_memory(m, rows=1, seq=8, activation_bytes=2).activations < one
    assert estimate_training_memory(m, rows=1, seq=8, train_samples=2).draws == 2 * estimate_training_memory(
        m, rows=1, seq=8).draws


def test_checkpointing_keeps_each_block_input_and_one_block():
    m = model()
    one = estimate_training_memory(m, rows=1, seq=8).activations
    layers, hidden = m.config.num_hidden_layers, m.config.hidden_size
    per_layer = one // layers
    checkpointed = estimate_training_memory(m, rows=1, seq=8, checkpointing=True).activations
    assert checkpointed == layers * 8 * hidden * 4 + per_layer
    assert checkpointed < one


def test_a_run_prints_and_records_its_estimate(tmp_path, capsys):
    from bayeslora.layout import RunFolder
    from bayeslora.training import TrainConfig, train

    encoder = save_tiny_encoder(tmp_path / "encoder")
    train(TrainConfig(model=encoder, task="synthetic", method="bayeslora", output=str(tmp_path / "run"),
                      max_steps=1, batch_size=4, max_train_examples=8, max_val_examples=4, progress=False,
                      target_modules=["query", "value"], max_length=32))
    printed = capsys.readouterr().out
    assert "memory estimate" in printed and "16 rows" in printed  # batch 4 × 4 choices × 1 draw
    recorded = RunFolder(tmp_path / "run").read_config()["memory_estimate_bytes"]
    assert recorded["total"] > recorded["base"] > 0


@pytest.mark.parametrize("shards", [2, 4])
def test_a_sharded_base_holds_its_shard_plus_the_units_it_gathers(shards):
    """FSDP: 1/N of the frozen base, plus whole copies of the model's own unit and two blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2))
    m = bayeslora.get_model(base, bayeslora.BayesLoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            bayesian_modules=["q_proj"]))
    whole = estimate_training_memory(m, rows=2, seq=8)
    sharded = estimate_training_memory(m, rows=2, seq=8, base_shards=shards)
    names = set(m._no_split_modules)
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters() if not p.requires_grad)
              for b in m.modules() if type(b).__name__ in names]
    assert len(blocks) == 6
    outside = whole.base - sum(blocks)
    assert sharded.base == whole.base // shards + (outside + 2 * max(blocks)) * (shards - 1) // shards
    assert sharded.base < whole.base and sharded.trainable == whole.trainable  # adapters stay whole
    assert sharded.to_dict()["total"] == whole.total - whole.base + sharded.base


@pytest.mark.parametrize("shards", [2, 3])
def test_zero2_partitions_the_adam_moments_and_its_float32_masters(shards):
    """DeepSpeed ZeRO-2: each rank holds 1/N of AdamW's two moments plus 1/N float32 master weights; the
    base, the adapter weights and (counted whole) the gradients do not change."""
    m = model()
    whole = estimate_training_memory(m, rows=2, seq=8)
    zero = estimate_training_memory(m, rows=2, seq=8, optimizer_shards=shards)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert zero.optimizer == (2 * 4 * trainable + 4 * trainable) // shards
    assert (zero.base, zero.trainable, zero.gradients) == (whole.base, whole.trainable, whole.gradients)
