"""The LoRA-based baselines: MAP's prior and MC-dropout's seeded test-time samples."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny

from bayeslora.methods import get_method
from bayeslora.methods.map import MAP_WEIGHT_DECAY
from bayeslora.methods.mcdropout import MCDROPOUT_RATE, lora_dropouts
from bayeslora.scoring import make_scorer
from bayeslora.training import TrainConfig, resolve

LORA = {"r": 4, "alpha": 8, "dropout": 0.3, "target_modules": ["q_proj", "v_proj"]}


def resolved(method, **given):
    return resolve(TrainConfig(model="m", task="jsonl", method=method, output="o", **given))


def test_map_is_lora_with_weight_decay_and_mcdropout_brings_its_dropout():
    assert resolved("map").weight_decay == MAP_WEIGHT_DECAY > 0
    assert resolved("map", weight_decay=0.0).weight_decay == 0.0
    assert resolved("lora").weight_decay == 0.0 and resolved("lora").lora_dropout == 0.0
    assert resolved("mcdropout").lora_dropout == MCDROPOUT_RATE
    assert resolved("mcdropout", lora_dropout=0.2).lora_dropout == 0.2
    with pytest.raises(ValueError, match="lora-dropout > 0"):
        get_method("mcdropout").build(tiny("llama"), {**LORA, "dropout": 0.0})


def label_batch(b=3, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (b, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "label_token_ids": torch.tensor([[5, 6, 7]] * b), "label_mask": torch.ones(b, 3, dtype=torch.bool),
            "labels": torch.zeros(b, dtype=torch.long)}


@pytest.fixture
def mcdropout_model():
    torch.manual_seed(0)
    method = get_method("mcdropout")
    model = method.build(tiny("llama"), LORA)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: B = 0 would hide the dropout
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    return method, model, make_scorer("causal", model, "labels")


def test_mcdropout_samples_differ_and_the_same_seeds_reproduce_them(mcdropout_model):
    method, model, scorer = mcdropout_model
    assert lora_dropouts(model)
    batch = label_batch()
    with torch.no_grad():
        state = torch.get_rng_state()
        a = method.predict(model, scorer, batch, "sample", 3, [1, 2, 3], batched=True)
        assert torch.equal(state, torch.get_rng_state())  # the global RNG is not consumed
        b = method.predict(model, scorer, batch, "sample", 3, [1, 2, 3], batched=True)
        c = method.predict(model, scorer, batch, "sample", 3, [4, 5, 6], batched=True)
        seq = method.predict(model, scorer, batch, "sample", 3, [1, 2, 3], batched=False)
        seq2 = method.predict(model, scorer, batch, "sample", 3, [1, 2, 3], batched=False)
        mean = method.predict(model, scorer, batch, "mean", 1, [0], batched=True)
    assert a.shape == (3, 3, 3) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # draws within a pass differ
    assert torch.equal(seq, seq2) and not torch.allclose(seq[0], seq[1])
    assert torch.allclose(a, seq, atol=1e-6)  # one S×B pass equals S sequential passes
    assert all(type(m) is torch.nn.Dropout and not m.training for m in lora_dropouts(model))  # restored
    with torch.no_grad():
        assert torch.equal(mean, method.predict(model, scorer, batch, "mean", 1, [0], batched=True))
        merged = method.prepare_eval(model, "merged")
        assert torch.allclose(mean, method.predict(merged, scorer, batch, "mean", 1, [0], batched=True), atol=1e-5)


def ensemble(size=3):
    torch.manual_seed(0)
    method = get_method("ensemble", {"size": size})
    model = method.build(tiny("llama"), {**LORA, "dropout": 0.0})
    return method, model, make_scorer("causal", model, "labels")


def test_ensemble_members_start_different_and_all_train(tmp_path):
    method, model, scorer = ensemble()
    a = {n: p for n, p in model.named_parameters() if "q_proj.lora_A" in n and "layers.0." in n}
    assert len(a) == 3 and all(p.requires_grad for p in a.values())
    values = list(a.values())
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[1], values[2])
    out = method.train_outputs(model, scorer, label_batch(), 1)
    assert out.log_probs.shape == (3, 3, 3)
    (-out.log_probs[:, :, 0].mean()).backward()
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(b) == 3 * len([m for m in model.modules() if isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict)])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b)


def test_ensemble_predicts_the_average_of_its_members_and_reloads(tmp_path):
    from bayeslora.evaluation import summarise_samples
    from bayeslora.methods.ensemble import active_member

    method, model, scorer = ensemble()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    batch = label_batch()
    with torch.no_grad():
        lp = method.predict(model, scorer, batch, "sample", 4, [0] * 4, batched=True)
        members = []
        for name in method.members:
            with active_member(model, name):
                logits, mask = scorer.choice_logits(model, batch, 1)
            members.append(torch.softmax(logits.double(), -1)[0])
    assert method.draws("sample", 4) == 3 and lp.shape[0] == 3
    assert torch.allclose(summarise_samples(lp).log_probs.exp(), torch.stack(members).mean(0), atol=1e-6)
    assert not torch.allclose(members[0], members[1])
    method.save(model, tmp_path)
    again = method.load(tiny("llama"), tmp_path, LORA)
    with torch.no_grad():
        assert torch.allclose(method.predict(again.eval(), scorer, batch, "sample", 4, [0] * 4, True), lp, atol=1e-6)
    import shutil
    shutil.rmtree(tmp_path / "member-2")
    with pytest.raises(FileNotFoundError, match="member-2"):
        method.load(tiny("llama"), tmp_path, LORA)
    with pytest.raises(ValueError, match="ensemble-size"):
        get_method("ensemble", {"size": 1}).resolved_options()


def blob(flipout=True):
    torch.manual_seed(0)
    method = get_method("blob", {"flipout": flipout})
    base = tiny("llama")
    reference = tiny("llama")
    model = method.build(base, {**LORA, "dropout": 0.0})
    return method, model, make_scorer("causal", model, "labels"), reference


def test_blob_starts_at_the_base_model_and_its_kl_is_the_gaussian_kl():
    from bayeslora.methods.blob import BLOB_EPS, blob_kl

    method, model, scorer, reference = blob()
    batch = label_batch()
    model.eval()
    with torch.no_grad():
        base_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = method.predict(model, scorer, batch, "sample", 2, [1, 2], batched=True)
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, base_logits, atol=1e-6)  # B = 0: every draw is the base model
    assert lp.shape == (2, 3, 3)
    rhos = [p for n, p in model.named_parameters() if "blob_rho" in n]
    assert rhos and all(BLOB_EPS / 2 ** 0.5 <= float(p.min()) and float(p.max()) <= BLOB_EPS for p in rhos)
    expected = 0.0
    for n, p in model.named_parameters():
        if "blob_rho" in n:
            layer_name, adapter = n.rsplit(".blob_rho.", 1)
            mu = dict(model.named_parameters())[f"{layer_name}.lora_A.{adapter}.weight"].double()
            q = torch.distributions.Normal(mu, p.double().square())
            expected += torch.distributions.kl_divergence(q, torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                                                          torch.tensor(0.2, dtype=torch.float64))).sum()
    assert float(blob_kl(model)) == pytest.approx(float(expected), rel=1e-12)
    assert blob_kl(model).dtype == torch.float64


@pytest.mark.parametrize("flipout", [True, False])
def test_blob_draws_are_seeded_batched_equals_sequential_and_mean_mode_is_the_posterior_mean(flipout, tmp_path):
    import peft

    method, model, scorer, reference = blob(flipout)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
        if "blob_rho" in name:
            p.data.fill_(0.3)  # a visible posterior width
    model.eval()
    batch = label_batch()
    with torch.no_grad():
        a = method.predict(model, scorer, batch, "sample", 3, [1, 2, 3], batched=True)
        b = method.predict(model, scorer, batch, "sample", 3, [1, 2, 3], batched=False)
        c = method.predict(model, scorer, batch, "sample", 3, [4, 5, 6], batched=True)
        mean = method.predict(model, scorer, batch, "mean", 1, [0], batched=True)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c) and not torch.allclose(a[0], a[1])
    method.save(model, tmp_path)
    plain = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()  # PEFT alone: the posterior mean
    again = method.load(tiny("llama"), tmp_path, LORA).eval()
    with torch.no_grad():
        assert torch.allclose(method.predict(plain, scorer, batch, "mean", 1, [0], True), mean, atol=1e-6)
        assert torch.allclose(method.predict(again, scorer, batch, "sample", 3, [1, 2, 3], True), a, atol=1e-6)
        merged = method.prepare_eval(again, "merged")
        assert torch.allclose(method.predict(merged, scorer, batch, "mean", 1, [0], True), mean, atol=1e-5)
    (tmp_path / "blob_rho.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="posterior scales"):
        method.load(tiny("llama"), tmp_path, LORA)


def test_a_boolean_bayeslora_option_from_a_json_cell_is_parsed_not_truth_tested():
    from bayeslora.methods import get_method

    assert get_method("bayeslora", {"label_rows": "false"}).resolved_options()["label_rows"] is False
    assert get_method("bayeslora", {"label_rows": "true"}).resolved_options()["label_rows"] is True
    with pytest.raises(ValueError, match="label_rows"):
        get_method("bayeslora", {"label_rows": "maybe"}).resolved_options()
