"""Evaluation: predictive averaging, calibration metrics, reliability diagrams and run reports.

The pipeline every method shares (torch only for the maths; no Hugging Face, no training code):

    logits (S, B, C) --log_softmax_over_choices(mask)--> per-sample log-probs (S, B, C)
        --average_log_probs--> log p̄ (B, C) --compute_metrics(labels, mask)--> acc, ece, nll, brier, n

Masks are boolean ``(B, C)`` with ``True`` marking a valid choice; padded choices carry ``-inf``
log-probability (probability 0) everywhere. Metrics are float64 fractions (ACC and ECE are shown ×100
only in reports and plots).
"""

from .metrics import (
    CalibrationBins,
    Predictions,
    calibration_bins,
    compute_metrics,
    prepare_predictions,
    reliability_bins,
)
from .predictive import (
    NORMALISATION_ATOL,
    PredictiveSummary,
    average_log_probs,
    entropy,
    expected_entropy,
    log_softmax_over_choices,
    mutual_information,
    predictive_entropy,
    summarise_samples,
)
from .reliability import draw_reliability, save_reliability_diagram
from .report import (
    MetricsFileError,
    atomic_write,
    collect_rows,
    find_metrics_files,
    format_table,
    load_metrics,
    report,
    write_json_atomic,
)

__all__ = [
    "NORMALISATION_ATOL",
    "CalibrationBins",
    "MetricsFileError",
    "Predictions",
    "PredictiveSummary",
    "atomic_write",
    "average_log_probs",
    "calibration_bins",
    "collect_rows",
    "compute_metrics",
    "draw_reliability",
    "entropy",
    "expected_entropy",
    "find_metrics_files",
    "format_table",
    "load_metrics",
    "log_softmax_over_choices",
    "mutual_information",
    "predictive_entropy",
    "prepare_predictions",
    "reliability_bins",
    "report",
    "save_reliability_diagram",
    "summarise_samples",
    "write_json_atomic",
]
