"""The ELBO and the authors' recipe as plain functions of the step (METHOD.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.training import (
    TrainConfig, beta_at, elbo_loss, paper_kl_weight, paper_loss, paper_lr_factor,
)
from bayeslora.training.loop import _scheduler


def test_paper_schedule_is_zero_based_epochs():
    steps = 25
    w = 0.1 / steps
    assert [paper_kl_weight(e, steps) for e in range(6)] == [0, 0, w, w, w, w]
    assert [paper_lr_factor(e) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_paper_lr_scheduler_follows_epochs():
    cfg = TrainConfig(model="m", task="t", method="lora", output="o", recipe="paper", lr=1.0, epochs=6)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = _scheduler(cfg, opt, steps_per_epoch=3, total_steps=18)
    lrs = []
    for _ in range(18):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1] * 6 + [0.1] * 6 + [0.01] * 6)


def test_beta_is_one_over_n_with_optional_warmup():
    assert beta_at(0, 200) == pytest.approx(1 / 200)
    assert beta_at(4, 200, warmup_steps=10) == pytest.approx(0.5 / 200)
    assert beta_at(50, 200, warmup_steps=10) == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="empty"):
        beta_at(0, 0)


def test_elbo_averages_log_likelihoods_over_draws():
    log_probs = torch.log(torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]]))  # S=2, B=1
    labels = torch.tensor([0])
    parts = elbo_loss(log_probs, labels, torch.tensor(3.0), torch.tensor(5.0), beta=0.5)
    expected_nll = -(math.log(0.9) + math.log(0.5)) / 2  # not -log of the averaged probability
    assert parts.nll.item() == pytest.approx(expected_nll)
    assert parts.loss.item() == pytest.approx(expected_nll + 0.5 * 8.0)


def test_paper_loss_smooths_over_each_items_own_choices_and_rewards_entropy():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.6, 0.4, 0.0]]])  # item 2 has 2 choices
    mask = torch.tensor([[True, True, True], [True, True, False]])
    log_probs = probs.log().masked_fill(~mask, float("-inf"))
    labels = torch.tensor([0, 1])
    parts = paper_loss(log_probs, labels, mask, None, torch.tensor(10.0), kl_weight=0.01)

    def item(p, y):
        ce = -math.log(p[y])
        uniform = -sum(math.log(q) for q in p) / len(p)
        entropy = -sum(q * math.log(q) for q in p)
        return 0.95 * ce + 0.05 * uniform, entropy

    a, b = item([0.7, 0.2, 0.1], 0), item([0.6, 0.4], 1)
    expected = (a[0] + b[0]) / 2 - 0.05 * (a[1] + b[1]) / 2 + 0.01 * 10.0
    assert parts.loss.item() == pytest.approx(expected, rel=1e-6)


def test_elbo_takes_the_papers_regularisers_as_options():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.6, 0.4, 0.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    log_probs = probs.log().masked_fill(~mask, float("-inf"))
    labels = torch.tensor([0, 1])
    kl = torch.tensor(10.0)
    paper = paper_loss(log_probs, labels, mask, None, kl, kl_weight=0.01)
    elbo = elbo_loss(log_probs, labels, None, kl, 0.01, mask, label_smoothing=0.05, entropy_bonus=0.05)
    assert elbo.loss.item() == pytest.approx(paper.loss.item(), rel=1e-6)
    plain = elbo_loss(log_probs, labels, None, kl, 0.01, mask)
    assert plain.loss.item() == pytest.approx(plain.nll.item() + 0.1, rel=1e-6)
    assert plain.loss.item() != pytest.approx(elbo.loss.item(), rel=1e-3)


def test_regularisers_default_to_the_recipes_and_are_recorded():
    from bayeslora.training import resolve

    base = dict(model="m", task="t", method="lora", output="o")
    elbo, paper = resolve(TrainConfig(**base)), resolve(TrainConfig(**base, recipe="paper"))
    assert (elbo.label_smoothing, elbo.entropy_bonus) == (0.0, 0.0)
    assert (paper.label_smoothing, paper.entropy_bonus) == (0.05, 0.05)
    mine = resolve(TrainConfig(**base, label_smoothing=0.1))
    assert (mine.label_smoothing, mine.entropy_bonus) == (0.1, 0.0)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("recipe", "other"), ("select", "best"),
                                          ("train_samples", 0), ("lr", 0.0), ("label_smoothing", 1.0),
                                          ("entropy_bonus", -0.1)])
def test_train_config_rejects_bad_values(field, value):
    kwargs = dict(model="m", task="t", method="lora", output="o")
    kwargs[field] = value
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        TrainConfig(**kwargs)


def test_parameter_groups_take_the_role_multipliers_and_decay_is_not_scaled_up():
    from tiny_models import tiny

    from bayeslora.methods import get_method
    from bayeslora.methods.bayes import parameter_role
    from bayeslora.training import TrainConfig, resolve
    from bayeslora.training.loop import TrainModule, _optimizer

    cfg = resolve(TrainConfig(task="synthetic", method="bayeslora", output="unused", target_modules=["q_proj"],
                              recipe="paper"))  # the paper recipe decays every parameter
    method = get_method(cfg.method, cfg.method_options)
    model = method.build(tiny("llama"), cfg.lora())
    optimizer = _optimizer(cfg, method, TrainModule(method, model, torch.nn.Linear(2, 2)))
    role_of = {id(p): parameter_role(n) for n, p in model.named_parameters()}
    expected_lr = {"mean": 10 * cfg.lr, "geometry": 10 * cfg.lr, "flow": 10 * cfg.lr, "scale": 0.1, None: cfg.lr}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            role = role_of.get(id(p))
            seen.add(role)
            assert group["lr"] == pytest.approx(expected_lr[role]), role
            assert group["lr"] * group["weight_decay"] == pytest.approx(cfg.lr * cfg.weight_decay), role
    assert seen == set(expected_lr)
