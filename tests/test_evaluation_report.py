"""Run reports and atomic JSON writes (bayeslora.evaluation.report)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from bayeslora.evaluation.report import (
    MetricsFileError,
    collect_rows,
    find_metrics_files,
    format_table,
    load_metrics,
    report,
    write_json_atomic,
)


def _metrics(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "task": "arc_e", "split": "dev", "method": "bayeslora", "mode": "sample", "samples": 4, "n": 570,
        "acc": 0.5412, "ece": 0.0643, "nll": 1.1261, "brier": 0.5931,
    }
    record.update(overrides)
    return record


def _write(path: Path, record: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_write_json_atomic_round_trips_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"acc": 0.5, "nll": math.inf, "task": "boolq·x"})  # overwrite in place
    back = json.loads(target.read_text(encoding="utf-8"))
    assert back["acc"] == 0.5 and math.isinf(back["nll"]) and back["task"] == "boolq·x"
    assert target.read_text(encoding="utf-8").endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_json_atomic(tmp_path / "metrics.json", {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path, umask: int, monkeypatch) -> None:
    """mkstemp makes 0600 files: results and adapter configs were unreadable to others under umask 022."""
    import os
    import stat

    from bayeslora import atomic
    from bayeslora.config import BayesLoraConfig

    old = os.umask(umask)
    monkeypatch.setattr(atomic, "_UMASK", atomic._read_umask())  # read at import; here, as this test sets it
    try:
        target = write_json_atomic(tmp_path / "metrics.json", {"a": 1})
        BayesLoraConfig(r=2, target_modules=["q"]).save_pretrained(str(tmp_path / "adapter"))
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE(target.stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "adapter" / "adapter_config.json").stat().st_mode) == want
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json"]


def test_find_metrics_files_accepts_file_folder_and_eval_subfolder(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    a = _write(run / "metrics.json", _metrics())
    b = _write(run / "metrics_test.json", _metrics(split="test"))
    c = _write(run / "eval" / "metrics_mean.json", _metrics(mode="mean", samples=1))
    _write(run / "other.json", _metrics())  # not a metrics file
    _write(run / "eval" / "deeper" / "metrics.json", _metrics())  # only direct children of eval/
    assert find_metrics_files(run) == [a, b, c]
    assert find_metrics_files(b) == [b]
    with pytest.raises(FileNotFoundError, match="no such run"):
        find_metrics_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics"):
        find_metrics_files(tmp_path / "empty")


def test_missing_or_mistyped_field_names_file_and_field(tmp_path: Path) -> None:
    record = _metrics()
    del record["brier"]
    path = _write(tmp_path / "r" / "metrics.json", record)
    with pytest.raises(MetricsFileError, match=r"metrics\.json.*'brier'"):
        load_metrics(path)
    with pytest.raises(MetricsFileError, match="'brier'"):
        report([tmp_path / "r"])
    bad = _write(tmp_path / "s" / "metrics.json", _metrics(samples="4"))
    with pytest.raises(MetricsFileError, match=r"s/metrics\.json: field 'samples' must be int"):
        load_metrics(bad)
    broken = tmp_path / "t" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    with pytest.raises(MetricsFileError, match="cannot read"):
        load_metrics(broken)


def test_rows_sort_stably_and_deduplicate(tmp_path: Path) -> None:
    r1 = tmp_path / "seed1"
    r2 = tmp_path / "seed2"
    _write(r1 / "metrics.json", _metrics(task="obqa", method="lora", mode="mean", samples=1))
    _write(r1 / "eval" / "metrics_b.json", _metrics(task="arc_e", acc=0.1))
    _write(r2 / "metrics.json", _metrics(task="arc_e", acc=0.2))
    rows = collect_rows([r2, r1, r1 / "eval" / "metrics_b.json"])  # the last argument repeats a file
    assert [(r.record["task"], r.record["acc"]) for r in rows] == [("arc_e", 0.2), ("arc_e", 0.1), ("obqa", 0.5412)]
    assert [r.run for r in rows] == [str(r2), str(r1), str(r1)]  # eval/ files belong to their run


def test_table_columns_are_aligned_and_scaled(tmp_path: Path) -> None:
    _write(tmp_path / "lora_run" / "metrics.json", _metrics(method="lora", mode="mean", samples=1, nll=math.inf))
    _write(tmp_path / "bl" / "metrics.json", _metrics(recipe="elbo", eval_seconds=12.34))
    out = io.StringIO()
    table = report([tmp_path / "lora_run", tmp_path / "bl"], out=out)
    assert out.getvalue() == table + "\n"
    lines = table.splitlines()
    header = lines[0].split()
    assert header[:11] == ["run", "task", "split", "method", "mode", "S", "n", "ACC×100", "ECE×100", "NLL", "Brier"]
    assert header[11:] == ["recipe", "eval", "s"]  # optional columns only when present somewhere
    assert len(lines) == 3
    bl, lora = lines[1], lines[2]  # sorted by method: bayeslora < lora
    assert "54.12" in bl and "6.43" in bl and "1.1261" in bl and "0.5931" in bl and "12.3" in bl
    assert "inf" in lora and " - " in lora + " "  # missing optional fields show as "-"
    # numbers are right-aligned: each numeric cell ends where its header ends
    for name, value_bl in [("ACC×100", "54.12"), ("NLL", "1.1261"), ("Brier", "0.5931")]:
        end = lines[0].index(name) + len(name)
        assert bl[end - len(value_bl) : end] == value_bl
    # text is left-aligned: every row's method starts under the header's "method"
    start = lines[0].index("method")
    assert bl[start:].startswith("bayeslora") and lora[start:].startswith("lora")


def test_format_table_of_no_rows_is_just_the_header() -> None:
    assert format_table([]).split() == ["run", "task", "split", "method", "mode", "S", "n", "ACC×100", "ECE×100", "NLL", "Brier"]
