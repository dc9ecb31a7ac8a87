"""Training: the ELBO objective and schedules, checkpoints, and the Accelerate loop."""

from .config import SELECTION_RULES, TrainConfig
from .loop import train
from .objective import RECIPES, beta_at, elbo_loss, paper_kl_weight, paper_loss, paper_lr_factor

__all__ = ["RECIPES", "SELECTION_RULES", "TrainConfig", "beta_at", "elbo_loss", "paper_kl_weight",
           "paper_loss", "paper_lr_factor", "train"]
