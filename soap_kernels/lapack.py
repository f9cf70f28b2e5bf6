"""LAPACK calls (QR, eigh) run the way that measures fastest on this machine, now.

Measured on the project's 2-core machines: MKL's ``eigh``/``qr`` can run several times slower with
all threads than with one (a batch of six 1024² QRs: 0.42 s at one thread, 1.52 s at two), while on
other machines the opposite holds. A batch can also be split over the cores, each piece running
single-threaded: both ways give the same bits (every matrix is factored alone, single-threaded,
in its own aligned buffer, and the split lays its results out as the batched call does: a
row-major copy of LAPACK's column-major Q had made the GEMMs that read it round differently, and
an odd-sized matrix inside one batch lay off alignment, docs/DESIGN.md §7). Which is faster depends on
the machine *and on what else runs on it*: a choice measured once, while another process was
busy, would stay wrong.

So nothing is locked in. Every CPU call for a given (op, matrix size, batch size) is timed, per
matrix, and the choice follows the latest measurements (:class:`_Chooser`): the first call runs
the split (where there is a core to spare it is the faster way, and the ways give the same
bits), the next tries one thread; from then on the way whose latest call was faster is used, and
the other is tried again on a real call after 2, 4, 8 … up to :data:`MAX_PROBE_INTERVAL` calls
while it keeps losing, and at once when the chosen way's time jumps (by :data:`CHANGE` either
way: the load changed) or exceeds the other's last time. A probe runs the other way on part of
the batch only (one matrix, or one per worker for the split) and the rest the chosen way, and
its result is used: the ways are bit-identical, so a probe costs only the difference in speed on
that part. A busy period therefore moves the choice to whichever way is faster while it lasts
and lets it move back after. ``SOAP_LAPACK_MULTITHREAD=1`` adds
all-threads LAPACK (the plain call) as a candidate (faster on some machines, but its rounding
differs, so runs may then differ between processes), ``SOAP_LAPACK_SPLIT=0`` removes the split,
``SOAP_LAPACK_THREADS=N`` fixes the thread count instead (no split, no timing). CUDA calls go
straight through.
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

__all__ = ["qr", "eigh", "thread_choice", "choice_stats"]

MIN_PROBE_INTERVAL = 2
MAX_PROBE_INTERVAL = 32
CHANGE = 1.25  # a chosen way's time moving by this factor between its calls means the load changed

_clock: Callable[[], float] = time.perf_counter  # tests inject a fake clock
_choosers: dict[tuple[str, int, int, int], _Chooser] = {}
_choice: dict[tuple[str, int], str] = {}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


class _Chooser:
    """The way to run one kind of call (op, size, batch, threads), from its latest timings.

    ``latest[w]``: seconds per matrix of the last call run way ``w``; ``since[w]``: calls since
    then. ``pick()`` names the way for the next call, ``record(way, seconds_per_matrix)`` takes
    its time. The chosen way is the one whose latest time is lower; the others are probed (run on
    a real call) when they have no time yet, after ``interval`` calls (doubling, up to
    MAX_PROBE_INTERVAL, while probes confirm the choice; back to MIN_PROBE_INTERVAL when one
    changes it), or at once when the chosen way's time moved by CHANGE or rose above another
    way's last time."""

    def __init__(self, ways: tuple[str, ...]):
        self.ways = ways
        self.current = ways[0]
        self.latest: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.since: dict[str, int] = {w: 0 for w in ways}
        self.interval = MIN_PROBE_INTERVAL
        self.alarm = False
        self.calls = self.probes = self.switches = 0

    def pick(self) -> str:
        for w in self.ways:
            if w not in self.latest:
                return w
        others = [w for w in self.ways if w != self.current]
        if not others:
            return self.current
        stalest = max(others, key=lambda w: self.since[w])
        if self.alarm or self.since[stalest] >= self.interval:
            return stalest
        return self.current

    def record(self, way: str, seconds: float) -> None:
        self.calls += 1
        previous = self.latest.get(way)
        self.latest[way] = seconds
        self.best[way] = min(seconds, self.best.get(way, float("inf")))
        for w in self.ways:
            self.since[w] = 0 if w == way else self.since[w] + 1
        if way != self.current:  # a probe (or a first measurement): compare with the chosen way's last call
            self.probes += 1
            self.alarm = False
            if self.current not in self.latest or seconds < self.latest[self.current]:
                if self.current in self.latest:
                    self.switches += 1
                self.current = way
                self.interval = MIN_PROBE_INTERVAL
            else:
                self.interval = min(2 * self.interval, MAX_PROBE_INTERVAL)
            return
        if previous is not None and not previous / CHANGE <= seconds <= previous * CHANGE:
            self.alarm = True  # the load changed: check the other ways now
            self.interval = MIN_PROBE_INTERVAL
        elif any(seconds > self.latest[w] for w in self.ways if w != way and w in self.latest):
            self.alarm = True  # the chosen way now loses to another's last time

    def stats(self) -> dict:
        return {"way": self.current, "latest_s_per_matrix": dict(self.latest),
                "best_s_per_matrix": dict(self.best), "calls": self.calls, "probes": self.probes,
                "switches": self.switches, "probe_interval": self.interval}


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
    """The way chosen now for each (op, matrix size) (the latest batch size seen): ``"1"``,
    ``"all"`` or ``"split"`` (``op`` is ``"qr"``/``"eigh"`` for batches, ``"qr-single"``/
    ``"eigh-single"`` for one matrix). Choices follow the measurements: they may change later."""
    with _lock:
        return dict(_choice)


