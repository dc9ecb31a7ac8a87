"""Every performance figure in one prepared run: the script a session with a GPU runs as it is.

It runs the four benchmark scripts beside it, each in its own subprocess with a time limit, on one model
size, writes each one's JSON and log into ``--out``, and then ``summary.json`` and ``summary.md``: every
target of the performance issue with the measured ratio and whether it is met. The before/after switches
live in the scripts (``draw_time.py``'s variants; ``step_time.py``'s label-row head; ``infer_time.py``'s
modes), so one run gives every comparison.

Sizes (the issue's):

* ``gpu`` (default when CUDA is available): a 1B-class random Llama in bf16, hidden 2048, 16 layers,
  vocabulary 32,000, sequence 512, batch 8 (q_proj, v_proj and lm_head adapted; q_proj and lm_head
  Bayesian); the draw's fixed cost is also measured at hidden 64;
* ``cpu``: the CPU targets' model, hidden 64 (and 512 where a script takes two), fp32, one thread;
* ``tiny``: seconds on a CPU, so a test can run the whole script (figures meaningless).

A script that fails or runs out of time is recorded as such and the rest go on; the summary is rewritten
after every script, and a script stopped by its limit keeps the sizes it finished (``infer_time.py`` writes
its JSON after each). A machine without internet
access needs zuko installed from a carried wheel first (``pip install --no-deps zuko-*.whl``).

Usage::

    python benchmarks/perf_suite.py --out results/               # size from the device
    python benchmarks/perf_suite.py --size tiny --out /tmp/perf   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# (script, arguments) per size; every script also gets --json
SIZES: dict[str, dict[str, list[str]]] = {
    "gpu": {
        "step_time": ["--device", "cuda", "--dtype", "bf16", "--hidden", "2048", "--layers", "16", "--heads", "16",
                      "--seq", "512", "--batch", "8", "--steps", "12", "--threads", "8"],
        "draw_time": ["--device", "cuda", "--hidden", "64", "2048", "--layers", "16", "--heads", "16",
                      "--rounds", "40", "--threads", "8"],
        "memory_estimate": ["--device", "cuda", "--dtype", "bf16", "--hidden", "2048", "--layers", "16",
                            "--heads", "16", "--seq", "512", "--batch", "8", "--steps", "3"],
        "infer_time": ["--device", "cuda", "--dtype", "bf16", "--hidden", "2048", "--layers", "16", "--heads", "16",
                       "--seq", "512", "--batch", "8", "--rounds", "10", "--threads", "8"],
    },
    "cpu": {
        "step_time": ["--hidden", "64", "--threads", "1", "--steps", "24"],
        "draw_time": ["--hidden", "64", "512", "--rounds", "40"],
        "memory_estimate": ["--hidden", "64", "512", "--threads", "1"],
        "infer_time": ["--hidden", "64", "512", "--rounds", "6"],
    },
    "tiny": {
        "step_time": ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "128", "--seq", "16",
                      "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1"],
        "draw_time": ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "128", "--rounds", "2",
                      "--warmup", "1"],
        "memory_estimate": ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "128", "--seq", "16",
                            "--batch", "2", "--steps", "1", "--threads", "1"],
        "infer_time": ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "128", "--seq", "16",
                       "--batch", "2", "--samples", "1", "4", "--rounds", "2"],
    },
}
# the targets: (what, script, how to read the figure from its JSON, bound, on which sizes)
TRAIN_BOUND = {"gpu": 1.10, "cpu": 1.05, "tiny": 1.05}


def _step(data: dict, size: str) -> list[tuple[str, float, float]]:
    r = data["results"][0]
    return [(f"training step bayeslora / lora, hidden {r['hidden']}", r["train"]["ratio_median"], TRAIN_BOUND[size])]


def _draw(data: dict, size: str) -> list[tuple[str, float, float | None]]:
    """The ≤ 10 ms target is the CPU's, at hidden 64 where the draw dominates a step; other sizes and the
    GPU's figures are reported without a bound."""
    out = []
    for key in sorted((k for k in data if k.startswith("hidden_")), key=lambda k: int(k.split("_")[1])):
        bound = 10.0 if size != "gpu" and key == "hidden_64" else None
        out.append((f"one training draw of every factor, {key.replace('_', ' ')} (ms)", data[key]["after"]["ms_median"],
                    bound))
    return out


