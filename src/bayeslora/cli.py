"""The ``bayeslora`` command line: train, evaluate, report, quickstart. Parsing and wiring only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _train_parser(sub, full: bool = True) -> None:
    p = sub.add_parser("train", help="fine-tune a model on a multiple-choice task",
                       description="Fine-tune with LoRA or Bayesian-LoRA; writes a run folder.")
    if not full:  # another command runs: skip importing the model stack just to list train's flags
        return
    from .methods import METHODS
    from .training import RECIPES, SELECTION_RULES

    p.add_argument("--model", default="minilm", help="Hub id, local folder, or 'minilm' (embedded, offline)")
    p.add_argument("--model-kind", choices=["causal", "encoder"], help="override the detected model kind")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--task", help="(required unless --resume) arc_easy, openbookqa, winogrande_s, boolq, mmlu_*, jsonl, synthetic ...")
    p.add_argument("--data-dir", help="folder with the task files (default: $BAYESLORA_DATA_DIR or ../shared/data)")
    p.add_argument("--train-file", help="train on this file instead of the task's train split")
    p.add_argument("--dev-file", help="select on this file instead of the task's dev split")
    p.add_argument("--method", choices=sorted(METHODS), help="(required unless --resume)")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--epochs", type=int, help="default 3 (6 with --recipe paper)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="default 1e-3 (7.39e-4 with --recipe paper)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="on non-variational parameters (elbo recipe)")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="elbo", choices=RECIPES)
    p.add_argument("--kl-warmup-steps", type=int, default=0, help="ramp β linearly from 0 over N steps")
    p.add_argument("--kl-scale", type=float, default=1.0,
                   help="β = kl_scale / N_train (1 = the per-example ELBO; < 1 tempers the KL)")
    p.add_argument("--train-samples", type=int, default=1, help="MC draws per training step")
    p.add_argument("--dev-samples", type=int, default=4, help="MC draws for the per-epoch dev evaluation")
    p.add_argument("--save-steps", type=int, default=0, help="also checkpoint every N optimizer steps")
    p.add_argument("--select", default="best-dev-nll", choices=SELECTION_RULES)
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--max-dev-examples", type=int)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--target-modules", nargs="+", help="default: per-architecture (q_proj,v_proj / query,value ...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--no-progress", action="store_true")
    for cls in METHODS.values():
        cls.add_arguments(p)


def _train(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .training import TrainConfig, train

    if args.resume:
        cfg = TrainConfig.from_run(args.output)  # the run's own configuration, not the command line
        cfg.progress = not args.no_progress
    else:
        missing = [f"--{name}" for name in ("task", "method") if getattr(args, name) is None]
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)}")
        paper = args.recipe == "paper"
        cfg = TrainConfig(
            model=args.model, task=args.task, method=args.method, output=args.output, data_dir=args.data_dir,
            train_file=args.train_file, dev_file=args.dev_file, model_kind=args.model_kind, dtype=args.dtype,
            mixed_precision=args.mixed_precision,
            method_options=METHODS[args.method].options_from_args(args), r=args.r, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, target_modules=args.target_modules,
            epochs=args.epochs or (6 if paper else 3), max_steps=args.max_steps, batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size, grad_accum=args.grad_accum,
            lr=args.lr or (7.39e-4 if paper else 1e-3), weight_decay=args.weight_decay,
            warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, seed=args.seed, recipe=args.recipe,
            kl_warmup_steps=args.kl_warmup_steps, kl_scale=args.kl_scale, train_samples=args.train_samples, dev_samples=args.dev_samples,
            save_steps=args.save_steps, select=args.select, max_length=args.max_length,
            max_train_examples=args.max_train_examples, max_dev_examples=args.max_dev_examples,
            progress=not args.no_progress,
        )
    train(cfg, resume=args.resume)
    print(f"run folder: {cfg.output}")
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run's selected adapter on a split",
                       description="Accuracy and calibration (ACC, ECE, NLL, Brier) of a trained run.")
    p.add_argument("--run", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--split", required=True, help="train, dev, test (MMLU: dev, test, fewshot; synthetic: ood)")
    p.add_argument("--data-dir")
    p.add_argument("--data-file", help="score this file instead of the task's split")
    p.add_argument("--samples", type=int, default=4, help="MC samples (sample mode)")
    p.add_argument("--mode", choices=["sample", "mean", "merged"], help="default: the method's default")
    p.add_argument("--output", help="metrics.json path (default: RUN/eval/metrics-*.json)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequential", action="store_true", help="S sequential passes instead of one S×B pass")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--device")


def _evaluate(args: argparse.Namespace) -> int:
    from .runs import evaluate_run

    record = evaluate_run(args.run, args.task, args.split, data_dir=args.data_dir, data_file=args.data_file,
                          samples=args.samples, mode=args.mode, output=args.output, batch_size=args.batch_size,
                          seed=args.seed, batched=not args.sequential, max_examples=args.max_examples,
                          device=args.device)
    print(f"{record['task']}/{record['split']} {record['method']} {record['mode']} S={record['samples']} "
          f"n={record['n']}: acc {100 * record['acc']:.2f} ece {100 * record['ece']:.2f} "
          f"nll {record['nll']:.4f} brier {record['brier']:.4f}")
    print(f"metrics: {record['metrics_file']}\nreliability diagram: {record['reliability_png']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .evaluation import report

    report(args.runs, out=sys.stdout)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    quickstart(Path(args.output), epochs=args.epochs, seed=args.seed)
    return 0


def build_parser(command: Optional[str] = "train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayeslora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, full=command == "train")
    _evaluate_parser(sub)
    p = sub.add_parser("report", help="compare metrics of runs in one table")
    p.add_argument("runs", nargs="+", help="run folders or metrics json files")
    p = sub.add_parser("quickstart", help="offline demo: LoRA vs Bayesian-LoRA on MiniLM, built-in task")
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    handler = {"train": _train, "evaluate": _evaluate, "report": _report, "quickstart": _quickstart}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bayeslora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
