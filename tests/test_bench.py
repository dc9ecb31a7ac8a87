"""``bayeslora bench``: suites are validated data, a tiny suite runs end to end into JSON lines, a table and
plots, a rerun skips finished units, a failing unit is recorded while the rest go on, shards partition
the matrix and their results merge by concatenation, and a built wheel ships the suites."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_compare import write_arc
from tiny_models import save_tiny_encoder

from bayeslora import cli
from bayeslora.bench import (load_suite, parse_shard, read_rows, run_bench, shard_units, shipped_suites,
                             suite_units, write_report)
from bayeslora.bench.results import append_rows, latest_rows, results_files
from bayeslora.bench.runner import unit_signature
from bayeslora.layout import RunFolder

SUITE = """
description = "tiny: two cells on the fruit task"
model = "{model}"
tasks = ["arc_easy"]
seeds = [0]
samples = 2
max_length = 32
max_eval_examples = 10
calibrations = ["temperature"]
[budget]
name = "tiny"
epochs = 1
batch_size = 8
[ood]
train = "arc_easy"
eval = ["arc_challenge"]
[defaults]
target_modules = ["query", "value"]
[cells.lora]
lr = 5e-2
[cells.bayeslora]
lr = 2e-2
{extra}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for name, seed in (("ARC-Easy", 0), ("ARC-Challenge", 1)):
        write_arc(root / "data" / "arc" / name / f"{name}-Train.jsonl", 32, seed)
        write_arc(root / "data" / "arc" / name / f"{name}-Dev.jsonl", 12, seed + 10)
    return root, save_tiny_encoder(root / "encoder")


def suite_file(root: Path, model: str, name: str = "tiny", extra: str = "") -> Path:
    path = root / f"{name}.toml"
    path.write_text(SUITE.format(model=model, extra=extra))
    return path


