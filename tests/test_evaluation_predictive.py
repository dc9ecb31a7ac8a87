"""Predictive averaging and uncertainty decomposition (bayeslora.evaluation.predictive)."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.evaluation.predictive import (
    average_log_probs,
    entropy,
    expected_entropy,
    log_softmax_over_choices,
    mutual_information,
    predictive_entropy,
    summarise_samples,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ragged_mask() -> torch.Tensor:
    """B = 4 items with 4, 3, 2 and 4 valid choices out of C = 4."""
    return torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


def _naive_mean_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax over the valid entries only, by hand, then the mean over samples."""
    s, b, c = logits.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for j in range(b):
        valid = mask[j].nonzero().flatten()
        for i in range(s):
            z = logits[i, j, valid].double()
            e = torch.exp(z - z.max())
            out[j, valid] += e / e.sum() / s
    return out


def test_log_softmax_normalises_over_valid_choices_only() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 100.0], [5.0, 5.0, float("nan"), 7.0], [0.0, 1.0, 2.0, 3.0]])
    lp = log_softmax_over_choices(logits, _ragged_mask())
    assert lp.dtype == torch.float64
    assert torch.isneginf(lp[~_ragged_mask()]).all()  # padding never gets probability, even if NaN or huge
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(lp[2, :2].exp(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(lp[0], torch.full((4,), -math.log(4), dtype=torch.float64))


def test_log_softmax_broadcasts_mask_over_samples_and_keeps_dtype_on_request() -> None:
    logits = torch.randn(3, 4, 4, generator=_gen())
    lp = log_softmax_over_choices(logits, _ragged_mask())
    assert lp.shape == (3, 4, 4) and torch.isneginf(lp[:, ~_ragged_mask()]).all()
    assert log_softmax_over_choices(logits.float(), _ragged_mask(), dtype=None).dtype == torch.float32


def test_log_softmax_rejects_bad_masks() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="boolean"):
        log_softmax_over_choices(logits, torch.ones(2, 3))
    with pytest.raises(ValueError, match="trailing dims"):
        log_softmax_over_choices(logits, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one valid choice"):
        log_softmax_over_choices(logits, torch.tensor([[True, False, False], [False, False, False]]))


def test_average_equals_naive_mean_of_softmax_probabilities() -> None:
    logits = 3 * torch.randn(5, 4, 4, generator=_gen(1))
    mask = _ragged_mask()
    log_p_bar = average_log_probs(log_softmax_over_choices(logits, mask), mask)
    assert log_p_bar.shape == (4, 4) and log_p_bar.dtype == torch.float64
    torch.testing.assert_close(log_p_bar.exp(), _naive_mean_probs(logits, mask), rtol=0, atol=1e-12)
    assert torch.isneginf(log_p_bar[~mask]).all()


def test_average_is_probability_space_not_logit_space() -> None:
    # Two confident samples that disagree: the probability average is uncertain, the logit average is not.
    logits = torch.tensor([[[10.0, 0.0]], [[0.0, 10.0]]])
    p_bar = average_log_probs(log_softmax_over_choices(logits)).exp()
    torch.testing.assert_close(p_bar, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_average_keeps_precision_of_tiny_probabilities() -> None:
    lp = log_softmax_over_choices(torch.tensor([[[0.0, -800.0]], [[0.0, -801.0]]]))  # p ~ e^-800 underflows
    log_p_bar = average_log_probs(lp)
    expected = -800.0 + math.log((1 + math.exp(-1.0)) / 2)
    assert log_p_bar[0, 1].item() == pytest.approx(expected, abs=1e-9)


def test_s1_and_s_gt_1_normalise_identically() -> None:
    # METHOD.md section 9: one reference evaluator normalised only when S > 1. Here one path serves all S.
    logits = torch.randn(1, 4, 4, generator=_gen(2))
    mask = _ragged_mask()
    single = average_log_probs(log_softmax_over_choices(logits, mask), mask)
    repeated = average_log_probs(log_softmax_over_choices(logits.expand(6, 4, 4), mask), mask)
    torch.testing.assert_close(single, repeated, rtol=0, atol=1e-12)
    torch.testing.assert_close(single.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    # Unnormalised scores (e.g. full-vocabulary log-probs of the label tokens, all <= 0) are refused
    # for S = 1 exactly as for S > 1.
    raw = torch.where(mask, torch.log_softmax(logits, -1) - 2.0, torch.tensor(-math.inf)).double()
    for s in (1, 3):
        with pytest.raises(ValueError, match="not normalised"):
            average_log_probs(raw.expand(s, 4, 4), mask)


def test_average_rejects_malformed_inputs() -> None:
    mask = _ragged_mask()
    lp = log_softmax_over_choices(torch.randn(2, 4, 4, generator=_gen(3)), mask)
    with pytest.raises(ValueError, match=r"\(S, B, C\)"):
        average_log_probs(lp[0])
    with pytest.raises(ValueError, match="padded choice"):
        average_log_probs(log_softmax_over_choices(torch.randn(2, 4, 4, generator=_gen(3))), mask)
    bad = lp.clone()
    bad[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        average_log_probs(bad, mask)
    with pytest.raises(ValueError, match="S >= 1"):
        average_log_probs(lp[:0])


def test_entropy_is_masked_and_matches_closed_forms() -> None:
    mask = _ragged_mask()
    uniform = log_softmax_over_choices(torch.zeros(4, 4), mask)
    h = predictive_entropy(uniform)
    torch.testing.assert_close(h, torch.tensor([math.log(4), math.log(3), math.log(2), math.log(4)], dtype=torch.float64))
    one_hot = torch.tensor([[0.0, -math.inf]])
    assert entropy(one_hot).item() == 0.0 and not torch.isnan(entropy(one_hot)).any()


def test_mutual_information_matches_naive_and_is_nonnegative() -> None:
    mask = _ragged_mask()
    logits = 2 * torch.randn(8, 4, 4, generator=_gen(4))
    lp = log_softmax_over_choices(logits, mask)
    p = lp.exp()  # (S, B, C), padded entries exactly 0
    p_bar = p.mean(0)
    h_naive = -(torch.special.xlogy(p_bar, p_bar)).sum(-1)
    e_naive = -(torch.special.xlogy(p, p)).sum(-1).mean(0)
    torch.testing.assert_close(predictive_entropy(average_log_probs(lp, mask)), h_naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_entropy(lp, mask), e_naive, rtol=0, atol=1e-12)
    mi = mutual_information(lp, mask)
    torch.testing.assert_close(mi, h_naive - e_naive, rtol=0, atol=1e-12)
    assert (mi > 1e-3).all()  # samples disagree here, so there is real epistemic uncertainty
    valid = mask.sum(-1).double()
    assert (mi <= torch.log(valid) + 1e-12).all()  # MI <= H[p̄] <= log(#valid choices)


def test_mutual_information_is_zero_when_samples_agree_or_s_is_1() -> None:
    mask = _ragged_mask()
    lp = log_softmax_over_choices(torch.randn(1, 4, 4, generator=_gen(5)), mask)
    assert (mutual_information(lp, mask) == 0).all()
    mi = mutual_information(lp.expand(7, 4, 4), mask)
    assert (mi >= 0).all() and mi.max().item() < 1e-12


def test_summary_is_consistent_with_the_single_functions() -> None:
    mask = _ragged_mask()
    lp = log_softmax_over_choices(torch.randn(3, 4, 4, generator=_gen(6)), mask)
    summary = summarise_samples(lp, mask)
    torch.testing.assert_close(summary.log_probs, average_log_probs(lp, mask))
    torch.testing.assert_close(summary.entropy, summary.expected_entropy + summary.mutual_information)
    assert all(t.dtype == torch.float64 for t in summary)
