"""Laplace-LoRA: K-FAC factors against brute-force GGNs, exact per-item Jacobians through every scorer,
the Kronecker maths against dense solves, evidence tuning, and the predictive's limits."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from tiny_models import VOCAB, tiny
from torch import nn

from bayeslora.calibration.kfac import KfacFactors, LayerTape, choice_hessians, row_items
from bayeslora.calibration.kron_laplace import KronLaplace, probit_logits, sample_logits
from bayeslora.calibration.laplace import covered_layers
from bayeslora.evaluation import log_softmax_over_choices
from bayeslora.scoring import CausalLoglikScorer, CausalScorer, EncoderScorer

@pytest.fixture(autouse=True)
def _float64():
    """The brute-force references below are compared at 1e-10."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class ToyNet(nn.Module):
    """x (B, 3) -> Linear with bias -> tanh -> Linear without bias -> (B, 3) logits: one position per item."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def toy_factors(x, mask):
    net = ToyNet()
    layers = {"first": net.first, "second": net.second}
    batch = {"input_ids": torch.zeros(x.shape[0], 1, dtype=torch.long)}
    with LayerTape(layers) as tape:
        logits = net(x).masked_fill(~mask, float("-inf"))
        pieces = tape.per_item(logits, mask, batch)
    _, hessians = choice_hessians(logits.detach(), mask)
    factors = KfacFactors()
    factors.add(pieces, hessians, mask, torch.zeros(x.shape[0]))
    return net, factors, hessians


def brute_ggn(net, x, mask, layer):
    """Σ_n J_nᵀ H_n J_n over ``layer``'s [W | b] flattened row-major, by torch.func."""
    params = dict(net.named_parameters())
    names = [n for n in params if n.startswith(layer)]

    def logits(flat, xi):
        shapes = [params[n].shape for n in names]
        pieces = torch.split(flat, [math.prod(s) for s in shapes])
        values = {**params, **{n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)}}
        return torch.func.functional_call(net, values, (xi[None],))[0]

    # [W | b] row-major: interleave each output row's weights with its bias
    w = params[f"{layer}.weight"].detach()
    has_bias = f"{layer}.bias" in params
    flat = torch.cat([params[n].detach().flatten() for n in names])
    total = 0
    for n in range(x.shape[0]):
        jac = torch.func.jacrev(logits)(flat, x[n])  # (C, |W| + |b|)
        jw = jac[:, :w.numel()].reshape(-1, *w.shape)
        if has_bias:
            jw = torch.cat([jw, jac[:, w.numel():, None]], -1)
        jac = jw.reshape(jac.shape[0], -1)[mask[n]]
        p = torch.softmax(logits(flat, x[n])[mask[n]], -1)
        total = total + jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total


@pytest.mark.parametrize("layer", ["first", "second"])
def test_kfac_is_the_exact_ggn_for_one_item_with_one_position(layer):
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, True, False]])  # a padded choice too
    net, factors, _ = toy_factors(x, mask)
    a, g = factors.factors()[layer]
    assert torch.allclose(torch.kron(g, a), brute_ggn(net, x, mask, layer), atol=1e-10, rtol=1e-8)
    assert factors.choices[layer]["variant"] == "inputs"  # one row per item: the input is shared
    assert factors.choices[layer]["trace_scale"] == pytest.approx(1.0, rel=1e-10)


def test_kfac_factors_sum_the_output_ggn_average_the_inputs_and_match_the_exact_trace():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[1, 2] = False
    net, factors, hessians = toy_factors(x, mask)
    sums = factors.sums["second"]
    hidden = torch.tanh(net.first(x)).detach()
    assert torch.allclose(sums["inputs_a"], hidden.T @ hidden, atol=1e-12)
    # the second layer's output is the logits: its output Jacobian is the identity
    assert torch.allclose(sums["inputs_g"], hessians.sum(0), atol=1e-12)
    x1 = torch.cat([x, torch.ones(5, 1)], 1)
    assert torch.allclose(factors.sums["first"]["inputs_a"], x1.T @ x1, atol=1e-12)
    for layer, (a, g) in factors.factors().items():
        exact = brute_ggn(net, x, mask, layer)
        assert float(torch.trace(a) * torch.trace(g)) == pytest.approx(float(torch.trace(exact)), rel=1e-9)


# ------------------------------------------------------------------ exact Jacobians through the scorers

def lora_model(family, targets):
    model = peft.get_peft_model(tiny(family, dtype=torch.float64), peft.LoraConfig(r=2, target_modules=targets))
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def left_padded(rows, length, gen):
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    attention = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        attention[r, :r % 3] = 0
        ids[r, :r % 3] = 0
    return ids, attention


