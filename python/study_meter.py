"""Count and time SOAP's eigenbasis refreshes from outside the optimizer.

``SOAP`` has no refresh counter or hook yet, so :class:`RefreshMeter` wraps, for as long as it is
entered, two methods at class level and restores them on exit (nothing in ``soap_kernels`` is
edited):

* ``soap_kernels.engine.Bucket.refresh(rows_per_dim)``: each call refreshes, per working dim, the
  listed rows; the meter adds ``len(rows)`` factor refreshes per dim and the call's wall time.
* ``SOAP._refresh_by_schedule`` (private; skipped when absent): the schedule's whole per-step
  decision path (drift of every factor, ``decide``, the refreshes). Its time minus the refresh time
  is the schedule's *decision overhead*, which is what ``DriftAdaptive`` and ``Budgeted`` pay on
  every step for the drift they read.

Only the batched engine (``backend="torch"`` / ``"triton"``) goes through ``Bucket.refresh``; the
``reference`` backend is not metered. Timings are host wall-clock (``time.perf_counter``) and
process CPU time (``time.process_time``, all threads of this process): on a shared, loaded CPU the
second is the steadier measure of the work done. On a GPU the caller would have to synchronise.
"""

from __future__ import annotations

import time
from typing import Any

from soap_kernels import SOAP
from soap_kernels.engine import Bucket


class RefreshMeter:
    def __init__(self) -> None:
        self.factor_refreshes = 0  # factors refreshed (one factor of one parameter = 1)
        self.refresh_calls = 0  # Bucket.refresh calls
        self.refresh_s = 0.0  # wall time inside Bucket.refresh
        self.refresh_cpu_s = 0.0  # process CPU time inside Bucket.refresh
        self.schedule_s = 0.0  # wall time inside SOAP._refresh_by_schedule (decision + refreshes)
        self.schedule_cpu_s = 0.0
        self._saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> RefreshMeter:
        meter = self
        original_refresh = Bucket.refresh

        def refresh(bucket: Bucket, rows_per_dim: dict[int, list[int]]) -> None:
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return original_refresh(bucket, rows_per_dim)
            finally:
                meter.refresh_s += time.perf_counter() - start
                meter.refresh_cpu_s += time.process_time() - start_cpu
                meter.refresh_calls += 1
                meter.factor_refreshes += sum(len(rows) for rows in rows_per_dim.values())

        self._patch(Bucket, "refresh", refresh)
        original_schedule = getattr(SOAP, "_refresh_by_schedule", None)
        if original_schedule is not None:

            def refresh_by_schedule(optimizer: SOAP, *args: Any, **kwargs: Any) -> Any:
                start, start_cpu = time.perf_counter(), time.process_time()
                try:
                    return original_schedule(optimizer, *args, **kwargs)
                finally:
                    meter.schedule_s += time.perf_counter() - start
                    meter.schedule_cpu_s += time.process_time() - start_cpu

            self._patch(SOAP, "_refresh_by_schedule", refresh_by_schedule)
        return self

    def _patch(self, owner: type, name: str, replacement: Any) -> None:
        self._saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def __exit__(self, *exc: object) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def snapshot(self) -> tuple[int, float, float, float]:
        """``(factor_refreshes, refresh_s, schedule_s, refresh_cpu_s)`` so far."""
        return self.factor_refreshes, self.refresh_s, self.schedule_s, self.refresh_cpu_s


def engine_refresh_count(optimizer: SOAP) -> int | None:
    """Factor refreshes as the engine's own per-(dim, row) counters see them (a cross-check of the
    meter), or None when the optimizer has no batched engine."""
    buckets = optimizer.buckets_info()
    if not buckets:
        return None
    return sum(b["refreshes"] for b in buckets)
