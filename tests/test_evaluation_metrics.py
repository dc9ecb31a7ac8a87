"""ACC / ECE / NLL / Brier (bayeslora.evaluation.metrics): hand-computed cases, torchmetrics parity, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics import CalibrationError
from torchmetrics.classification import MulticlassCalibrationError

from bayeslora.evaluation.metrics import calibration_bins, compute_metrics, reliability_bins
from bayeslora.evaluation.predictive import average_log_probs, log_softmax_over_choices

# Four examples, C = 3; the last two have only 2 valid choices (column 2 is padding).
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # y=0: top 0.70 correct   -> bin 10 [10/15, 11/15)
        [0.20, 0.50, 0.30],  # y=2: top 0.50 wrong     -> bin 7
        [0.90, 0.10, 0.00],  # y=1: top 0.90 wrong     -> bin 13
        [0.35, 0.65, 0.00],  # y=1: top 0.65 correct   -> bin 9
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 2, 1, 1])
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)


def test_hand_computed_four_examples_with_padding() -> None:
    m = compute_metrics(PROBS, LABELS, MASK)
    assert m["n"] == 4
    assert m["acc"] == pytest.approx(0.5, abs=1e-15)
    # every example sits alone in its bin: ECE = mean |correct - confidence|
    assert m["ece"] == pytest.approx((0.30 + 0.50 + 0.90 + 0.35) / 4, abs=1e-15)
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.1) + math.log(0.65)) / 4, abs=1e-15)
    # Brier: .09+.04+.01 | .04+.25+.49 | .81+.81 (padding adds nothing) | .35²+.35²
    assert m["brier"] == pytest.approx((0.14 + 0.78 + 1.62 + 0.245) / 4, abs=1e-15)


def test_log_prob_input_gives_the_same_metrics() -> None:
    from_probs = compute_metrics(PROBS, LABELS, MASK)
    from_logs = compute_metrics(PROBS.log(), LABELS, MASK)  # padding becomes -inf
    assert from_logs.keys() == from_probs.keys()
    for key in from_probs:
        assert from_logs[key] == pytest.approx(from_probs[key], abs=1e-12)
    assert compute_metrics(PROBS.log(), LABELS, MASK, kind="log_probs") == from_logs


def test_examples_sharing_a_bin_are_averaged_within_the_bin() -> None:
    probs = torch.tensor([[0.71, 0.29], [0.72, 0.28], [0.95, 0.05]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])  # bin 10: conf .715, acc .5 ; bin 14: conf .95, acc 1
    m = compute_metrics(probs, labels)
    assert m["ece"] == pytest.approx(2 / 3 * 0.215 + 1 / 3 * 0.05, abs=1e-15)
    bins = reliability_bins(probs, labels)
    assert bins.counts.tolist() == [0] * 10 + [2, 0, 0, 0, 1, 0]
    assert bins.mean_confidence[10].item() == pytest.approx(0.715, abs=1e-15)
    assert bins.accuracy[10].item() == 0.5 and bins.accuracy[14].item() == 1.0
    assert math.isnan(bins.accuracy[0].item())  # empty bins are NaN, not 0
    assert bins.n == 3 and bins.ece == m["ece"]


def test_bin_edges_are_left_closed_and_confidence_one_gets_its_own_bucket() -> None:
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    conf = torch.tensor([edges[9].item(), 1.0, 1.0, 0.999])
    bins = calibration_bins(conf, torch.tensor([True, True, False, True]))
    assert bins.counts[9] == 1 and bins.counts[8] == 0  # k/15 belongs to bin k: [k/15, (k+1)/15)
    assert bins.counts[15] == 2 and bins.accuracy[15] == 0.5  # conf == 1.0, as torchmetrics' bucketize
    assert bins.counts[14] == 1
    assert bins.to_dict()["mean_confidence"][0] is None


def _random_predictions(seed: int, n: int = 10_000, c: int = 4, scale: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    return torch.softmax(logits, -1), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_agrees_with_torchmetrics_on_10k_random_predictions(seed: int) -> None:
    probs, labels = _random_predictions(seed)
    ours = compute_metrics(probs, labels)["ece"]
    functional_like = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(probs, labels)
    task_api = CalibrationError(task="multiclass", num_classes=4, n_bins=15, norm="l1")(probs, labels)
    assert ours == pytest.approx(functional_like.item(), abs=1e-6)
    assert ours == pytest.approx(task_api.item(), abs=1e-6)
    assert ours > 0.01  # a non-trivial value, so agreement means something


def test_ece_agrees_with_torchmetrics_with_saturated_confidences() -> None:
    # Confidences of exactly 1.0 exercise torchmetrics' extra bucket.
    probs, labels = _random_predictions(3, n=2_000, scale=1.0)
    one_hot = torch.nn.functional.one_hot
    probs[:300] = one_hot(labels[:300], 4).double()  # conf 1, correct
    probs[300:600] = one_hot((labels[300:600] + 1) % 4, 4).double()  # conf 1, wrong: gap -0.5
    probs[600:900] = 0.02 + 0.92 * one_hot(labels[600:900], 4).double()  # conf .94 (bin 14), correct: gap > 0
    ours = compute_metrics(probs, labels)["ece"]
    theirs = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(probs, labels).item()
    assert ours == pytest.approx(theirs, abs=1e-6)
    # the extra bucket matters: merging conf == 1 into the last bin would give a different ECE
    bins = reliability_bins(probs, labels)
    c, a, k = bins.counts.double(), bins.accuracy, bins.mean_confidence
    merged_gap = abs((a[14] * c[14] + a[15] * c[15]) - (k[14] * c[14] + k[15] * c[15])) / c.sum()
    separate_gap = (c[14] * (a[14] - k[14]).abs() + c[15] * (a[15] - k[15]).abs()) / c.sum()
    assert separate_gap - merged_gap > 1e-3


def test_averaged_sample_predictive_flows_into_metrics() -> None:
    g = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool).repeat(50, 1)
    log_p_bar = average_log_probs(log_softmax_over_choices(torch.randn(4, 100, 4, generator=g), mask), mask)
    labels = torch.zeros(100, dtype=torch.long)
    m = compute_metrics(log_p_bar, labels, mask)
    assert m["n"] == 100
    assert m["nll"] == pytest.approx(-log_p_bar[:, 0].mean().item(), abs=1e-12)


@pytest.mark.parametrize(
    ("probs", "labels", "mask", "message"),
    [
        ([[0.5, math.nan], [0.5, 0.5]], [0, 1], None, "NaN"),
        ([[0.5, 0.4], [0.5, 0.5]], [0, 1], None, "row 0 does not sum to 1"),
        ([[0.5, 0.5], [1.2, -0.2]], [0, 1], None, "neither probabilities nor log-probabilities"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 2], None, "outside 0..1"),
        ([[0.5, 0.5], [1.0, 0.0]], [0, 1], [[True, True], [True, False]], "padded choice"),
        ([[0.5, 0.5], [0.6, 0.4]], [0, 0], [[True, True], [True, False]], "padded choice has non-zero"),
        ([[0.5, 0.5]], [0, 1], None, "labels shape"),
        ([0.5, 0.5], [0], None, r"\(B, C\)"),
    ],
)
def test_malformed_inputs_raise_instead_of_dropping(probs, labels, mask, message) -> None:
    mask_t = None if mask is None else torch.tensor(mask)
    with pytest.raises(ValueError, match=message):
        compute_metrics(torch.tensor(probs, dtype=torch.float64), torch.tensor(labels), mask_t)


def test_explicit_kind_is_checked() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        compute_metrics(torch.tensor([[1.2, -0.2]]), torch.tensor([0]), kind="probs")
    with pytest.raises(ValueError, match="log-probabilities must be <= 0"):
        compute_metrics(PROBS, LABELS, MASK, kind="log_probs")  # probabilities declared as log-probs


def test_unnormalised_log_probs_and_float_labels_raise() -> None:
    with pytest.raises(ValueError, match="does not sum to 1"):
        compute_metrics(torch.tensor([[-1.0, -2.0]]), torch.tensor([0]))  # raw logits, never normalised
    with pytest.raises(ValueError, match="integer"):
        compute_metrics(PROBS, LABELS.double(), MASK)


def test_zero_gold_probability_gives_infinite_nll_not_a_dropped_row() -> None:
    m = compute_metrics(torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64), torch.tensor([1, 0]))
    assert m["n"] == 2 and math.isinf(m["nll"]) and m["acc"] == 0.5  # tie 0.5/0.5 -> lowest index wins
