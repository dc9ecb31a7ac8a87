"""Training-step and forward time of Bayesian-LoRA against plain PEFT LoRA on a small Llama.

What it measures
----------------
For each hidden size (default 512 and 64) a randomly initialised ``transformers.LlamaForCausalLM``
(4 layers, 8 heads, intermediate ≈ 2.69 × hidden, i.e. 1376 at hidden 512, vocab 32000) is built once
and deep-copied into two models that share the same base weights:

* **bayeslora**: ``bayeslora.get_model`` with LoRA r=8, alpha=16 on q_proj, v_proj and lm_head, of which
  q_proj and lm_head are Bayesian (sample mode: every forward draws fresh factors);
* **lora**: ``peft.get_peft_model`` with a ``peft.LoraConfig`` of the same targets, r and alpha;
* **bayeslora, head on label rows** (``--label-rows N``, default 5): bayeslora whose lm_head adapter
  changes only N output rows (``BayesLoraConfig.output_rows``, as ``--label-rows true`` sets for a
  label-scored task): its B factor is N×r instead of 32000×r. Timed against the same LoRA model.

A *training step* is zero_grad + forward + cross-entropy of next-token logits on random tokens
(+ β·KL for bayeslora) + backward + ``torch.optim.AdamW`` step over the trainable parameters. At the
largest hidden size a *forward-only* pass (sample mode, ``torch.no_grad``) is timed as well.

Why the median of interleaved pairs
-----------------------------------
The machine is shared and its speed drifts by tens of percent within seconds. After a warm-up, steps
alternate bayeslora, lora, bayeslora, lora, ... on the same input, so both halves of a pair see nearly
the same machine state; the ratio of each pair cancels most of the drift, and the *median* of those
ratios ignores the pairs that a neighbour's burst of work hit. We print the median ratio with the
min/max of the per-pair ratios (their spread shows how noisy the run was) and the median absolute
times. The ratio at hidden 64, where the LoRA model itself is cheap, exposes the fixed per-step cost
of the Bayesian machinery (drawing, flow, KL, extra optimizer tensors); at hidden 512 it is amortised.

Pairing cancels drift but not a cost that only one side pays under load: on an oversubscribed CPU the
many small batched ops of the posterior draw each wait for a descheduled intra-op worker thread, so
bayeslora's overhead grows from tens of milliseconds to hundreds. The 1-minute load average is printed
before and after each measurement; compare it with the thread count before trusting a ratio.

Usage::

    python benchmarks/step_time.py                       # CPU, 2 threads, fp32, hidden 512 and 64
    python benchmarks/step_time.py --steps 40 --json out.json
    python benchmarks/step_time.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from typing import Callable

import peft
import torch
import torch.nn.functional as F
import transformers

import bayeslora

TARGETS = ["q_proj", "v_proj", "lm_head"]
BAYESIAN = ["q_proj", "lm_head"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KL_WEIGHT = 1e-3  # β; its value does not change the cost


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p, hidden=[512, 64])
    p.add_argument("--steps", type=int, default=16,
                   help="measured pairs (bayeslora, lora) per training measurement; the forward-only "
                        "measurement takes 2x and hidden sizes below 256 take 4x, their steps being short")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured pairs before each measurement")
    p.add_argument("--label-rows", type=int, default=5,
                   help="also time bayeslora with its lm_head adapter restricted to this many output rows "
                        "(BayesLoraConfig.output_rows: the answer labels of a label-scored task); 0 = skip")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the base model")
    p.add_argument("--seed", type=int, default=0)
    add_preset_argument(p)
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args()
    resolve_device(p, args)
    if args.dtype == "bf16" and not args.device.startswith("cuda"):
        p.error("--dtype bf16 is meant for CUDA (bf16 matmuls on CPU are not representative)")
    return args


def add_model_arguments(p: argparse.ArgumentParser, hidden: list[int]) -> None:
    """The benchmark model's size and its LoRA (``--hidden`` defaults to ``hidden``), shared by the scripts."""
    p.add_argument("--hidden", type=int, nargs="+", default=hidden, help="hidden sizes to measure")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)


def resolve_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--device auto`` becomes cuda when available; an unavailable cuda is a usage error."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")


# ------------------------------------------------------------------------------------ models
def intermediate_size(hidden: int) -> int:
    """Llama's MLP ratio as in the 1376-at-512 setting, rounded to a multiple of 8."""
    return max(8, round(hidden * 1376 / 512 / 8) * 8)


def build_base(args: argparse.Namespace, hidden: int, device: torch.device, dtype: torch.dtype):
    """The random base Llama of the benchmarks (seeded by ``args.seed``) and its config."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=intermediate_size(hidden),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq, tie_word_embeddings=False, use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype), config


def label_rows(args: argparse.Namespace) -> list[int]:
    """``args.label_rows`` distinct vocabulary rows, seeded (label tokens sit anywhere in a vocabulary)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    return sorted(torch.randperm(args.vocab, generator=gen)[: args.label_rows].tolist())


def add_preset_argument(p: argparse.ArgumentParser) -> None:
    """``--preset``: which ``bayeslora train --preset`` the Bayesian side is built from."""
    from bayeslora.methods.bayes import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="Bayesian-LoRA posterior preset, as `bayeslora train --preset`")


def preset_posterior(name: str) -> dict:
    """The posterior fields of a ``bayeslora train --preset`` (the CLI's default unless asked otherwise), so a
    benchmark measures the construction users train with."""
    from bayeslora.methods.bayes import PRESETS

    return dict(PRESETS[name].posterior)


