"""Which kernel table runs each bucket: every eligibility rule and ``auto``'s measurement.

This is the only module that decides between backends (docs/DESIGN.md §3). ``backend`` is one of
:data:`BACKENDS`; ``"reference"`` runs :mod:`soap_kernels.reference` per parameter, the others the
batched engine with a table per bucket:

* ``"torch"``: :class:`~soap_kernels.ops.TorchKernels` everywhere;
* ``"triton"``: :class:`~soap_kernels.triton.table.TritonKernels` for the buckets the Triton kernels
  take (Adam second moment, fp32 state, matrix or un-preconditioned working layouts, CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1``), the torch table for the rest;
* ``"auto"``: the torch table, or where Triton runs on CUDA, each eligible bucket's first full
  update timed through both tables on the bucket's own state (restored after each timed call)
  and the faster kept (:func:`measure`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .kernels import Kernels
from .layout import Layout
from .ops import TORCH

__all__ = ["BACKENDS", "backend_available", "auto_backend", "resolve_backend", "device_problem", "select", "measure",
           "triton_interpreted"]

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_available(name: str) -> tuple[bool, str]:
    """Whether a backend can run here, and if not, why."""
    if name in ("reference", "torch"):
        return True, "plain PyTorch"
    if name == "triton":
        from . import triton as triton_kernels

        return triton_kernels.available()
    return False, f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"


def auto_backend(device: torch.device | None) -> str:
    """``"triton"`` (measured per bucket) on a CUDA device where Triton runs, else ``"torch"``."""
    if device is not None and device.type == "cuda" and backend_available("triton")[0]:
        return "triton"
    return "torch"


def resolve_backend(backend: str, device: torch.device | None) -> str:
    """The backend a ``SOAP(..., backend=backend)`` runs; an explicit one that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return auto_backend(device)
    ok, reason = backend_available(backend)
    if not ok:
        raise RuntimeError(f"backend={backend!r} cannot run here: {reason}. Use backend='auto' or 'torch'.")
    return backend


def device_problem(devices: Iterable[torch.device], backend: str) -> str | None:
    """Why parameters on ``devices`` cannot run on ``backend``, or ``None``. Compiled Triton
    kernels read CUDA memory only; under the interpreter (``TRITON_INTERPRET=1``) CPU tensors only."""
    if backend != "triton":
        return None
    interpreted = triton_interpreted()
    wanted = "cpu" if interpreted else "cuda"
    for device in devices:
        if device.type != wanted:
            how = "the Triton interpreter (TRITON_INTERPRET=1) runs CPU tensors" if interpreted else \
                "compiled Triton kernels run CUDA tensors"
            return f"backend='triton' cannot update a parameter on {device}: {how} only; use backend='torch'"
    return None


def _triton_takes(layout: Layout, second_moment: str, state_dtype: torch.dtype, device: torch.device) -> bool:
    """The Triton kernels take Adam buckets with fp32 state whose working layout is a matrix or has
    no factor, on the device the kernels read."""
    if second_moment != "adam" or state_dtype != torch.float32:
        return False
    if len(layout.work_shape) != 2 and layout.any_preconditioned:
        return False
    return device_problem((device,), "triton") is None


def select(backend: str, layout: Layout, second_moment: str, state_dtype: torch.dtype, device: torch.device,
           precision: str = "fp32") -> tuple[Kernels, bool]:
    """The table for one bucket, and whether ``auto`` should still measure it against the torch
    table (:func:`measure`, at the bucket's first full update)."""
    if backend == "reference":
        raise ValueError("backend='reference' has no kernel table: it runs soap_kernels.reference")
    if backend in ("torch", "auto") and not (backend == "auto" and auto_backend(device) == "triton"):
        return TORCH, False
    if not _triton_takes(layout, second_moment, state_dtype, device):
        return TORCH, False
    from .triton.table import TritonKernels

    return TritonKernels(precision), backend == "auto"


def time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(candidates: dict[str, Kernels], run: Callable[[Kernels], None], snapshot: Callable[[], Any],
            restore: Callable[[Any], None], device: torch.device, where: str) -> tuple[Kernels, dict[str, float] | None]:
    """``auto``'s per-bucket choice: time ``run(table)`` (one whole update) for each candidate, three
    rounds, the first not counted (Triton compiles and tunes then), the state restored after every
    call so the run is the one the chosen table alone would give. A candidate other than torch that
    raises (e.g. a Triton compile error) is dropped with a warning. Returns the faster table and
    the measured milliseconds."""
    saved = snapshot()
    best = {name: math.inf for name in candidates}
    try:
        for rnd in range(3):
            for name, table in list(candidates.items()):
                try:
                    seconds = time_call(lambda table=table: run(table), device)
                except Exception as exc:
                    if name == "torch":
                        raise
                    warnings.warn(f"SOAP backend='auto': the {name} kernels failed on a bucket of {where} "
                                  f"({type(exc).__name__}: {exc}); it uses the torch ops", RuntimeWarning, stacklevel=4)
                    return TORCH, None
                finally:
                    restore(saved)
                if rnd:
                    best[name] = min(best[name], seconds)
    finally:
        restore(saved)
    chosen = min(best, key=best.get)
    return candidates[chosen], {k: v * 1e3 for k, v in best.items()}
