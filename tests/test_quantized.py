"""Bayesian-LoRA on bitsandbytes-quantized bases (4-bit NF4 and 8-bit), on the CPU backend bitsandbytes
ships: factors on quantized layers train in float32, sample and mean modes run, a run trains and
evaluates end to end with ``quantize``, and merging into quantized weights is refused with a reason."""

from __future__ import annotations

import pytest
import torch
from tiny_models import inputs, outputs, save_tiny_encoder, tiny

import bayeslora

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")


def quantized_llama(bits: str):
    model = tiny("llama", 0)
    reference = tiny("llama", 0)
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        if bits == "4bit":
            new = bnb.nn.Linear4bit(q.in_features, q.out_features, bias=q.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(q.in_features, q.out_features, bias=q.bias is not None, has_fp16_weights=False)
        new.load_state_dict(q.state_dict())
        layer.self_attn.q_proj = new.to("cpu")
    return model, reference


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bayesian_factors_on_quantized_layers_train_and_predict(bits):
    base, reference = quantized_llama(bits)
    config = dict(r=4, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"], sigma_u_init=0.05,
                  lambda_init=0.02)
    model = bayeslora.get_model(base, bayeslora.BayesLoraConfig(**config))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bayeslora.BayesLoraLinear) and layer.base_is_quantized
    assert all(p.dtype == torch.float32 for p in layer.lora_bayes.parameters())
    batch = inputs()
    with torch.no_grad():  # a fresh adapter (B's mean 0) in mean mode is the quantized base itself
        bayeslora.set_mode(model, "mean")
        plain = reference(**batch).logits
        got = outputs(model, batch)
        assert (got - plain).abs().max() < 0.2 * plain.abs().max()  # the quantisation error, no more
    bayeslora.set_mode(model, "sample")
    loss = outputs(model, batch).pow(2).mean() + 1e-3 * bayeslora.kl_divergence(model)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    with pytest.raises(NotImplementedError, match="mean mode"):
        model.merge_and_unload()


def test_a_quantized_run_trains_and_evaluates_end_to_end(tmp_path):
    from bayeslora.runs import evaluate_run
    from bayeslora.training import TrainConfig, train

    encoder = save_tiny_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    train(TrainConfig(model=encoder, task="synthetic", method="bayeslora", output=str(out), quantize="4bit",
                      max_steps=2, batch_size=4, max_train_examples=8, max_val_examples=4, progress=False,
                      target_modules=["query", "value"], max_length=32))
    r = evaluate_run(out, "synthetic", "dev", samples=2, max_examples=6)
    assert r["n"] == 6 and 0 <= r["acc"] <= 1 and torch.isfinite(torch.tensor(r["nll"]))
    with pytest.raises(NotImplementedError, match="quantized"):
        evaluate_run(out, "synthetic", "dev", mode="merged", max_examples=6)
