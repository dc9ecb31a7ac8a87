"""``bayeslora bench``: a suite (a TOML file) of methods × tasks × seeds under one budget, run resumably
in shards, reported as JSON lines, a markdown table and plots."""

from .report import write_report
from .results import latest_rows, read_rows, results_file
from .runner import current_signatures, parse_shard, run_bench, shard_units, suite_signatures, suite_units
from .suite import SUITES_DIR, Suite, load_suite, shipped_suites

__all__ = ["SUITES_DIR", "Suite", "current_signatures", "latest_rows", "load_suite", "parse_shard", "read_rows",
           "results_file", "run_bench", "shard_units", "shipped_suites", "suite_signatures", "suite_units",
           "write_report"]