def test_a_tiny_suite_runs_end_to_end_and_resumes_without_work(setup):
    root, model = setup
    suite = load_suite(suite_file(root, model))
    out = root / "out"
    logs: list[str] = []
    results, units, failed = run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=logs.append)
    rows = read_rows([results])
    assert units == 2 and failed == [] and {r["unit"] for r in rows} == {"dev/tiny/arc_easy/lora/seed-0", "dev/tiny/arc_easy/bayeslora/seed-0"}
    assert all(r["status"] == "ok" for r in rows)
    variants = {(r["cell"], r["eval_task"], r["mode"]) for r in rows}
    assert ("lora+temperature", "arc_challenge", "mean") in variants and ("bayeslora", "arc_easy", "mean") in variants
    for r in rows:
        assert r["n"] == 10 and r["suite"] == "tiny" and r["split"] == "dev" and r["config"]["epochs"] == 1
        assert r["versions"]["torch"] and "commit" in r and r["unit_seconds"] > 0 and r["rows_in_attempt"] > 1
        assert r["train_seconds"] > 0 and r["trainable_parameters"] > 0 and r["examples_per_second"] > 0
        seen = sum(h["timed_examples"] for h in RunFolder(r["run"]).read_history())
        assert seen == r["n_train"] and r["train_examples_per_second"] == pytest.approx(seen / r["train_seconds"])
        assert len(r["accuracy_at_coverage"]) == 20 and sum(r["reliability"]["counts"]) == 10
        assert r["entropy"] == pytest.approx(r["aleatoric"] + r["mi"], abs=1e-9)
        assert (r["auroc_entropy"] is not None) == (r["eval_task"] == "arc_challenge")
        assert (r["aurc_mi"] is not None) == (r["mode"] == "sample")
        assert r["scoring"] == r["config"]["scoring"] == "pairs"  # the protocol each row was scored under

    table, plots = write_report(out)
    text = table.read_text()
    assert "### arc_easy → arc_challenge (OOD" in text and "**" in text and "lora+temperature" in text
    assert "scored by pairs;" in text and "| train ex/s |" in text and "| eval ex/s |" in text
    assert len(plots) == 6 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert all(p.stem.endswith("-pairs") for p in plots)

    again: list[str] = []
    run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=again.append)
    assert "2 already finished" in again[0] and len(again) == 1  # nothing trained, scored or appended
    assert len(read_rows([results])) == len(rows)

    # its results copied to another folder, the data read from another: still finished (a signature holds
    # the data's bytes, not paths); other bytes in a file a unit scores on: that unit is not
    shutil.copytree(out / "results", root / "moved" / "results")
    shutil.copytree(root / "data", root / "data-copy")
    moved: list[str] = []
    run_bench(suite, root / "moved", data_dir=str(root / "data-copy"), progress=False, log=moved.append)
    assert "2 already finished" in moved[0] and len(moved) == 1
    plan = suite.plan(root / "moved", data_dir=str(root / "data-copy"))
    before = [unit_signature(plan, *u[1:]) for u in suite_units(plan)]
    dev = root / "data-copy" / "arc" / "ARC-Challenge" / "ARC-Challenge-Dev.jsonl"
    dev.write_bytes(dev.read_bytes() + b"\n")
    assert all(a != b for a, b in zip(before, [unit_signature(plan, *u[1:]) for u in suite_units(plan)]))
    # without its data a finished unit stays finished (its signature cannot be checked; it need not run)
    shutil.rmtree(root / "data-copy")
    gone: list[str] = []
    run_bench(suite, root / "moved", data_dir=str(root / "data-copy"), progress=False, log=gone.append)
    assert "2 already finished" in gone[0] and len(gone) == 1

    # its run folders alone moved (no results: every unit runs), the data read from another folder: the
    # trained runs are taken as they are and scored again, not refused as "other settings" nor retrained
    shutil.copytree(out / "runs", root / "runs-moved" / "runs")
    shutil.copytree(root / "data", root / "data-elsewhere")
    rescored: list[str] = []
    again_file, _, failed = run_bench(suite, root / "runs-moved", data_dir=str(root / "data-elsewhere"),
                                      progress=False, log=rescored.append)
    assert failed == [] and "0 already finished" in rescored[0] and not any(": training" in x for x in rescored)
    first = {(r["cell"], r["eval_task"], r["mode"]): r["nll"] for r in rows}
    assert {(r["cell"], r["eval_task"], r["mode"]): r["nll"] for r in read_rows([again_file])} == first
    # other bytes in the training file: not the run's data, and the unit says which file
    shutil.copytree(out / "runs", root / "runs-other-data" / "runs")
    train = root / "data-elsewhere" / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl"
    train.write_bytes(train.read_bytes() + b"\n")
    other: list[str] = []
    _, _, failed = run_bench(suite, root / "runs-other-data", data_dir=str(root / "data-elsewhere"),
                             progress=False, log=other.append)
    assert len(failed) == 2 and any("ARC-Easy-Train.jsonl: not the train data this run trained on" in x for x in other)

    # another split is another set of units: nothing of dev stands for it
    val: list[str] = []
    run_bench(suite, out, split="val", data_dir=str(root / "data"), progress=False, log=val.append)
    assert "0 already finished" in val[0] and not any(": training" in line for line in val)  # trained runs reused
    latest = latest_rows(read_rows([results]))
    assert {r["split"] for r in latest} == {"dev", "val"}
    table, _ = write_report(out)
    assert "### arc_easy → arc_easy (in-distribution; val;" in table.read_text()

    # a changed suite (a larger eval subset) changes the units' signatures: they run again
    path = suite_file(root, model)
    before = load_suite(path).sha256
    path.write_text(path.read_text().replace("max_eval_examples = 10", "max_eval_examples = 12"))
    rerun: list[str] = []
    run_bench(load_suite(path), out, data_dir=str(root / "data"), progress=False, log=rerun.append)
    assert "0 already finished" in rerun[0]
    assert {r["n"] for r in latest_rows(read_rows([results])) if r["split"] == "dev"} == {12}
    assert before != load_suite(path).sha256
    # the report holds the rows against the suite as it stands: val's units ran with the old subset, so
    # their lines are marked and the units named, not shown as if run with the suite's settings
    assert cli.main(["bench", "--suite", str(path), "--output", str(out), "--data-dir", str(root / "data"),
                     "--report-only", "--no-progress"]) == 0
    text = (out / "bench.md").read_text()
    assert "2 of 4 units finished with the suite's settings" in text and "n = 12" in text
    assert "‡ marks lines with 2 finished unit(s) that ran with other settings or data" in text
    assert "`val/tiny/arc_easy/lora/seed-0`" in text
    val_lines = text.split("val; budget")[1].split("###")[0]
    assert "| lora‡ | mean |" in val_lines and "| lora | mean |" not in val_lines
    assert "| lora | mean |" in text.split("dev; budget")[1].split("###")[0]  # dev's rerun lines: unmarked


