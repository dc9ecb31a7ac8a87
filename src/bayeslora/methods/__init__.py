"""Fine-tuning methods behind one interface (see :mod:`bayeslora.methods.base`)."""

from . import bayes as _bayes  # noqa: F401  (registers "bayeslora")
from . import blob as _blob  # noqa: F401  (registers "blob")
from . import ensemble as _ensemble  # noqa: F401  (registers "ensemble")
from . import lora as _lora  # noqa: F401  (registers "lora")
from . import map as _map  # noqa: F401  (registers "map")
from . import mcdropout as _mcdropout  # noqa: F401  (registers "mcdropout")
from .base import METHODS, Method, TrainOutputs, get_method, register_method

__all__ = ["METHODS", "Method", "TrainOutputs", "get_method", "register_method"]
