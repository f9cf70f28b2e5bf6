"""LAPACK calls (QR, eigh) run the way that measured fastest on this machine.

Measured on the project's 2-core machines: MKL's ``eigh``/``qr`` can run several times slower with
all threads than with one (a batch of six 1024² QRs: 0.42 s at one thread, 1.52 s at two), while on
other machines the opposite holds. A batch can also be split over the cores, each piece running
single-threaded. So the first call for a given (op, size) on the CPU times the candidates on a sample of the
batch — one thread, or the batch split over the cores at one thread each — and remembers the
faster; later calls use it. Both give the same bits (every matrix is factored single-threaded), so
a run is reproducible whatever the timing picked. ``SOAP_LAPACK_MULTITHREAD=1`` adds all-threads
LAPACK as a candidate (faster on some machines, but its rounding differs, so runs may then differ
between processes). ``SOAP_LAPACK_THREADS=N`` fixes the thread count instead (no split).
CUDA calls go straight through.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = ["qr", "eigh", "thread_choice"]

_choice: dict[tuple[str, int], str] = {}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


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


def thread_choice() -> dict[tuple[str, int], str]:
    """The way chosen so far for each (op, matrix size): ``"1"``, ``"all"`` or ``"split"``
    (``op`` is ``"qr"``/``"eigh"`` for batches, ``"qr-single"``/``"eigh-single"`` for one matrix)."""
    return dict(_choice)


def _split(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, workers: int) -> tuple[Tensor, Tensor]:
    """Run ``fn`` on the matrices of the batch concurrently, each single-threaded (torch releases
    the GIL). One task per matrix, handed out as workers come free, so batches that do not divide
    evenly (7 matrices on 2 cores) keep every core busy to the end; each task copies its result
    into the output itself, so the copies run in parallel too."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soap-lapack")
    flat = x.reshape(-1, *x.shape[-2:])
    outs: list[tuple[Tensor, Tensor]] = []
    ready = threading.Lock()

    def task(i: int) -> None:
        first, second = fn(flat[i : i + 1])
        with ready:
            if not outs:
                outs.append((first.new_empty(flat.shape[0], *first.shape[1:]),
                             second.new_empty(flat.shape[0], *second.shape[1:])))
        outs[0][0][i : i + 1].copy_(first)
        outs[0][1][i : i + 1].copy_(second)

    with _threads(1):
        list(_pool.map(task, range(flat.shape[0])))
    first, second = outs[0]
    return first.reshape(*x.shape[:-2], *first.shape[1:]), second.reshape(*x.shape[:-2], *second.shape[1:])


def _run(op: str, fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    if x.device.type != "cpu":
        return fn(x)
    forced = os.environ.get("SOAP_LAPACK_THREADS")
    if forced:
        with _threads(max(1, int(forced))):
            return fn(x)
    full = torch.get_num_threads()
    batch = x.numel() // max(1, x.shape[-1] * x.shape[-2])
    # Single matrices and batches are calibrated apart: a single matrix cannot be split, so its
    # choice (made, e.g., by the per-parameter reference backend) says nothing about a batch's.
    key = (op, x.shape[-1]) if batch > 1 else (f"{op}-single", x.shape[-1])
    with _lock:
        way = _choice.get(key)
    if way is None:
        way = _calibrate(fn, x, full, batch)
        with _lock:
            _choice[key] = way
    if way == "all":
        return fn(x)
    if way == "split" and batch > 1:
        return _split(fn, x, min(full, batch))
    return _one(fn, x)


def _calibrate(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, full: int, batch: int) -> str:
    """Time the candidates on at most two matrices of this size (a whole batch of 1024² QRs at
    the slow thread count took 19 s here), dropping one as soon as it runs 3× the best."""
    if full == 1:
        return "1"
    sample = x.reshape(-1, *x.shape[-2:])[: min(batch, 2)]
    ways: dict[str, Callable[[], object]] = {"1": lambda: _one(fn, sample)}
    if os.environ.get("SOAP_LAPACK_MULTITHREAD", "0") != "0":
        # Multi-threaded LAPACK rounds differently from single-threaded LAPACK, so it is a
        # candidate only on request: by default every choice gives the same bits.
        ways["all"] = lambda: fn(sample)
    if sample.shape[0] > 1:
        ways["split"] = lambda: _split(fn, sample, min(full, sample.shape[0]))
    best: dict[str, float] = {}
    for _ in range(3):  # three rounds: the first of each pays one-off costs, the best of the rest counts
        for name, call in ways.items():
            if best and name in best and best[name] > 3 * min(best.values()):
                continue
            t0 = time.perf_counter()
            call()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return min(best, key=best.get)


def _one(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    with _threads(1):
        return fn(x)


def _householder_qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.qr`` of square matrices as LAPACK's two halves, ``geqrf`` then ``orgqr``.

    The same bits as ``torch.linalg.qr`` (checked in the tests), without its extra copies:
    measured on this project's CPU, one 1024² QR at one thread took 53 ms this way against 63 ms.
    """
    a, tau = torch.geqrf(x)
    return torch.linalg.householder_product(a, tau), a.triu()


def qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batched Householder QR (``torch.linalg.qr``, reduced)."""
    if x.device.type == "cpu" and x.shape[-1] == x.shape[-2]:
        return _run("qr", _householder_qr, x)
    return _run("qr", torch.linalg.qr, x)


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batched symmetric eigendecomposition (``torch.linalg.eigh``), ascending eigenvalues."""
    return _run("eigh", torch.linalg.eigh, x)
