"""Training: the ELBO objective and schedules, checkpoints, and the Accelerate loop."""

from .config import SELECTION_RULES, TrainConfig, add_train_arguments, config_from_args, resolve
from .loop import fit_and_val_sets, train
from .recipes import RECIPES, Recipe
from .objective import beta_at, elbo_loss, paper_kl_weight, paper_loss, paper_lr_factor

__all__ = ["RECIPES", "Recipe", "SELECTION_RULES", "TrainConfig", "add_train_arguments", "config_from_args", "fit_and_val_sets", "resolve", "beta_at", "elbo_loss", "paper_kl_weight",
           "paper_loss", "paper_lr_factor", "train"]