def _memory(data: list, size: str) -> list[tuple[str, float, float]]:
    out = []
    for hidden in sorted({r["hidden"] for r in data}):
        side = {r["side"]: r["measured"] for r in data if r["hidden"] == hidden}
        out.append((f"peak memory bayeslora / lora, hidden {hidden}", side["bayeslora"] / side["lora"], 1.05))
    return out


def _infer(data: dict, size: str) -> list[tuple[str, float, float]]:
    out = []
    for key in sorted(k for k in data if k.startswith("hidden_")):
        r, h = data[key], key.replace("_", " ")
        out.append((f"merged / base model, {h}", r["merged_over_base"]["median"], 1.02))
        out.append((f"sample mode S = 4 as one S×B batch / mean mode, {h}", r["batched_4_over_mean"]["median"], 2.0))
    return out


READERS = {"step_time": _step, "draw_time": _draw, "memory_estimate": _memory, "infer_time": _infer}


def run_script(name: str, args: list[str], out: Path, limit: float) -> dict:
    """One benchmark script in a subprocess; its stdout and stderr go to ``out/name.log``."""
    target = out / f"{name}.json"
    target.unlink(missing_ok=True)  # a JSON left by an earlier run in this folder is not this run's
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(target)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if proc.returncode == 0 and target.exists() else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return {"script": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "args": args}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), help="default: gpu when CUDA is available, else cpu")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSONs, logs and the summary")
    p.add_argument("--only", nargs="+", choices=sorted(SIZES["cpu"]), help="run these scripts only")
    p.add_argument("--limit", type=float,
                   help="seconds each script may run (default: gpu 150, so four fit a 10-minute slot; cpu 1200; "
                        "tiny 300)")
    args = p.parse_args()
    size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
    limit = args.limit or {"gpu": 150.0, "cpu": 1200.0, "tiny": 300.0}[size]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"size": size, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    runs, targets = [], []
    for name, script_args in SIZES[size].items():
        if args.only and name not in args.only:
            continue
        run = run_script(name, script_args, args.out, limit)
        runs.append(run)
        print(f"{name}: {run['status']} in {run['seconds']} s", flush=True)
        if (args.out / f"{name}.json").exists():  # a timed-out script may have written the sizes it finished
            data = json.loads((args.out / f"{name}.json").read_text())
            for what, value, bound in READERS[name](data, size):
                targets.append({"target": what, "measured": value, "bound": bound,
                                "met": None if bound is None else value <= bound})
        write_summary(args.out, env, runs, targets)  # after every script: a killed suite keeps what it has
    print((args.out / "summary.md").read_text())


def write_summary(out: Path, env: dict, runs: list[dict], targets: list[dict]) -> None:
    (out / "summary.json").write_text(json.dumps({"environment": env, "runs": runs, "targets": targets}, indent=2))
    met = {True: "yes", False: "no", None: "(no target here)"}
    lines = [f"# Performance suite ({env['size']}; torch {env['torch']}; {env['gpu'] or 'CPU'})", "",
             "| target | measured | bound | met |", "|---|---|---|---|"]
    bounds = ["" if t["bound"] is None else f"≤ {t['bound']:g}" for t in targets]
    lines += [f"| {t['target']} | {t['measured']:.3f} | {b} | {met[t['met']]} |" for t, b in zip(targets, bounds)]
    lines += ["", "| script | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['script']} | {r['status']} | {r['seconds']} |" for r in runs]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
