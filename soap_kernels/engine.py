"""The batched SOAP engine in plain PyTorch (DESIGN §2), on any device.

Parameters of one (param group, working layout, dtype, device) form a :class:`Bucket` whose state
is stacked: ``exp_avg[B, *work]``, ``exp_avg_sq[B, *work]``, per preconditioned working dim ``i``
an eigenbasis ``Q_i[B, d_i, d_i]`` and the statistics *in the rotated frame*
``B_i = Q_iᵀ GG_i Q_i``. What differs from the reference (same math, less work):

* ``exp_avg`` stays in the eigenbasis between refreshes (the reference rotates it back and forth
  every step, which is the identity); at a refresh it is re-expressed with the small ``Q_m``.
* Statistics are updated from the rotated gradient Adam already needs, so ``diag(B_i)`` (the
  eigenvalue estimates) and the drift ``||B_i − diag B_i|| / ||B_i||`` are free, and the refresh is
  ``Q ← (Q P)·qr(Pᵀ B P)`` instead of ``qr(GG Q P)``.
* One batched GEMM serves every parameter of a bucket; LAPACK calls run at the faster thread count.

The reference's per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``, ``GG``, ``Q``) is
exported and imported by :meth:`Bucket.export_row` / :meth:`Bucket.import_row`, so checkpoints move
between backends.

Failed factorisations (the reference's policy, :mod:`soap_kernels.reference`): a refresh or
re-orthonormalisation whose QR raises or returns non-finite values for some rows is redone for those
rows in float64 with the plain ops; rows that fail again keep their previous basis (identity
permutation and mixing, so the moments stay as they are) and are reported through
``Bucket.on_failure``. The check reads one flag back to the host per refresh call (not per step).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _native, ops, reference
from .reference import Layout

__all__ = ["Bucket", "BatchedEngine", "bucket_key"]

# A basis is a product of orthogonal factors; re-orthonormalise it every this many refreshes.
# The error grows by about one fp32 rounding per refresh between two. Measured (python/soak.py and
# f = 1 runs): max ||QᵀQ − I||_F = 3.4e-6 (d = 16), 8.2e-6 (d = 64), 2.5e-5 (d = 256), at most 1.8×
# the error of the fp32 eigh that made the first basis, with no growth over 3000 refreshes; the QR
# costs ~2% of the step time at f = 1 (less at larger f).
REORTHONORMALIZE_EVERY = 8

# ``on_failure(param, working dim, what)``: told when a factorisation failed in fp32 and fp64 and
# the previous basis was kept (the identity at the first step). ``None``: a RuntimeWarning.
FailureHook = Callable[[Tensor, int, str], None]


def _finite_rows(x: Tensor) -> Tensor:
    """``[R]`` bool: whether each matrix of a ``[R, d, d]`` batch is entirely finite.

    A row sum is finite exactly when every entry is, unless finite entries overflow the sum: a
    false "not finite" that only sends the row to the float64 retry. It reads the batch once and
    allocates no d²-sized mask (``isfinite(x).all()`` measured 37–84 ms on six 1024² matrices).
    """
    return torch.isfinite(x.flatten(1).sum(dim=1))


def time_update(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bucket_key(param: Tensor, layout: Layout) -> tuple:
    return (layout, param.dtype, param.device)


class Bucket:
    """Stacked state of ``B`` same-shaped parameters of one param group."""

    def __init__(self, params: list[Tensor], layout: Layout, second_moment: str, kernels: str = "torch",
                 precision: str = "fp32") -> None:
        self.params = params
        # "triton": matrix buckets (and un-preconditioned ones) run the fused Triton kernels.
        # "measure" (backend="auto" where Triton runs): time both at the first full update, keep
        # the faster (see _measure_kernels); ``measured`` holds the timings.
        self.kernels = kernels
        self.measured: dict[str, float] | None = None
        self.precision = precision
        self.layout = layout
        self.second_moment = second_moment
        # The dtype the bucket was built for (part of its key): a parameter cast since then is moved
        # to a new bucket by the optimizer.
        self.dtype = params[0].dtype
        self.on_failure: FailureHook | None = None
        count = len(params)
        device = params[0].device
        f32 = {"device": device, "dtype": torch.float32}
        work = layout.work_shape
        self.exp_avg = torch.zeros(count, *work, **f32)
        if second_moment == "adam":
            self.exp_avg_sq = torch.zeros(count, *work, **f32)
        else:
            self.exp_avg_sq = torch.zeros(count, reference._adafactor_numel(layout), **f32)
        self.q: list[Tensor | None] = [
            torch.zeros(count, d, d, **f32) if pre else None
            for d, pre in zip(work, layout.preconditioned)
        ]
        self.stats: list[Tensor | None] = [None if q is None else torch.zeros_like(q) for q in self.q]
        # The step count lives twice: on the device for the bias correction (no host sync on the
        # step) and on the host for refresh decisions.
        self.step = torch.zeros(count, **f32)
        self.host_step = [0] * count
        self.initialized = [False] * count
        # Refreshes per (working dim, row) since the start, for the re-orthonormalisation cadence.
        self.refresh_count = [[0] * count for _ in self.q]
        # Two scratch buffers shared by every bucket of the engine (buckets run one after another).
        self.workspace_pool: WorkspacePool | None = None
        # The last back-rotation GEMM can write the parameter update itself when the parameters
        # are fp32 matrices that the working layout views without a copy.
        self._fused_update = (
            len(layout.work_shape) == 2
            and not layout.permute
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
        )

    # ----------------------------------------------------------------------------- bookkeeping
    @property
    def factor_dims(self) -> list[int]:
        return [i for i, q in enumerate(self.q) if q is not None]

    def report_failure(self, row: int, dim: int, what: str) -> None:
        """A factorisation of (``row``, working ``dim``) failed twice; its previous basis was kept."""
        if self.on_failure is not None:
            self.on_failure(self.params[row], dim, what)
        else:
            warnings.warn(f"SOAP: {what} (parameter of shape {self.layout.shape}, working dim {dim})",
                          RuntimeWarning, stacklevel=3)

    def row_state(self, row: int) -> dict[str, Any]:
        """Live views of one row's state under the reference's names (``GG`` is derived)."""
        layout = self.layout
        state: dict[str, Any] = {
            "step": self.step[row],
            "exp_avg": layout.from_work(self.exp_avg[row]),
            "exp_avg_sq": (
                layout.from_work(self.exp_avg_sq[row]) if self.second_moment == "adam" else self.exp_avg_sq[row]
            ),
            "Q": [reference.NOT_PRECONDITIONED if q is None else q[row] for q in self.q],
        }
        return state

    def export_row(self, row: int) -> dict[str, Any]:
        """One row's state as the reference stores it (fresh tensors, ``GG = Q B Qᵀ``)."""
        state = self.row_state(row)
        out: dict[str, Any] = {"step": self.host_step[row]}
        out["exp_avg"] = state["exp_avg"].clone(memory_format=torch.contiguous_format)
        out["exp_avg_sq"] = state["exp_avg_sq"].clone(memory_format=torch.contiguous_format)
        out["Q"] = [reference.NOT_PRECONDITIONED if q is None else q[row].clone() for q in self.q]
        out["GG"] = [
            reference.NOT_PRECONDITIONED if q is None else q[row] @ s[row] @ q[row].T
            for q, s in zip(self.q, self.stats)
        ]
        # Engine-private extras (ignored by the reference): the exact rotated-frame statistics and
        # the refresh counts, so that a checkpoint continues bit for bit on the batched engine.
        out["GG_eigenbasis"] = [
            reference.NOT_PRECONDITIONED if s is None else s[row].clone() for s in self.stats
        ]
        out["Q_refreshes"] = [counts[row] for counts in self.refresh_count]
        return out

    def import_row(self, row: int, state: dict[str, Any]) -> None:
        """Load one row from the reference's layout (already validated by the optimizer)."""
        layout = self.layout
        self.exp_avg[row].copy_(layout.to_work(state["exp_avg"].float()))
        if self.second_moment == "adam":
            self.exp_avg_sq[row].copy_(layout.to_work(state["exp_avg_sq"].float()))
        else:
            self.exp_avg_sq[row].copy_(state["exp_avg_sq"].float())
        exact = state.get("GG_eigenbasis")
        counts = state.get("Q_refreshes", [0] * len(self.q))
        for i, (q, s, q_in, gg_in) in enumerate(zip(self.q, self.stats, state["Q"], state["GG"])):
            if q is None:
                continue
            q_row = q_in.float()
            q[row].copy_(q_row)
            s[row].copy_(exact[i] if exact is not None else q_row.T @ gg_in.float() @ q_row)
            self.refresh_count[i][row] = int(counts[i])
        step = int(state["step"])
        self.host_step[row] = step
        self.step[row] = step
        self.initialized[row] = True

    # ----------------------------------------------------------------------------- the step
    def initialize(self, rows: list[int], grads: list[Tensor], shampoo_beta: float) -> None:
        """First step with a gradient: ``GG = (1-βs) g gᵀ``, ``Q = eigh(GG)``; no update.

        Done per row with the reference's own functions (it happens once per parameter), so the
        initial basis is the reference's bit for bit, null-space directions included.
        """
        layout = self.layout
        for row, grad in zip(rows, grads):
            grad_work = layout.to_work(grad.float())
            for i, (q, s) in enumerate(zip(self.q, self.stats)):
                if q is None:
                    continue
                gg = reference.gram(grad_work, i).mul_(1.0 - shampoo_beta)
                basis = reference.initial_basis(
                    gg, i, layout.shape, lambda dim, what, row=row: self.report_failure(row, dim, what))
                q[row].copy_(basis)
                s[row].copy_(basis.T @ gg @ basis)
            self.exp_avg[row].zero_()
            self.exp_avg_sq[row].zero_()
            self.step[row] = 0
            self.host_step[row] = 0
            self.initialized[row] = True

    def _workspace(self) -> tuple[Tensor, Tensor] | None:
        """Two bucket-sized fp32 buffers reused every step on the CPU.

        Measured here: an elementwise op into a fresh 16 MB tensor took 17 ms against 11 ms into a
        reused one (the fresh pages fault in). CUDA's caching allocator makes this moot, so GPU
        buckets allocate per step and keep no extra memory.
        """
        if self.exp_avg.device.type != "cpu":
            return None
        if self.workspace_pool is None:
            self.workspace_pool = WorkspacePool()
        return self.workspace_pool.get(self.exp_avg.shape, self.exp_avg.device)

    def _advance_steps(self, rows: list[int], index: Tensor | None, group: dict) -> list[float]:
        """Count one more update for ``rows``: on the device for the live state, on the host for
        the step sizes (the bias correction needs no device round trip). Returns each row's step
        size ``lr·√(1-β2ᵗ)/(1-β1ᵗ)`` (``lr`` without bias correction)."""
        if index is None:
            self.step.add_(1)
        else:
            self.step.index_copy_(0, index, self.step.index_select(0, index).add_(1))
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        step_sizes = []
        for r in rows:
            self.host_step[r] += 1
            t = self.host_step[r]
            bias = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if group["correct_bias"] else 1.0
            step_sizes.append(lr * bias)
        return step_sizes

    def _native_adam_update(self, rows: list[int], grads: list[Tensor], group: dict) -> bool:
        """Plain Adam through ``soap_kernels._C`` for a CPU bucket with no factor (the 1-D
        parameters): one fused pass per tensor, measured ~20x faster than the stacked torch path on
        the cpu set's LayerNorm/bias parameters. False when the bucket stays on the torch path."""
        layout = self.layout
        if (not ops.NATIVE_OPS or layout.any_preconditioned or self.second_moment != "adam"
                or group["normalize_grads"] or len(rows) != len(self.params)
                or self.exp_avg.device.type != "cpu" or layout.work_shape != layout.shape):
            return False
        if not all(p.is_contiguous() and g.is_contiguous() and g.dtype == p.dtype for p, g in zip(self.params, grads)):
            return False
        beta1, beta2 = group["betas"]
        step_sizes = self._advance_steps(rows, None, group)
        lr = float(group["lr"])
        decay = lr * group["weight_decay"] if group["weight_decay"] > 0 else 0.0
        _native.adam_step(self.params, grads, list(self.exp_avg.unbind(0)), list(self.exp_avg_sq.unbind(0)),
                          step_sizes, beta1=beta1, beta2=beta2, eps=group["eps"], lr_weight_decay=decay)
        return True

    def update(self, rows: list[int], grads: list[Tensor], group: dict) -> None:
        """Steps 3 and the statistics half of 4 of DESIGN §1 for ``rows`` (all initialised)."""
        if self.kernels == "measure":
            self._measure_kernels(rows, grads, group)
        if self._triton_update(rows, grads, group) or self._native_adam_update(rows, grads, group):
            return
        layout = self.layout
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        full = len(rows) == len(self.params)
        index = None if full else torch.tensor(rows, device=self.exp_avg.device)

        def take(x: Tensor | None) -> Tensor | None:
            return x if (x is None or full) else x.index_select(0, index)

        workspace = self._workspace() if full else None
        work = [layout.to_work(g if g.dtype == torch.float32 else g.float()) for g in grads]
        if workspace is not None and len(layout.work_shape) == 2 and self.second_moment == "adam":
            grad = work  # the first GEMM reads each gradient in place
        elif workspace is not None:
            grad = torch.stack(work, out=workspace[0])
        else:
            grad = torch.stack(work)
        exp_avg, exp_avg_sq = take(self.exp_avg), take(self.exp_avg_sq)
        qs = [take(q) for q in self.q]
        stats = [take(s) for s in self.stats]

        step_sizes = self._advance_steps(rows, index, group)
        lr = float(group["lr"])
        decay = 1.0 - lr * group["weight_decay"] if group["weight_decay"] > 0 else 1.0

        if self.second_moment == "adam":
            rotated, direction = ops.rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, beta1, beta2, group["eps"],
                                                    workspace=workspace)
        else:
            rotated, direction = ops.rotate_in_adafactor(grad, qs, exp_avg, exp_avg_sq, beta1, beta2, group["eps"])
        ops.update_statistics(stats, rotated, shampoo_beta)

        params = [self.params[r] for r in rows]
        if not group["normalize_grads"] and self._fused_update:
            ops.rotate_back_update(direction, qs, self._work_views(params), step_sizes, decay,
                                   workspace=None if workspace is None else workspace[0])
        else:
            update = ops.rotate_back(direction, qs)
            if group["normalize_grads"]:
                # Per row. Regression: for 0-D parameters (update [B]) mean(dim=()) reduced over
                # every row of the bucket.
                rms = update.reshape(update.shape[0], -1).square().mean(dim=1).sqrt_()
                update.div_(rms.add_(1e-30).view(-1, *(1,) * (update.dim() - 1)))
            sizes = torch.tensor(step_sizes, dtype=torch.float32).to(update.device, non_blocking=True)
            update.mul_(sizes.view(-1, *(1,) * (update.dim() - 1)))
            _apply_update(params, [layout.from_work(u) for u in update.unbind(0)], None if decay == 1.0 else decay)

        if not full:
            self.exp_avg.index_copy_(0, index, exp_avg)
            self.exp_avg_sq.index_copy_(0, index, exp_avg_sq)
            for s_all, s in zip(self.stats, stats):
                if s_all is not None:
                    s_all.index_copy_(0, index, s)

    def _work_views(self, params: list[Tensor]) -> list[Tensor] | None:
        """The parameters as working-layout views (no copy), or ``None`` where a view is impossible.

        Regression: a 3-D/4-D parameter that ``merge_dims`` turns into a matrix (e.g. a (64, 32, 3,
        3) conv weight -> [6144, 3]) was handed to the in-place matrix update as is and failed after
        the moments had been updated."""
        work = self.layout.work_shape
        if self.layout.permute:
            return None
        out = []
        for p in params:
            if tuple(p.shape) == work:
                out.append(p)
            elif p.is_contiguous():
                out.append(p.view(work))
            else:
                return None
        return out

    def _measure_kernels(self, rows: list[int], grads: list[Tensor], group: dict) -> None:
        """``backend="auto"`` with Triton available: time this bucket's whole update through the
        Triton kernels and through the torch ops, on the bucket's own state and gradients (restored
        after every timed call, so the run is the same as with the chosen path alone), and keep the
        faster for the rest of the run (``self.kernels``; the timings in ``self.measured``). The
        first call of each path is not counted (Triton compiles and tunes then). A bucket the Triton
        path cannot take, or an update of only some of its rows, stays on torch / is measured later."""
        self.kernels = "triton"
        if not self._triton_takes(group):
            self.kernels, self.measured = "torch", None
            return
        if len(rows) != len(self.params):
            self.kernels = "measure"  # decide at a full update; this one runs on torch
            return
        saved = self._snapshot()
        best = {"triton": math.inf, "torch": math.inf}
        try:
            for rnd in range(3):
                for kernels in ("triton", "torch"):
                    self.kernels = kernels
                    try:
                        seconds = time_update(lambda: self.update(rows, grads, group), self.exp_avg.device)
                    except Exception as exc:  # e.g. a Triton compile error: auto must not fail for it
                        if kernels == "torch":
                            raise
                        warnings.warn(f"SOAP backend='auto': the Triton kernels failed on a bucket of working shape "
                                      f"{self.layout.work_shape} ({type(exc).__name__}: {exc}); it uses the torch ops",
                                      RuntimeWarning, stacklevel=4)
                        self.kernels, self.measured = "torch", None
                        return
                    finally:
                        self._restore(saved)
                    if rnd:
                        best[kernels] = min(best[kernels], seconds)
        finally:
            self._restore(saved)
        self.kernels = min(best, key=best.get)
        self.measured = {k: v * 1e3 for k, v in best.items()}  # ms

    def _snapshot(self) -> dict[str, Any]:
        """What an update changes: moments, statistics, step counters and the parameters."""
        return {
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "stats": [None if s is None else s.clone() for s in self.stats],
            "step": self.step.clone(),
            "host_step": list(self.host_step),
            "params": [p.detach().clone() for p in self.params],
        }

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

    def _uses_triton(self) -> bool:
        return self.kernels == "triton" and self.second_moment == "adam" and (
            len(self.layout.work_shape) == 2 or not self.layout.any_preconditioned
        )

    def _triton_takes(self, group: dict, views: list[Tensor] | None = None) -> bool:
        """Whether :meth:`_triton_update` runs this bucket (a full update): the multi-tensor Adam
        kernel of un-preconditioned buckets needs working-shaped parameters and does not normalise.
        Regression: normalize_grads was ignored for un-preconditioned buckets on the Triton path."""
        if not self._uses_triton():
            return False
        if self.layout.any_preconditioned:
            return True
        views = self._work_views(self.params) if views is None else views
        return views is not None and not group["normalize_grads"]

    def _triton_update(self, rows: list[int], grads: list[Tensor], group: dict) -> bool:
        """The update through the fused Triton kernels (matrix and un-preconditioned buckets).

        Step sizes come from the device step counter, so the step has no host round trip.
        Returns False when this bucket stays on the torch path.
        """
        if not self._uses_triton() or len(rows) != len(self.params):
            return False
        views = self._work_views(self.params)
        if not self._triton_takes(group, views):
            return False
        from . import triton as tk

        layout = self.layout

        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        self._advance_steps(rows, None, group)
        step = self.step  # step sizes on the device: no host round trip on the GPU path
        lr = float(group["lr"])
        if group["correct_bias"]:
            step_size = lr * torch.sqrt(1.0 - torch.pow(beta2, step)) / (1.0 - torch.pow(beta1, step))
        else:
            step_size = torch.full_like(step, lr)
        decay = 1.0 - lr * group["weight_decay"] if group["weight_decay"] > 0 else 1.0
        if not self.layout.any_preconditioned:
            tk.adam_step(views, [layout.to_work(g).contiguous() for g in grads], list(self.exp_avg.unbind(0)),
                         list(self.exp_avg_sq.unbind(0)), step_size, beta1, beta2, group["eps"], decay)
            return True
        grad = torch.stack([layout.to_work(g if g.dtype == torch.float32 else g.float()) for g in grads])
        rotated, direction = tk.rotate_in_adam(grad, self.q, self.exp_avg, self.exp_avg_sq, beta1, beta2,
                                               group["eps"], precision=self.precision)
        tk.update_statistics(self.stats, rotated, shampoo_beta)
        if group["normalize_grads"] or views is None or not all(v.is_contiguous() for v in views):
            update = tk.rotate_back(direction, self.q, precision=self.precision)
            if group["normalize_grads"]:
                rms = update.square().mean(dim=(1, 2), keepdim=True).sqrt_()
                update.div_(rms.add_(1e-30))
            update.mul_(step_size.view(-1, 1, 1))
            _apply_update(self.params, [layout.from_work(u) for u in update.unbind(0)], None if decay == 1.0 else decay)
        else:
            tk.rotate_back_update(direction, self.q, views, step_size, decay, precision=self.precision)
        return True

    def refresh(self, rows_per_dim: dict[int, list[int]]) -> None:
        """Refresh factor ``i`` of the given rows (step 4 of DESIGN §1, in the rotated frame)."""
        count = len(self.params)
        for dim, rows in rows_per_dim.items():
            if not rows:
                continue
            full = len(rows) == count
            index = None if full else torch.tensor(rows, device=self.exp_avg.device)
            q = self.q[dim] if full else self.q[dim].index_select(0, index)
            stats = self.stats[dim] if full else self.stats[dim].index_select(0, index)
            triton_refresh = self._uses_triton() and full
            if triton_refresh:
                from . import triton as tk

                perm, q_mix = self._guarded_refresh(tk.refresh_factor, stats, q, rows, dim)
            else:
                perm, q_mix = self._guarded_refresh(ops.refresh_factor, stats, q, rows, dim)
            counts = self.refresh_count[dim]
            for r in rows:
                counts[r] += 1
            due = [k for k, r in enumerate(rows) if counts[r] % REORTHONORMALIZE_EVERY == 0]
            if len(due) == len(rows):
                self._guarded_reorthonormalize(tk.reorthonormalize_ if triton_refresh else ops.reorthonormalize_,
                                               q, rows, dim)
            elif due:
                sub = torch.tensor(due, device=q.device)
                q_due = q.index_select(0, sub)
                self._guarded_reorthonormalize(ops.reorthonormalize_, q_due, [rows[k] for k in due], dim)
                q.index_copy_(0, sub, q_due)
            if triton_refresh:
                tk.refresh_moments_(self.exp_avg, self.exp_avg_sq, perm, q_mix, axis=dim + 1)
                continue
            exp_avg = self.exp_avg if full else self.exp_avg.index_select(0, index)
            exp_avg_sq = self.exp_avg_sq if full else self.exp_avg_sq.index_select(0, index)
            new_exp_avg = ops.reexpress(exp_avg, dim, perm, q_mix)
            new_exp_avg_sq = self._permute_second_moment(exp_avg_sq, dim, perm)
            if full:
                self.exp_avg.copy_(new_exp_avg)
                self.exp_avg_sq.copy_(new_exp_avg_sq)
            else:
                self.q[dim].index_copy_(0, index, q)
                self.stats[dim].index_copy_(0, index, stats)
                self.exp_avg.index_copy_(0, index, new_exp_avg)
                self.exp_avg_sq.index_copy_(0, index, new_exp_avg_sq)

    def _guarded_refresh(self, refresh: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], stats: Tensor,
                         q: Tensor, rows: list[int], dim: int) -> tuple[Tensor, Tensor]:
        """``refresh(stats, q)`` (in place, returns ``(perm, q_mix)``) such that no failed
        factorisation reaches ``q``: failed rows are redone in float64 with the plain ops, and rows
        that fail again keep ``q``/``stats`` with the identity ``perm``/``q_mix``."""
        saved_stats, saved_q = stats.clone(), q.clone()
        try:
            perm, q_mix = refresh(stats, q)
            failed = ~(_finite_rows(q) & _finite_rows(q_mix))
            if not bool(failed.any()):  # the one host read of a refresh
                return perm, q_mix
        except RuntimeError:  # e.g. torch.linalg.LinAlgError from a Cholesky or QR
            stats.copy_(saved_stats)
            q.copy_(saved_q)
            count, d = q.shape[0], q.shape[-1]
            perm = torch.arange(d, device=q.device).expand(count, d).clone()
            q_mix = torch.eye(d, device=q.device, dtype=q.dtype).expand(count, d, d).clone()
            failed = torch.ones(count, dtype=torch.bool, device=q.device)
        self._redo_failed_refresh(failed, saved_stats, saved_q, stats, q, perm, q_mix, rows, dim)
        return perm, q_mix

    def _redo_failed_refresh(self, failed: Tensor, saved_stats: Tensor, saved_q: Tensor, stats: Tensor, q: Tensor,
                             perm: Tensor, q_mix: Tensor, rows: list[int], dim: int) -> None:
        index = failed.nonzero().squeeze(1)
        stats64, q64 = saved_stats[index].double(), saved_q[index].double()
        try:
            perm64, mix64 = ops.refresh_factor(stats64, q64)
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
            self.report_failure(rows[k], dim, "eigenbasis refresh (QR) failed in float32 and float64; "
                                "kept the previous basis")

    def _guarded_reorthonormalize(self, reorthonormalize: Callable[[Tensor], None], q: Tensor, rows: list[int],
                                  dim: int) -> None:
        """``reorthonormalize(q)`` in place; rows where it fails are redone in float64, or kept as
        they are (a finite basis a few roundings from orthonormal) if that fails too."""
        saved = q.clone()
        try:
            reorthonormalize(q)
            failed = ~_finite_rows(q)
            if not bool(failed.any()):
                return
        except RuntimeError:
            failed = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        for k in failed.nonzero().squeeze(1).tolist():
            q64 = saved[k : k + 1].double()
            try:
                ops.reorthonormalize_(q64)
                ok = bool(_finite_rows(q64).all())
            except RuntimeError:
                ok = False
            q[k] = q64[0] if ok else saved[k]
            if not ok:
                self.report_failure(rows[k], dim, "re-orthonormalisation of the eigenbasis (QR) failed in float32 "
                                    "and float64; kept the basis as it was")

    def _permute_second_moment(self, exp_avg_sq: Tensor, dim: int, perm: Tensor) -> Tensor:
        if self.second_moment == "adam":
            return ops.permute_along(exp_avg_sq, dim, perm)
        rows = self.layout.work_shape[0] if self.layout.work_shape else 1
        row_acc, col_acc = exp_avg_sq[:, :rows], exp_avg_sq[:, rows:]
        if dim == 0:
            row_acc = row_acc.take_along_dim(perm, dim=1)
        else:
            cols = col_acc.reshape(col_acc.shape[0], *self.layout.work_shape[1:])
            col_acc = ops.permute_along(cols, dim - 1, perm).reshape(col_acc.shape)
        return torch.cat([row_acc, col_acc], dim=1)

    def drift(self) -> Tensor:
        """``||B_i − diag B_i||_F / ||B_i||_F`` per (factor dim, row): ``[factors, B]``."""
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


