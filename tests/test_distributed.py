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
import tempfile
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


def _zero3_partitioned_config() -> Path:
    """ZeRO-3 with DeepSpeed's persistence threshold at 0: with its default (tensors of up to 1e5 elements
    stay whole after the first step) every tensor of the tiny models would, and the tests would never run a
    step over a partitioned base. A DeepSpeed JSON file beside an accelerate config that points to it."""
    folder = Path(tempfile.mkdtemp(prefix="zero3_partitioned_"))
    (folder / "ds.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
        "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    (folder / "zero3.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {folder / 'ds.json'}\n  zero3_init_flag: false\nnum_machines: 1\n"
        "machine_rank: 0\nnum_processes: 2\nuse_cpu: false\nrdzv_backend: static\nsame_network: true\n")
    return folder / "zero3.yaml"


def two_processes(engine: str) -> list[str]:
    """accelerate launch of 2 processes with a shipped config: ``ddp`` (MULTI_GPU: accelerate's
    torch.distributed launcher; without a GPU the trainer's Accelerator(cpu=True) takes the MULTI_CPU path
    with gloo), ``fsdp`` (FSDP2, which the trainer runs over gloo too), ``zero2``, ``zero3``; or
    ``zero3-partitioned`` (:func:`_zero3_partitioned_config`)."""
    config = _zero3_partitioned_config() if engine == "zero3-partitioned" else launch_config(engine)
    return [shutil.which("accelerate"), "launch", "--config_file", str(config), "--num_processes", "2",
            "-m", "bayeslora.cli"]


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


NEEDS_DEEPSPEED = pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed "
                                     "(pip install \"bayeslora[deepspeed]\"; the dev extra includes it)")
ENGINES = pytest.mark.parametrize("engine", ["ddp", "fsdp", pytest.param("zero2", marks=NEEDS_DEEPSPEED),
                                            pytest.param("zero3-partitioned", marks=NEEDS_DEEPSPEED)])
DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                    "zero3-partitioned": "DEEPSPEED"}  # what the trainer ran on CPU
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
    if engine in ("fsdp", "zero3-partitioned"):  # rank 0: the whole adapter, half the base (rounded up per tensor)
        assert config["trainable_parameters"] + frozen // 2 <= held <= config["trainable_parameters"] + 0.55 * frozen
    else:
        assert held == config["parameters"]

    a, b = logits_of(single, examples[:8]), logits_of(double, examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=1e-5), (mode, (a[mode] - b[mode]).abs().max())
    base_a = json.loads((single / "history.json").read_text())[-1]["val"]
    base_b = json.loads((double / "history.json").read_text())[-1]["val"]
    assert base_a["nll"] == pytest.approx(base_b["nll"], abs=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@NEEDS_LAUNCHER
@pytest.mark.parametrize("engine", ["ddp", "fsdp", pytest.param("zero3", marks=NEEDS_DEEPSPEED)])
def test_a_two_node_launch_of_a_shipped_config_equals_single_process(tmp_path, engine):
    """Two `accelerate launch` commands, one per "machine" (machine ranks 0 and 1 on localhost, one process
    each, the README's multi-node command): the run is one world of 2 ranks (global batch 8) and equals a
    single process. Each node's only process is its local rank 0, which two processes on one machine never
    test. For DeepSpeed the shipped config names the `standard` multi-node launcher (torchrun on each node):
    accelerate's default, DeepSpeed's pdsh runner, without a hostfile ran each node as its own 1-process
    world (measured: logits off by 1e-2), and the second node's run failed on the port."""
    data, examples, model_dir = tiny_task(tmp_path)

    def args(out: Path, batch_size: int) -> list[str]:
        return bayes_train_args(model_dir, data, out, batch_size, "--max-steps", "4")

    single = tmp_path / "single"
    assert cli.main(args(single, 8)) == 0
    nodes = tmp_path / "nodes"
    port, env = _free_port(), dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([shutil.which("accelerate"), "launch", "--config_file", str(launch_config(engine)),
                               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--num_processes", "2", "-m", "bayeslora.cli",
                               *args(nodes, 4)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"node{rank}.log", "w"),
                              start_new_session=True)
             for rank in (0, 1)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == [0, 0], [(tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1)]
    config = json.loads((nodes / "config.json").read_text())
    assert config["num_processes"] == 2 and config["distributed"] == DISTRIBUTED_TYPE[engine]
    a, b = logits_of(single, examples[:8]), logits_of(nodes, examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=1e-5), (mode, (a[mode] - b[mode]).abs().max())



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
@NEEDS_DEEPSPEED
def test_a_zero3_run_adapting_a_tied_lm_head_saves_it_whole_and_equals_single_process(tmp_path):
    """With lm_head among the targets PEFT saves the (untied) base head beside the adapter; ZeRO-3 loads the
    base partitioned, so untying must gather it and the trainer must keep it whole for rank 0 to save
    (found in review: the saved head was empty). The base stays partitioned between steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import wordlevel_tokenizer

    data = write_task(tmp_path / "train.jsonl", n=32, kind="causal")
    examples = load_task("jsonl", "train", file=data)
    tokenizer = wordlevel_tokenizer([causal_prompt(e) for e in examples])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    def args(out: Path, batch_size: int) -> list[str]:
        return bayes_train_args(str(tmp_path / "model"), data, out, batch_size, "--max-steps", "3",
                                targets=("q_proj", "v_proj", "lm_head"))

    assert cli.main(args(tmp_path / "single", 8)) == 0
    proc = subprocess.run([*two_processes("zero3-partitioned"), *args(tmp_path / "double", 4)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "double" / "adapters" / "epoch-0" / "adapter_model.safetensors"))
    assert saved["base_model.model.lm_head.base_layer.weight"].shape == (len(tokenizer), 64)
    a, b = logits_of(tmp_path / "single", examples[:8]), logits_of(tmp_path / "double", examples[:8])
    for mode in a:
        assert torch.allclose(a[mode], b[mode], atol=1e-5), (mode, (a[mode] - b[mode]).abs().max())

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
    # the logits alone miss a resume that restarts AdamW's moments (measured: a ZeRO-3 state saved empty
    # passed them at 1e-5): the final optimizer states must agree too
    from safetensors.torch import load_file

    ours_state, theirs_state = (load_file(str(run / "checkpoint" / "optimizer.safetensors")) for run in (killed, single))
    assert set(ours_state) == set(theirs_state) and any(k.endswith("exp_avg_sq") for k in ours_state)
    for key in ours_state:
        assert torch.allclose(ours_state[key], theirs_state[key], atol=1e-6, rtol=1e-4), key


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


def _old_format_state(w: torch.nn.Parameter):
    """A saved AdamW state from when λ was 0-d: λ's moments are 0-d and it comes first in its group."""
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor(0.7), "exp_avg_sq": torch.tensor(0.2)},
                      1: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).view(2, 3),
                          "exp_avg_sq": torch.full((2, 3), 0.5)}},
            "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}


