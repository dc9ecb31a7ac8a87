"""Deterministic seed mixing, shared by the sampler, the trainer and the evaluator."""

from __future__ import annotations

__all__ = ["mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, step, draw), stable across processes and runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF
