"""The speed scripts in ``benchmarks/`` run end to end on a tiny CPU config, so the GPU runs they are
written for cannot rot between the sessions that have a GPU. Nothing here times anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "128"]


@pytest.mark.parametrize("script, extra, keys", [
    ("step_time.py", ["--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1"], None),
    ("draw_time.py", ["--rounds", "2", "--warmup", "1"], {"before", "per_group", "after", "sampler", "after_over_before",
                                                      "after_over_per_group", "label_rows", "label_rows_over_after"}),
])
def test_the_script_runs_on_a_tiny_cpu_config_and_writes_its_json(tmp_path, script, extra, keys):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *TINY, *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data and ("results" in data if keys is None else True), "no results written"
    if keys is None:  # step_time: the label-rows variant is timed beside the full head, against the same LoRA
        assert all(r["train_label_rows"]["pairs"] == r["train"]["pairs"] > 0 for r in data["results"])
    if keys is not None:
        assert keys <= set(data["hidden_32"]) and data["hidden_32"]["after"]["ms_median"] > 0


def test_the_inference_script_runs_on_a_tiny_cpu_config_and_its_merged_models_compute_the_mean(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "infer_time.py"), *TINY, "--seq", "16", "--batch", "2",
                           "--samples", "1", "4", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["hidden_32"]
    assert {"base", "merged", "merged_wrapped", "mean", "batched_4", "sequential_4", "merged_over_base",
            "batched_4_over_mean", "batched_4_over_sequential_4"} <= set(r)
    diff = r["max_abs_logit_difference"]
    assert diff["merged_vs_mean"] < 1e-4 and diff["merged_wrapped_vs_mean"] < 1e-4
    assert diff["base_vs_mean"] > 1e-3  # the adapter is not a no-op, so the agreement above means something
    # the timed S×B layout is the sampler's: block i of a seeded batch is draw i's own pass
    assert diff["batched_vs_sequential_draws"] < 1e-4 < diff["draw_1_vs_draw_2"]
    assert r["sequential_4"]["ms_per_example_draw"] > 0


def test_the_prepared_suite_runs_its_scripts_and_scores_every_target(tmp_path):
    """benchmarks/perf_suite.py, the one script a GPU session runs: two of its scripts at the tiny size end to
    end, and every target read from the committed CPU results (so a changed JSON layout fails here)."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "perf_suite.py"), "--size", "tiny", "--out", str(tmp_path),
                           "--only", "draw_time", "infer_time"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["ok", "ok"]
    assert {t["target"].split(",")[0] for t in summary["targets"]} == {
        "one training draw of every factor", "merged / base model", "sample mode S = 4 as one S×B batch / mean mode"}
    assert (tmp_path / "summary.md").read_text().count("|") > 10

    sys.path.insert(0, str(SCRIPTS))
    from perf_suite import READERS

    results = SCRIPTS / "results"
    step = READERS["step_time"](json.loads((results / "step_time_cpu_h64_threads1_stop33.json").read_text()), "cpu")
    assert step == [("training step bayeslora / lora, hidden 64", pytest.approx(0.870, abs=5e-4), 1.05)]
    memory = READERS["memory_estimate"](json.loads((results / "memory_estimate_cpu_stop33.json").read_text()), "cpu")
    assert [m[0] for m in memory] == ["peak memory bayeslora / lora, hidden 64", "peak memory bayeslora / lora, hidden 512"]
    assert all(0.5 < m[1] < 2 for m in memory)
    draw = READERS["draw_time"](json.loads((results / "draw_time_cpu_stop33.json").read_text()), "cpu")
    assert draw[0][0].endswith("hidden 64 (ms)") and draw[0][1] == pytest.approx(6.49, abs=0.01)


def test_the_sharded_memory_script_runs_the_real_trainer_under_each_engine(tmp_path):
    """benchmarks/sharded_memory.py at its smoke size: one process and two engines, figures from the runs."""
    import importlib.util

    engines = ["ddp", "zero3"] if importlib.util.find_spec("deepspeed") else ["ddp"]
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "sharded_memory.py"), "--hidden", "64", "--layers", "1",
                           "--steps", "1", "--engines", *engines, "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"single", *engines}
    assert all(r["estimate"]["total"] > 0 and r["held"] > 0 for r in rows.values())
    if "zero3" in rows:  # the base is partitioned: a rank holds less than the whole model
        assert rows["zero3"]["held"] < rows["single"]["held"] == rows["ddp"]["held"]


