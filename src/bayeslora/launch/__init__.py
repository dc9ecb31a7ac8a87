"""Accelerate launch configs shipped with the package, so a multi-process run starts from a file that
the test suite itself launches with::

    accelerate launch --config_file "$(python -c 'from bayeslora.launch import launch_config; print(launch_config("ddp"))')" \
        --num_processes 4 -m bayeslora.cli train ...


Only configs that a test runs are shipped: ``ddp`` (data parallel; tested on CPU with 2 gloo processes,
and a killed run resumed). FSDP and DeepSpeed ZeRO-3 shard parameters outside each wrapped block's
forward, while the posterior sampler draws every factor once per forward at the model's root, so they
need the Bayesian factors kept unsharded; that is not built, and Accelerate runs an FSDP config as
plain DDP without a GPU, so no CPU test could check it (README, "Scale-out").
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["LAUNCH_CONFIGS", "launch_config"]

LAUNCH_CONFIGS = ("ddp", "fsdp")


def launch_config(name: str) -> Path:
    """Path of a shipped accelerate config file (``ddp``)."""
    if name not in LAUNCH_CONFIGS:
        raise ValueError(f"unknown launch config {name!r}; shipped: {', '.join(LAUNCH_CONFIGS)}")
    return Path(str(resources.files(__package__) / f"{name}.yaml"))
