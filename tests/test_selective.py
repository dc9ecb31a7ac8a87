"""Selective prediction and OOD detection scores against hand-computed cases and scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.evaluation.selective import auroc, risk_coverage


def test_risk_coverage_by_hand():
    certainty = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, False])
    curve = risk_coverage(certainty, correct)
    assert curve.risk.tolist() == pytest.approx([0.0, 1 / 2, 1 / 3, 2 / 4])
    assert curve.aurc == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert curve.accuracy_at(0.5) == pytest.approx(0.5) and curve.accuracy_at(0.25) == 1.0


def test_ties_are_a_random_order_and_a_constant_score_ranks_nothing():
    correct = torch.tensor([True, False, True, True, False])
    flat = risk_coverage(torch.full((5,), 0.5), correct)
    assert torch.allclose(flat.risk, torch.full((5,), 0.4, dtype=torch.float64)) and flat.aurc == pytest.approx(0.4)
    # a tie between one right and one wrong answer at the top: half an error expected at k = 1
    tied = risk_coverage(torch.tensor([0.9, 0.9, 0.1]), torch.tensor([True, False, True]))
    assert tied.risk.tolist() == pytest.approx([0.5, 0.5, 1 / 3])


def test_a_perfect_ranking_reaches_its_closed_form_and_beats_a_reversed_one():
    n, accuracy = 10000, 0.7
    correct = torch.arange(n) < accuracy * n
    certainty = torch.linspace(1, 0, n)
    best, worst = risk_coverage(certainty, correct), risk_coverage(-certainty, correct)
    assert best.aurc == pytest.approx((1 - accuracy) + accuracy * math.log(accuracy), abs=1e-3)
    assert worst.aurc > 1 - accuracy > best.aurc


def test_auroc_by_hand_and_with_ties():
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.5])) == 0.5
    assert auroc(torch.tensor([0.1, 0.5]), torch.tensor([0.5, 0.9])) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_auroc_and_aurc_agree_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 20, (300,), generator=gen).double()  # many ties
    b = torch.randint(5, 25, (200,), generator=gen).double()
    labels = torch.cat([torch.zeros(300), torch.ones(200)])
    expected = metrics.roc_auc_score(labels.numpy(), torch.cat([a, b]).numpy())
    assert auroc(a, b) == pytest.approx(expected, abs=1e-12)
    correct = torch.rand(500, generator=gen) < 0.6
    curve = risk_coverage(torch.rand(500, generator=gen), correct)
    assert float(curve.risk[-1]) == pytest.approx(1 - correct.double().mean().item())


def test_tied_risks_are_the_average_over_every_order_within_the_ties():
    import itertools

    certainty = torch.tensor([0.9, 0.5, 0.9, 0.5, 0.9, 0.1])
    correct = torch.tensor([True, False, False, True, True, False])
    groups = [[0, 2, 4], [1, 3], [5]]
    risks = []
    for first in itertools.permutations(groups[0]):
        for second in itertools.permutations(groups[1]):
            order = [*first, *second, 5]
            errors = torch.cumsum((~correct[order]).double(), 0)
            risks.append(errors / torch.arange(1, 7))
    expected = torch.stack(risks).mean(0)
    assert torch.allclose(risk_coverage(certainty, correct).risk, expected, atol=1e-12)