def choice_stats() -> list[dict]:
    """Per kind of call (op, size, batch, threads): the way chosen now, the latest and best
    seconds per matrix of each way, and how many calls, probes and switches there were."""
    with _lock:
        return [{"op": op, "size": d, "batch": b, "threads": t, **c.stats()}
                for (op, d, b, t), c in _choosers.items()]


def _split(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, workers: int) -> tuple[Tensor, Tensor]:
    """Run ``fn`` on the matrices of the batch concurrently, each single-threaded (torch releases
    the GIL). One task per matrix, handed out as workers come free, so batches that do not divide
    evenly (7 matrices on 2 cores) keep every core busy to the end; each task copies its result
    into the output itself, so the copies run in parallel too."""
    global _pool
    if _pool is None:
        # Each worker sets its own thread count before its first call: a fresh thread's OpenMP
        # count is the process default (all cores), not the caller's, so without this the first
        # split call factored with all threads and gave other bits than one thread (seen in
        # tests/test_lapack.py once the pool was no longer created by a calibration).
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soap-lapack",
                                   initializer=torch.set_num_threads, initargs=(1,))
    with _threads(1):
        return _each(fn, x, _pool.map)


def _each(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor,
          run: Callable[..., Iterator[None]]) -> tuple[Tensor, Tensor]:
    """``fn`` on each matrix of the batch alone (``run(task, indices)`` calls the tasks: in turn or
    concurrently), the results gathered into one batch. Alone, each matrix sits in its own freshly
    allocated (aligned) buffer whichever way runs it: MKL's results depend on the alignment, and
    inside one batch a d×d fp32 matrix with d not a multiple of 4 starts off 64-byte alignment
    (e.g. d = 83), so a batched call and per-matrix calls gave other bits there."""
    flat = x.reshape(-1, *x.shape[-2:])
    outs: list[tuple[Tensor, Tensor]] = []
    ready = threading.Lock()

    def task(i: int) -> None:
        first, second = fn(flat[i : i + 1])
        with ready:
            if not outs:
                outs.append((_batch_like(first, flat.shape[0]), _batch_like(second, flat.shape[0])))
        outs[0][0][i : i + 1].copy_(first)
        outs[0][1][i : i + 1].copy_(second)

    list(run(task, range(flat.shape[0])))
    first, second = outs[0]
    return first.reshape(*x.shape[:-2], *first.shape[1:]), second.reshape(*x.shape[:-2], *second.shape[1:])


def _batch_like(single: Tensor, batch: int) -> Tensor:
    """An empty batch of ``batch`` results laid out as the batched call lays out ``single``'s
    (LAPACK's Q is column-major). The layout matters: the GEMMs that read the result round
    differently for a transposed operand, so a row-major copy of the same values gave other bits
    downstream (the split's difference of docs/DESIGN.md §7)."""
    return single.new_empty_strided((batch, *single.shape[1:]), (single[0].numel(), *single.stride()[1:]))


