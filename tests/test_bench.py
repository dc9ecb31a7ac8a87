"""``bayeslora bench``: suites are validated data, a tiny suite runs end to end into JSON lines, a table and
plots, a rerun skips finished units, a failing unit is recorded while the rest go on, shards partition
the matrix and their results merge by concatenation, and a built wheel ships the suites."""

from __future__ import annotations

import json
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
    results = run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=logs.append)
    rows = read_rows([results])
    assert {r["unit"] for r in rows} == {"tiny/arc_easy/lora/seed-0", "tiny/arc_easy/bayeslora/seed-0"}
    assert all(r["status"] == "ok" for r in rows)
    variants = {(r["cell"], r["eval_task"], r["mode"]) for r in rows}
    assert ("lora+temperature", "arc_challenge", "mean") in variants and ("bayeslora", "arc_easy", "mean") in variants
    for r in rows:
        assert r["n"] == 10 and r["suite"] == "tiny" and r["split"] == "dev" and r["config"]["epochs"] == 1
        assert r["versions"]["torch"] and "commit" in r and r["unit_seconds"] > 0
        assert r["train_seconds"] > 0 and r["trainable_parameters"] > 0 and r["examples_per_second"] > 0
        assert len(r["accuracy_at_coverage"]) == 20 and sum(r["reliability"]["counts"]) == 10
        assert r["entropy"] == pytest.approx(r["aleatoric"] + r["mi"], abs=1e-9)
        assert (r["auroc_entropy"] is not None) == (r["eval_task"] == "arc_challenge")
        assert (r["aurc_mi"] is not None) == (r["mode"] == "sample")

    table, plots = write_report(out)
    text = table.read_text()
    assert "### arc_easy → arc_challenge (OOD" in text and "**" in text and "lora+temperature" in text
    assert len(plots) == 6 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    again: list[str] = []
    run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=again.append)
    assert "2 already finished" in again[0] and len(again) == 1  # nothing trained, scored or appended
    assert len(read_rows([results])) == len(rows)


def test_a_failing_unit_is_recorded_and_the_others_go_on(setup):
    root, model = setup
    extra = '[cells.broken]\nmethod = "lora"\nlr = 5e-2\ntarget_modules = ["no_such_module"]'
    suite = load_suite(suite_file(root, model, "broken", extra))
    out = root / "broken-out"
    logs: list[str] = []
    results = run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=logs.append)
    rows = read_rows([results])
    failed = [r for r in rows if r["status"] == "error"]
    assert [r["unit"] for r in failed] == ["tiny/arc_easy/broken/seed-0"] and "no_such_module" in failed[0]["error"]
    assert {r["unit"] for r in rows if r["status"] == "ok"} == {"tiny/arc_easy/lora/seed-0",
                                                                "tiny/arc_easy/bayeslora/seed-0"}
    assert any("FAILED" in line for line in logs)
    table, _ = write_report(out)
    assert "Failed units" in table.read_text() and "tiny/arc_easy/broken/seed-0" in table.read_text()

    retry: list[str] = []
    run_bench(suite, out, data_dir=str(root / "data"), progress=False, log=retry.append)  # retries only it
    assert "2 already finished" in retry[0]
    latest = latest_rows(read_rows([results]))
    assert len([r for r in latest if r["unit"] == "tiny/arc_easy/broken/seed-0"]) == 1


def test_shards_partition_the_matrix_and_merge_by_concatenation(setup, tmp_path):
    root, model = setup
    suite = load_suite(suite_file(root, model))
    plan = suite.plan(tmp_path)
    units = [u[0] for u in suite_units(plan)]
    for n in (1, 2, 3, 5):
        parts = [[u[0] for u in shard_units(suite_units(plan), (i, n))] for i in range(1, n + 1)]
        assert sorted(sum(parts, [])) == sorted(units)  # every unit once, none twice

    files = []
    for i in (1, 2):
        files.append(run_bench(suite, tmp_path / f"machine-{i}", data_dir=str(root / "data"), shard=(i, 2),
                               progress=False, log=lambda _: None))
    assert [f.name for f in files] == ["shard-1-of-2.jsonl", "shard-2-of-2.jsonl"]
    assert {r["cell"].split("+")[0] for r in read_rows(files[:1])} == {"lora"}
    merged = tmp_path / "merged" / "results" / "all.jsonl"
    merged.parent.mkdir(parents=True)
    merged.write_bytes(b"".join(f.read_bytes() for f in files))  # cat shard-*.jsonl > all.jsonl
    table, _ = write_report(tmp_path / "merged")
    text = table.read_text()
    assert "| lora |" in text and "| bayeslora |" in text and "2 units finished" in text


def test_results_readers_skip_a_torn_last_line_and_name_a_bad_one(tmp_path):
    path = tmp_path / "results" / "results.jsonl"
    append_rows(path, [{"unit": "u", "status": "ok", "finished_at": "1", "attempt": "a"}])
    with open(path, "ab") as handle:
        handle.write(b'{"unit": "u", "sta')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(read_rows(results_files(tmp_path))) == 1
    path.write_text('{"unit": "u"}\n{"unit": "u", "status": "ok"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:1: not a benchmark row"):
        read_rows([path])
    path.write_text('not json\n{"unit": "u", "status": "ok"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:1: not a JSON line"):
        read_rows([path])


@pytest.mark.parametrize("bad, message", [
    ('descripton = "typo"', "descripton: unknown key"),
    ('[cells.bayeslora]\nflow_dept = 0', "cells.bayeslora: .*unknown method options .*flow_dept"),
    ('[cells.x]\nmethod = "nope"', "unknown method 'nope'"),
    ('[cells.lora]\nseed = 3', r"cells.lora: \['seed'\] are set by the suite"),
    ('[budget]\nepoch = 2', "budget.epoch: unknown key"),
    ('[ood]\ntrain = "arc_easy"', "ood.eval: names no OOD sets"),
    ('seeds = []', "seeds: must be a non-empty list"),
    ('max_eval_examples = 0', "max_eval_examples: must be a positive integer"),
])
def test_a_bad_suite_is_refused_naming_the_file_and_the_key(tmp_path, bad, message):
    base = 'description = "d"\ntasks = ["arc_easy"]\n[cells.lora]\n'
    text = (base + bad + "\n") if bad.startswith("[") else (bad + "\n" + base)
    if bad.startswith("[cells.lora]"):
        text = 'description = "d"\ntasks = ["arc_easy"]\n' + bad + "\n"
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_suite(path)
    assert "bad.toml" in str(info.value)


def test_shipped_suites_load_and_the_cli_lists_them(capsys):
    names = shipped_suites()
    assert {"cpu-quick", "cpu", "cpu-llm", "gpu", "ablation-flow-depth", "ablation-inducing", "ablation-samples",
            "ablation-recipe", "ablation-kl"} <= set(names)
    for name in names:
        suite = load_suite(name)
        assert suite.description.strip() and suite.plan(Path("x")).runs()
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