def test_score_noise_splits_common_and_separating_noise_by_hand_and_runs_on_a_trained_run(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import torch
    from score_noise import noise_split

    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    base = torch.tensor([[0.0, 1.0, 2.0], [0.5, -0.5, 0.0]])
    shift = torch.tensor([-1.0, 1.0])[:, None, None]  # two draws, every choice of a question moves together
    common = noise_split([(base + shift, mask)])
    assert common["common_mode_share"] == pytest.approx(1.0) and common["separating_variance"] == pytest.approx(0.0)
    assert common["score_variance"] == pytest.approx(1.0)
    opposite = torch.tensor([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0]])  # sums to 0 over each item's choices
    separating = noise_split([(base + torch.stack([opposite, -opposite]), mask)])
    assert separating["common_mode_share"] == pytest.approx(0.0, abs=1e-12)
    assert separating["score_variance"] == pytest.approx(4 / 5)  # padded choices are not counted
    with pytest.raises(ValueError, match="deterministic"):
        noise_split([(base.expand(2, 2, 3), mask)])

    from test_pipeline import TARGETS, write_task
    from tiny_models import save_tiny_encoder

    from bayeslora import cli

    data = write_task(tmp_path / "rows.jsonl", kind="encoder")
    run = tmp_path / "run"
    assert cli.main(["train", "--model", save_tiny_encoder(tmp_path / "enc"), "--task", "jsonl", "--train-file",
                     str(data), "--val-file", str(data), "--method", "bayeslora", "--output", str(run),
                     "--max-steps", "2", "--batch-size", "8", "--no-progress", "--samples", "2",
                     "--target-modules", *TARGETS["encoder"]]) == 0
    out = tmp_path / "noise.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "score_noise.py"), str(run), "--task", "jsonl", "--split",
                           "train", "--data-file", str(data), "--samples", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["score_variance"] > 0 and 0 <= result["common_mode_share"] <= 1 and result["samples"] == 3


def test_interval_proxy_lists_the_published_intervals_no_longer_shown_to_exclude_zero(tmp_path):
    """benchmarks/interval_proxy.py (stop 37's correction) on a hand-made compare.json: a line whose seeds spread
    (published [-0.05, -0.001]: rebuilt, it spans 0) and one whose seeds agree and whose published interval is
    narrow (kept)."""
    def row(cell, seed, nll):
        return {"budget": "short", "train_task": "t", "eval_task": "t", "cell": cell, "mode": "mean", "seed": seed,
                "nll": nll, "brier": 0.5}

    rows = [row("lora", s, 1.0) for s in range(3)]
    rows += [row("spread", s, 1.0 + d) for s, d in enumerate((-0.001, -0.010, -0.050))]
    rows += [row("agree", s, 1.0 + d) for s, d in enumerate((-0.020, -0.021, -0.019))]
    published = {"spread": {"low": -0.05, "high": -0.001}, "agree": {"low": -0.025, "high": -0.015}}
    table = [{"budget": "short", "train_task": "t", "eval_task": "t", "cell": c, "mode": "mean", "n": 500,
              "vs_reference": {"seeds": [0, 1, 2], "mode": "mean", "nll": published[c],
                               "brier": {"low": -0.1, "high": 0.1}}} for c in ("spread", "agree")]
    path = tmp_path / "compare-x.json"
    path.write_text(json.dumps({"plan": {"reference": "lora"}, "rows": rows, "table": table}))
    proc = subprocess.run([sys.executable, str(SCRIPTS / "interval_proxy.py"), str(path)], capture_output=True,
                          text=True, check=True)
    assert "excluding 0: 2; still excluding 0 rebuilt: 1 (of which by less than 1.2 x the half-width, undecided: 0)" \
        "; no longer shown to: 1" in proc.stdout
    (line,) = [x for x in proc.stdout.splitlines() if "| spread (mean) | NLL | 3 | -0.020 [-0.050, -0.001] |" in x]
    low, high = (float(v) for v in line.split("|")[-3].strip(" []").split(","))
    assert low < -0.08 and high > 0.04  # about the seeds' own t interval [-0.085, +0.044]: the seed term dominates
    assert "agree" not in proc.stdout
