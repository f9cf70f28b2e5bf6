"""The batched SOAP engine (docs/DESIGN.md §2): buckets of same-shaped parameters, one kernel table each.

Parameters of one (param group, working layout, dtype, device) form a :class:`Bucket` whose state
is stacked: ``exp_avg[B, *work]``, ``exp_avg_sq[B, *work]``, per factor (preconditioned working dim
``i``) an eigenbasis ``Q_i[B, d_i, d_i]`` and the statistics *in the rotated frame*
``B_i = Q_iᵀ GG_i Q_i``. Same math as :mod:`soap_kernels.reference`, less work:

* ``exp_avg`` stays in the eigenbasis between refreshes; at a refresh it is re-expressed with the
  small ``Q_m``;
* statistics are updated from the rotated gradient Adam already needs, so ``diag(B_i)`` and the
  drift are free, and the refresh is ``Q ← (Q P)·qr(Pᵀ B P)``;
* one batched GEMM serves every parameter of a bucket.

A bucket gets its kernel table (:mod:`soap_kernels.kernels`) when it is built
(:func:`soap_kernels.select.select`) and has one update path and one refresh path. State is in
the parameter's precision class: fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 parameters.

Failed factorisations: a refresh whose QR raises or returns non-finite values for some rows is
redone for those rows in float64 with the torch table; rows that fail again keep their previous
basis (identity permutation and mixing) and are reported through ``Bucket.on_failure``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import ops, select
from .kernels import Kernels, step_scalars
from .layout import Layout

__all__ = ["Bucket", "BatchedEngine", "bucket_key", "state_dtype", "NOT_PRECONDITIONED"]

# A basis is a product of orthogonal factors; re-orthonormalise it every this many refreshes
# (the first time after 8 to 15 refreshes, by the factor's phase: reorthonormalize_phase).
# Measured (python/soak.py, f = 1): max ||QᵀQ − I||_F = 3.4e-6 (d = 16), 8.2e-6 (d = 64), 2.5e-5
# (d = 256), no growth over 3000 refreshes; the QR costs ~2% of the step at f = 1.
REORTHONORMALIZE_EVERY = 8


def reorthonormalize_phase(work_shape: Sequence[int], dim: int) -> int:
    """Where in the cadence factor ``dim`` of a ``work_shape`` bucket re-orthonormalises: after its
    refresh number ``REORTHONORMALIZE_EVERY + phase`` and every ``REORTHONORMALIZE_EVERY`` after.

    Spread by a hash of the factor's shape (the same on every process and after a resume), so the
    factors of a model do not all take their QR at the same refresh: when they did, one refresh
    in eight cost +550 ms on the bench set (a full QR set) and was the one refresh step that came
    out slower than the reference's under load (benchmarks/NOTES.md 30)."""
    return zlib.crc32(repr((tuple(int(d) for d in work_shape), int(dim))).encode()) % REORTHONORMALIZE_EVERY


def reorthonormalize_due(refreshes: int, phase: int) -> bool:
    """Does a factor that has now been refreshed ``refreshes`` times re-orthonormalise?"""
    return refreshes >= REORTHONORMALIZE_EVERY and (refreshes - phase) % REORTHONORMALIZE_EVERY == 0

# A factor that is not preconditioned is an empty list in the state, as in the reference's.
NOT_PRECONDITIONED: list = []

# ``on_failure(param, working dim, what)``: a factorisation failed in fp32 and fp64; the previous
# basis was kept (the identity at the first step).
FailureHook = Callable[[Tensor, int, str], None]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 parameters get fp64 state and math; every other dtype fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bucket_key(param: Tensor, layout: Layout) -> tuple:
    return (layout, param.dtype, param.device)