def test_a_samples_sweep_scores_each_stochastic_run_again_without_training_it_again(setup, tmp_path):
    root, model = setup
    path = suite_file(root, model, name="sweep")
    out = tmp_path / "out"
    run_bench(load_suite(path), out, data_dir=str(root / "data"), progress=False, log=lambda _: None)
    plain = load_suite(path).plan(out, data_dir=str(root / "data"))
    path.write_text(path.read_text().replace("samples = 2\n", "samples = 2\nsamples_sweep = [1, 2, 3]\n"))
    suite = load_suite(path)
    plan = suite.plan(out, data_dir=str(root / "data"))
    assert [plan.draw_variants(c) for c in plan.cells] == [[], [("bayeslora S=1", 1), ("bayeslora S=3", 3)]]
    # the deterministic cell's unit is unchanged (finished); the stochastic one's is not, and runs again
    signatures = [(unit_signature(plain, *u[1:]), unit_signature(plan, *u[1:])) for u in suite_units(plan)]
    assert signatures[0][0] == signatures[0][1] and signatures[1][0] != signatures[1][1]
    # what a signature hashes: a unit without extra draws hashes what units hashed before the sweep existed
    hashed = []
    real = json.dumps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json, "dumps", lambda obj, **kw: hashed.append(obj) or real(obj, **kw))
        for unit in suite_units(plan):
            unit_signature(plan, *unit[1:])
    assert [sorted(spec) for spec in hashed] == [["data", "evals", "first", "split", "train", "variants"],
                                                 ["data", "draws", "evals", "first", "split", "train", "variants"]]
    logs: list[str] = []
    results, units, failed = run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=logs.append)
    assert units == 2 and failed == [] and "1 already finished" in logs[0]
    # who gets extra draws: a method whose draws follow S, less its own S; not an ensemble (it draws its members)
    from bayeslora.compare import Cell

    assert plan.draw_variants(Cell("e", "ensemble")) == [] and plan.draw_variants(Cell("m", "mcdropout"))
    assert plan.draw_variants(Cell("b3", "bayeslora", {"samples": 3})) == [("b3 S=1", 1), ("b3 S=2", 2)]
    assert not any(": training" in line for line in logs)  # scored again, not trained again
    rows = latest_rows(read_rows([results]))
    swept = {(r["cell"], r["eval_task"]): r for r in rows if r["cell"].startswith("bayeslora S=")}
    assert set(swept) == {(f"bayeslora S={k}", t) for k in (1, 3) for t in ("arc_easy", "arc_challenge")}
    base = next(r for r in rows if r["cell"] == "bayeslora" and r["mode"] == "sample" and r["eval_task"] == "arc_easy")
    assert base["samples"] == 2
    for (cell, task), r in swept.items():
        assert r["mode"] == "sample" and r["samples"] == int(cell[-1]) and r["run"] == base["run"]
        assert (r["mi"] == 0.0) == (r["samples"] == 1)  # one draw has no epistemic part
        assert (r["auroc_entropy"] is not None) == (task == "arc_challenge")
    assert len({r["unit"] for r in rows}) == 2  # one run per unit: the sweep trained nothing new
    text = write_report(out)[0].read_text()
    assert "| bayeslora S=3 | sample | 3 | 1 |" in text and "| bayeslora | sample | 2 | 1 |" in text
    assert "| lora | mean | 1 | 1 |" in text