def _check_round_trip(state_object, saved):
    state_object.load_state_dict(saved)
    back = state_object.state_dict()
    lam, w = back["state"][0], back["state"][1]
    assert torch.equal(lam["exp_avg"].reshape(-1), torch.tensor([0.7])) and lam["exp_avg"].numel() == 1
    assert torch.equal(lam["exp_avg_sq"].reshape(-1), torch.tensor([0.2]))
    assert torch.equal(w["exp_avg"], torch.arange(6.0).view(2, 3)) and torch.equal(w["exp_avg_sq"], torch.full((2, 3), 0.5))
    assert float(lam["step"]) == float(w["step"]) == 3.0


def test_zero_states_load_old_checkpoints_whose_lambda_moments_are_0d():
    """Both ZeRO state objects (one rank, DeepSpeed's partition bookkeeping faked) read a checkpoint whose λ
    moments are 0-d, λ first in its group: moments by key name, not by shape (bayeslora.training.zero)."""
    from types import SimpleNamespace

    from bayeslora.training.zero import GatheredZero3State, GatheredZeroState

    lam, w = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2, 3))
    flat = torch.zeros(7)
    base = SimpleNamespace(param_groups=[{"params": [], "lr": 1e-3}], state={})
    for p, start in ((lam, 0), (w, 1)):  # ZeRO-2's map: the whole parameter at this offset of the partition
        p._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0, numel=p.numel()),
                                        hp_fragment_address=SimpleNamespace(start=start, numel=p.numel()))
    zero2 = SimpleNamespace(optimizer=base, single_partition_of_fp32_groups=[flat])
    _check_round_trip(GatheredZeroState(zero2, [[lam, w]]), _old_format_state(w))

    class Zero3:  # ZeRO-3's per-parameter accessors over one flat partition
        def __init__(self):
            self.fp32_partitioned_groups_flat, self.sub_group_to_group_id = [torch.zeros(7)], {0: 0}
            self.optimizer = SimpleNamespace(param_groups=[{"params": [], "lr": 1e-3}], state={})
            self.where = {id(lam): (0, 1), id(w): (1, 6)}

        def _get_fp32_opt_state_partition(self, p, optim_state_key=None):
            flat = self.fp32_partitioned_groups_flat[0]
            source = flat if optim_state_key is None else self.optimizer.state[flat][optim_state_key]
            return source.narrow(0, *self.where[id(p)]), 0

        def _get_param_partition_rank(self, p):
            return 0

        def get_full_hp_param(self, p, optim_state_key=None):
            return self._get_fp32_opt_state_partition(p, optim_state_key)[0].clone()

    for p in (lam, w):
        p.ds_numel, p.ds_shape = p.numel(), p.shape
    _check_round_trip(GatheredZero3State(Zero3(), [[lam, w]]), _old_format_state(w))


@NEEDS_DEEPSPEED
def test_zero3_refuses_adapter_parameters_inside_a_leaf_module():
    """DeepSpeed gathers and releases a ZeRO-3 leaf's subtree whole (persistent parameters too), so adapter
    parameters inside one (e.g. an MoE block Accelerate marked) could not stay whole: refused by name."""
    from deepspeed.utils import set_z3_leaf_module

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    set_z3_leaf_module(module[1], True)
    with pytest.raises(ValueError, match=r"1 is a ZeRO-3 leaf module"):
        _zero_engine({"zero_optimization": {"stage": 3}}).after_prepare(module)
