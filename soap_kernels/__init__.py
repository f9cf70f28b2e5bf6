"""soap_kernels: a fast, faithful SOAP optimizer for PyTorch."""

__version__ = "0.1.0"

from .distributed import ShardedSOAP  # noqa: E402
from .optimizer import SOAP  # noqa: E402
from .schedules import *  # noqa: E402, F403
from .schedules import __all__ as _schedules_all  # noqa: E402


def backend_info(device=None) -> dict:
    """Which backends and native ops run here, and what ``backend="auto"`` picks on ``device``."""
    from ._info import backend_info as _backend_info

    return _backend_info(device)


__all__ = ["SOAP", "ShardedSOAP", "backend_info", "__version__", *_schedules_all]
