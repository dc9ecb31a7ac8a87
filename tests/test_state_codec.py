"""Optimizer and scheduler states survive safetensors + JSON exactly, and resuming continues bit-identically."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bayeslora.training.state_codec import decode_state, encode_state


def _trained(optimizer_cls, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [{"params": model[0].parameters(), "lr": 1e-2, "name": "first"},
              {"params": model[1].parameters(), "lr": 3e-3}]
    opt = optimizer_cls(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    x = torch.randn(8, 4)
    for _ in range(steps):
        model(x).pow(2).sum().backward()
        opt.step(); sched.step(); opt.zero_grad()
    return model, opt, sched, x


def _round_trip(state, tmp_path):
    tensors = {}
    meta = encode_state(state, tensors)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(meta))
    return decode_state(json.loads((tmp_path / "s.json").read_text()), load_file(str(tmp_path / "s.safetensors")))


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
def test_round_trip_restores_the_exact_tree(optimizer_cls, tmp_path):
    _, opt, sched, _ = _trained(optimizer_cls, 3)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    back = _round_trip(state, tmp_path)
    assert back["scheduler"] == state["scheduler"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    if optimizer_cls is not torch.optim.SGD:
        assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])  # integer keys stay integers
    for pid, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            got = back["optimizer"]["state"][pid][key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value


def test_resuming_from_the_stored_state_continues_bit_identically(tmp_path):
    model, opt, sched, x = _trained(torch.optim.AdamW, 2)
    stored = _round_trip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}, tmp_path)
    for _ in range(2):  # the uninterrupted run goes on
        model(x).pow(2).sum().backward()
        opt.step(); sched.step(); opt.zero_grad()

    fresh, opt2, sched2, _ = _trained(torch.optim.AdamW, 0)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(stored["weights"][n])
    opt2.load_state_dict(stored["optimizer"]); sched2.load_state_dict(stored["scheduler"])
    for _ in range(2):
        fresh(x).pow(2).sum().backward()
        opt2.step(); sched2.step(); opt2.zero_grad()
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_objects_that_would_need_pickling_are_refused():
    with pytest.raises(TypeError, match=r"lr_lambda.*function"):
        encode_state({"lr_lambda": lambda i: i}, {})
    with pytest.raises(TypeError, match="key"):
        encode_state({(1, 2): 0.0}, {})


def test_a_missing_tensor_names_the_file():
    meta = encode_state({"state": {0: {"exp_avg": torch.zeros(2)}}}, {})
    with pytest.raises(ValueError, match=r"optimizer.json.*state.0.exp_avg"):
        decode_state(meta, {}, source="run/checkpoint/optimizer.json")
