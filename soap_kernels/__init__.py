"""soap_kernels: a fast, faithful SOAP optimizer for PyTorch."""

from .optimizer import SOAP
from .schedules import *  # noqa: F403
from .schedules import __all__ as _schedules_all

__version__ = "0.1.0"

__all__ = ["SOAP", "__version__", *_schedules_all]
