"""The training-memory estimate printed before every run, against the peak measured on the step_time model.

For each hidden size and each side (bayeslora, plain PEFT LoRA; same targets as ``step_time.py``) a
fresh subprocess builds the model alone, runs a few training steps (language-modelling loss over every
position, so ``full_logits``), and reports its peak: on CUDA ``torch.cuda.max_memory_allocated``; on CPU
the process's peak RSS (``VmHWM``) less its RSS after the imports (the same modules on both sides), i.e.
what the model and the steps added. Printed: estimate, measured, and estimate / measured per part of the matrix.

Usage::

    python benchmarks/memory_estimate.py                      # CPU, hidden 64 and 512
    python benchmarks/memory_estimate.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --seq 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import peft
    from step_time import BAYESIAN, DTYPES, KL_WEIGHT, TARGETS, build_base, preset_posterior

    import bayeslora
    from bayeslora.memory_estimate import estimate_training_memory

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # both sides make every import either needs before the baseline (the preset reads the method registry,
    # get_model the adapter code and zuko): modules loaded after it were counted as the posterior's memory
    posterior = preset_posterior(args.preset)
    get_model = bayeslora.get_model
    baseline = _rss_kb("VmRSS") * 1024 if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    args.seed = 0
    base, _ = build_base(args, args.hidden_size, device, DTYPES[args.dtype])
    if args.side == "bayeslora":
        model = get_model(base, bayeslora.BayesLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                          bayesian_modules=BAYESIAN, **posterior))
    else:
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    estimate = estimate_training_memory(model, rows=args.batch, seq=args.seq, full_logits=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, args.vocab).float(), ids[:, 1:].reshape(-1))
        if args.side == "bayeslora":
            loss = loss + KL_WEIGHT * bayeslora.kl_divergence(model)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
    else:
        measured = _rss_kb("VmHWM") * 1024 - baseline
    print(json.dumps({"estimate": estimate.to_dict(), "measured": measured}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 512])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--preset", default="default", help="Bayesian-LoRA posterior preset, as `bayeslora train --preset`")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", default="bayeslora", help=argparse.SUPPRESS)
    p.add_argument("--hidden-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    common = [f"--{k}={getattr(args, k)}" for k in ("layers", "heads", "vocab", "seq", "batch", "steps", "threads",
                                                    "device", "dtype", "preset")]
    results = []
    print(f"memory: estimate against measured peak ({args.device}, {args.dtype}, {args.layers} layers, vocab "
          f"{args.vocab}, batch {args.batch} × seq {args.seq}; CPU: peak RSS less the RSS after imports)")
    for hidden in args.hidden:
        for side in ("bayeslora", "lora"):
            proc = subprocess.run([sys.executable, __file__, "--child", f"--side={side}", f"--hidden-size={hidden}",
                                   *common], capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            est, measured = r["estimate"]["total"], r["measured"]
            results.append({"hidden": hidden, "side": side, "preset": args.preset, **r})
            parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["estimate"].items() if k != "total")
            print(f"  hidden {hidden:5d} {side:9s}: estimate {est / 2**20:8.0f} MB, measured {measured / 2**20:8.0f} MB, "
                  f"estimate/measured x{est / max(measured, 1):.2f}  ({parts})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