def scored_batch(kind):
    """(model, scorer, batch) for pair scoring, choice log-likelihood, and label tokens (GPT-2 Conv1D)."""
    gen = torch.Generator().manual_seed(4)
    n_choices = torch.tensor([3, 2, 3])
    rows = int(n_choices.sum())
    if kind == "encoder-pairs":
        model = lora_model("bert", ["query", "value"])
        ids = torch.randint(3, VOCAB, (rows, 7), generator=gen)
        attention = torch.ones(rows, 7, dtype=torch.long)
        for r in range(rows):
            attention[r, 7 - r % 3:] = 0  # right padding
        batch = {"input_ids": ids, "attention_mask": attention, "token_type_ids": torch.zeros_like(ids),
                 "n_choices": n_choices}
        scorer = EncoderScorer(32).double()
    elif kind == "llama-loglik":
        model = lora_model("llama", ["q_proj", "v_proj"])
        ids, attention = left_padded(rows, 7, gen)
        cont = torch.ones(rows, 2, dtype=torch.bool)
        cont[::2, 0] = False
        batch = {"input_ids": ids, "attention_mask": attention, "continuation_mask": cont, "n_choices": n_choices}
        scorer = CausalLoglikScorer()
    else:
        model = lora_model("gpt2", ["c_attn"])
        ids, attention = left_padded(3, 6, gen)
        batch = {"input_ids": ids, "attention_mask": attention,
                 "label_token_ids": torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7]]),
                 "label_mask": torch.tensor([[True, True, True], [True, True, False], [True, True, True]]),
                 "n_choices": torch.tensor([3, 2, 3])}  # as CausalCollator gives it: still one row per item
        scorer = CausalScorer()
    return model, scorer, batch


@pytest.mark.parametrize("kind", ["encoder-pairs", "llama-loglik", "gpt2-labels"])
def test_per_item_jacobians_are_exact_through_every_scorer(kind):
    model, scorer, batch = scored_batch(kind)
    layers, skipped = covered_layers(model, scorer)
    assert not skipped and any("lora_A" in n for n in layers) and any("lora_B" in n for n in layers)
    assert ("scorer.head" in layers) == (kind == "encoder-pairs")
    checked = list(layers.items())[:3] + list(layers.items())[-2:]
    expected = {}
    with LayerTape(layers) as tape:
        logits, mask = scorer.choice_logits(model, batch, 1)
        for name, layer in checked:  # the reference first: per_item frees the graph
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            for n, c in [(0, 0), (1, 1), (2, 2)]:
                grads = torch.autograd.grad(logits[0, n, c], params, retain_graph=True)
                expected[name, n, c] = grads[0] if len(grads) == 1 else torch.cat([grads[0], grads[1][:, None]], 1)
        pieces = tape.per_item(logits[0], mask, batch, jacobians=True)
    for name, _ in checked:
        for n, c in [(0, 0), (1, 1), (2, 2)]:
            got = pieces[name]["jac"][n, c]
            assert torch.allclose(got, expected[name, n, c], atol=1e-10, rtol=1e-7), (name, n, c)
        assert torch.equal(pieces[name]["jac"][1, 2], torch.zeros_like(pieces[name]["jac"][1, 2]))  # padded
    name = checked[0][0]  # K-FAC-reduce's input: the mean over the item's real positions of all its rows
    a, weights = tape.records[name].inputs[0], batch["attention_mask"].double()
    items, _ = row_items(batch, 3, a.shape[0])
    for n in range(3):
        rows = items == n
        mean = (a[rows] * weights[rows, :, None]).sum((0, 1)) / weights[rows].sum()
        assert torch.allclose(pieces[name]["a"][n], mean, atol=1e-12)


def test_the_encoder_head_gets_its_exact_ggn_and_every_layer_its_exact_trace():
    """The head's output gradient is 1 for every choice: the shared-gradient variant is exact for it."""
    model, scorer, batch = scored_batch("encoder-pairs")
    layers, _ = covered_layers(model, scorer)
    with LayerTape(layers) as tape:
        logits, mask = scorer.choice_logits(model, batch, 1)
        pieces = tape.per_item(logits[0], mask, batch)
    _, hessians = choice_hessians(logits[0].detach(), mask)
    factors = KfacFactors()
    factors.add(pieces, hessians, mask, torch.zeros(3))
    found = factors.factors()
    jac = pieces["scorer.head"]["jac"][:, :, 0, :]
    exact = torch.einsum("nci,ncd,ndj->ij", jac, hessians, jac)
    a, g = found["scorer.head"]
    assert factors.choices["scorer.head"]["variant"] == "gradients"
    assert torch.allclose(torch.kron(g, a), exact, atol=1e-10, rtol=1e-8)
    for name, (a, g) in found.items():
        full = torch.einsum("ncoi,ncd,ndoi->", pieces[name]["jac"], hessians, pieces[name]["jac"])
        assert float(torch.trace(a) * torch.trace(g)) == pytest.approx(float(full), rel=1e-9)


def test_a_layer_wider_than_the_cap_is_left_at_its_value(monkeypatch):
    import bayeslora.calibration.laplace as laplace

    model, scorer, _ = scored_batch("gpt2-labels")
    monkeypatch.setattr(laplace, "LAPLACE_MAX_WIDTH", 64)  # c_attn's B is 96 wide
    layers, skipped = covered_layers(model, scorer)
    assert skipped and all("lora_B" in n for n in skipped) and all("lora_A" in n for n in layers)


# ------------------------------------------------------------------ the Kronecker posterior