def build_bayes(args: argparse.Namespace, base, rows: list[int] | None = None):
    """bayeslora on a copy of ``base``; with ``rows``, its lm_head adapter changes only those output rows."""
    bayes_cfg = bayeslora.BayesLoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS,
                                          bayesian_modules=BAYESIAN,
                                          output_rows=None if rows is None else {"lm_head": rows},
                                          **preset_posterior(args.preset))
    return bayeslora.get_model(copy.deepcopy(base), bayes_cfg)


def build_pair(args: argparse.Namespace, hidden: int, device: torch.device, dtype: torch.dtype):
    """The same random base Llama wrapped twice: (bayeslora PeftModel, plain-LoRA PeftModel, the base)."""
    base, _ = build_base(args, hidden, device, dtype)
    lora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS)
    lora = peft.get_peft_model(copy.deepcopy(base), lora_cfg)
    return build_bayes(args, base), lora, base


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ steps
def make_train_step(model, is_bayes: bool, vocab: int) -> Callable[[torch.Tensor], None]:
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4, weight_decay=0.0)
    model.train()

    def step(ids: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        if is_bayes:
            loss = loss + KL_WEIGHT * bayeslora.kl_divergence(model)
        loss.backward()
        optimizer.step()

    return step


def make_forward(model) -> Callable[[torch.Tensor], None]:
    model.eval()  # dropout off; bayeslora stays in sample mode (it follows set_mode, not eval)

    def forward(ids: torch.Tensor) -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return forward


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): how busy the shared machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, with the device idle before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed(fn: Callable[[torch.Tensor], None], ids: torch.Tensor, device: torch.device) -> float:
    return timed_call(lambda: fn(ids), device)


def interleaved(bayes_fn, lora_fn, args, device: torch.device, steps: int) -> dict:
    """Warm up, then time ``steps`` pairs (bayeslora, lora) on the same fresh random batch."""
    gen = torch.Generator().manual_seed(args.seed + 1)

    def batch() -> torch.Tensor:
        return torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    load_before = load_average()
    for _ in range(args.warmup):
        ids = batch()
        timed(bayes_fn, ids, device)
        timed(lora_fn, ids, device)
    t_bayes, t_lora = [], []
    for _ in range(steps):
        ids = batch()
        t_bayes.append(timed(bayes_fn, ids, device))
        t_lora.append(timed(lora_fn, ids, device))
    ratios = [b / l for b, l in zip(t_bayes, t_lora)]
    return {
        "pairs": steps,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "bayeslora_ms_median": 1e3 * statistics.median(t_bayes),
        "lora_ms_median": 1e3 * statistics.median(t_lora),
        "overhead_ms_median": 1e3 * statistics.median(b - l for b, l in zip(t_bayes, t_lora)),
        "load_before": load_before,
        "load_after": load_average(),
        "bayeslora_ms": [round(1e3 * t, 3) for t in t_bayes],
        "lora_ms": [round(1e3 * t, 3) for t in t_lora],
    }


def line(hidden: int, what: str, r: dict) -> str:
    return (f"hidden {hidden:4d}  {what:<22s} ratio median {r['ratio_median']:.3f} "
            f"[min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f}] over {r['pairs']} pairs | "
            f"bayeslora {r['bayeslora_ms_median']:8.1f} ms, lora {r['lora_ms_median']:8.1f} ms "
            f"(median paired difference {r['overhead_ms_median']:+.1f} ms) "
            f"[load {_fmt_load(r['load_before'])} -> {_fmt_load(r['load_after'])}]")



# ------------------------------------------------------------------------------------ main
def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    forward_hidden = max(args.hidden)
    header = {
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "layers": args.layers, "heads": args.heads,
        "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "rank": args.rank, "alpha": args.alpha,
        "targets": TARGETS, "bayesian": BAYESIAN, "warmup": args.warmup, "label_rows": args.label_rows,
        "preset": args.preset,
    }
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    print("step_time: bayeslora (sample mode) vs plain PEFT LoRA, median of interleaved pairs")
    print("  " + ", ".join(f"{k}={v}" for k, v in header.items()))
    if args.vocab != 32000:
        print(f"  NOTE: vocab {args.vocab} instead of Llama's 32000 (lm_head and logits scale with it)")

    results = []
    for hidden in args.hidden:
        bayes, lora, base = build_pair(args, hidden, device, dtype)
        config = base.config
        counts = bayeslora.count_parameters(bayes)
        lora_trainable = sum(p.numel() for p in trainable(lora))
        print(f"hidden {hidden:4d}: intermediate {config.intermediate_size}, "
              f"trainable bayeslora {counts['trainable']:,} vs lora {lora_trainable:,} "
              f"({counts['bayesian_factors']} Bayesian factors)")
        steps = args.steps if hidden >= 256 else 4 * args.steps
        entry = {"hidden": hidden, "intermediate": config.intermediate_size,
                 "trainable_bayeslora": counts["trainable"], "trainable_lora": lora_trainable}
        entry["train"] = interleaved(make_train_step(bayes, True, args.vocab),
                                     make_train_step(lora, False, args.vocab), args, device, steps)
        print(line(hidden, "train step", entry["train"]), flush=True)
        if hidden == forward_hidden:
            entry["forward"] = interleaved(make_forward(bayes), make_forward(lora), args, device, 2 * steps)
            print(line(hidden, "forward (no grad)", entry["forward"]), flush=True)
        del bayes
        if args.label_rows:  # the same base and LoRA reference, bayeslora's lm_head on label rows only
            restricted = build_bayes(args, base, rows=label_rows(args))
            entry["train_label_rows"] = interleaved(make_train_step(restricted, True, args.vocab),
                                                    make_train_step(lora, False, args.vocab), args, device, steps)
            print(line(hidden, f"train, head {args.label_rows} rows", entry["train_label_rows"]), flush=True)
            del restricted
        results.append(entry)
        del lora, base

    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": header, "results": results}, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
