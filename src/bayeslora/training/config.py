"""TrainConfig: everything a training run needs, recorded in the run folder to reproduce it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .objective import RECIPES

__all__ = ["TrainConfig", "SELECTION_RULES"]

SELECTION_RULES = ("last", "best-dev-nll")


@dataclass
class TrainConfig:
    model: str
    task: str
    method: str
    output: str
    data_dir: Optional[str] = None
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    model_kind: Optional[str] = None
    dtype: str = "float32"
    mixed_precision: str = "no"
    method_options: dict[str, Any] = field(default_factory=dict)
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    epochs: int = 3
    max_steps: Optional[int] = None
    batch_size: int = 8
    eval_batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    recipe: str = "elbo"
    kl_warmup_steps: int = 0
    kl_scale: float = 1.0
    train_samples: int = 1
    dev_samples: int = 4
    save_steps: int = 0
    select: str = "best-dev-nll"
    max_length: Optional[int] = None
    max_train_examples: Optional[int] = None
    max_dev_examples: Optional[int] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("r", "lora_alpha", "epochs", "batch_size", "eval_batch_size", "grad_accum",
                    "train_samples", "dev_samples")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if not self.kl_scale >= 0:
            raise ValueError(f"--kl-scale must be >= 0, got {self.kl_scale}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.select not in SELECTION_RULES:
            raise ValueError(f"--select must be one of {SELECTION_RULES}, got {self.select!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    def lora(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": self.target_modules}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training fields {unknown}")
        return cls(**data)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "TrainConfig":
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a bayeslora run folder (no config.json)")
        return cls.from_dict(json.loads(path.read_text())["train"], str(path))
