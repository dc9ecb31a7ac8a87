"""Post-hoc calibration of trained runs (``bayeslora calibrate``), fitted on the ``val`` slice.

* ``temperature``: temperature scaling of every draw's logits (any method).
* ``posterior-scale``: one factor on the spread of a posterior's draws (Bayesian-LoRA).
* ``posterior-widen``: the widest such factor whose val NLL stays within TFB's tolerance (Bayesian-LoRA).
* ``tfb``: training-free Bayesianization of a deterministic LoRA run (Shi et al. 2025).
* ``laplace``: Laplace-LoRA, a K-FAC Laplace posterior over a deterministic LoRA run (Yang et al. 2024).
"""

from .base import CALIBRATIONS, Calibration, Fitting, get_calibration, register_calibration, val_metrics
from .laplace import Laplace, LaplacePredictor
from .posterior_scale import PosteriorScale, PosteriorWiden, search_scale, widest_scale
from .temperature import TemperatureScaling, fit_temperature, tempered
from .tfb import Tfb, TfbPredictor, bisect_sigma

__all__ = [
    "CALIBRATIONS", "Calibration", "Fitting", "Laplace", "LaplacePredictor", "PosteriorScale", "PosteriorWiden", "TemperatureScaling", "Tfb", "TfbPredictor", "bisect_sigma",
    "fit_temperature",
    "get_calibration", "register_calibration", "search_scale", "widest_scale", "tempered", "val_metrics",
]
