"""How much of a stochastic run's draw-to-draw noise in the choice scores the softmax over choices cancels.

A choice's score (logit) varies from draw to draw. The softmax over one question's choices is blind to a
shift that moves all of them together, so only the part of the noise that separates the choices can
show up as mutual information. This script scores a split with a trained run in sample mode, records
the per-draw choice logits its scorer returns, and splits their variance over draws into the part
common to a question's choices and the part that separates them (each question's logits centred on
their mean over its choices). It also prints the spread of the mean logits across choices, the signal
that noise would have to rival.

Usage::

    python benchmarks/score_noise.py RUN --task arc_easy --split dev --samples 8 --max-examples 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from bayeslora.data import load_task
from bayeslora.evaluation.predict import predict_examples
from bayeslora.runs import prepare_run


def noise_split(draws: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Per-choice variance over draws of the logits (S, B, C) with their choice masks (B, C): in total,
    in the part that separates one question's choices, the common-mode share, and the spread (mean
    square over choices) of the mean logits. Every figure is per scored choice."""
    total = separating = spread = 0.0
    choices = 0
    for logits, mask in draws:
        keep = mask.bool()
        x = logits.double().masked_fill(~keep, 0.0)
        n = keep.sum(-1, keepdim=True).double()  # (B, 1)
        centred = (x - x.sum(-1, keepdim=True) / n).masked_fill(~keep, 0.0)
        total += float(((x - x.mean(0)) ** 2).mean(0).masked_fill(~keep, 0.0).sum())
        separating += float(((centred - centred.mean(0)) ** 2).mean(0).masked_fill(~keep, 0.0).sum())
        spread += float((centred.mean(0) ** 2).masked_fill(~keep, 0.0).sum())
        choices += int(keep.sum())
    if choices == 0 or total == 0.0:
        raise ValueError("no score noise to split: a deterministic run or mode (use a stochastic run in sample mode)")
    return {"score_variance": total / choices, "separating_variance": separating / choices,
            "common_mode_share": 1.0 - separating / total, "mean_score_spread": spread / choices}


def measure(run: str, task: str, split: str, *, samples: int, max_examples: int | None, data_dir: str | None,
            data_file: str | None = None, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    prepared = prepare_run(run, mode="sample")
    recorded: list[tuple[Tensor, Tensor]] = []
    scorer = prepared.scorer
    plain = scorer.choice_logits

    def recording(model, batch, num_samples=1):
        logits, mask = plain(model, batch, num_samples)
        recorded.append((logits.detach().cpu(), mask.detach().cpu()))
        return logits, mask

    scorer.choice_logits = recording  # this instance only
    examples = load_task(task, split, data_dir, data_file)
    examples = examples if max_examples is None else examples[:max_examples]
    try:
        predict_examples(prepared.predictor, prepared.model, scorer, examples,
                         scorer.make_collator(prepared.tokenizer, prepared.cfg.max_length), mode="sample",
                         samples=samples, batch_size=batch_size, seed=seed)
    finally:
        prepared.close()
    return {**noise_split(recorded), "run": str(run), "task": task, "split": split, "samples": samples,
            "examples": len(examples)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained run folder of a stochastic method")
    p.add_argument("--task", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--data-file", help="score this file instead of the task's split")
    p.add_argument("--samples", type=int, default=8, help="predictive draws (default 8)")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.manual_seed(0)
    out = measure(args.run, args.task, args.split, samples=args.samples, max_examples=args.max_examples,
                  data_dir=args.data_dir, data_file=args.data_file)
    print(f"{out['task']}/{out['split']}, {out['examples']} questions, S = {out['samples']}: per-draw score variance "
          f"{out['score_variance']:.3e}, of which common to a question's choices {100 * out['common_mode_share']:.1f}%; "
          f"choice-separating {out['separating_variance']:.3e} against a spread of the mean scores of "
          f"{out['mean_score_spread']:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
