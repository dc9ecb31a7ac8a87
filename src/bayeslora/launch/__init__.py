"""Accelerate launch configs shipped with the package, so a multi-process run starts from a file that
the test suite itself launches with::

    accelerate launch --config_file "$(python -c 'from bayeslora.launch import launch_config; print(launch_config("ddp"))')" \
        --num_processes 4 -m bayeslora.cli train ...


Only configs that a test runs are shipped: ``ddp`` (data parallel), ``fsdp`` (FSDP2 full shard of the
frozen base, the adapter whole on every rank: :mod:`bayeslora.training.sharding`), ``zero2`` (DeepSpeed
ZeRO-2, the adapter's gradients and optimizer state partitioned: :mod:`bayeslora.training.zero`) and
``zero3`` (ZeRO-3: ZeRO-2 plus the frozen base partitioned), each tested on CPU with 2 gloo processes
against one process, and a killed run resumed (README, "Scale-out").
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["LAUNCH_CONFIGS", "launch_config"]

LAUNCH_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")


def launch_config(name: str) -> Path:
    """Path of a shipped accelerate config file (``ddp``, ``fsdp``, ``zero2`` or ``zero3``)."""
    if name not in LAUNCH_CONFIGS:
        raise ValueError(f"unknown launch config {name!r}; shipped: {', '.join(LAUNCH_CONFIGS)}")
    return Path(str(resources.files(__package__) / f"{name}.yaml"))
