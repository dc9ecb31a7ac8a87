"""End to end through the command line: train → evaluate → report, a registered toy method, batched
Monte Carlo, resuming after SIGKILL. Tiny random models saved as folders; tiny data written here."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_causal, save_tiny_encoder

from bayeslora import cli
from bayeslora.data import causal_prompt, load_task
from bayeslora.methods import METHODS, Method, register_method

TARGETS = {"causal": ["q_proj", "v_proj"], "encoder": ["query", "value"]}
KEYS = {"alpha": 0, "beta": 1}


def write_task(path: Path, n: int = 32, seed: int = 0, kind: str = "causal") -> Path:
    """A learnable two-choice task.

    causal: a keyword in the question decides the answer letter (needs attention to the question);
    encoder: the right choice is a fruit, the wrong one a material, in random order (a pair scorer
    learns it from each (question, choice) pair).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if kind == "causal":
            key = rng.choice(sorted(KEYS))
            rows.append({"question": f"the word is {key}", "choices": ["yes", "no"], "answer": KEYS[key]})
        else:
            good, bad = rng.choice(["apple", "pear", "plum"]), rng.choice(["stone", "brick", "steel"])
            answer = rng.randrange(2)
            rows.append({"question": "which one can you eat", "choices": [bad, good] if answer else [good, bad],
                         "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = {kind: write_task(root / f"{kind}.jsonl", kind=kind) for kind in ("causal", "encoder")}
    prompts = [causal_prompt(e) for e in load_task("jsonl", "train", file=data["causal"])]
    return {"root": root, "data": data, "causal": save_tiny_causal(root / "causal", prompts),
            "encoder": save_tiny_encoder(root / "encoder")}


def train_args(ws, kind, method, out, *extra):
    data = str(ws["data"][kind])
    return ["train", "--model", ws[kind], "--task", "jsonl", "--train-file", data, "--val-file", data,
            "--method", method, "--output", str(out), "--batch-size", "8", "--no-progress",
            "--samples", "2", "--target-modules", *TARGETS[kind], *extra]


# 32 examples in 8 epochs are few for the per-example ELBO: the test tempers the KL and raises the LoRA
# scaling so the pipeline is seen learning (BLoB's KL/M, with M = 4 steps per epoch, is tempered too). Bayesian-LoRA's means step at 10x the run's lr by default,
# so its lr here is a tenth of LoRA's (the same weight-space step).
LEARN = {"lora": ["--lr", "5e-2", "--epochs", "4"], "map": ["--lr", "5e-2", "--epochs", "4"],
         "mcdropout": ["--lr", "5e-2", "--epochs", "4"], "ensemble": ["--lr", "5e-2", "--epochs", "4"],
         "blob": ["--lr", "5e-2", "--epochs", "4", "--kl-scale", "0.01"],
         "bayeslora": ["--lr", "5e-3", "--epochs", "12", "--kl-scale", "0.01", "--lora-alpha", "64"]}
# Bayesian-LoRA got 12 epochs, not 8, when the draw's noise layout changed (46ec55a, same law): at seed 0
# the new stream sits on the majority-class plateau (val acc 0.59) until the decaying lr of an 8-epoch
# schedule is too small to leave it; seeds 1-9 reached 1.0 in 8 epochs, seed 0 does by epoch 7 of 12.
DRAWS = {"lora": 1, "map": 1, "mcdropout": 3, "bayeslora": 3, "ensemble": 3, "blob": 3}  # evaluated with --samples 3


@pytest.mark.parametrize("kind", ["causal", "encoder"])
@pytest.mark.parametrize("method", ["lora", "map", "mcdropout", "ensemble", "blob", "bayeslora"])
def test_train_evaluate_report(workspace, kind, method, capsys):
    run = workspace["root"] / f"run-{kind}-{method}"
    assert cli.main(train_args(workspace, kind, method, run, *LEARN[method])) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["method"] == method and config["versions"]["torch"] == torch.__version__
    assert config["data_files"]["train"][0]["sha256"]
    history = json.loads((run / "history.json").read_text())
    epochs = int(LEARN[method][LEARN[method].index("--epochs") + 1])
    assert len(history) == epochs and all("nll" in h["val"] for h in history)
    assert all(h["timed_steps"] == 4 and h["train_seconds"] > 0 for h in history)  # 32 rows, batch 8
    assert json.loads((run / "selection.json").read_text())["rule"] == "best-val-nll"
    evaluate = ["evaluate", "--run", str(run), "--task", "jsonl", "--data-file", str(workspace["data"][kind]),
                "--split", "train"]
    assert cli.main(evaluate + ["--samples", "3"]) == 0
    if DRAWS[method] == 1:  # a count the method will not use is said, not silently replaced
        assert "note: --samples 3 is not used" in capsys.readouterr().err
    metrics_files = list((run / "eval").glob("metrics-*.json"))
    assert len(metrics_files) == 1
    metrics = json.loads(metrics_files[0].read_text())
    assert metrics["n"] == 32 and metrics["acc"] >= 0.9, metrics
    assert metrics["samples"] == DRAWS[method]
    for key in ("ece", "nll", "brier", "eval_seconds", "examples_per_second", "truncated", "recipe",
                "selection_rule"):
        assert key in metrics
    predictions = [json.loads(line) for line in metrics_files[0].with_name(
        metrics_files[0].name.replace("metrics", "predictions")).with_suffix(".jsonl").read_text().splitlines()]
    assert len(predictions) == 32 and len(predictions[0]["sample_probs"]) == metrics["samples"]
    assert list((run / "eval").glob("reliability-*.png"))
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    table = capsys.readouterr().out
    assert method in table and "jsonl" in table


@pytest.mark.parametrize("scoring", ["labels", "loglik-norm"])
@pytest.mark.parametrize("method", ["lora", "map", "mcdropout", "ensemble", "blob", "bayeslora"])
def test_every_method_trains_and_evaluates_under_the_other_causal_protocols(workspace, method, scoring):
    """The test above runs the causal default (summed log-likelihood); here each method trains 4 steps and is
    scored by answer-label tokens and by length-normalised log-likelihood, in every mode it offers (sample
    with S = 3, mean, merged): the protocol is recorded, every row is a distribution, and `predict` gives
    the evaluation's probabilities."""
    from bayeslora import answer_questions
    from bayeslora.layout import EvalFiles

    run = workspace["root"] / f"run-{scoring}-{method}"
    assert cli.main(train_args(workspace, "causal", method, run, "--max-steps", "4", "--scoring", scoring)) == 0
    assert json.loads((run / "config.json").read_text())["train"]["scoring"] == scoring
    from bayeslora.methods import get_method

    for mode in get_method(method).modes:
        out = workspace["root"] / f"{scoring}-{method}-{mode}.json"
        assert cli.main(["evaluate", "--run", str(run), "--task", "jsonl", "--data-file",
                         str(workspace["data"]["causal"]), "--split", "train", "--samples", "3", "--mode", mode,
                         "--output", str(out)]) == 0
        metrics = json.loads(out.read_text())
        assert metrics["scoring"] == scoring and metrics["n"] == 32
        assert metrics["samples"] == (DRAWS[method] if mode == "sample" else 1), mode
        rows = [json.loads(line) for line in EvalFiles(out).predictions.read_text().splitlines()]
        assert len(rows) == 32 and all(abs(sum(r["probs"]) - 1) < 1e-4 for r in rows)
        assert all(len(r["sample_probs"]) == metrics["samples"] for r in rows)
        # `predict` on the same rows, in the same mode: the same probabilities (data the user's own file)
        answers = answer_questions(run, workspace["data"]["causal"], samples=3, mode=mode)
        assert [a["probs"] for a in answers] == [r["probs"] for r in rows]


def test_modes_of_a_bayesian_run_and_batched_equals_sequential(workspace):
    run = workspace["root"] / "run-causal-bayeslora"
    if not (run / "selection.json").exists():
        cli.main(train_args(workspace, "causal", "bayeslora", run, "--max-steps", "4"))
    records = {}
    for mode, extra in [("sample", []), ("sample-seq", ["--sequential"]), ("mean", []), ("merged", [])]:
        out = workspace["root"] / f"m-{mode}.json"
        args = ["evaluate", "--run", str(run), "--task", "jsonl", "--data-file", str(workspace["data"]["causal"]),
                "--split", "train", "--samples", "4", "--mode", mode.split("-")[0], "--output", str(out), *extra]
        assert cli.main(args) == 0
        records[mode] = json.loads(out.read_text())
    assert records["sample"]["nll"] == pytest.approx(records["sample-seq"]["nll"], abs=1e-6)
    assert records["mean"]["nll"] == pytest.approx(records["merged"]["nll"], abs=1e-4)
    assert records["mean"]["samples"] == 1 and records["sample"]["samples"] == 4


@register_method
class ToyMethod(Method):
    """A method defined in a test: plain LoRA whose loss path is the base class's."""

    name = "toy-test-method"

    def build(self, base_model, lora):
        import peft

        return peft.get_peft_model(base_model, peft.LoraConfig(r=lora["r"], target_modules=lora["target_modules"]))

    def load(self, base_model, directory, lora):
        import peft

        return peft.PeftModel.from_pretrained(base_model, str(directory))


def test_a_registered_toy_method_trains_through_the_cli(workspace):
    assert "toy-test-method" in METHODS
    run = workspace["root"] / "run-toy"
    assert cli.main(train_args(workspace, "causal", "toy-test-method", run, "--max-steps", "2")) == 0
    assert json.loads((run / "config.json").read_text())["train"]["method"] == "toy-test-method"
    assert (run / "adapters" / "epoch-0" / "adapter_model.safetensors").exists()


def test_bad_inputs_fail_with_clear_messages(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"], "answer": 3}\n')
    args = train_args(workspace, "causal", "lora", tmp_path / "run", "--max-steps", "1")
    args[args.index("--train-file") + 1] = str(bad)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err
    assert cli.main(["evaluate", "--run", str(tmp_path / "nothing"), "--task", "jsonl", "--split", "dev"]) == 2
    assert "config.json" in capsys.readouterr().err
    plain = train_args(workspace, "causal", "lora", tmp_path / "run2", "--max-steps", "1", "--mean-lr-factor", "5")
    assert cli.main(plain) == 2  # a Bayesian-LoRA flag is refused for --method lora, never silently ignored
    assert "--mean-lr-factor is an option of --method bayeslora" in capsys.readouterr().err


def _history(run: Path) -> list:
    return json.loads((run / "history.json").read_text())


def test_resume_after_sigkill_reaches_the_same_result(workspace, tmp_path):
    common = ["--epochs", "2", "--batch-size", "4", "--save-steps", "2", "--lr", "1e-2"]
    reference = tmp_path / "reference"
    assert cli.main(train_args(workspace, "causal", "bayeslora", reference, *common)) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "bayeslora.cli",
                             *train_args(workspace, "causal", "bayeslora", killed, *common)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = killed / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state_file.exists():
            try:
                position = json.loads(state_file.read_text())["position"]
            except (json.JSONDecodeError, OSError):
                position = None
            if position and position["epoch"] >= 1 and position["batch"] > 0:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-epoch"
    position = json.loads(state_file.read_text())["position"]
    assert position["epoch"] == 1 and position["batch"] > 0  # resuming from the middle of an epoch
    stored = {p.name for p in (killed / "checkpoint").iterdir()}
    assert {"rng.json", "rng.safetensors", "optimizer.json", "optimizer.safetensors"} <= stored
    assert not any(name.endswith((".pt", ".pkl", ".bin")) for name in stored)  # nothing a resume unpickles

    assert cli.main(["train", "--resume", "--output", str(killed), "--no-progress"]) == 0
    ours, theirs = _history(killed), _history(reference)
    assert [h["epoch"] for h in ours] == [0, 1]
    for a, b in zip(ours, theirs):
        for key in ("acc", "ece", "nll", "brier"):
            assert a["val"][key] == pytest.approx(b["val"][key], abs=1e-6), (a["epoch"], key)


def test_gradient_accumulation_equals_the_larger_batch(workspace, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for name, extra in [("whole", ["--batch-size", "8"]), ("accumulated", ["--batch-size", "4", "--grad-accum", "2"])]:
        out = tmp_path / name
        args = train_args(workspace, "causal", "lora", out, "--max-steps", "3", "--lr", "1e-2", "--select", "last")
        args[args.index("--batch-size") + 1:args.index("--batch-size") + 2] = [extra[1]]
        assert cli.main(args + extra[2:]) == 0
        runs[name] = load_file(str(out / "adapters" / "epoch-0" / "adapter_model.safetensors"))
    assert runs["whole"].keys() == runs["accumulated"].keys()
    for key in runs["whole"]:
        # choice rows are padded per micro-batch, so sums differ in the last bits and Adam magnifies
        # that on near-zero gradients (measured 1.5e-5); a wrong accumulation is off by ~lr = 1e-2
        diff = (runs["whole"][key] - runs["accumulated"][key]).abs().max()
        assert diff < 1e-4, (key, diff)


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_gradient_checkpointing_trains_the_same_adapter(workspace, tmp_path, kind):
    """Recomputing each block in the backward reuses the step's posterior draw, so the adapter after a
    few Bayesian steps is the one trained without checkpointing (same seed, same draws)."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in [("plain", []), ("checkpointed", ["--gradient-checkpointing"])]:
        out = tmp_path / name
        assert cli.main(train_args(workspace, kind, "bayeslora", out, "--max-steps", "3", "--select", "last",
                                   *extra)) == 0
        runs[name] = load_file(str(out / "adapters" / "epoch-0" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "checkpointed" / "config.json").read_text())
    assert config["train"]["gradient_checkpointing"] is True
    assert runs["plain"].keys() == runs["checkpointed"].keys()
    for key in runs["plain"]:
        diff = (runs["plain"][key].float() - runs["checkpointed"][key].float()).abs().max()
        assert diff < 1e-5, (key, diff)
    # the steps moved the adapter (B's inducing means start at zero), so agreeing is not trivial
    b_means = [v for k, v in runs["checkpointed"].items() if k.endswith("B__inducing_mean")]
    assert b_means and max(float(v.abs().max()) for v in b_means) > 1e-3


def test_gradient_checkpointing_is_refused_where_the_recompute_would_use_other_weights(workspace, tmp_path,
                                                                                      capsys):
    # an ensemble's members share one backward after K forwards with K different active adapters
    assert cli.main(train_args(workspace, "causal", "ensemble", tmp_path / "ens", "--max-steps", "1",
                               "--gradient-checkpointing")) != 0
    assert "--gradient-checkpointing is not supported by --method ensemble" in capsys.readouterr().err


def test_new_options_are_type_checked():
    from bayeslora.training import TrainConfig

    with pytest.raises(ValueError, match="--gradient-checkpointing must be true or false"):
        TrainConfig(gradient_checkpointing="false")
    with pytest.raises(ValueError, match="--head-lr-factor must be a number, got True"):
        TrainConfig(head_lr_factor=True)
    with pytest.raises(ValueError, match="--lr must be a number, got 'fast'"):  # a suite's or JSON cell's
        TrainConfig(lr="fast")
    with pytest.raises(ValueError, match=r"--target-modules must be a list of names or one regex, got \['query', 1\]"):
        TrainConfig(target_modules=["query", 1])


def test_gradient_checkpointing_on_a_model_without_it_fails_clearly():
    from torch import nn

    from bayeslora.training.loop import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="--gradient-checkpointing: Linear does not support"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_bf16_mixed_precision_training_runs(workspace, tmp_path):
    run = tmp_path / "bf16"
    # a process of its own: Accelerate's precision setting is process-global
    args = train_args(workspace, "causal", "bayeslora", run, "--max-steps", "2", "--mixed-precision", "bf16")
    proc = subprocess.run([sys.executable, "-m", "bayeslora.cli", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    dev = json.loads((run / "history.json").read_text())[-1]["val"]
    assert all(torch.isfinite(torch.tensor(dev[k])) for k in ("nll", "ece", "brier"))


def test_several_draws_per_training_step(workspace, tmp_path):
    run = tmp_path / "s3"
    assert cli.main(train_args(workspace, "causal", "bayeslora", run, "--max-steps", "2",
                               "--train-samples", "3")) == 0
    assert json.loads((run / "config.json").read_text())["train"]["train_samples"] == 3
    assert torch.isfinite(torch.tensor(json.loads((run / "history.json").read_text())[-1]["val"]["nll"]))


def _train_accuracy(workspace, kind: str, run: Path) -> float:
    out = run / "train-metrics.json"
    assert cli.main(["evaluate", "--run", str(run), "--task", "jsonl", "--data-file", str(workspace["data"][kind]),
                     "--split", "train", "--samples", "4", "--output", str(out)]) == 0
    return json.loads(out.read_text())["acc"]


# Each method at its own defaults (learning rate included) for the same number of steps; everything Bayesian
# at its default too: preset, prior, posterior scales and their learning rates, the untempered ELBO.
SAME_BUDGET = ["--epochs", "30"]


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_bayeslora_defaults_learn_the_tiny_task_as_lora_does(workspace, kind):
    accuracy = {}
    for method in ("lora", "bayeslora"):
        run = workspace["root"] / f"same-budget-{kind}-{method}"
        assert cli.main(train_args(workspace, kind, method, run, *SAME_BUDGET)) == 0
        accuracy[method] = _train_accuracy(workspace, kind, run)
    assert accuracy["lora"] >= 0.9, accuracy
    assert accuracy["bayeslora"] >= accuracy["lora"] - 0.05, accuracy


def test_default_posterior_scales_move_tenfold_from_their_initial_values(workspace):
    from bayeslora.config import BayesLoraConfig

    run = workspace["root"] / "scales-encoder-bayeslora"
    assert cli.main(train_args(workspace, "encoder", "bayeslora", run, *SAME_BUDGET)) == 0
    stats = json.loads((run / "history.json").read_text())[-1]["posterior"]
    init = BayesLoraConfig(r=8)
    for module, values in stats.items():
        sigma = values["sigma_u_mean"]
        lam = values["lambda"]
        assert sigma >= 10 * init.sigma_u_init or sigma <= init.sigma_u_init / 10, (module, values)
        assert lam >= 10 * init.lambda_init or lam <= init.lambda_init / 10, (module, values)
        assert sigma < 0.99 * init.sigma_u_max, (module, values)  # the data, not the clamp, sets σ_U
        # λ is clamped at lambda_max by design (unclamped, the conditional KL over every weight drives the
        # model to chance; see the README's training notes), so it is not asked to stay off its clamp.


def test_a_label_scored_head_restricted_to_the_label_rows(workspace, tmp_path, capsys):
    """--label-rows true: the Bayesian lm_head adapts only the answer-label rows (its B is labels×r), the
    run trains, evaluates in every mode and records the rows; refused where the protocol reads every row."""
    from bayeslora.data import answer_label_rows
    from transformers import AutoTokenizer

    head = ["--scoring", "labels", "--target-modules", "q_proj", "v_proj", "lm_head",
            "--bayesian-modules", "q_proj", "lm_head", "--max-steps", "2"]
    run = tmp_path / "rows"
    assert cli.main(train_args(workspace, "causal", "bayeslora", run, "--label-rows", "true", *head)) == 0
    rows = answer_label_rows(AutoTokenizer.from_pretrained(workspace["causal"]))
    assert 2 <= len(rows) < 26  # the tiny vocabulary has a few of the letters
    from bayeslora.layout import RunFolder

    adapter = json.loads((RunFolder(run).selected_adapter()[0] / "adapter_config.json").read_text())
    assert adapter["output_rows"] == {"lm_head": rows}
    assert json.loads((run / "config.json").read_text())["train"]["method_options"]["label_rows"] is True
    nll = {}
    for mode in ("sample", "mean", "merged"):
        out = tmp_path / f"{mode}.json"
        assert cli.main(["evaluate", "--run", str(run), "--task", "jsonl", "--data-file",
                         str(workspace["data"]["causal"]), "--split", "train", "--mode", mode,
                         "--output", str(out)]) == 0
        nll[mode] = json.loads(out.read_text())["nll"]
    assert nll["mean"] == pytest.approx(nll["merged"], abs=1e-4)
    loglik = train_args(workspace, "causal", "bayeslora", tmp_path / "r2", "--label-rows", "true", *head[2:])
    capsys.readouterr()
    assert cli.main(loglik) == 2 and "needs --scoring labels" in capsys.readouterr().err
    untargeted = train_args(workspace, "causal", "bayeslora", tmp_path / "r3", "--label-rows", "true",
                            "--scoring", "labels", "--max-steps", "1")
    assert cli.main(untargeted) == 2 and "is not a Bayesian target" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--geometry-lr-factor", "0"), ("--mean-lr-factor", "-1"),
                                         ("--scale-lr", "0")])
def test_a_learning_rate_factor_that_cannot_work_is_refused_by_name(workspace, tmp_path, capsys, flag, value):
    # a zero factor used to end in a ZeroDivisionError traceback while the optimizer was built
    assert cli.main(train_args(workspace, "causal", "bayeslora", tmp_path / "run", "--max-steps", "1",
                               flag, value)) == 2
    assert f"{flag} must be a positive finite number" in capsys.readouterr().err


def test_training_over_a_run_is_refused_unless_overwritten(workspace, tmp_path, capsys):
    """Training into a finished run used to leave its evaluations beside the new adapter (the report then
    listed the old method's rows for the new run); --overwrite removes only what a run wrote."""
    run = tmp_path / "run"
    first = train_args(workspace, "causal", "lora", run, "--max-steps", "1")
    assert cli.main(first) == 0
    (run / "eval").mkdir()
    (run / "eval" / "metrics-old.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    second = train_args(workspace, "causal", "map", run, "--max-steps", "1")
    assert cli.main(second) == 2
    err = capsys.readouterr().err
    assert "holds a run already" in err and "--overwrite" in err
    assert json.loads((run / "config.json").read_text())["train"]["method"] == "lora"  # untouched
    assert cli.main(second + ["--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["method"] == "map"
    assert not (run / "eval").exists() and (run / "notes.txt").read_text() == "mine"
    assert cli.main(second + ["--overwrite", "--resume"]) == 2
    assert "pass one" in capsys.readouterr().err
    model_like = tmp_path / "model-folder"  # a config.json that no run wrote: never deleted
    model_like.mkdir()
    (model_like / "config.json").write_text('{"model_type": "bert"}')
    assert cli.main(train_args(workspace, "causal", "lora", model_like, "--max-steps", "1", "--overwrite")) == 2
    assert "is not a bayeslora run" in capsys.readouterr().err
    assert json.loads((model_like / "config.json").read_text()) == {"model_type": "bert"}


def test_resume_reads_the_folder_given_from_any_directory(workspace, tmp_path, monkeypatch, capsys):
    """config.json recorded --output as typed ('r'): a resume from another directory looked for ./r."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    data = Path(workspace["data"]["causal"])
    (here / "task.jsonl").write_text(data.read_text())
    monkeypatch.chdir(here)
    args = train_args(workspace, "causal", "lora", "r", "--max-steps", "2", "--save-steps", "1")
    args[args.index("--train-file") + 1] = args[args.index("--val-file") + 1] = "task.jsonl"  # relative
    assert cli.main(args) == 0
    recorded = json.loads((here / "r" / "config.json").read_text())["train"]
    assert recorded["train_file"] == str(here / "task.jsonl")  # absolute: calibrate works from anywhere
    monkeypatch.chdir(elsewhere)
    (elsewhere / "r").mkdir()  # a decoy with the recorded relative name: it must not be the one read
    assert cli.main(["train", "--resume", "--output", "../here/r", "--no-progress",
                     "--train-file", "../here/task.jsonl"]) == 0  # the recorded file, named another way
    assert list((elsewhere / "r").iterdir()) == []
    assert "run folder: ../here/r" in capsys.readouterr().out


def test_resume_refuses_options_it_would_ignore(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_args(workspace, "causal", "bayeslora", run, "--max-steps", "1", "--lr", "1e-2",
                               "--seed", "1")) == 0
    resume = ["train", "--resume", "--output", str(run), "--no-progress"]
    assert cli.main(resume + ["--max-steps", "5"]) == 2
    assert "--max-steps 5 (the run has 1)" in capsys.readouterr().err
    assert cli.main(resume + ["--flow-depth", "2"]) == 2
    assert "--flow-depth 2" in capsys.readouterr().err
    # typed equal to its default is typed all the same (argparse alone cannot tell it from no --seed)
    assert cli.main(resume + ["--seed", "0"]) == 2
    assert "--seed 0 (the run has 1)" in capsys.readouterr().err
    assert cli.main(resume + ["--no-flipout"]) == 2
    assert "--no-flipout (an option of --method blob; the run is bayeslora)" in capsys.readouterr().err
    # the recorded values repeated (as when re-running the original command with --resume) are fine,
    # method flags included, also those recorded under another name (lr_factors)
    recorded = json.loads((run / "config.json").read_text())["train"]["method_options"]
    assert cli.main(resume + ["--lr", "1e-2", "--method", "bayeslora", "--max-steps", "1", "--seed", "1",
                              "--flow-depth", str(recorded["flow_depth"]),
                              "--mean-lr-factor", str(recorded["lr_factors"]["mean"])]) == 0
    # a run of a method not registered here (a user's own): train's clean error, not a KeyError
    config = json.loads((run / "config.json").read_text())
    config["train"]["method"] = "toy"
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(resume + ["--flow-depth", "2"]) == 2
    assert "unknown method 'toy'" in capsys.readouterr().err


def test_train_knows_which_options_were_typed_even_at_their_default():
    argv = ["train", "--task", "arc_easy", "--seed", "0", "--eval-batch-size=32", "--no-progress", "--flow-depth",
            "2", "--output", "r"]
    parser, sub = cli._build_parser("train")
    args = parser.parse_args(argv)
    assert cli._typed_options(sub.choices["train"], "train", argv, args) == {"task", "seed", "eval_batch_size", "no_progress",
                                                        "flow_depth", "output"}


@pytest.mark.parametrize("method, recipe, option, value", [
    ("lora", "paper", "warmup_ratio", 0.5), ("bayeslora", "paper", "kl_warmup_steps", 10),
    ("blob", None, "kl_warmup_steps", 10)])
def test_an_option_the_recipe_does_not_read_is_refused(method, recipe, option, value):
    from bayeslora.training import TrainConfig, resolve

    cfg = TrainConfig(task="arc_easy", method=method, recipe=recipe, **{option: value})
    with pytest.raises(ValueError, match=f"does not read --{option.replace('_', '-')} {value}"):
        resolve(cfg)
    resolve(TrainConfig(task="arc_easy", method=method, recipe=recipe))  # unset: fine


@pytest.mark.parametrize("value", [1.0, 2, -0.1])
def test_warmup_ratio_outside_zero_one_is_refused(value):
    from bayeslora.training import TrainConfig

    with pytest.raises(ValueError, match="--warmup-ratio must be in"):
        TrainConfig(task="arc_easy", method="lora", warmup_ratio=value)


def test_calibrate_and_resume_refuse_data_that_changed_since_training(workspace, tmp_path, capsys):
    """The sha256 of each data file was recorded but never compared: a replaced train file gave calibrate
    another val slice than the run was selected on, with no word said."""
    data = tmp_path / "task.jsonl"
    original = Path(workspace["data"]["causal"]).read_text()
    data.write_text(original)
    run = tmp_path / "run"
    args = train_args(workspace, "causal", "lora", run, "--max-steps", "1", "--save-steps", "1")
    args[args.index("--train-file") + 1] = args[args.index("--val-file") + 1] = str(data)
    assert cli.main(args) == 0
    lines = original.splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # the same rows in another order: other bytes
    assert cli.main(["calibrate", "--run", str(run), "--calibration", "temperature"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: not the train data this run trained on" in err
    assert cli.main(["train", "--resume", "--output", str(run), "--no-progress"]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    data.write_text(original)
    assert cli.main(["calibrate", "--run", str(run), "--calibration", "temperature"]) == 0


def test_a_run_whose_train_file_moved_resumes_with_the_new_path(workspace, tmp_path, capsys):
    """A --task jsonl run always reads files: once they moved, neither a plain resume (the file is gone) nor
    one naming the new path (refused as a changed setting) could continue it."""
    (tmp_path / "here").mkdir()
    data = tmp_path / "here" / "task.jsonl"
    data.write_text(Path(workspace["data"]["causal"]).read_text())
    run = tmp_path / "run"
    args = train_args(workspace, "causal", "lora", run, "--max-steps", "1", "--save-steps", "1")
    args[args.index("--train-file") + 1] = args[args.index("--val-file") + 1] = str(data)
    assert cli.main(args) == 0
    (tmp_path / "here").rename(tmp_path / "there")
    moved = str(tmp_path / "there" / "task.jsonl")
    resume = ["train", "--resume", "--output", str(run), "--no-progress"]
    assert cli.main(resume + ["--train-file", moved, "--val-file", moved]) == 0
    train = json.loads((run / "config.json").read_text())
    assert train["train"]["train_file"] == train["train"]["val_file"] == moved
    assert {f["path"] for files in train["data_files"].values() for f in files} == {moved}
    assert cli.main(["calibrate", "--run", str(run), "--calibration", "temperature"]) == 0
    # other bytes at the new path are still refused, naming the file
    Path(moved).write_text(Path(moved).read_text() + "\n")
    assert cli.main(resume + ["--train-file", moved, "--val-file", moved]) == 2
    assert "sha256 differs" in capsys.readouterr().err


def test_a_resume_cannot_swap_a_val_slice_for_a_val_file(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(workspace, "causal", "lora", run, "--max-steps", "1")
    del args[args.index("--val-file"):args.index("--val-file") + 2]  # a seeded val slice of the train file
    assert cli.main(args) == 0
    data = workspace["data"]["causal"]
    assert cli.main(["train", "--resume", "--output", str(run), "--no-progress", "--val-file", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"--val-file {data} (the run read no such file: a val slice of its train data)" in err


def test_a_local_model_folder_is_recorded_absolute(workspace, tmp_path, monkeypatch):
    """A run trained with --model ./m recorded './m', so resume, evaluate and calibrate from another directory
    failed or sent the name to the Hub."""
    model = Path(workspace["causal"])
    monkeypatch.chdir(model.parent)
    run = tmp_path / "run"
    args = train_args(workspace, "causal", "lora", run, "--max-steps", "1")
    args[args.index("--model") + 1] = model.name  # relative to the working directory
    assert cli.main(args) == 0
    assert json.loads((run / "config.json").read_text())["train"]["model"] == str(model)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--resume", "--output", str(run), "--no-progress", "--model", str(model)]) == 0