def test_table_lines_sort_numbers_by_value_and_ties_as_written():
    from bayeslora.bench.table import line_order

    lines = {(c, "sample"): None for c in ("kl-10", "kl-3", "kl-0.1", "b S=16", "b S=2", "b", "b S=02", "lora")}
    assert [c for (c, _), _ in sorted(lines.items(), key=line_order)] == [
        "b", "b S=02", "b S=2", "b S=16", "kl-0.1", "kl-3", "kl-10", "lora"]


def test_a_whole_val_file_is_another_unit_than_a_val_slice_of_the_same_bytes(setup, tmp_path):
    from bayeslora.compare import Cell

    root, model = setup
    plan = load_suite(suite_file(root, model)).plan(tmp_path, data_dir=str(root / "data"))
    unit = suite_units(plan)[0]
    train = str(root / "data" / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl")
    whole = Cell(unit[3].label, unit[3].method, {**unit[3].settings, "val_file": train})
    assert unit_signature(plan, *unit[1:3], whole, unit[4]) != unit_signature(plan, *unit[1:])


def test_a_failing_unit_is_recorded_and_the_others_go_on(setup, capsys):
    root, model = setup
    extra = '[cells.broken]\nmethod = "lora"\nlr = 5e-2\ntarget_modules = ["no_such_module"]'
    path = suite_file(root, model, "broken", extra)
    suite = load_suite(path)
    out = root / "broken-out"
    logs: list[str] = []
    results, _, failed_ids = run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=logs.append)
    rows = read_rows([results])
    failed = [r for r in rows if r["status"] == "error"]
    assert [r["unit"] for r in failed] == ["dev/tiny/arc_easy/broken/seed-0"] and "no_such_module" in failed[0]["error"]
    assert {r["unit"] for r in rows if r["status"] == "ok"} == {"dev/tiny/arc_easy/lora/seed-0",
                                                                "dev/tiny/arc_easy/bayeslora/seed-0"}
    assert any("FAILED" in line for line in logs)
    table, _ = write_report(out)
    assert "Failed units" in table.read_text() and "dev/tiny/arc_easy/broken/seed-0" in table.read_text()

    retry: list[str] = []
    run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=retry.append)  # retries only it
    assert "2 already finished" in retry[0]
    latest = latest_rows(read_rows([results]))
    assert len([r for r in latest if r["unit"] == "dev/tiny/arc_easy/broken/seed-0"]) == 1
    assert failed_ids == ["dev/tiny/arc_easy/broken/seed-0"]

    # the command fails when a unit of its shard did (after the others ran), saying where the errors are
    capsys.readouterr()
    assert cli.main(["bench", "--suite", str(path), "--output", str(out), "--data-dir", str(root / "data"),
                     "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "1 of 3 units failed (dev/tiny/arc_easy/broken/seed-0)" in captured.err and str(results) in captured.err
    assert "Failed units" in captured.out  # the report was still written


def test_a_missing_split_file_fails_before_the_first_unit(setup, tmp_path):
    root, model = setup
    suite = load_suite(suite_file(root, model))
    logs: list[str] = []
    with pytest.raises(FileNotFoundError, match=r"arc_easy 'test' split: .*ARC-Easy-Test.jsonl does not exist"):
        run_bench(suite, tmp_path / "out", split="test", data_dir=str(root / "data"), progress=False,
                  log=logs.append)
    assert logs == [] and not (tmp_path / "out").exists()  # no unit trained, nothing recorded


def test_shards_partition_the_matrix_and_merge_by_concatenation(setup, tmp_path):
    root, model = setup
    suite = load_suite(suite_file(root, model))
    plan = suite.plan(tmp_path)
    units = [u[0] for u in suite_units(plan)]
    for n in (1, 2, 3, 5):
        parts = [[u[0] for u in shard_units(suite_units(plan), (i, n))] for i in range(1, n + 1)]
        assert sorted(sum(parts, [])) == sorted(units)  # every unit once, none twice
    # every shard gets its share of every cell (a cheap cell is not all on one shard)
    wide = dataclasses.replace(plan, seeds=[0, 1, 2, 3], tasks=["arc_easy", "arc_challenge"])
    for n in (2, 3, 4):
        parts = [shard_units(suite_units(wide), (i, n)) for i in range(1, n + 1)]
        assert sorted(u[0] for p in parts for u in p) == sorted(u[0] for u in suite_units(wide))
        for part in parts:
            counts = [sum(u[3].label == c.label for u in part) for c in wide.cells]
            assert all(abs(k - 8 / n) < 1 for k in counts), (n, counts)  # 8 units per cell: 2 tasks × 4 seeds

    files = []
    for i in (1, 2):
        files.append(run_bench(suite, tmp_path / f"machine-{i}", data_dir=str(root / "data"), shard=(i, 2),
                               progress=False, log=lambda _: None)[0])
    assert [f.name for f in files] == ["shard-1-of-2.jsonl", "shard-2-of-2.jsonl"]
    assert {r["cell"].split("+")[0] for r in read_rows(files[:1])} == {"lora"}
    merged = tmp_path / "merged" / "results" / "all.jsonl"
    merged.parent.mkdir(parents=True)
    merged.write_bytes(b"".join(f.read_bytes() for f in files))  # cat shard-*.jsonl > all.jsonl
    table, _ = write_report(tmp_path / "merged")
    text = table.read_text()
    assert "| lora |" in text and "| bayeslora |" in text and "2 units finished" in text
    # the same lines read twice (all.jsonl beside the shard files it was made of) are not two seeds
    for f in files:
        (tmp_path / "merged" / "results" / f.name).write_bytes(f.read_bytes())
    assert "| lora | mean | 1 | 1 |" in write_report(tmp_path / "merged")[0].read_text()  # S 1, one seed
    empty = run_bench(suite, tmp_path / "machine-9", data_dir=str(root / "data"), shard=(3, 3), progress=False,
                      log=lambda _: None)
    assert empty[1] == 0  # more shards than units: an empty shard, not an error


def _rows(unit, attempt, n, stamp):
    return [{"unit": unit, "status": "ok", "attempt": attempt, "finished_at": stamp, "rows_in_attempt": n,
             "eval_task": "t", "cell": f"c{i}", "mode": "mean"} for i in range(n)]


def test_an_attempt_cut_short_is_ignored_and_the_file_stays_appendable(tmp_path):
    path = tmp_path / "results" / "results.jsonl"
    append_rows(path, _rows("u", "a", 2, "1"))
    whole = "".join(json.dumps(r) + "\n" for r in _rows("v", "b", 3, "2"))
    with open(path, "ab") as handle:
        handle.write(whole[: whole.index("\n") + 1 + 20].encode())  # killed after one row and a bit
    with pytest.warns(UserWarning):
        latest = latest_rows(read_rows(results_files(tmp_path)))
    assert {r["unit"] for r in latest} == {"u"}  # v's attempt is incomplete: not finished
    with pytest.warns(UserWarning, match="cut a torn last line"):
        append_rows(path, _rows("v", "c", 3, "3"))  # the rerun appends after cutting the fragment
    with pytest.warns(UserWarning, match="1 of 3 rows present"):
        latest = latest_rows(read_rows([path]))
    assert sorted((r["unit"], r["attempt"]) for r in latest) == [("u", "a")] * 2 + [("v", "c")] * 3
    path.write_text('{"unit": "u"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:1: not a benchmark row"):
        read_rows([path])


def test_rows_are_stored_without_non_finite_values(tmp_path):
    path = tmp_path / "r.jsonl"
    append_rows(path, [{"unit": "u", "status": "ok", "nll": float("inf"), "x": [float("nan"), 1.0]}])
    row = read_rows([path])[0]
    assert row["nll"] is None and row["x"] == [None, 1.0]


def test_the_reliability_plot_keeps_the_confidence_one_bucket():
    from bayeslora.bench.plots import _pooled_bins

    rel = {"edges": [0.0, 0.5, 1.0], "counts": [1, 1, 2], "accuracy": [0.0, 1.0, 0.5], "mean_confidence": [0.4, 0.7, 1.0]}
    acc, width, lo, counts = _pooled_bins([{"reliability": rel}, {"reliability": rel}])
    assert counts == [2, 6] and acc[1] == pytest.approx((2 * 1.0 + 4 * 0.5) / 6) and width == 0.5


@pytest.mark.parametrize("bad, message", [
    ('descripton = "typo"', "descripton: unknown key"),
    ('[cells.bayeslora]\nflow_dept = 0', "cells.bayeslora: .*unknown method options .*flow_dept"),
    ('[cells.x]\nmethod = "nope"', "unknown method 'nope'"),
    ('[cells.lora]\nseed = 3', r"cells.lora: \['seed'\] are set by the suite"),
    ('[budget]\nepoch = 2', "budget.epoch: unknown key"),
    ('[ood]\ntrain = "arc_easy"', "ood.eval: names no OOD sets"),
    ('seeds = []', "seeds: must be a non-empty list"),
    ('max_eval_examples = 0', "max_eval_examples: must be a positive integer"),
    ('tasks = []', "tasks: names no task"),
    ('tasks = ["arc_esay"]', "tasks: unknown task 'arc_esay'"),
    ('reference = "bayes"', "reference: 'bayes' is not one of the cells"),
    ('[cells."a/b"]', r"cells.a/b: a cell label is"),
    ('[budget]\nbatch_size = 1.9', "budget.batch_size: must be a positive integer"),
    ('[defaults]\nmax_grad_norm = inf', "defaults.max_grad_norm: NaN and infinity"),
    ('[ood]\ntrain = "arc_easy"\neval = ["mmlu_stme"]', "ood.eval: unknown task 'mmlu_stme'"),
    ('[cells.lora]\nlr = "fast"', "cells.lora: --lr must be a number, got 'fast'"),
    # the method's own config is built at load too, not hours later at the cell's unit
    ('[cells.bayeslora]\nflow_depth = "two"', "cells.bayeslora: BayesLoraConfig.flow_depth must be an integer >= 0"),
    ('[cells.ensemble]\nsize = 1', "cells.ensemble: --ensemble-size must be an integer >= 2"),
    ('samples_sweep = [1, 1]', "samples_sweep: must be a list of distinct positive integers"),
    ('samples_sweep = [0, 2]', "samples_sweep: must be a list of distinct positive integers"),
])
def test_a_bad_suite_is_refused_naming_the_file_and_the_key(tmp_path, bad, message):
    head = 'description = "d"\n' + ("" if bad.startswith("tasks") else 'tasks = ["arc_easy"]\n')
    cells = "" if bad.startswith("[cells.lora]") else "[cells.lora]\n"
    text = head + cells + bad + "\n" if bad.startswith("[") else head + bad + "\n" + cells
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_suite(path)
    assert "bad.toml" in str(info.value)


def test_shipped_suites_load_and_the_cli_lists_them(capsys):
    names = shipped_suites()
    assert {"cpu-quick", "cpu", "cpu-llm", "gpu", "ablation-flow-depth", "ablation-inducing", "ablation-samples",
            "ablation-recipe", "ablation-kl", "ablation-construction"} <= set(names)
    for name in names:
        suite = load_suite(name)
        assert suite.description.strip() and suite.plan(Path("x")).runs()
        assert "Cost" in suite.description, f"{name}: --list shows the description, which must state the cost"
    assert load_suite("cpu").plan(Path("x"), split="test").ood_eval[-2:] == ["mmlu_chem", "mmlu_phy"]
    assert cli.main(["bench", "--list"]) == 0
    assert "cpu-quick:" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such shipped suite"):
        load_suite("nope")
    for text in ("3", "0/2", "3/2", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(text)


def test_a_built_wheel_ships_the_suites(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(repo)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("bayeslora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).stem for n in names if n.startswith("bayeslora/bench/suites/") and n.endswith(".toml")}
    assert shipped == set(shipped_suites())
    from bayeslora.launch import LAUNCH_CONFIGS

    launch = {Path(n).stem for n in names if n.startswith("bayeslora/launch/") and n.endswith(".yaml")}
    assert launch == set(LAUNCH_CONFIGS)


def test_the_report_says_the_commit_is_unknown_outside_a_git_checkout():
    from bayeslora.bench.report import _header

    rows = [{"suite": "s", "split": "dev", "status": "error", "unit": u, "commit": c}
            for u, c in (("a", None), ("b", "abc123"))]
    header = "\n".join(_header(rows, None))
    assert "`abc123`" in header and "`unknown (not a git checkout; see versions)`" in header
    assert "None" not in header


def test_the_table_never_averages_two_scoring_protocols_of_one_set():
    from bayeslora.bench.table import markdown_table

    def row(seed, acc, scoring=None, config_scoring=None):
        return {"status": "ok", "split": "dev", "budget": "b", "train_task": "t", "eval_task": "t", "kind": "id",
                "cell": "lora", "mode": "mean", "seed": seed, "n": 10, "acc": acc, "scoring": scoring,
                "config": {"scoring": config_scoring}}

    rows = [row(0, 0.2, "loglik"), row(1, 0.4, "loglik"), row(0, 0.8, "labels"),
            row(1, 0.6, None, "labels")]  # a row from before the protocol was recorded: read from its config
    text = markdown_table(rows, [])
    assert "scored by loglik;" in text and "scored by labels;" in text
    assert "| lora | mean |  | 2 | 30.0 ± 14.1 |" in text and "| lora | mean |  | 2 | 70.0 ± 14.1 |" in text
    assert "50.0" not in text
    from bayeslora.bench.plots import _sets

    assert sorted(key[-1] for key in _sets(rows)) == ["labels", "loglik"]  # one figure per protocol too


def test_the_report_leaves_out_units_the_suite_dropped_and_marks_units_that_ran_otherwise():
    """Every row in results/ was averaged in: a dropped seed stayed in the table, and after a suite edit old and
    new settings were averaged into one line under one label with nothing said. Rows of another suite sharing
    the folder (a narrowed suite per task) are shown as they are."""
    from bayeslora.bench.report import in_suite
    from bayeslora.bench.table import markdown_table

    def row(unit, seed, acc, signature, suite="s"):
        return {"unit": unit, "status": "ok", "unit_signature": signature, "seed": seed, "acc": acc, "suite": suite,
                "split": "dev", "budget": "b", "train_task": "t", "eval_task": "t", "kind": "id",
                "cell": unit.split("/")[3], "mode": "mean", "n": 10, "scoring": "pairs"}

    rows = [row("dev/b/t/bayes/seed-0", 0, 0.60, "new"), row("dev/b/t/bayes/seed-1", 1, 0.62, "new"),
            row("dev/b/t/bayes/seed-2", 2, 0.30, "old"), row("dev/b/t/bayes/seed-9", 9, 0.10, "new"),
            row("dev/b/t/lora/seed-0", 0, 0.50, "new"), row("dev/b/t/other/seed-0", 0, 0.40, "x", suite="s-obqa")]
    units = {"dev/b/t/bayes/seed-0": "new", "dev/b/t/bayes/seed-1": "new", "dev/b/t/bayes/seed-2": "new",
             "dev/b/t/lora/seed-0": None}  # None: its data is not here to check; its row stands
    kept, stale, notes = in_suite(rows, "s", units)
    assert sorted(r["unit"] for r in kept) == ["dev/b/t/bayes/seed-0", "dev/b/t/bayes/seed-1", "dev/b/t/bayes/seed-2",
                                               "dev/b/t/lora/seed-0", "dev/b/t/other/seed-0"]
    assert stale == {"dev/b/t/bayes/seed-2"} and "1 finished unit(s) that ran with other settings" in notes[0]
    assert "1 unit(s) this suite no longer has: `dev/b/t/bayes/seed-9`" in notes[1]
    text = markdown_table(kept, [], stale)
    assert "| bayes‡ | mean |  | 3 |" in text and "| lora | mean |" in text and "| other | mean |" in text
    from bayeslora.bench.report import _header

    for r in kept:
        r.update(commit="c", versions={"torch": "x"}, config={}, n_train=1, n_val=1)
    header = "\n".join(_header(kept, None, units, notes, stale))
    assert "3 of 4 units finished with the suite's settings, 0 failed" in header  # another suite's unit: not its
    assert "not checked against their own suites: rows of 1 unit(s) of s-obqa" in header
    assert in_suite(rows[:2], "s", {u: "new" for u in units})[1:] == (set(), [])  # nothing to say: nothing said


def test_a_column_only_some_seeds_have_says_so_and_is_not_marked_best():
    """A seed without a value (AURC by MI where the MI is noise; a non-finite value stored as None) left one
    seed's value shown as a three-seed mean "± 0.0", and marked best."""
    from bayeslora.bench.table import markdown_table

    def row(cell, seed, aurc_mi):
        return {"status": "ok", "split": "dev", "budget": "b", "train_task": "t", "eval_task": "t", "kind": "id",
                "cell": cell, "mode": "sample", "seed": seed, "n": 10, "acc": 0.5, "aurc_mi": aurc_mi,
                "scoring": "pairs"}

    rows = [row("bayes", 0, 0.30), row("bayes", 1, None), row("bayes", 2, None),
            row("other", 0, 0.40), row("other", 1, 0.41), row("other", 2, 0.35),
            row("third", 0, 0.45), row("third", 1, 0.50), row("third", 2, 0.55)]
    text = markdown_table(rows, [])
    assert "| 30.0 (1/3 seeds) |" in text and "**38.7 ± 3.2**" in text and "**30.0" not in text


def test_rows_without_an_attempt_id_stay_apart_per_unit():
    rows = [{"unit": f"u{i}", "status": "ok", "eval_task": "t", "cell": "c", "mode": "mean", "seed": i}
            for i in range(3)]
    assert sorted(r["seed"] for r in latest_rows(rows)) == [0, 1, 2]


def test_plots_skip_values_stored_as_none(tmp_path):
    from bayeslora.bench.plots import write_plots

    rel = {"edges": [0.0, 0.5, 1.0], "counts": [1, 1], "accuracy": [0.0, 1.0], "mean_confidence": [0.4, 0.7]}
    rows = [{"status": "ok", "split": "dev", "budget": "b", "train_task": "t", "eval_task": "t", "cell": c,
             "mode": "mean", "seed": 0, "acc": a, "ece": e, "reliability": rel, "scoring": "pairs",
             "accuracy_at_coverage": [None] + [0.5] * 19} for c, a, e in (("x", None, None), ("y", 0.5, 0.1))]
    assert len(write_plots(rows, tmp_path)) == 3
