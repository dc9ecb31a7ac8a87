"""Data parallelism, DDP, FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3: a 2-process CPU run (gloo) equals a single
process with the same global batch, and a killed one resumes to the uninterrupted result. Under FSDP and
ZeRO-3 the frozen base is sharded (each rank holds half of it) while the adapter's weights stay whole; under
ZeRO-2 and ZeRO-3 the adapter's gradients and optimizer state are partitioned (bayeslora.training.sharding,
bayeslora.training.zero)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pipeline import TARGETS, write_task
from tiny_models import save_tiny_causal

import bayeslora
from bayeslora import cli
from bayeslora.data import causal_prompt, load_task
from bayeslora.launch import launch_config
from bayeslora.runs import load_run_model


def logits_of(run: Path, examples) -> dict[str, torch.Tensor]:
    method, model, scorer, tokenizer, _, _ = load_run_model(run)
    batch = scorer.make_collator(tokenizer)(examples)
    out = {}
    with torch.no_grad():
        for mode in ("mean", "sample"):
            bayeslora.set_mode(model, mode)
            bayeslora.set_draw_seed(model, 123)
            out[mode] = scorer.choice_logits(model, batch)[0]
    return out


def tiny_task(root: Path):
    """The tiny causal task and model of the test suite: (data file, its examples, model folder)."""
    data = write_task(root / "train.jsonl", n=32, kind="causal")
    examples = load_task("jsonl", "train", file=data)
    return data, examples, save_tiny_causal(root / "model", [causal_prompt(e) for e in examples])


def bayes_train_args(model_dir: str, data: Path, out: Path, batch_size: int, *budget: str,
                     targets: tuple[str, ...] = tuple(TARGETS["causal"])) -> list[str]:
    # lr 1e-3 with the default 10x on the means (and scales at 1e-2) is the step these tests always took;
    # at 10x that, 1- and 2-process runs parted by ~2e-4 (measured), most likely Adam turning the
    # reduction-order differences of the all-reduce on near-zero gradients into full-size steps.
    return ["train", "--model", model_dir, "--task", "jsonl", "--train-file", str(data), "--val-file",
            str(data), "--method", "bayeslora", "--output", str(out), "--batch-size", str(batch_size),
            *budget, "--lr", "1e-3", "--scale-lr", "1e-2", "--no-progress",
            "--target-modules", *targets, "--sigma-u-init", "0.05", "--lambda-init", "0.02"]


def two_processes(engine: str) -> list[str]:
    """accelerate launch of 2 processes with a shipped config: ``ddp`` (MULTI_GPU: accelerate's
    torch.distributed launcher; without a GPU the trainer's Accelerator(cpu=True) takes the MULTI_CPU path
    with gloo) or ``fsdp`` (FSDP2, which the trainer runs over gloo too)."""
    return [shutil.which("accelerate"), "launch", "--config_file", str(launch_config(engine)), "--num_processes",
            "2", "-m", "bayeslora.cli"]


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


NEEDS_DEEPSPEED = pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed "
                                     "(pip install \"bayeslora[deepspeed]\"; the dev extra includes it)")
ENGINES = pytest.mark.parametrize("engine", ["ddp", "fsdp", pytest.param("zero2", marks=NEEDS_DEEPSPEED),
                                            pytest.param("zero3", marks=NEEDS_DEEPSPEED)])
DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}  # what ran on CPU
NEEDS_LAUNCHER = pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed")


@NEEDS_LAUNCHER
@ENGINES
def test_two_process_run_equals_single_process(tmp_path, engine):
    data, examples, model_dir = tiny_task(tmp_path)

    def args(out: Path, batch_size: int) -> list[str]:
        return bayes_train_args(model_dir, data, out, batch_size, "--max-steps", "4")

    single = tmp_path / "single"
    assert cli.main(args(single, 8)) == 0

    double = tmp_path / "double"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*two_processes(engine), *args(double, 4)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((double / "config.json").read_text())
    assert config["num_processes"] == 2
    assert config["distributed"] == DISTRIBUTED_TYPE[engine]
    frozen, held = config["parameters"] - config["trainable_parameters"], config["parameters_held_per_process"]
    if engine in ("fsdp", "zero3"):  # rank 0 holds the whole adapter and half the base (rounded up per tensor)
        assert config["trainable_parameters"] + frozen // 2 <= held <= config["trainable_parameters"] + 0.55 * frozen
    else:
        assert held == config["parameters"]

    a, b = logits_of(single, examples[:8]), logits_of(double, examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=1e-5), (mode, (a[mode] - b[mode]).abs().max())
    base_a = json.loads((single / "history.json").read_text())[-1]["val"]
    base_b = json.loads((double / "history.json").read_text())[-1]["val"]
    assert base_a["nll"] == pytest.approx(base_b["nll"], abs=1e-5)



@NEEDS_LAUNCHER
@NEEDS_DEEPSPEED
def test_a_zero3_encoder_run_whose_head_trains_equals_single_process(tmp_path):
    """An encoder's classification head is a trainable module that the forward calls (the factors are
    not): ZeRO-3 would release its weights after validation and save them empty, unless the trainer keeps
    its hooks off (bayeslora.training.zero). Dropout is off so one and two processes draw alike."""
    from tiny_models import save_tiny_encoder

    data = write_task(tmp_path / "train.jsonl", n=32, kind="encoder")
    examples = load_task("jsonl", "train", file=data)
    model_dir = Path(save_tiny_encoder(tmp_path / "model"))
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(config))

    def args(out: Path, batch_size: int) -> list[str]:
        return bayes_train_args(str(model_dir), data, out, batch_size, "--max-steps", "3",
                                targets=tuple(TARGETS["encoder"]))

    assert cli.main(args(tmp_path / "single", 8)) == 0
    proc = subprocess.run([*two_processes("zero3"), *args(tmp_path / "double", 4)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = logits_of(tmp_path / "single", examples[:8]), logits_of(tmp_path / "double", examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=5e-5), (mode, (a[mode] - b[mode]).abs().max())

@NEEDS_LAUNCHER
@ENGINES
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, engine):
    """SIGKILL every rank of a 2-process run mid-epoch, resume it with 2 processes: its history and logits
    equal an uninterrupted 2-process run's (each rank restores its own RNGs). The reference is a 2-process
    run, not a single process: over 12 steps the all-reduce's summation order alone parts those by ~1e-4."""
    data, examples, model_dir = tiny_task(tmp_path)

    def args(out: Path, batch_size: int) -> list[str]:
        return bayes_train_args(model_dir, data, out, batch_size, "--epochs", "3", "--save-steps", "1")

    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = two_processes(engine)
    single = tmp_path / "uninterrupted"
    reference = subprocess.run([*launch, *args(single, 4)], env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*launch, *args(killed, 4)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state_file = killed / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            position = json.loads(state_file.read_text())["position"]
        except (json.JSONDecodeError, OSError, KeyError):
            position = None
        if position and position["epoch"] >= 1 and position["batch"] > 0:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-epoch"
    position = json.loads(state_file.read_text())["position"]
    assert position["epoch"] >= 1 and position["batch"] > 0
    assert len(json.loads((killed / "checkpoint" / "rng.json").read_text())) == 2  # one RNG state per rank

    resumed = subprocess.run([*launch, "train", "--resume", "--output", str(killed), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = json.loads((killed / "history.json").read_text())
    theirs = json.loads((single / "history.json").read_text())
    assert [h["epoch"] for h in ours] == [h["epoch"] for h in theirs] == [0, 1, 2]
    for a, b in zip(ours, theirs):
        assert a["val"]["nll"] == pytest.approx(b["val"]["nll"], abs=1e-5), a["epoch"]
    a, b = logits_of(single, examples[:8]), logits_of(killed, examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=1e-5), (mode, (a[mode] - b[mode]).abs().max())


def test_shipped_launch_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    from bayeslora.launch import LAUNCH_CONFIGS

    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert set(LAUNCH_CONFIGS) == set(expected)
    for name in LAUNCH_CONFIGS:
        config = load_config_from_file(str(launch_config(name)))
        assert config.distributed_type.value == expected[name] and config.num_machines == 1
    fsdp = load_config_from_file(str(launch_config("fsdp"))).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_cpu_ram_efficient_loading"] is False
    for stage in (2, 3):
        zero = load_config_from_file(str(launch_config(f"zero{stage}"))).deepspeed_config
        assert zero["zero_stage"] == stage and "gradient_accumulation_steps" not in zero  # --grad-accum's to set
    with pytest.raises(ValueError, match="unknown launch config 'zero1'"):
        launch_config("zero1")


def _reduce_on_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from bayeslora.training.sharding import FullyShardedBase

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 1)})
    module["c"].bias.requires_grad_(False)
    for name, value in (("a", 1.0 + rank), ("b", 4.0)):
        if name == "b" and rank == 0:
            continue  # rank 0's backward never reached b: its buffer must still match rank 1's
        for p in module[name].parameters():
            p.grad = torch.full_like(p, value)
    FullyShardedBase(type("Acc", (), {"num_processes": 2})()).reduce_gradients(module)
    torch.save({n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_fsdp_gradient_average_survives_ranks_that_reached_different_parameters(tmp_path):
    """The flat all-reduce of whole (trainable) parameters' gradients: the mean over ranks, a gradient one
    rank lacks counts as zero there, and a parameter no rank reached keeps ``grad = None``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.spawn(_reduce_on_rank, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        grads = torch.load(f"{out}.{rank}", weights_only=True)
        assert torch.equal(grads["a.weight"], torch.full((2, 3), 1.5))
        assert torch.equal(grads["b.bias"], torch.full((2,), 2.0))
        assert grads["c.weight"] is None and grads["c.bias"] is None


@NEEDS_LAUNCHER
@NEEDS_DEEPSPEED
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_zero_checkpoint_is_the_single_process_format(tmp_path, zero):
    """ZeRO-2 and ZeRO-3 partition AdamW's state across ranks; the checkpoint gathers it back: the same
    tensors, under the same names and groups, as a DDP run of the same steps writes (so it resumes under any
    engine or process count), with two micro-batches per step to cover DeepSpeed's accumulation boundary.

    The moments agree to ~1e-7 (measured 5e-8). The weights are compared through the logits: Adam turns
    rounding-level differences of the inducing locations' near-zero gradients into full-size steps, so
    their raw values part by ~4e-4 between any two engines, one process and DDP included (measured)."""
    from safetensors.torch import load_file

    data, examples, model_dir = tiny_task(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for engine in ("ddp", zero):
        out = tmp_path / engine
        args = bayes_train_args(model_dir, data, out, 2, "--max-steps", "3", "--grad-accum", "2")
        proc = subprocess.run([*two_processes(engine), *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[engine] = out
    ddp, ours = (load_file(str(runs[e] / "checkpoint" / "optimizer.safetensors")) for e in ("ddp", zero))
    assert set(ddp) == set(ours) and any(k.endswith("exp_avg_sq") for k in ddp)
    for key in ddp:
        assert ddp[key].shape == ours[key].shape, key
        assert torch.allclose(ddp[key], ours[key], atol=1e-6), (key, (ddp[key] - ours[key]).abs().max())
    ddp_w, ours_w = (load_file(str(runs[e] / "checkpoint" / "trainable.safetensors")) for e in ("ddp", zero))
    assert {k: v.shape for k, v in ddp_w.items()} == {k: v.shape for k, v in ours_w.items()}
    metas = [json.loads((runs[e] / "checkpoint" / "optimizer.json").read_text()) for e in ("ddp", zero)]
    assert metas[0]["optimizer"]["param_groups"] == metas[1]["optimizer"]["param_groups"]
    a, b = logits_of(runs["ddp"], examples[:8]), logits_of(runs[zero], examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=1e-5), (mode, (a[mode] - b[mode]).abs().max())


def _zero_engine(config: dict, processes: int = 2):
    from bayeslora.training.zero import ZeroRedundancy

    plugin = type("Plugin", (), {"deepspeed_config": config})()
    acc = type("Acc", (), {"num_processes": processes, "state": type("State", (), {"deepspeed_plugin": plugin})()})()
    return ZeroRedundancy(acc)


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 0}}, "supports stages 1, 2, 3"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, "mics_shard_size 2"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "zero_hpz_partition_size 2"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param.device 'cpu'"),
    # DeepSpeed maps parameters to round-robin partitions in the original order: checkpoints would be wrong
    ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin_gradients"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer.device 'cpu'"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": "true"}}, "fp16 is not supported"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, "cpu_offload"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
     "bf16_master_weights_and_grads"),
    ({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
])
def test_zero_settings_the_trainer_cannot_honour_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        _zero_engine(config).check()


@pytest.mark.parametrize("stage", [2, 3])
def test_the_shipped_zero_settings_pass_the_checks(stage):
    _zero_engine({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"},
                                        "offload_param": {"device": "none"}}, "fp16": {"enabled": False},
                  "bf16": {"enabled": True}}).check()


def test_a_deepspeed_config_cannot_override_the_run_s_accumulation_or_clipping():
    """--grad-accum and --max-grad-norm are the one home of these settings: a launch config that sets them
    otherwise is refused by field name; left out (or auto) they are filled from the run's options."""
    cfg = type("Cfg", (), {"batch_size": 4, "max_grad_norm": 1.0})()
    module, optimizer = torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="gradient_accumulation_steps 4.*--grad-accum"):
        _zero_engine({"gradient_accumulation_steps": 4}).before_prepare(module, optimizer, cfg)
    with pytest.raises(ValueError, match="gradient_clipping 0.5 differs from --max-grad-norm 1.0"):
        _zero_engine({"gradient_clipping": 0.5}).before_prepare(module, optimizer, cfg)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu 16 differs from the run's 4"):
        _zero_engine({"train_micro_batch_size_per_gpu": 16}).before_prepare(module, optimizer, cfg)
    config = {"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}
    _zero_engine(config, processes=3).before_prepare(module, optimizer, cfg)
    assert config == {"gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 12,
                      "gradient_clipping": 1.0}


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    """The tiny task and one bf16 process's val NLL after 2 steps (its own process: Accelerate's precision
    setting is process-global)."""
    root = tmp_path_factory.mktemp("bf16")
    data, _, model_dir = tiny_task(root)
    single = root / "single"
    proc = subprocess.run([sys.executable, "-m", "bayeslora.cli",
                           *bayes_train_args(model_dir, data, single, 8, "--max-steps", "2", "--mixed-precision", "bf16")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, model_dir, json.loads((single / "history.json").read_text())[-1]["val"]["nll"]


@NEEDS_LAUNCHER
@ENGINES
def test_bf16_mixed_precision_trains_under_every_engine(tmp_path, engine, bf16_reference):
    """--mixed-precision bf16 on 2 processes (FSDP2's mixed-precision policy, DeepSpeed's bf16 mode with
    float32 masters): the run finishes and its val NLL is a single bf16 process's, to bf16 accuracy."""
    data, model_dir, reference = bf16_reference
    double = tmp_path / "double"
    proc = subprocess.run([*two_processes(engine), *bayes_train_args(model_dir, data, double, 4, "--max-steps", "2",
                                                                     "--mixed-precision", "bf16")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((double / "config.json").read_text())["distributed"] == DISTRIBUTED_TYPE[engine]
    assert json.loads((double / "history.json").read_text())[-1]["val"]["nll"] == pytest.approx(reference, abs=5e-3)


def test_a_step_deepspeed_skipped_stops_the_run_instead_of_counting():
    """DeepSpeed skips a step whose gradient norm is not finite; the trainer's schedule and position would
    still advance, so the engine raises (one process would have written NaN weights)."""
    class Engine:
        def step(self):
            pass

        def was_step_applied(self):
            return False

    zero = _zero_engine({})
    zero.acc.deepspeed_engine_wrapped = type("Wrapped", (), {"engine": Engine()})()
    with pytest.raises(FloatingPointError, match="skipped an optimizer step"):
        zero.step(None, None, None, 1.0)


def test_zero3_refuses_a_0d_parameter_by_name():
    """ZeRO-3 partitions parameters as flat byte views: a 0-d one (as each factor's λ once was) is named."""
    cfg = type("Cfg", (), {"batch_size": 4, "max_grad_norm": 1.0})()
    module = torch.nn.Module()
    module.scale = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.AdamW(module.parameters())
    with pytest.raises(ValueError, match=r"0-d parameters \['scale'\]"):
        _zero_engine({"zero_optimization": {"stage": 3}}).before_prepare(module, optimizer, cfg)