def random_posterior(seed=5, shapes=((3, 4), (5, 2))):
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for i, (out, inp) in enumerate(shapes):
        a = torch.randn(inp, inp + 2, generator=gen)
        g = torch.randn(out, out + 1, generator=gen)
        factors[f"layer{i}"] = (a @ a.T / inp, g @ g.T)
    return KronLaplace.from_factors(factors, theta_sq=3.7, log_likelihood=-12.0), factors


def dense_precision(factors, delta):
    blocks = [torch.kron(g, a) for a, g in factors.values()]
    return torch.block_diag(*blocks) + delta * torch.eye(sum(b.shape[0] for b in blocks))


def test_the_logit_covariance_equals_a_dense_cholesky_solve():
    posterior, factors = random_posterior()
    gen = torch.Generator().manual_seed(6)
    jac = {n: torch.randn(2, 3, g.shape[0], a.shape[0], generator=gen) for n, (a, g) in factors.items()}
    for delta in (0.1, 2.0):
        p = dense_precision(factors, delta)
        flat = torch.cat([jac[n].reshape(2, 3, -1) for n in factors], -1)  # row-major [W] per layer
        chol = torch.linalg.cholesky(p)
        solved = torch.cholesky_solve(flat.reshape(6, -1).T, chol).T.reshape(2, 3, -1)
        dense = flat @ solved.transpose(1, 2)
        assert torch.allclose(posterior.logit_covariance(jac, delta), dense, atol=1e-10, rtol=1e-8)


def test_the_evidence_matches_its_dense_formula_and_tuning_climbs_it_to_the_maximum():
    posterior, factors = random_posterior()
    d = posterior.n_params
    for delta in (0.05, 1.0, 20.0):
        logdet = torch.linalg.slogdet(dense_precision(factors, delta))[1]
        dense = -12.0 - 0.5 * delta * 3.7 - 0.5 * logdet + 0.5 * d * math.log(delta)
        assert posterior.log_marginal_likelihood(delta) == pytest.approx(float(dense), rel=1e-10)
    path = posterior.tune_prior_precision(start=1e3)
    values = [v for _, v in path]
    assert len(path) > 2 and all(b >= a for a, b in zip(values, values[1:])) and values[-1] > values[0] + 1
    best = posterior.prior_precision
    assert best == path[-1][0]
    for nearby in (best * 1.01, best / 1.01):
        assert posterior.log_marginal_likelihood(nearby) < values[-1]


def test_the_predictive_variance_shrinks_as_the_prior_precision_grows_and_vanishes_in_the_limit():
    posterior, factors = random_posterior()
    gen = torch.Generator().manual_seed(7)
    jac = {n: torch.randn(4, 3, g.shape[0], a.shape[0], generator=gen) for n, (a, g) in factors.items()}
    traces = [float(torch.diagonal(posterior.logit_covariance(jac, d), dim1=-2, dim2=-1).sum())
              for d in (0.01, 0.1, 1.0, 10.0, 100.0)]
    assert all(b < a for a, b in zip(traces, traces[1:]))
    mu = torch.randn(4, 3, generator=gen)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[2, 2] = False
    wide = log_softmax_over_choices(probit_logits(mu, posterior.logit_covariance(jac, 0.01), mask), mask)
    tight = log_softmax_over_choices(probit_logits(mu, posterior.logit_covariance(jac, 1e8), mask), mask)
    lora = log_softmax_over_choices(mu, mask)
    assert torch.allclose(tight.exp(), lora.exp(), atol=1e-6)
    assert (wide.exp().max(-1).values < lora.exp().max(-1).values).all()  # wider posterior, less confident
    assert torch.isneginf(tight[2, 2]) and torch.isneginf(wide[2, 2])


def test_logit_draws_are_seeded_and_follow_the_covariance():
    mu = torch.tensor([[1.0, 0.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    cov = torch.tensor([[[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]]])
    seeds = list(range(4000))
    draws = sample_logits(mu, cov, mask, seeds)
    assert torch.equal(draws[:3], sample_logits(mu, cov, mask, seeds[:3]))
    centre = torch.eye(3) - 1 / 3
    centred = (draws[:, 0] - draws[:, 0].mean(-1, keepdim=True))
    assert torch.allclose(centred.mean(0), centre @ mu[0], atol=0.06)
    assert torch.allclose(torch.cov(centred.T), centre @ cov[0] @ centre, atol=0.12)


def test_saved_factors_load_back_and_bad_ones_are_refused():
    posterior, _ = random_posterior()
    back = KronLaplace.from_tensors(posterior.tensors(), 3.7, -12.0, 2.0, "f.safetensors")
    assert back.prior_precision == 2.0 and set(back.eig_a) == set(posterior.eig_a)
    assert back.log_marginal_likelihood(1.0) == pytest.approx(posterior.log_marginal_likelihood(1.0), rel=1e-6)
    broken = {k: v for k, v in posterior.tensors().items() if not k.endswith("::vec_g")}
    with pytest.raises(ValueError, match="f.safetensors: layer .* lacks"):
        KronLaplace.from_tensors(broken, 3.7, -12.0, 2.0, "f.safetensors")
