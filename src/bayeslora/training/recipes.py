"""Training recipes: each one object holding its loss, its learning-rate schedule, its weight-decay
rule and the option values it brings, so the loop has no per-recipe branches.

* ``elbo``: the per-example ELBO (METHOD.md section 3), β = kl_scale/N_train with an optional linear
  warm-up, linear lr warm-up/decay, no weight decay on variational parameters, no regularisers unless
  asked (``--label-smoothing``, ``--entropy-bonus``).
* ``blob``: BLoB's default (Wang et al. 2024): the NLL plus KL / M with M the steps per epoch (× kl_scale),
  the lr schedule and regularisers of ``elbo``.
* ``paper``: the authors' recipe (label smoothing 0.05, entropy bonus 0.05, KL weight 0.1/steps_per_epoch
  from epoch 2, lr ÷10 at epochs 2 and 4, weight decay 0.027 on everything, lr 7.39e-4, 6 epochs).

A recipe works for every method: a method without a posterior has no KL terms, so ``--method lora
--recipe paper`` is LoRA with the paper's calibrating regularisers, the fair comparison for them.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from .objective import PAPER, LossParts, beta_at, elbo_loss, paper_kl_weight, paper_loss, paper_lr_factor

__all__ = ["RECIPES", "Recipe", "StepContext"]


def _choice_mask(batch: dict[str, Any]):
    """Which choices each item has: ``label_mask`` (label-token scoring) or ``choice_mask`` (pairs)."""
    return batch.get("label_mask", batch.get("choice_mask"))


class StepContext:
    """Where training stands when a loss is computed."""

    def __init__(self, epoch: int, step: int, steps_per_epoch: int, total_steps: int, n_train: int) -> None:
        self.epoch, self.step, self.steps_per_epoch = epoch, step, steps_per_epoch
        self.total_steps, self.n_train = total_steps, n_train


class Recipe:
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    decays_variational: ClassVar[bool] = False  # whether weight decay reaches variational parameters
    ignores: ClassVar[tuple[str, ...]] = ()  # TrainConfig options this recipe never reads (set: an error)

    def loss(self, out: dict[str, Any], batch: dict[str, Any], ctx: StepContext, cfg) -> LossParts:
        raise NotImplementedError

    def lr_factor(self, cfg, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
        raise NotImplementedError


class ElboRecipe(Recipe):
    name = "elbo"
    defaults = {"lr": 1e-3, "weight_decay": 0.0, "kl_scale": 1.0, "label_smoothing": 0.0, "entropy_bonus": 0.0}

    def loss(self, out, batch, ctx, cfg) -> LossParts:
        beta = cfg.kl_scale * beta_at(ctx.step, ctx.n_train, cfg.kl_warmup_steps)
        mask = _choice_mask(batch)
        return elbo_loss(out["log_probs"], batch["labels"], out["kl_flow"], out["kl_cond"], beta, mask,
                         cfg.label_smoothing, cfg.entropy_bonus)

    def lr_factor(self, cfg, steps_per_epoch, total_steps):
        warmup = int(cfg.warmup_ratio * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

        return factor


class BlobRecipe(ElboRecipe):
    name = "blob"
    ignores = ("kl_warmup_steps",)

    def loss(self, out, batch, ctx, cfg) -> LossParts:
        weight = cfg.kl_scale / ctx.steps_per_epoch
        return elbo_loss(out["log_probs"], batch["labels"], out["kl_flow"], out["kl_cond"], weight,
                         _choice_mask(batch), cfg.label_smoothing, cfg.entropy_bonus)


class PaperRecipe(Recipe):
    name = "paper"
    defaults = {"lr": PAPER.lr, "epochs": PAPER.epochs, "weight_decay": PAPER.weight_decay, "kl_scale": 1.0,
                "label_smoothing": PAPER.label_smoothing, "entropy_bonus": PAPER.entropy_bonus}
    decays_variational = True
    ignores = ("warmup_ratio", "kl_warmup_steps")

    def loss(self, out, batch, ctx, cfg) -> LossParts:
        mask = _choice_mask(batch)
        weight = cfg.kl_scale * paper_kl_weight(ctx.epoch, ctx.steps_per_epoch)
        return paper_loss(out["log_probs"], batch["labels"], mask, out["kl_flow"], out["kl_cond"], weight,
                          cfg.label_smoothing, cfg.entropy_bonus)

    def lr_factor(self, cfg, steps_per_epoch, total_steps):
        return lambda step: paper_lr_factor(step // steps_per_epoch)


RECIPES: dict[str, Recipe] = {r.name: r for r in (ElboRecipe(), BlobRecipe(), PaperRecipe())}

