"""Inference cost of Bayesian-LoRA's modes against the base model, side by side in one run.

What it measures (no gradients; the ``step_time.py`` model: a random Llama, LoRA r=8 on q_proj, v_proj and
lm_head, q_proj and lm_head Bayesian, the CLI's default preset), timed as interleaved rounds (each round
runs every variant once, in turn, so they see the same machine):

* ``base``: the base model alone, one forward of B sequences;
* ``merged``: the adapter's posterior mean merged into the base weights and the PEFT wrappers removed
  (``merge_and_unload``): what a zero-latency deployment runs;
* ``merged_wrapped``: merged, wrappers kept (``merge_adapter``): PEFT's layers and the sampler's
  pre-forward hook still run, the adapters' products do not;
* ``mean``: mean mode, unmerged: one deterministic pass with the adapter's products;
* ``batched_S``: sample mode, S draws as one forward of S×B rows (``set_mode(model, "sample", S)``, the
  input repeated sample-major), the draw included;
* ``sequential_S``: the same S draws as S forwards of B rows, one draw each.

Printed: milliseconds (median, min, max over rounds), and the ratios the performance issue sets targets for:
merged / base (≤ 1.02), batched_4 / mean (≤ 2 on a GPU) and, per S, batched / sequential and the cost
per example-draw. On a CPU a forward's cost grows with its rows, so S×B batching cannot approach one pass
there; the ≤ 2 target is about a GPU, where B rows leave most of the device idle.

Usage::

    python benchmarks/infer_time.py                        # CPU, hidden 512, seq 128, batch 8
    python benchmarks/infer_time.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --seq 512
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import (  # noqa: E402
    DTYPES, add_model_arguments, add_preset_argument, build_base, build_bayes, load_average, resolve_device,
    timed_call,
)

import bayeslora  # noqa: E402


def variants(args: argparse.Namespace, hidden: int, device: torch.device) -> dict:
    """name -> (setup, forward), where the setup runs untimed before each timed no-grad forward, and the
    largest logit differences of the merged models and the base from mean mode; every model is built from
    one seeded base."""
    base, _ = build_base(args, hidden, device, DTYPES[args.dtype])
    base.eval()
    bayes = build_bayes(args, base).eval()
    torch.manual_seed(args.seed + 1)  # a trained-looking adapter: E[B] = 0 at init would merge nothing
    with torch.no_grad():
        for name, p in bayes.named_parameters():
            if p.requires_grad and ("inducing_mean" in name or "lora_offset" in name or "lora_B" in name):
                p.add_(0.05 * torch.randn_like(p))
    bayeslora.set_mode(bayes, "mean")
    wrapped = copy.deepcopy(bayes)  # the same adapter, merged in place
    wrapped.merge_adapter()
    merged = copy.deepcopy(bayes).merge_and_unload().eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def forward(model, rows):
        return lambda: None, lambda: model(input_ids=rows, use_cache=False)

    def bayes_mode(mode: str, count: int, rows: torch.Tensor, passes: int = 1):
        # the mode is set before the clock starts, as a user sets it once; the forward draws (sample mode)
        def run():
            for _ in range(passes):
                bayes(input_ids=rows, use_cache=False)
        def setup():
            bayeslora.set_mode(bayes, mode, count)
            if mode == "mean":  # means are cached by parameter version: make sure they are, untimed
                bayes(input_ids=rows[:1], use_cache=False)
        return setup, run

    with torch.no_grad():  # what is timed must compute the same thing: merged == wrapped == mean mode
        bayeslora.set_mode(bayes, "mean")
        logits = [m(input_ids=ids, use_cache=False).logits.float() for m in (bayes, merged, wrapped, base)]
        # and S seeded draws as one S×B batch (sample-major blocks) must equal S single-draw passes
        seeds = [11, 12]
        bayeslora.set_mode(bayes, "sample", len(seeds))
        bayeslora.set_draw_seeds(bayes, seeds)
        batched = bayes(input_ids=ids.repeat(len(seeds), 1), use_cache=False).logits.float()
        bayeslora.set_mode(bayes, "sample", 1)
        one_by_one = []
        for seed in seeds:
            bayeslora.set_draw_seeds(bayes, [seed])
            one_by_one.append(bayes(input_ids=ids, use_cache=False).logits.float())
        bayeslora.set_draw_seeds(bayes, None)  # timed draws use the global RNG, as an unseeded user's do
    agreement = {"merged_vs_mean": (logits[1] - logits[0]).abs().max().item(),
                 "merged_wrapped_vs_mean": (logits[2] - logits[0]).abs().max().item(),
                 "base_vs_mean": (logits[3] - logits[0]).abs().max().item(),
                 "batched_vs_sequential_draws": (batched - torch.cat(one_by_one)).abs().max().item(),
                 "draw_1_vs_draw_2": (one_by_one[0] - one_by_one[1]).abs().max().item()}
    out = {"base": forward(base, ids), "merged": forward(merged, ids), "merged_wrapped": forward(wrapped, ids),
           "mean": bayes_mode("mean", 1, ids)}
    for s in args.samples:
        out[f"batched_{s}"] = bayes_mode("sample", s, ids.repeat(s, 1))  # sample-major: draw i scores rows iB…
        out[f"sequential_{s}"] = bayes_mode("sample", 1, ids, passes=s)
    return out, agreement


def ratio(times: dict, a: str, b: str) -> dict:
    r = [x / y for x, y in zip(times[a], times[b])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def measure(args: argparse.Namespace, hidden: int, device: torch.device) -> dict:
    fns, agreement = variants(args, hidden, device)
    times = {name: [] for name in fns}
    load_before = load_average()
    with torch.no_grad():
        for round_ in range(args.warmup + args.rounds):
            for name, (setup, fn) in fns.items():
                setup()
                t = timed_call(fn, device)
                if round_ >= args.warmup:
                    times[name].append(t)
    out = {name: {"ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t), "ms_max": 1e3 * max(t)}
           for name, t in times.items()}
    out["merged_over_base"] = ratio(times, "merged", "base")
    out["merged_wrapped_over_base"] = ratio(times, "merged_wrapped", "base")
    out["mean_over_base"] = ratio(times, "mean", "base")
    for s in args.samples:
        out[f"batched_{s}_over_mean"] = ratio(times, f"batched_{s}", "mean")
        out[f"batched_{s}_over_sequential_{s}"] = ratio(times, f"batched_{s}", f"sequential_{s}")
        for kind in ("batched", "sequential"):  # per example-draw: one question scored by one draw
            out[f"{kind}_{s}"]["ms_per_example_draw"] = out[f"{kind}_{s}"]["ms_median"] / (s * args.batch)
    out["load"] = [load_before, load_average()]
    out["max_abs_logit_difference"] = agreement
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p, hidden=[512])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8], help="the S of the table")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the base model")
    p.add_argument("--seed", type=int, default=0)
    add_preset_argument(p)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    resolve_device(p, args)
    if 4 not in args.samples:
        p.error("--samples must include 4 (the target is set for S = 4)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": args.threads, "cpus": os.cpu_count(), "dtype": args.dtype, "preset": args.preset,
           "batch": args.batch, "seq": args.seq, "layers": args.layers, "vocab": args.vocab}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    print("environment:", json.dumps(env))
    results = {"environment": env}
    for hidden in args.hidden:
        r = measure(args, hidden, device)
        results[f"hidden_{hidden}"] = r
        if args.json:  # after each size, so a run stopped by a time limit keeps what it finished
            Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"hidden {hidden} ({args.layers} layers, vocab {args.vocab}, batch {args.batch} × seq {args.seq}; "
              f"median of {args.rounds} interleaved rounds; load {r['load'][0]:.1f} -> {r['load'][1]:.1f}):")
        print("  max |logit difference| from mean mode: " + ", ".join(
            f"{k.replace('_vs_mean', '')} {v:.2e}" for k, v in r["max_abs_logit_difference"].items()
            if k.endswith("_vs_mean")))
        diff = r["max_abs_logit_difference"]
        print(f"  S seeded draws as one S×B batch vs one by one: max |logit difference| "
              f"{diff['batched_vs_sequential_draws']:.2e} (two draws differ by {diff['draw_1_vs_draw_2']:.2e})")
        for name in ("base", "merged", "merged_wrapped", "mean"):
            v = r[name]
            print(f"  {name:15s} {v['ms_median']:9.1f} ms  (min {v['ms_min']:.1f}, max {v['ms_max']:.1f})")
        for what in ("merged_over_base", "merged_wrapped_over_base", "mean_over_base", "batched_4_over_mean"):
            a = r[what]
            print(f"  {what.replace('_over_', ' / '):27s} x{a['median']:.3f} (min {a['min']:.3f}, max {a['max']:.3f})")
        print("  S | batched S×B ms | sequential ms | batched / sequential | ms per example-draw, batched vs sequential")
        for s in args.samples:
            b, q, a = r[f"batched_{s}"], r[f"sequential_{s}"], r[f"batched_{s}_over_sequential_{s}"]
            print(f"  {s} | {b['ms_median']:14.1f} | {q['ms_median']:13.1f} | x{a['median']:.3f} "
                  f"[{a['min']:.3f}, {a['max']:.3f}] | {b['ms_per_example_draw']:.2f} vs {q['ms_per_example_draw']:.2f}")


if __name__ == "__main__":
    main()