def _finite_rows(x: Tensor) -> Tensor:
    """``[R]`` bool: whether each matrix of ``[R, d, d]`` is finite (a row sum is finite exactly
    when every entry is, unless the sum overflows: then the row only goes to the fp64 retry).

    Summed over the matrix dims as they lie: LAPACK's Q is column-major, and ``flatten`` would copy
    it first (a fresh 25 MB per 6×1024² batch; 58 ms of a refresh step on the bench set)."""
    return torch.isfinite(x.sum(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x)


class Bucket:
    """Stacked state of ``B`` same-shaped parameters of one param group."""

    def __init__(self, params: list[Tensor], layout: Layout, second_moment: str, kernels: Kernels,
                 measure: bool = False) -> None:
        self.params = params
        self.layout = layout
        self.second_moment = second_moment
        # backend="auto": the torch table until the first full update times both (a partial
        # update before it, e.g. a row without a gradient, runs the torch table).
        self.candidate = kernels if measure else None
        self.kernels = ops.TORCH if measure else kernels
        self.pending_measure = measure
        self.measured: dict[str, float] | None = None
        self.dtype = params[0].dtype
        self.on_failure: FailureHook | None = None
        self.workspace_pool: WorkspacePool | None = None
        count, work = len(params), layout.work_shape
        opts = {"device": params[0].device, "dtype": state_dtype(self.dtype)}
        self.exp_avg = torch.zeros(count, *work, **opts)
        rows = work[0] if work else 1
        cols = math.prod(work[1:]) if len(work) > 1 else 1
        self.exp_avg_sq = torch.zeros(count, *work, **opts) if second_moment == "adam" else \
            torch.zeros(count, rows + cols, **opts)
        self.q = [torch.zeros(count, d, d, **opts) if pre else None for d, pre in zip(work, layout.preconditioned)]
        self.stats = [None if q is None else torch.zeros_like(q) for q in self.q]
        # The step count lives on the device (bias correction, live state) and on the host (refresh
        # decisions, step sizes): no device round trip on the step.
        self.step = torch.zeros(count, device=opts["device"], dtype=torch.float32)
        self.host_step = [0] * count
        self.initialized = [False] * count
        # Refreshes per (working dim, row), for the re-orthonormalisation cadence (CPU, in the state).
        self.refresh_count = torch.zeros(len(work), count, dtype=torch.int64)

    @property
    def factor_dims(self) -> list[int]:
        return self.layout.factor_dims

    def report_failure(self, row: int, dim: int, what: str) -> None:
        if self.on_failure is not None:
            self.on_failure(self.params[row], dim, what)

    # ----------------------------------------------------------------------------- state
    def row_state(self, row: int) -> dict[str, Any]:
        """One row's state as live views, under the reference's names (``GG_eigenbasis`` is the
        engine's rotated-frame ``GG``: ``Qᵀ GG Q``)."""
        layout = self.layout
        return {
            "step": self.step[row],
            "exp_avg": layout.from_work(self.exp_avg[row]),
            "exp_avg_sq": layout.from_work(self.exp_avg_sq[row]) if self.second_moment == "adam" else self.exp_avg_sq[row],
            "Q": [NOT_PRECONDITIONED if q is None else q[row] for q in self.q],
            "GG_eigenbasis": [NOT_PRECONDITIONED if s is None else s[row] for s in self.stats],
            "Q_refreshes": self.refresh_count[:, row],
        }

    def import_row(self, row: int, state: dict[str, Any]) -> None:
        """Load one row from a validated state: the engine's own (``GG_eigenbasis``) or the
        reference's (``GG``, rotated here: ``B = Qᵀ GG Q``)."""
        layout, dtype = self.layout, self.exp_avg.dtype
        self.exp_avg[row].copy_(layout.to_work(state["exp_avg"].to(dtype)))
        second = state["exp_avg_sq"].to(dtype)
        self.exp_avg_sq[row].copy_(layout.to_work(second) if self.second_moment == "adam" else second)
        exact = state.get("GG_eigenbasis")
        for i, (q, s) in enumerate(zip(self.q, self.stats)):
            if q is None:
                continue
            q_row = state["Q"][i].to(dtype)
            q[row].copy_(q_row)
            s[row].copy_(exact[i].to(dtype) if exact is not None else q_row.T @ state["GG"][i].to(dtype) @ q_row)
        counts = state.get("Q_refreshes")
        if counts is not None:
            self.refresh_count[:, row] = torch.as_tensor(counts, dtype=torch.int64)
        step = state["step"]
        step = int(step.item()) if isinstance(step, Tensor) else int(step)
        self.host_step[row] = step
        self.step[row] = step
        self.initialized[row] = True

    # ----------------------------------------------------------------------------- the step
    def initialize(self, rows: list[int], grads: list[Tensor], shampoo_beta: float) -> None:
        """First step with a gradient: ``GG = (1-βs) g gᵀ``, ``Q = eigh(GG)``; no update."""
        for row, grad in zip(rows, grads):
            grad_work = self.layout.to_work(grad.to(self.exp_avg.dtype))
            for i, (q, s) in enumerate(zip(self.q, self.stats)):
                if q is None:
                    continue
                gg = ops.gram(grad_work, i).mul_(1.0 - shampoo_beta)
                basis = ops.initial_eigenbasis(gg)
                if basis is None:
                    self.report_failure(row, i, "initial eigendecomposition (eigh) failed in float32 and float64; "
                                        "started from the identity basis")
                    basis = torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype)
                q[row].copy_(basis)
                s[row].copy_(basis.T @ gg @ basis)
            self.exp_avg[row].zero_()
            self.exp_avg_sq[row].zero_()
            self.step[row] = 0
            self.host_step[row] = 0
            self.initialized[row] = True

    def work_views(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """The parameters as working-layout views, or ``None`` where a view is impossible.
        Regression: a conv weight that ``merge_dims`` makes a matrix was updated as is."""
        if self.layout.permute:
            return None
        work = self.layout.work_shape
        views = []
        for p in params:
            if tuple(p.shape) == work:
                views.append(p)
            elif p.is_contiguous():
                views.append(p.view(work))
            else:
                return None
        return views

    def _workspace(self) -> tuple[Tensor, Tensor] | None:
        """Two bucket-sized scratch buffers reused every step on the CPU (an elementwise op into a
        fresh 16 MB tensor measured 17 ms against 11 ms into a reused one: page faults). CUDA's
        caching allocator makes this moot."""
        if self.exp_avg.device.type != "cpu" or self.workspace_pool is None:
            return None
        return self.workspace_pool.get(self.exp_avg.shape, self.exp_avg.device, self.exp_avg.dtype)

    def update(self, rows: list[int], grads: list[Tensor], group: dict) -> None:
        """Step 3 and the statistics half of step 4 (docs/DESIGN.md §1) for initialised ``rows``."""
        full = len(rows) == len(self.params)
        if self.pending_measure and full:
            self._measure(rows, grads, group)
        index = None if full else torch.tensor(rows, device=self.exp_avg.device)

        def take(x: Tensor | None) -> Tensor | None:
            return x if (x is None or full) else x.index_select(0, index)

        if index is None:
            self.step.add_(1)
        else:
            self.step.index_copy_(0, index, self.step.index_select(0, index).add_(1))
        for r in rows:
            self.host_step[r] += 1
        scalars = step_scalars(take(self.step), [self.host_step[r] for r in rows], float(group["lr"]),
                               group["betas"], group["weight_decay"], group["correct_bias"])
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        params = [self.params[r] for r in rows]
        views = self.work_views(params)
        work = [self.layout.to_work(g) for g in grads]
        exp_avg, exp_avg_sq = take(self.exp_avg), take(self.exp_avg_sq)
        stats = [take(s) for s in self.stats]
        kernels = self._table(full)
        if not self.layout.any_preconditioned:
            kernels.adam_step(params, work, exp_avg, exp_avg_sq, scalars, beta1, beta2, group["eps"],
                                   second_moment=self.second_moment, normalize=group["normalize_grads"], views=views,
                                   from_work=self.layout.from_work)
        else:
            qs = [take(q) for q in self.q]
            workspace = self._workspace() if full else None
            rotated, direction = kernels.rotate_in_moments(
                work, qs, exp_avg, exp_avg_sq, beta1, beta2, group["eps"], second_moment=self.second_moment,
                workspace=workspace)
            kernels.update_statistics(stats, rotated, shampoo_beta)
            kernels.rotate_back_update(direction, qs, params, views, scalars, normalize=group["normalize_grads"],
                                            from_work=self.layout.from_work,
                                            workspace=None if workspace is None else workspace[0])
        if not full:
            self.exp_avg.index_copy_(0, index, exp_avg)
            self.exp_avg_sq.index_copy_(0, index, exp_avg_sq)
            for s_all, s in zip(self.stats, stats):
                if s_all is not None:
                    s_all.index_copy_(0, index, s)

    def _measure(self, rows: list[int], grads: list[Tensor], group: dict) -> None:
        """``backend="auto"``: time this bucket's whole update through its table and the torch
        table (:func:`soap_kernels.select.measure`) and keep the faster."""
        self.pending_measure = False
        candidates = {self.candidate.name: self.candidate, "torch": ops.TORCH}
        self.candidate = None

        def run(table: Kernels) -> None:
            self.kernels = table
            self.update(rows, grads, group)

        self.kernels, self.measured = select.measure(candidates, run, self._snapshot, self._restore,
                                                     self.exp_avg.device, f"working shape {self.layout.work_shape}")

    def _snapshot(self) -> dict[str, Any]:
        return {"exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "stats": [None if s is None else s.clone() for s in self.stats], "step": self.step.clone(),
                "host_step": list(self.host_step), "params": [p.detach().clone() for p in self.params]}

    def _restore(self, saved: dict[str, Any]) -> None:
        self.exp_avg.copy_(saved["exp_avg"])
        self.exp_avg_sq.copy_(saved["exp_avg_sq"])
        for s, kept in zip(self.stats, saved["stats"]):
            if s is not None:
                s.copy_(kept)
        self.step.copy_(saved["step"])
        self.host_step[:] = saved["host_step"]
        with torch.no_grad():
            for p, kept in zip(self.params, saved["params"]):
                p.copy_(kept)

    def _table(self, full: bool) -> Kernels:
        """The bucket's table, or the torch table for a subset of rows it does not take."""
        return self.kernels if full or self.kernels.takes_row_subsets else ops.TORCH

    # ----------------------------------------------------------------------------- the refresh
    def refresh(self, rows_per_dim: dict[int, list[int]]) -> None:
        """Refresh factor ``dim`` of the given rows (step 4 of docs/DESIGN.md §1, rotated frame)."""
        for dim, rows in rows_per_dim.items():
            if not rows:
                continue
            full = len(rows) == len(self.params)
            index = None if full else torch.tensor(rows, device=self.exp_avg.device)
            take = (lambda x: x) if full else (lambda x, index=index: x.index_select(0, index))
            q, stats = take(self.q[dim]), take(self.stats[dim])
            kernels = self._table(full)
            perm, q_mix = _guarded_refresh(self, kernels, stats, q, rows, dim)
            self.refresh_count[dim, rows] += 1
            phase = reorthonormalize_phase(self.layout.work_shape, dim)
            due = [k for k, r in enumerate(rows) if reorthonormalize_due(int(self.refresh_count[dim, r]), phase)]
            if due:
                sub = None if len(due) == len(rows) else torch.tensor(due, device=q.device)
                q_due = q if sub is None else q.index_select(0, sub)
                _guarded_reorthonormalize(self, kernels, q_due, [rows[k] for k in due], dim)
                if sub is not None:
                    q.index_copy_(0, sub, q_due)
            exp_avg, exp_avg_sq = take(self.exp_avg), take(self.exp_avg_sq)
            kernels.refresh_moments(exp_avg, exp_avg_sq, dim, perm, q_mix, second_moment=self.second_moment,
                                         work_shape=self.layout.work_shape)
            if not full:
                self.q[dim].index_copy_(0, index, q)
                self.stats[dim].index_copy_(0, index, stats)
                self.exp_avg.index_copy_(0, index, exp_avg)
                self.exp_avg_sq.index_copy_(0, index, exp_avg_sq)

    def drift(self) -> Tensor:
        """``||B_i − diag B_i||_F / ||B_i||_F`` per (factor, row): ``[factors, B]``."""
        out = []
        for s in self.stats:
            if s is None:
                continue
            total = torch.linalg.matrix_norm(s)
            off = torch.linalg.matrix_norm(s - torch.diag_embed(s.diagonal(dim1=-2, dim2=-1)))
            out.append(off / total.clamp_min(torch.finfo(s.dtype).tiny))
        if not out:
            return torch.zeros(0, len(self.params), device=self.exp_avg.device)
        return torch.stack(out)


def _guarded_refresh(bucket: Bucket, kernels: Kernels, stats: Tensor, q: Tensor, rows: list[int],
                     dim: int) -> tuple[Tensor, Tensor]:
    """``kernels.refresh_factor(stats, q)`` such that no failed factorisation reaches ``q``: failed
    rows are redone in float64 with the torch table, and rows that fail again keep ``q``/``stats``
    with the identity ``perm``/``q_mix``. One host read per call."""
    saved_stats = ops.scratch_empty("saved_stats", stats.shape, stats).copy_(stats)
    saved_q = ops.scratch_empty("saved_q", q.shape, q).copy_(q)
    try:
        perm, q_mix = kernels.refresh_factor(stats, q)
        failed = ~(_finite_rows(q) & _finite_rows(q_mix))
        if not bool(failed.any()):
            return perm, q_mix
    except RuntimeError:  # e.g. torch.linalg.LinAlgError from a Cholesky or QR
        stats.copy_(saved_stats)
        q.copy_(saved_q)
        count, d = q.shape[0], q.shape[-1]
        perm = torch.arange(d, device=q.device).expand(count, d).clone()
        q_mix = torch.eye(d, device=q.device, dtype=q.dtype).expand(count, d, d).clone()
        failed = torch.ones(count, dtype=torch.bool, device=q.device)
    index = failed.nonzero().squeeze(1)
    stats64, q64 = saved_stats[index].double(), saved_q[index].double()
    try:
        perm64, mix64 = ops.TORCH.refresh_factor(stats64, q64)
        ok64 = (_finite_rows(q64) & _finite_rows(mix64) & _finite_rows(stats64)).tolist()
    except RuntimeError:
        ok64 = [False] * len(index)
    d = q.shape[-1]
    for j, k in enumerate(index.tolist()):
        if ok64[j]:
            stats[k], q[k], perm[k], q_mix[k] = stats64[j], q64[j], perm64[j], mix64[j]
            continue
        stats[k], q[k] = saved_stats[k], saved_q[k]
        perm[k] = torch.arange(d, device=q.device)
        q_mix[k] = torch.eye(d, device=q.device, dtype=q_mix.dtype)
        bucket.report_failure(rows[k], dim, "eigenbasis refresh (QR) failed in float32 and float64; kept the previous basis")
    return perm, q_mix


def _guarded_reorthonormalize(bucket: Bucket, kernels: Kernels, q: Tensor, rows: list[int], dim: int) -> None:
    """``kernels.reorthonormalize_(q)``; rows where it fails are redone in float64, or kept as they
    are (a finite basis a few roundings from orthonormal) if that fails too."""
    saved = ops.scratch_empty("saved_q", q.shape, q).copy_(q)
    try:
        kernels.reorthonormalize_(q)
        failed = ~_finite_rows(q)
        if not bool(failed.any()):
            return
    except RuntimeError:
        failed = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    for k in failed.nonzero().squeeze(1).tolist():
        q64 = saved[k : k + 1].double()
        try:
            ops.TORCH.reorthonormalize_(q64)
            ok = bool(_finite_rows(q64).all())
        except RuntimeError:
            ok = False
        q[k] = q64[0] if ok else saved[k]
        if not ok:
            bucket.report_failure(rows[k], dim, "re-orthonormalisation of the eigenbasis (QR) failed in float32 and "
                                  "float64; kept the basis as it was")


class WorkspacePool:
    """Two scratch buffers per (device, dtype), grown to the largest bucket and shared by all
    buckets (they run one after another): measured 3.7 B/param on the cpu set against 8 with a
    pair per bucket."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def get(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        numel = math.prod(shape)
        buf = self.buffers.get((device, dtype))
        if buf is None or buf.shape[1] < numel:
            buf = torch.empty(2, numel, device=device, dtype=dtype)
            self.buffers[(device, dtype)] = buf
        return buf[0, :numel].view(shape), buf[1, :numel].view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


class BatchedEngine:
    """Runs SOAP's step over buckets; owns the stacked state of the optimizer's parameters."""

    def __init__(self, second_moment: str = "adam", backend: str = "torch", precision: str = "fp32") -> None:
        self.workspace_pool = WorkspacePool()
        # SOAP(keep_refresh_scratch=True): ops.refresh_scratch's buffers, kept between steps.
        self.kept_scratch: dict | None = None
        self.second_moment = second_moment
        self.backend = backend
        self.precision = precision
        self.buckets: list[tuple[int, Bucket]] = []  # (group index, bucket)
        self.where: dict[Tensor, tuple[Bucket, int]] = {}
        self.on_failure: FailureHook | None = None

    def build(self, param_groups: list[dict], layout_of: Callable[[Tensor, dict], Layout],
              states: dict[Tensor, dict]) -> None:
        """(Re)build buckets; ``states`` holds validated state to import, by parameter."""
        self.clear()
        for gi, group in enumerate(param_groups):
            by_key: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                by_key.setdefault(bucket_key(p, layout_of(p, group)), []).append(p)
            for (layout, _, _), params in by_key.items():
                self.add_bucket(gi, params, layout, states)

    def clear(self) -> None:
        self.buckets = []
        self.where = {}

    def add_bucket(self, gi: int, params: list[Tensor], layout: Layout, states: dict[Tensor, dict],
                   on_failure: FailureHook | None = None) -> Bucket:
        """One bucket of ``params`` (same layout, dtype and device) of param group ``gi``, its table
        chosen by :func:`select.select`; rows with an entry in ``states`` import it. ``on_failure``
        replaces the engine's failure hook for this bucket."""
        first = params[0]
        table, measure = select.select(self.backend, layout, self.second_moment, state_dtype(first.dtype),
                                       first.device, self.precision)
        bucket = Bucket(params, layout, self.second_moment, table, measure)
        bucket.workspace_pool = self.workspace_pool
        bucket.on_failure = self.on_failure if on_failure is None else on_failure
        for row, p in enumerate(params):
            self.where[p] = (bucket, row)
            if states.get(p):
                bucket.import_row(row, states[p])
        self.buckets.append((gi, bucket))
        return bucket

    def live_state(self, p: Tensor) -> dict | None:
        bucket, row = self.where[p]
        return bucket.row_state(row) if bucket.initialized[row] else None

    def step(self, param_groups: list[dict]) -> tuple[list[Tensor], list[tuple[Bucket, list[int]]]]:
        """Initialise or update every parameter of the buckets that has a gradient. Returns the
        parameters initialised this step and, per bucket, the rows updated."""
        initialized: list[Tensor] = []
        updated: list[tuple[Bucket, list[int]]] = []
        for gi, bucket in self.buckets:
            group = param_groups[gi]
            new = [(r, p.grad) for r, p in enumerate(bucket.params) if p.grad is not None and not bucket.initialized[r]]
            old = [(r, p.grad) for r, p in enumerate(bucket.params) if p.grad is not None and bucket.initialized[r]]
            if old:
                bucket.update([r for r, _ in old], [g for _, g in old], group)
                updated.append((bucket, [r for r, _ in old]))
            if new:
                beta2 = group["betas"][1]
                bucket.initialize([r for r, _ in new], [g for _, g in new],
                                  group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2)
                initialized.extend(bucket.params[r] for r, _ in new)
        return initialized, updated
