"""Answering questions with a trained run (``bayeslora predict``): what users run after training.

Each row of a generic JSONL file (``{"question", "choices"}``, optionally ``answer``, ``passage``, ``id``)
gets the run's chosen answer, its probability, the predictive entropy split into its aleatoric part
(the expected entropy of the draws) and its epistemic part (the mutual information), and an ``abstain``
flag when the chosen uncertainty exceeds the user's threshold. Any method, either model kind, any mode,
and any fitted calibration, exactly as ``bayeslora evaluate`` predicts.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .data import read_questions
from .evaluation import summarise_samples
from .evaluation.predict import predict_examples
from .evaluation.report import atomic_write
from .runs import prepare_run

__all__ = ["UNCERTAINTIES", "answer_questions"]

UNCERTAINTIES = {
    "entropy": "the predictive entropy H[p̄] in nats (total uncertainty)",
    "mutual-information": "the mutual information H[p̄] − E_s H[p_s] in nats (epistemic; 0 without draws)",
    "one-minus-confidence": "1 − the chosen answer's probability",
}


def answer_questions(run_dir: str | Path, data_file: str | Path, *, samples: int = 4, mode: Optional[str] = None,
                     calibration: Optional[str] = None, uncertainty: str = "entropy",
                     abstain_above: Optional[float] = None, batch_size: int = 32, seed: int = 0,
                     device: Optional[str] = None, output: Optional[str | Path] = None) -> list[dict[str, Any]]:
    """One record per row of ``data_file`` (in file order); written as JSON lines to ``output`` if given."""
    if uncertainty not in UNCERTAINTIES:
        raise ValueError(f"--uncertainty: choose one of {', '.join(UNCERTAINTIES)}, not {uncertainty!r}")
    if abstain_above is not None and not (math.isfinite(abstain_above) and abstain_above >= 0):
        raise ValueError(f"--abstain-above must be a finite number >= 0, got {abstain_above!r}")
    rows = read_questions(data_file)
    if not rows:
        raise ValueError(f"{data_file}: no questions to answer")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = prepare_run(run_dir, mode=mode, calibration=calibration, device=device)
    try:
        examples = [example for example, _ in rows]
        collator = run.scorer.make_collator(run.tokenizer, run.cfg.max_length)
        result = predict_examples(run.predictor, run.model, run.scorer, examples, collator, mode=run.mode,
                                  samples=samples, batch_size=batch_size, seed=seed, device=device)
    finally:
        run.close()
    if result.uids != [example.uid for example in examples]:
        raise RuntimeError("predictions came back out of order")
    if result.truncated:
        warnings.warn(f"{result.truncated} of {len(examples)} questions were longer than the run's max_length "
                      f"({run.cfg.max_length} tokens) and were shortened (the passage or question, never the "
                      "answer cue)", stacklevel=2)
    log_probs = result.log_probs if run.transform is None else run.transform(result.log_probs, result.mask)
    summary = summarise_samples(log_probs.transpose(0, 1), result.mask)
    records = []
    for i, (example, labelled) in enumerate(rows):
        probs = summary.log_probs[i, :example.n_choices].exp()
        chosen = int(probs.argmax())
        measures = {"entropy": float(summary.entropy[i]),
                    "mutual-information": float(summary.mutual_information[i]),
                    "one-minus-confidence": 1.0 - float(probs[chosen])}
        total = measures["entropy"]
        record = {
            "id": example.uid, "answer_index": chosen, "answer": example.choices[chosen],
            "probability": float(probs[chosen]), "probs": [round(float(p), 6) for p in probs],
            "entropy": total, "aleatoric": float(summary.expected_entropy[i]),
            "epistemic": measures["mutual-information"],
            "epistemic_share": measures["mutual-information"] / total if total > 0 else 0.0,
            "uncertainty": uncertainty, "abstain": abstain_above is not None and measures[uncertainty] > abstain_above,
        }
        if labelled:
            record["label"] = example.answer
            record["correct"] = chosen == example.answer
        records.append(record)
    if output is not None:
        text = "".join(json.dumps(r) + "\n" for r in records).encode()
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output, lambda handle: handle.write(text))
    return records
