"""Post-hoc calibration of trained runs (``bayeslora calibrate``), fitted on the ``val`` slice.

* ``temperature``: temperature scaling of every draw's logits (any method).
* ``posterior-scale``: one factor on the spread of a posterior's draws (Bayesian-LoRA).
"""

from .base import CALIBRATIONS, Calibration, Fitting, get_calibration, register_calibration, val_metrics
from .posterior_scale import PosteriorScale, search_scale
from .temperature import TemperatureScaling, fit_temperature, tempered

__all__ = [
    "CALIBRATIONS", "Calibration", "Fitting", "PosteriorScale", "TemperatureScaling", "fit_temperature",
    "get_calibration", "register_calibration", "search_scale", "tempered", "val_metrics",
]