def _apply_update(params: Sequence[Tensor], updates: Sequence[Tensor], decay: float | None) -> None:
    """``p ← (p − u)·decay`` in fp32, written back once in the parameter's dtype."""
    if params[0].dtype == torch.float32:
        torch._foreach_sub_(list(params), list(updates))
        if decay is not None:
            torch._foreach_mul_(list(params), decay)
        return
    for p, u in zip(params, updates):
        p32 = p.float().sub_(u)
        if decay is not None:
            p32.mul_(decay)
        p.copy_(p32)


class WorkspacePool:
    """Two fp32 scratch buffers per device, grown to the largest bucket and shared by all buckets:
    buckets run one after another, so the engine needs one pair, not one per bucket (measured on
    the cpu set: 8 B/param with a pair per bucket, 3.7 B/param shared)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, Tensor] = {}

    def get(self, shape: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
        numel = math.prod(shape)
        buf = self.buffers.get(device)
        if buf is None or buf.shape[1] < numel:
            buf = torch.empty(2, numel, device=device, dtype=torch.float32)
            self.buffers[device] = buf
        return buf[0, :numel].view(shape), buf[1, :numel].view(shape)


class BatchedEngine:
    """Runs SOAP's step over buckets; owns the stacked state of the optimizer's parameters."""

    def __init__(self, second_moment: str = "adam", kernels: str = "torch", precision: str = "fp32") -> None:
        self.workspace_pool = WorkspacePool()
        self.second_moment = second_moment
        self.kernels = kernels
        self.precision = precision
        self.buckets: list[tuple[int, Bucket]] = []  # (group index, bucket)
        self.where: dict[Tensor, tuple[Bucket, int]] = {}
        self.signature: tuple | None = None
        # Given to every bucket: told about factorisations that failed twice (see Bucket.on_failure).
        self.on_failure: FailureHook | None = None

    def build(self, param_groups: list[dict], layout_of: Callable[[Tensor, dict], Layout],
              states: dict[Tensor, dict]) -> None:
        """(Re)build buckets; ``states`` holds reference-layout state to import, by parameter."""
        self.buckets = []
        self.where = {}
        for gi, group in enumerate(param_groups):
            by_key: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                layout = layout_of(p, group)
                by_key.setdefault(bucket_key(p, layout), []).append(p)
            for (layout, _, _), params in by_key.items():
                bucket = Bucket(params, layout, self.second_moment, self.kernels, self.precision)
                bucket.workspace_pool = self.workspace_pool
                bucket.on_failure = self.on_failure
                for row, p in enumerate(params):
                    self.where[p] = (bucket, row)
                    if states.get(p):
                        bucket.import_row(row, states[p])
                self.buckets.append((gi, bucket))

    def export_state(self) -> dict[Tensor, dict]:
        out = {}
        for _, bucket in self.buckets:
            for row, p in enumerate(bucket.params):
                if bucket.initialized[row]:
                    out[p] = bucket.export_row(row)
        return out

    def live_state(self, p: Tensor) -> dict | None:
        bucket, row = self.where[p]
        return bucket.row_state(row) if bucket.initialized[row] else None

    def step(self, param_groups: list[dict], owns: Callable[[Bucket], bool] | None = None,
             ) -> tuple[list[Tensor], list[tuple[Bucket, list[int]]]]:
        """Initialise or update every parameter that has a gradient.

        ``owns``: when given, only buckets for which it returns True are touched (a distributed
        rank updates the buckets it owns; see :mod:`soap_kernels.distributed`).
        Returns the parameters initialised this step and, per bucket, the rows updated.
        """
        initialized: list[Tensor] = []
        updated: list[tuple[Bucket, list[int]]] = []
        for gi, bucket in self.buckets:
            if owns is not None and not owns(bucket):
                continue
            group = param_groups[gi]
            rows_new, grads_new, rows_upd, grads_upd = [], [], [], []
            for row, p in enumerate(bucket.params):
                if p.grad is None:
                    continue
                if bucket.initialized[row]:
                    rows_upd.append(row)
                    grads_upd.append(p.grad)
                else:
                    rows_new.append(row)
                    grads_new.append(p.grad)
            if rows_upd:
                bucket.update(rows_upd, grads_upd, group)
                updated.append((bucket, rows_upd))
            if rows_new:
                beta2 = group["betas"][1]
                bucket.initialize(rows_new, grads_new, group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2)
                initialized.extend(bucket.params[r] for r in rows_new)
        return initialized, updated
