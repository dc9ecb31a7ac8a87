"""The import direction of the package (STYLE.md): core → torch only; data imports no model code;
evaluation does not import training; nothing imports the CLI. Checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bayeslora"


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved against the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def files(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py")) if (PACKAGE / sub).is_dir() else [PACKAGE / f"{sub}.py"]


def offending(sub: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(PACKAGE)} imports {name}" for f in files(sub) for name in sorted(imports_of(f))
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden)]


def test_core_is_torch_only():
    bad = offending("core", ("transformers", "peft", "accelerate", "bayeslora.surgery", "bayeslora.training",
                             "bayeslora.data", "bayeslora.methods", "bayeslora.evaluation"))
    assert not bad, bad


def test_data_imports_no_model_code():
    bad = offending("data", ("peft", "accelerate", "bayeslora.core", "bayeslora.surgery", "bayeslora.methods",
                             "bayeslora.training", "bayeslora.scoring", "bayeslora.models"))
    assert not bad, bad


def test_evaluation_does_not_import_training_or_model_code():
    bad = offending("evaluation", ("bayeslora.training", "bayeslora.methods", "bayeslora.surgery", "peft",
                                   "transformers", "accelerate"))
    assert not bad, bad


def test_nothing_imports_the_cli():
    bad = [f"{f.relative_to(PACKAGE)}" for f in PACKAGE.rglob("*.py")
           if f.name != "cli.py" and any(n == "bayeslora.cli" for n in imports_of(f))]
    assert not bad, bad


def test_matplotlib_is_imported_only_where_a_plot_is_drawn():
    """Module-level matplotlib imports came with the evaluation package (so with every method): ~30 MB of
    resident memory to any process that never draws a plot, which the memory benchmark counted as the
    posterior's cost. Plots import it inside the function that draws."""
    bad = []
    for f in PACKAGE.rglob("*.py"):
        for node in ast.parse(f.read_text()).body:  # top level only; `if TYPE_CHECKING:` blocks are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.relative_to(PACKAGE)} imports {n}" for n in names if n.split(".")[0] == "matplotlib"]
    assert not bad, bad


def test_importing_the_methods_and_evaluation_loads_no_matplotlib():
    """The goal behind the check above, in a fresh interpreter: the method registry (which the CLI, the
    presets and the benchmarks import) reaches the evaluation package, whose reliability plot used to
    import matplotlib with the module."""
    import subprocess
    import sys

    code = ("import sys, bayeslora.methods.bayes, bayeslora.evaluation, bayeslora.bench.plots\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_checker_sees_relative_imports():
    assert "bayeslora.core.posterior" in imports_of(PACKAGE / "core" / "__init__.py")
    assert any(n.startswith("bayeslora.core") for n in imports_of(PACKAGE / "surgery" / "layer.py"))


def test_zero_shot_files_keep_each_protocol_and_each_hub_organisation_apart(tmp_path):
    from bayeslora.layout import zero_shot_files

    a, b = zero_shot_files("orgA/model", "s", "loglik"), zero_shot_files("orgB/model", "s", "loglik")
    assert a.metrics.parent != b.metrics.parent and a.metrics.parent.parent.name == "orgA--model"
    assert zero_shot_files("orgA/model", "s", "labels").metrics != a.metrics
    local = tmp_path / "checkpoints" / "my-lm"
    local.mkdir(parents=True)
    assert zero_shot_files(str(local), "s", "loglik").metrics == Path("zero-shot/my-lm/loglik/metrics-s.json")


def test_evaluations_with_other_draw_seeds_get_their_own_files():
    """Two `evaluate --seed` runs wrote one metrics file: the second erased the first."""
    from bayeslora.layout import eval_stem

    base = eval_stem("arc_easy", "dev", "bayeslora", "sample", 4)
    assert base == "arc_easy-dev-bayeslora-sample-S4"  # seed 0 keeps the names existing runs have
    assert eval_stem("arc_easy", "dev", "bayeslora", "sample", 4, seed=1) == base + "-seed1"
    assert eval_stem("arc_easy", "dev", "bayeslora", "sample", 4, first=20, seed=2) == base + "-first20-seed2"
    assert eval_stem("arc_easy", "dev", "lora", "mean", 1, seed=3) == "arc_easy-dev-lora-mean-S1"  # no draws


def test_a_run_folder_removes_only_what_a_run_wrote(tmp_path):
    from bayeslora.layout import RunFolder, previous_version

    folder = RunFolder(tmp_path)
    assert folder.run_entries() == []
    (tmp_path / "mine.txt").write_text("keep")
    assert folder.run_entries() == []
    for path in (folder.config, folder.history, folder.root / "metrics_dev.json"):
        path.write_text("{}")
    assert not folder.holds_run()  # a model folder's config.json is not a run's
    with pytest.raises(ValueError, match="not a bayeslora run folder; nothing deleted"):
        folder.remove_run()
    folder.config.write_text('{"train": {}}')
    assert folder.holds_run()
    for path in (folder.adapters_dir / "epoch-0", folder.checkpoint, previous_version(folder.checkpoint),
                 folder.eval_dir, folder.calibration_dir):
        path.mkdir(parents=True)
    assert folder.run_entries()[0] == folder.config and len(folder.run_entries()) == 8
    folder.remove_run()
    assert folder.run_entries() == [] and [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