def _candidates(full: int, batch: int) -> tuple[str, ...]:
    ways = ["1"]
    if full > 1 and batch > 1 and os.environ.get("SOAP_LAPACK_SPLIT", "1") != "0":
        # The same bits as one thread (SOAP_LAPACK_SPLIT=0 leaves it out); tried first, as the
        # way that uses the cores.
        ways.insert(0, "split")
    if full > 1 and os.environ.get("SOAP_LAPACK_MULTITHREAD", "0") != "0":
        # Multi-threaded LAPACK rounds differently from single-threaded LAPACK, so it is a
        # candidate only on request: by default every choice gives the same bits.
        ways.append("all")
    return tuple(ways)


def _execute(way: str, fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, full: int,
             batch: int) -> tuple[Tensor, Tensor]:
    if way == "all":
        return fn(x)
    if way == "split" and batch > 1:
        return _split(fn, x, min(full, batch))
    return _one(fn, x)


def _run(op: str, fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    if x.device.type != "cpu":
        return fn(x)
    forced = os.environ.get("SOAP_LAPACK_THREADS")
    if forced:
        threads = max(1, int(forced))
        if threads == 1:  # the default's one-thread way, matrix by matrix: the same bits
            return _one(fn, x)
        with _threads(threads):
            return fn(x)
    full = torch.get_num_threads()
    batch = x.numel() // max(1, x.shape[-1] * x.shape[-2])
    # Single matrices and batches are told apart: a single matrix cannot be split, so its choice
    # (made, e.g., by the per-parameter reference backend) says nothing about a batch's.
    name = op if batch > 1 else f"{op}-single"
    ways = _candidates(full, batch)
    key = (name, x.shape[-1], batch, full)
    with _lock:
        chooser = _choosers.get(key)
        if chooser is None or chooser.ways != ways:
            chooser = _choosers[key] = _Chooser(ways)
        way = chooser.pick()
        current = chooser.current
        part = _probe_part(way, full, batch) if way != current and current in chooser.latest else batch
    if len(ways) == 1:
        out = _execute(way, fn, x, full, batch)
    elif part < batch:
        out, elapsed = _probe(fn, x, way, part, current, full)
        with _lock:
            chooser.record(way, elapsed / part)
    else:
        t0 = _clock()
        out = _execute(way, fn, x, full, batch)
        elapsed = _clock() - t0
        with _lock:
            chooser.record(way, elapsed / max(1, batch))
    with _lock:
        _choice[(name, x.shape[-1])] = chooser.current
    return out


def _probe_part(way: str, full: int, batch: int) -> int:
    """How many matrices of the batch a probe of ``way`` runs: one per worker for the split (one
    round of it), one for the other ways."""
    return min(batch, min(full, batch) if way == "split" else 1)


def _probe(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, way: str, part: int, current: str,
           full: int) -> tuple[tuple[Tensor, Tensor], float]:
    """The first ``part`` matrices of the batch run ``way`` (timed), the rest ``current``; the
    results are joined into one batch laid out as the batched call lays it out. Returns the
    results and the probed part's seconds."""
    flat = x.reshape(-1, *x.shape[-2:])
    batch = flat.shape[0]
    t0 = _clock()
    head = _execute(way, fn, flat[:part], full, part)
    elapsed = _clock() - t0
    tail = _execute(current, fn, flat[part:], full, batch - part)
    joined = []
    for a, b in zip(head, tail):
        out = _batch_like(a, batch)
        out[:part].copy_(a)
        out[part:].copy_(b)
        joined.append(out.reshape(*x.shape[:-2], *out.shape[1:]))
    return (joined[0], joined[1]), elapsed


def _one(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """At one thread; a batch matrix by matrix (:func:`_each`: the split's bits for every size)."""
    with _threads(1):
        if x.dim() > 2 and x.numel() > x.shape[-1] * x.shape[-2]:
            return _each(fn, x, map)
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
