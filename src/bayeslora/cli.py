"""The ``bayeslora`` command line: train, evaluate, calibrate, predict, compare, bench, report, quickstart.
Parsing and wiring only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _train_parser(sub, full: bool = True) -> None:
    p = sub.add_parser("train", help="fine-tune a model on a multiple-choice task",
                       description="Fine-tune with Bayesian-LoRA or a baseline (lora, map, mcdropout, ensemble, "
                                   "blob); writes a run folder. Options left unset take the recipe's or the "
                                   "method's defaults (recorded in config.json).")
    if not full:  # another command runs: skip importing the model stack just to list train's flags
        return
    from .methods import METHODS
    from .training import add_train_arguments

    add_train_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint, "
                   "with the settings it recorded (only --gradient-checkpointing, --eval-batch-size and where the data is "
                   "(--data-dir, --train-file, --val-file; checked against its sha256) may change; a moved folder or "
                   "data is recorded where it is now)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output (its config, "
                   "history, adapters, checkpoint, evaluations and calibrations are deleted first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    owners: dict[str, tuple[str, str]] = {}  # dest -> (method, flag)
    for cls in METHODS.values():
        before = len(p._actions)
        cls.add_arguments(p)
        for action in p._actions[before:]:
            owners[action.dest] = (cls.name, action.option_strings[0])
    p.set_defaults(_method_flags=owners)


def _train(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .training import TrainConfig, config_from_args, train

    if args.output is None:
        raise ValueError("the following arguments are required: --output")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it: pass one")
    if args.resume:
        cfg = TrainConfig.from_run(args.output)  # the run's own configuration, not the command line
        _refuse_changes_on_resume(args, cfg)
        for name in _RESUME_MAY_CHANGE:  # given: the folder wherever the command runs, moved data, memory
            if name in args.typed:
                setattr(cfg, name, getattr(args, name))
        cfg.progress = not args.no_progress
    else:
        missing = [f"--{name}" for name in ("task", "method") if getattr(args, name) is None]
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)}")
        if args.method not in METHODS:
            raise ValueError(f"--method: unknown method {args.method!r}; available: {', '.join(sorted(METHODS))}")
        for dest, (owner, flag) in args._method_flags.items():
            if owner != args.method and dest in args.typed:
                raise ValueError(f"{flag} is an option of --method {owner}, not of --method {args.method}")
        cfg = config_from_args(args, METHODS[args.method].options_from_args(args))
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run folder: {cfg.output}")
    return 0


# Train options a resume takes from the command line when given: where things are (the data is checked
# against its recorded sha256; a file only where the run read one: a --val-file given to a run that selected
# on a slice of train would be another setting), and memory/speed only (a run that ran out of memory can resume).
_RESUME_MAY_CHANGE = ("output", "data_dir", "train_file", "val_file", "gradient_checkpointing", "eval_batch_size")


def _refuse_changes_on_resume(args: argparse.Namespace, cfg) -> None:
    """A resumed run keeps the settings it recorded: an option typed with another value would be ignored
    silently, so name it instead (an option repeated with the value the run recorded is fine)."""
    from dataclasses import fields

    from .methods import METHODS
    from .training import TrainConfig
    from .training.config import DATA_PATHS, absolute_path

    def same(name: str, given, recorded) -> bool:
        paths = name in DATA_PATHS or (name == "model" and Path(str(given)).expanduser().exists())
        if paths and given is not None and recorded is not None:  # recorded absolute (older runs: as typed)
            return absolute_path(given) == absolute_path(recorded)
        return given == recorded

    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run read no such file: "
               f"{'the task data folder' if name == 'train_file' else 'a val slice of its train data'})"
               for name in ("train_file", "val_file") if name in args.typed and getattr(cfg, name) is None]
    for f in fields(TrainConfig):
        if not f.metadata.get("flag", True) or f.name in _RESUME_MAY_CHANGE:
            continue
        given = getattr(args, f.name)
        if f.name in args.typed and not same(f.name, given, getattr(cfg, f.name)):
            changed.append(f"--{f.name.replace('_', '-')} {given} (the run has {getattr(cfg, f.name)!r})")
    recorded = METHODS.get(cfg.method)  # an unknown method is train's error to name
    for dest, (owner, flag) in args._method_flags.items() if recorded is not None else ():
        given = getattr(args, dest)
        if dest in args.typed and (owner != cfg.method or given != recorded.flag_value(dest, cfg.method_options)):
            changed.append(f"{flag} {given}" if owner == cfg.method else f"{flag} (an option of --method {owner}; "
                                                                         f"the run is {cfg.method})")
    if changed:
        raise ValueError(f"--resume continues {args.output} with the settings in its config.json; these would be "
                         f"ignored, so drop them (or train a new run): {'; '.join(changed)}")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run's selected adapter (or a base model zero-shot) on a split",
                       description="Accuracy and calibration (ACC, ECE, NLL, Brier) of a trained run, or with "
                                   "--model and no --run, of a causal base model zero-shot.")
    p.add_argument("--run", help="run folder (omit with --model for zero-shot)")
    p.add_argument("--model", help="zero-shot: a causal LM (Hub id, folder, .gguf, smollm2); needs no --run")
    p.add_argument("--scoring", choices=["loglik", "loglik-norm", "labels"],
                   help="zero-shot scoring protocol (default loglik; a run uses its recorded one)")
    p.add_argument("--max-length", type=int, help="zero-shot: truncate prompts to this many tokens")
    p.add_argument("--task", required=True)
    p.add_argument("--split", required=True, help="train, val (a run's val slice), dev, test (MMLU: dev, test, "
                                                  "fewshot; synthetic: ood)")
    p.add_argument("--data-dir")
    p.add_argument("--data-file", help="score this file instead of the task's split")
    p.add_argument("--samples", type=int, help="predictive draws in sample mode (default 4; a run only)")
    p.add_argument("--mode", choices=["sample", "mean", "merged"], help="default: the method's default (a run only)")
    p.add_argument("--output", help="metrics.json path (default: RUN/eval/metrics-*.json)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, help="seed of the predictive draws (default 0; a run only)")
    p.add_argument("--sequential", action="store_true",
                   help="S sequential passes instead of one S×B pass (a run only)")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--device")
    p.add_argument("--calibration", help="apply this post-hoc calibration of the run (fitted by bayeslora "
                                         "calibrate), in the mode it was fitted in")


def _calibration_names() -> list[str]:
    from .calibration import CALIBRATIONS

    return sorted(CALIBRATIONS)


def _calibration_help(name: str) -> str:
    from .calibration import CALIBRATIONS

    return CALIBRATIONS[name].help


def _calibrate_parser(sub, full: bool) -> None:
    names = _calibration_names() if full else []
    what = " ".join(f"{name}: {_calibration_help(name)}." for name in names)
    p = sub.add_parser("calibrate", help="fit a post-hoc calibration of a trained run on its val slice",
                       description="Fit a post-hoc calibration on the run's val slice (the rows its checkpoint "
                                   "was selected on; never the split it is reported on) and write "
                                   "RUN/calibration/NAME.json; then: bayeslora evaluate --run RUN --calibration "
                                   f"NAME. {what}")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--calibration", required=True, choices=names or None,
                   help="which calibration to fit")
    p.add_argument("--mode", choices=["sample", "mean", "merged"], help="the mode it calibrates (default: the "
                   "calibration's, else the method's default; tfb, posterior-scale and posterior-widen: sample; laplace: mean, "
                   "its probit predictive); evaluate "
                   "applies it in this mode")
    p.add_argument("--samples", type=int, default=4, help="predictive draws in sample mode (default 4)")
    p.add_argument("--data-dir", help="where the run's task data is now (default: as recorded)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (the same for every setting tried)")
    p.add_argument("--device")


def _calibrate(args: argparse.Namespace) -> int:
    from .runs import calibrate_run

    record = calibrate_run(args.run, args.calibration, mode=args.mode, samples=args.samples,
                           batch_size=args.batch_size, seed=args.seed, data_dir=args.data_dir, device=args.device)
    before, after = record["val_before"], record["val_after"]
    params = ", ".join(f"{k} {v:.4g}" for k, v in record["params"].items())
    print(f"{args.calibration} fitted on {record['fitted_on']['split']} (n={record['fitted_on']['n']}, "
          f"{record['mode']} mode): {params}; val "
          f"nll {before['nll']:.4f} -> {after['nll']:.4f}, ece {100 * before['ece']:.2f} -> {100 * after['ece']:.2f}, "
          f"acc {100 * before['acc']:.2f} -> {100 * after['acc']:.2f}")
    for name in record["at_search_bound"]:
        print(f"warning: {name} {record['params'][name]:.4g} ended on an end of its search range, so the range chose "
              f"it, not the data (n={record['fitted_on']['n']} {record['fitted_on']['split']} rows: too few, or a "
              "degenerate model?); treat this calibration with care", file=sys.stderr)
    print(f"calibration: {record['file']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .layout import method_label
    from .runs import evaluate_base, evaluate_run

    if (args.run is None) == (args.model is None):
        raise ValueError("evaluate: give --run RUN_DIR (a trained run) or --model MODEL (zero-shot), not both")
    if args.run is None:
        run_only = {"--calibration": args.calibration, "--mode": args.mode, "--samples": args.samples,
                    "--seed": args.seed, "--sequential": args.sequential or None}
        given = [flag for flag, value in run_only.items() if value is not None]
        if given:  # zero-shot is one deterministic pass: refuse what would otherwise be ignored
            raise ValueError(f"evaluate --model (zero-shot) scores the base model once, in mean mode; "
                             f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a trained run (--run)")
        record = evaluate_base(args.model, args.task, args.split, scoring=args.scoring, data_dir=args.data_dir,
                               data_file=args.data_file, output=args.output, batch_size=args.batch_size,
                               max_examples=args.max_examples, max_length=args.max_length, device=args.device)
    else:
        if args.scoring or args.max_length:
            raise ValueError("evaluate --run: the run's recorded --scoring and --max-length apply")
        draws = {key: value for key, value in (("samples", args.samples), ("seed", args.seed)) if value is not None}
        record = evaluate_run(args.run, args.task, args.split, data_dir=args.data_dir, data_file=args.data_file,
                              mode=args.mode, output=args.output, batch_size=args.batch_size,
                              batched=not args.sequential, max_examples=args.max_examples,
                              device=args.device, calibration=args.calibration,
                              note_samples=args.samples is not None, name_seed=args.seed is not None, **draws)
    print(f"{record['task']}/{record['split']} {method_label(record['method'], record['calibration'])} {record['mode']} S={record['samples']} "
          f"n={record['n']}: acc {100 * record['acc']:.2f} ece {100 * record['ece']:.2f} "
          f"nll {record['nll']:.4f} brier {record['brier']:.4f}")
    print(f"metrics: {record['metrics_file']}\nreliability diagram: {record['reliability_png']}")
    return 0


def _predict_parser(sub, full: bool) -> None:
    p = sub.add_parser("predict", help="answer questions with a trained run, with uncertainty and abstention",
                       description="Answer every row of a JSON-lines file ({\"question\", \"choices\"}, "
                                   "optionally \"answer\", \"passage\", \"id\") with the run's chosen answer, "
                                   "its probability, the predictive entropy, its aleatoric and epistemic parts, "
                                   "and an abstain flag; JSON lines out.")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data-file", required=True, help="the questions (generic JSONL; answer optional)")
    p.add_argument("--output", help="write the JSON lines here (default: standard output)")
    p.add_argument("--samples", type=int, default=4, help="predictive draws in sample mode (default 4)")
    p.add_argument("--mode", choices=["sample", "mean", "merged"], help="default: the method's default")
    p.add_argument("--calibration", help="through this post-hoc calibration of the run (bayeslora calibrate)")
    names = []
    if full:
        from .answers import UNCERTAINTIES

        names = list(UNCERTAINTIES)
    p.add_argument("--uncertainty", default="entropy", choices=names or None,
                   help="the score that --abstain-above thresholds (default entropy)")
    p.add_argument("--abstain-above", type=float, help="flag abstain when the uncertainty exceeds this "
                   "(default: never)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")


def _predict(args: argparse.Namespace) -> int:
    import json

    from .answers import answer_questions

    records = answer_questions(args.run, args.data_file, samples=args.samples, mode=args.mode,
                               calibration=args.calibration, uncertainty=args.uncertainty,
                               abstain_above=args.abstain_above, batch_size=args.batch_size, seed=args.seed,
                               device=args.device, output=args.output)
    if args.output is None:
        for record in records:
            print(json.dumps(record))
    else:
        abstained = sum(r["abstain"] for r in records)
        print(f"{len(records)} answers ({abstained} abstain): {args.output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .evaluation import report

    report(args.runs, out=sys.stdout)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    quickstart(Path(args.output), epochs=args.epochs, seed=args.seed)
    return 0


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="Bayesian-LoRA vs LoRA: same data, budget and evaluation, several seeds",
                       description="Train every cell on every task, budget and seed (selecting on the val "
                                   "slice), evaluate on --split, write compare.json and compare.md. Resumable: "
                                   "finished runs and evaluations are skipped.")
    p.add_argument("--output", default="runs/compare", help="comparison folder (default runs/compare)")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "openbookqa"],
                   help="in-distribution tasks (default arc_easy arc_challenge openbookqa)")
    p.add_argument("--ood-train", default="openbookqa", help="OOD protocol: train here (default openbookqa; "
                   "'none' = no OOD sets)")
    p.add_argument("--ood-eval", nargs="+", default=["arc_easy", "arc_challenge", "mmlu_stem"],
                   help="OOD protocol: evaluate there (default arc_easy arc_challenge mmlu_stem)")
    p.add_argument("--cells", nargs="+", default=["lora", "bayeslora"],
                   help="methods with their defaults, or LABEL='{\"method\": ..., settings}' (default lora bayeslora)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default 0 1")
    p.add_argument("--budgets", nargs="+", choices=["short", "default"], default=["short", "default"],
                   help="short = 1 epoch; default = the CLI's default epochs; batch 16 for both")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="dev", help="where to report (default dev)")
    p.add_argument("--samples", type=int, default=4, help="predictive draws in sample mode (default 4)")
    p.add_argument("--samples-sweep", nargs="*", type=int, default=[],
                   help="also score each stochastic run with these draw counts, as cells 'LABEL S=k' (no retraining; "
                        "default none)")
    p.add_argument("--max-length", type=int, default=128, help="default 128")
    p.add_argument("--reference", default="lora", help="the cell others are paired with, in its default mode (default lora)")
    p.add_argument("--calibrations", nargs="*", default=[],
                   help="also fit these post-hoc calibrations on each run's val slice and report them as cells "
                        "LABEL+NAME where they apply (temperature, posterior-scale, posterior-widen, tfb, laplace; default none)")
    p.add_argument("--summary-only", action="store_true", help="only re-read what exists and write the tables")


def _compare(args: argparse.Namespace) -> int:
    from .compare import BUDGETS, Cell, Plan, run_plan, write_summary

    plan = Plan(output=Path(args.output), tasks=args.tasks, cells=[Cell.parse(c) for c in args.cells],
                seeds=args.seeds, budgets=[BUDGETS[b] for b in args.budgets],
                ood_train=None if args.ood_train == "none" else args.ood_train, ood_eval=args.ood_eval,
                model=args.model, data_dir=args.data_dir, split=args.split, samples=args.samples,
                max_length=args.max_length, reference=args.reference, calibrations=args.calibrations,
                samples_sweep=args.samples_sweep)
    if not args.summary_only:
        run_plan(plan)
    json_path, md_path = write_summary(plan)
    print(md_path.read_text())
    print(f"results: {json_path}\ntable: {md_path}")
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite: methods × tasks × seeds, resumable and shardable",
                       description="Run a suite (a shipped name or a TOML file) and write OUTPUT/results/*.jsonl "
                                   "(one row per evaluated cell), OUTPUT/bench.md and OUTPUT/plots/. Finished "
                                   "units are skipped, so an interrupted benchmark resumes; a failed unit is "
                                   "recorded and the rest go on.")
    p.add_argument("--suite", help="a shipped suite (see --list) or the path of a suite TOML file")
    p.add_argument("--list", action="store_true", help="list the shipped suites and what they cost")
    p.add_argument("--split", choices=["dev", "test", "val"], help="where to report (default: the suite's, dev)")
    p.add_argument("--data-dir", help="the data folder (default $BAYESLORA_DATA_DIR or ../shared/data)")
    p.add_argument("--output", help="benchmark folder (default runs/bench/SUITE)")
    p.add_argument("--shard", help="I/N: run only shard I of N (each cell's units dealt round the shards; results merge by concatenation)")
    p.add_argument("--report-only", action="store_true", help="only rebuild bench.md and the plots from the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _bench(args: argparse.Namespace) -> int:
    from .bench import load_suite, parse_shard, read_rows, run_bench, shipped_suites, suite_signatures, write_report
    from .bench.results import results_files

    if args.list:
        for name in shipped_suites():
            print(f"{name}: {load_suite(name).description.strip()}\n")
        return 0
    if not args.suite:
        raise ValueError("the following arguments are required: --suite (or --list)")
    suite = load_suite(args.suite)
    output = Path(args.output or Path("runs") / "bench" / suite.name)
    shard = parse_shard(args.shard)
    if not args.report_only:
        print(f"suite {suite.name} ({suite.source}): {suite.description.strip()}")
        results, units, failed = run_bench(suite, output, split=args.split, data_dir=args.data_dir, shard=shard,
                                           progress=not args.no_progress)
        print(f"results: {results}")
        if units == 0:  # more shards than units: nothing to do is not a failure of a job array
            print(f"shard {args.shard} holds no unit of this suite; nothing to run or report")
            return 0
    # the table holds the suite's units as it stands (on every split the folder has results for), no others
    splits = {suite.plan(output, split=args.split).split} | {r.get("split") for r in read_rows(results_files(output))}
    as_it_stands = suite_signatures(suite, output, sorted(s for s in splits if s), data_dir=args.data_dir)
    table, plots = write_report(output, description=suite.description, units=as_it_stands, suite=suite.name)
    print(table.read_text())
    print(f"table: {table}\nplots: {len(plots)} files in {output / 'plots'}")
    if not args.report_only and failed:  # a job array or script must see it; the other units still ran
        print(f"bayeslora bench: {len(failed)} of {units} units failed ({', '.join(failed)}); their errors and "
              f"tracebacks are in {results}; rerun the same command to retry only them", file=sys.stderr)
        return 1
    return 0


def build_parser(command: Optional[str] = "train") -> argparse.ArgumentParser:
    return _build_parser(command)[0]


def _build_parser(command: Optional[str]) -> tuple[argparse.ArgumentParser, argparse.Action]:
    parser = argparse.ArgumentParser(prog="bayeslora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, full=command == "train")
    _evaluate_parser(sub)
    _calibrate_parser(sub, full=command == "calibrate")
    _predict_parser(sub, full=command == "predict")
    _compare_parser(sub)
    _bench_parser(sub)
    p = sub.add_parser("report", help="compare metrics of runs in one table")
    p.add_argument("runs", nargs="+", help="run folders or metrics json files")
    p = sub.add_parser("quickstart", help="offline demo: LoRA vs Bayesian-LoRA on MiniLM, built-in task")
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return parser, sub


def _typed_options(p: argparse.ArgumentParser, command: str, argv: list[str],
                   args: argparse.Namespace) -> frozenset[str]:
    """The options this command line gives. argparse fills every other option with its default, so the
    namespace alone cannot tell `--seed 0` from no --seed: parse the command's arguments again with the
    command's parser ``p``, every default replaced by a marker (an object, so argparse's conversion of
    string defaults leaves it alone), and what does not hold it was typed."""
    unset = object()
    p.set_defaults(**{dest: unset for dest in vars(args)})
    given = p.parse_args(argv[argv.index(command) + 1:])
    return frozenset(dest for dest, value in vars(given).items() if value is not unset)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, sub = _build_parser(command)
    args = parser.parse_args(argv)
    if args.command == "train":  # after parsing, so its parser may take the markers
        args.typed = _typed_options(sub.choices["train"], command, argv, args)
    handler = {"train": _train, "evaluate": _evaluate, "calibrate": _calibrate, "report": _report,
               "quickstart": _quickstart, "compare": _compare, "predict": _predict,
               "bench": _bench}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        from .models import MissingPackage

        if isinstance(exc, ImportError) and not isinstance(exc, MissingPackage):
            raise  # a broken install is a traceback; a missing optional package is the user's to install
        print(f"bayeslora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
