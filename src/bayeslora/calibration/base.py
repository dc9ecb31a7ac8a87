"""The interface of a post-hoc calibration: fitted on a trained run's ``val`` slice, applied at evaluation.

A calibration changes a trained run's predictions without retraining it, in one or both of two places:
``prepare`` acts on the model before it predicts (e.g. widening a posterior, or adding noise to a
deterministic adapter) and returns the predictor to use (the run's method, or one that wraps it), and
``transform`` acts on the per-draw log-probabilities after (e.g. a temperature). ``fit`` chooses the
parameters (JSON numbers; large fitted state, such as Laplace's factors, goes under ``"tensors"`` and is
saved as safetensors beside the record) on held-back
data through a :class:`Fitting`, which predicts with the run's own method, scorer and mode, so a
calibration never sees the split it is reported on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

from torch import Tensor, nn

from ..evaluation import compute_metrics, summarise_samples
from ..evaluation.predict import PredictionResult

__all__ = ["CALIBRATIONS", "Calibration", "Fitting", "LoraPostHoc", "get_calibration", "positive_param", "register_calibration",
           "val_metrics"]

CALIBRATIONS: dict[str, type["Calibration"]] = {}


def register_calibration(cls: type["Calibration"]) -> type["Calibration"]:
    """Class decorator: make a calibration available to ``bayeslora calibrate`` and ``evaluate``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a `name`")
    CALIBRATIONS[cls.name] = cls
    return cls


def get_calibration(name: str) -> "Calibration":
    if name not in CALIBRATIONS:
        raise ValueError(f"--calibration: unknown calibration {name!r}; available: {', '.join(sorted(CALIBRATIONS))}")
    return CALIBRATIONS[name]()


def val_metrics(result: PredictionResult, log_probs: Tensor | None = None) -> dict[str, Any]:
    """ACC / ECE / NLL / Brier of the averaged predictive of (N, S, C) per-draw log-probabilities."""
    lp = result.log_probs if log_probs is None else log_probs
    summary = summarise_samples(lp.transpose(0, 1), result.mask)
    return compute_metrics(summary.log_probs, result.labels, result.mask, kind="log_probs")


@dataclass
class Fitting:
    """What a calibration is fitted with: the run's method and model, and a way to predict the val slice.

    ``predict()`` runs the run's method in ``mode`` with ``samples`` draws seeded by ``seed`` (the same
    seeds on every call, so two settings are compared on common random numbers).
    """

    method: Any
    model: nn.Module
    examples: Sequence[Any]
    mode: str
    samples: int
    seed: int
    predictor: Callable[..., PredictionResult]
    train_examples: Sequence[Any] = ()

    def predict(self, predictor: Any = None, examples: Sequence[Any] | None = None,
                desc: str | None = None) -> PredictionResult:
        """Predict ``examples`` (default: the val slice) with ``predictor`` (default: the run's method);
        ``desc`` shows a progress bar so named (for long passes)."""
        return self.predictor(predictor, examples, desc)


class Calibration:
    """Base class: by default a calibration changes nothing (``prepare`` and ``transform`` are identities)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

    def applies_to(self, method: Any) -> bool:
        """Whether this calibration can act on a run of ``method`` (a :class:`~bayeslora.methods.Method`)."""
        return True

    def mode_for(self, method: Any) -> str | None:
        """The mode the calibrated predictor runs in (None: the method's default)."""
        return None

    def draws(self, method: Any, mode: str, samples: int) -> int:
        """How many draws the calibrated predictor makes (as its files are named)."""
        return method.draws(mode, samples)

    def base_mode(self, method: Any, mode: str) -> str:
        """The mode the run's own model is prepared in before ``prepare`` acts on it."""
        return mode

    def fit(self, fitting: Fitting) -> dict[str, Any]:
        """Choose the parameters on ``fitting``'s data; returns ``{"params": {...}, ...diagnostics}``."""
        raise NotImplementedError

    def prepare(self, method: Any, model: nn.Module, params: dict[str, Any],
                tensors: Optional[dict[str, Tensor]] = None) -> Any:
        """Act on the model before it predicts; returns the predictor (``draws``, ``predict``) to use.
        ``tensors`` are what ``fit`` returned under ``"tensors"`` (saved beside the record), if anything."""
        return method

    def transform(self, log_probs: Tensor, mask: Tensor, params: dict[str, Any]) -> Tensor:
        """Act on per-draw log-probabilities (N, S, C) (-inf on padded choices) after prediction."""
        return log_probs

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        """Validate parameters read back from a file (``where`` names it in errors)."""
        return params

    def search_bounds(self) -> dict[str, tuple[float, float]]:
        """Per parameter, the ends of the range its search may reach: a fit that ends on one was stopped by
        the range, not chosen by the data (too few val rows, a degenerate model), and is flagged."""
        return {}

    def at_bound(self, params: dict[str, Any]) -> list[str]:
        """The parameters that ended on an end of their search range (see :meth:`search_bounds`)."""
        ends = self.search_bounds().items()  # within float rounding: exp(log(0.01)) is 0.010000000000000004
        return [name for name, (low, high) in ends
                if name in params and not low * (1 + 1e-9) < params[name] < high * (1 - 1e-9)]

    def fitted_values(self, params: dict[str, Any]) -> int:
        """How many of ``params`` are fitted values (the rest is bookkeeping), for cost tables."""
        return len(params)

    def check_tensors(self, tensors: dict[str, Tensor], params: dict[str, Any], where: str) -> dict[str, Tensor]:
        """Validate the tensors read back from the file ``where`` (a calibration without tensors has none)."""
        raise ValueError(f"{where}: the {self.name} calibration saves no tensors")


class LoraPostHoc(Calibration):
    """A calibration that acts on a deterministic PEFT LoRA run (lora, map) through its unmerged layers."""

    def applies_to(self, method: Any) -> bool:
        return not method.stochastic and "merged" in method.modes

    def base_mode(self, method: Any, mode: str) -> str:
        return "mean"


def positive_param(params: dict[str, Any], key: str, where: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"{where}: params.{key} must be a positive finite number, got {value!r}")
    return float(value)

