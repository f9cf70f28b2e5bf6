"""LAPACK calls (QR, eigh) run at the CPU thread count that measured fastest.

Measured on the project's 2-core machines: MKL's ``eigh``/``qr`` can run many times slower with
all threads than with one, and on other machines the opposite holds (see README, "LAPACK threads").
So the first call for a given (op, size, batch) on the CPU times the call once at one thread and
once at ``torch.get_num_threads()`` and remembers the faster; later calls use it. The environment
variable ``SOAP_LAPACK_THREADS=N`` fixes the count instead. CUDA calls go straight through.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["qr", "eigh", "thread_choice"]

_choice: dict[tuple[str, int, int], int] = {}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def thread_choice() -> dict[tuple[str, int, int], int]:
    """The thread counts chosen so far, keyed by (op, matrix size, batch)."""
    return dict(_choice)


def _run(op: str, fn: Callable[[Tensor], object], x: Tensor):
    if x.device.type != "cpu":
        return fn(x)
    forced = os.environ.get("SOAP_LAPACK_THREADS")
    if forced:
        with _threads(max(1, int(forced))):
            return fn(x)
    batch = x.numel() // max(1, x.shape[-1] * x.shape[-2])
    key = (op, x.shape[-1], batch)
    n = _choice.get(key)
    if n is not None:
        with _threads(n):
            return fn(x)
    full = torch.get_num_threads()
    if full == 1:
        _choice[key] = 1
        return fn(x)
    timings = {}
    result = None
    for n in (1, full, 1, full):  # two rounds: the first of each pays one-off costs
        t0 = time.perf_counter()
        with _threads(n):
            result = fn(x)
        timings[n] = min(timings.get(n, float("inf")), time.perf_counter() - t0)
    _choice[key] = min(timings, key=timings.get)
    return result


def qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batched Householder QR (``torch.linalg.qr``, reduced)."""
    return _run("qr", torch.linalg.qr, x)


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batched symmetric eigendecomposition (``torch.linalg.eigh``), ascending eigenvalues."""
    return _run("eigh", torch.linalg.eigh, x)
