"""Triton kernels for the hot path (one module per op family).

- ``rotate``: :func:`rotate_in_adam`, :func:`rotate_back`, :func:`rotate_back_update`, :func:`rotate_in`
- ``statistics``: :func:`update_statistics`
- ``adam``: :func:`adam_step` (multi-tensor Adam for the un-preconditioned parameters)
- ``refresh``: :func:`refresh_factor`, :func:`cholesky_qr`, :func:`reexpress_exp_avg`,
  :func:`permute_along`, :func:`refresh_moments_`, :func:`reorthonormalize_`

Importing this package never imports Triton; the functions are loaded on first use, so the
package works (and :func:`available` says why not) when Triton is missing. On a machine without a
GPU the kernels run under Triton's interpreter on CPU tensors, which needs ``TRITON_INTERPRET=1``
set before ``triton`` is first imported.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = [
    "available",
    "rotate_in_adam",
    "rotate_in",
    "rotate_back",
    "rotate_back_update",
    "update_statistics",
    "adam_step",
    "refresh_factor",
    "cholesky_qr",
    "reexpress_exp_avg",
    "permute_along",
    "refresh_moments_",
    "reorthonormalize_",
]

_HOME = {
    "rotate_in_adam": "rotate",
    "rotate_in": "rotate",
    "rotate_back": "rotate",
    "rotate_back_update": "rotate",
    "update_statistics": "statistics",
    "adam_step": "adam",
    "refresh_factor": "refresh",
    "cholesky_qr": "refresh",
    "reexpress_exp_avg": "refresh",
    "permute_along": "refresh",
    "refresh_moments_": "refresh",
    "reorthonormalize_": "refresh",
}


def available() -> tuple[bool, str]:
    """``(True, how)`` when the Triton kernels can run here, else ``(False, why not)``.

    They need ``triton`` importable and either a CUDA device or ``TRITON_INTERPRET=1`` (the CPU
    interpreter, for CPU tensors; it must be set before ``triton`` is first imported).
    """
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        cuda = False
    if cuda:
        return True, f"triton {triton.__version__} on CUDA"
    if interpret:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set (the CPU interpreter is opt-in)"


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
