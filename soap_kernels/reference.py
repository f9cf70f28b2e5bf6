"""The reference semantics of SOAP (docs/DESIGN.md §1), stated literally, one parameter at a time.

This module is the oracle every other backend is checked against, and the slow fallback. It follows
the paper authors' ``soap.py`` step by step: the first step with a gradient only initialises the
statistics and the eigenbasis (``eigh``); later steps rotate the gradient into the eigenbasis, run
Adam there, rotate back, update the parameter, apply decoupled weight decay to the *updated*
parameter, update the statistics with the current gradient *after* the step, and on a refresh step
sort the eigenvalue estimates, permute ``exp_avg_sq``, run one power-iteration step with a QR, and
re-express ``exp_avg`` in the new basis. ``exp_avg`` is carried in the original frame across the
statistics update and rotated into the (possibly new) eigenbasis again, as the reference does.

Deliberate differences from ``soap.py``, all documented in the README:

* state and math are fp32 for bf16/fp16 parameters (the result is written back in the parameter's
  dtype once per step);
* ``second_moment="adafactor"`` (Shampoo with exponent 1/2, by the paper's equivalence) is offered
  as a mode of the same algorithm;
* a factorisation that fails (``eigh``/``qr`` raising, or returning non-finite values, e.g. from
  NaN/inf statistics) is retried in float64, and if that fails too the previous basis is kept (the
  identity at the first step) and the caller is told (``on_failure``), so a NaN never reaches
  ``Q``. The first attempt is exactly ``soap.py``'s (fp32, ``+1e-30·I`` for ``eigh``); only the
  retry differs: fp64, and for ``eigh`` a jitter ``RETRY_JITTER·trace(GG)/d·I`` relative to the
  factor's mean eigenvalue (``soap.py``'s absolute ``1e-30`` is below fp32's resolution of any
  non-zero factor; a shift leaves the eigenvectors unchanged in exact arithmetic, so the jitter only
  conditions the rounding). The QR retry adds no jitter: Householder QR cannot fail on finite input.

Nothing here is clever or batched on purpose.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

# The oracle imports nothing of the package it judges (tests/test_layout.py asserts it).

__all__ = [
    "Layout",
    "make_layout",
    "gram",
    "project",
    "project_back",
    "eigenbasis",
    "try_eigenbasis",
    "try_qr",
    "initial_basis",
    "init_state",
    "update_param",
    "refresh_param",
    "drift",
]

# A factor that is not preconditioned is stored as an empty list, as in the reference's state.
NOT_PRECONDITIONED: list = []

# The jitter of the float64 retry of a failed eigh, relative to the factor's mean eigenvalue
# (trace / d): about 4500 fp64 ulps of it, far below anything fp32 statistics resolve.
RETRY_JITTER = 1e-12

# ``on_failure(dim, what)``: told when the factorisation of working dim ``dim`` failed in fp32 and
# fp64 and the previous basis was kept. ``None``: a RuntimeWarning naming the parameter's shape.
FailureHook = Callable[[int, str], None]


class Layout:
    """How the preconditioner sees a parameter of a given shape.

    ``work_shape``: the shape the statistics are taken over (after the ``channels_last``
    permutation and ``merge_dims``); ``preconditioned[i]``: whether working dim ``i`` has a factor.
    """

    __slots__ = ("shape", "work_shape", "permute", "preconditioned")

    def __init__(self, shape: Sequence[int], work_shape: Sequence[int], permute: bool,
                 preconditioned: Sequence[bool]) -> None:
        self.shape = tuple(shape)
        self.work_shape = tuple(work_shape)
        self.permute = permute
        self.preconditioned = tuple(preconditioned)

    def to_work(self, x: Tensor) -> Tensor:
        """A parameter-shaped tensor in the working layout."""
        if self.permute:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(self.work_shape)

    def from_work(self, x: Tensor) -> Tensor:
        """A working-layout tensor back in the parameter's shape."""
        if self.permute:
            n, h, w, c = self.shape
            return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return x.reshape(self.shape)

    @property
    def any_preconditioned(self) -> bool:
        return any(self.preconditioned)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    def __repr__(self) -> str:
        return f"Layout(shape={self.shape}, work_shape={self.work_shape}, preconditioned={self.preconditioned})"


def merged_shape(shape: Sequence[int], max_precond_dim: int) -> list[int]:
    """Merge consecutive dims greedily while the product stays ``<= max_precond_dim``."""
    new_shape: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                new_shape.append(current)
                current = size
            else:
                new_shape.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not new_shape:
        new_shape.append(current)
    return new_shape


def make_layout(shape: Sequence[int], *, max_precond_dim: int, merge_dims: bool, precondition_1d: bool,
                channels_last: bool) -> Layout:
    """The reference's rules: 4-D ``channels_last`` tensors are permuted to NCHW and dims are merged
    only with ``merge_dims``; a 1-D tensor is never merged and has a factor only with
    ``precondition_1d``; any other working dim has a factor iff its size ``<= max_precond_dim``."""
    shape = tuple(shape)
    if 0 in shape:  # no elements: nothing to precondition (the update is empty)
        return Layout(shape, shape, False, (False,) * len(shape))
    if len(shape) == 1:
        return Layout(shape, shape, False, (precondition_1d and shape[0] <= max_precond_dim,))
    permute = False
    work = list(shape)
    if merge_dims:
        permute = channels_last and len(shape) == 4
        if permute:
            work = [shape[0], shape[3], shape[1], shape[2]]
        work = merged_shape(work, max_precond_dim)
    return Layout(shape, work, permute, tuple(d <= max_precond_dim for d in work))


def gram(x: Tensor, dim: int) -> Tensor:
    """``x_(dim) x_(dim)ᵀ``: contraction of ``x`` with itself over every dim but ``dim``."""
    others = [d for d in range(x.dim()) if d != dim]
    return torch.tensordot(x, x, dims=[others, others])


def project(x: Tensor, q: Sequence[Any]) -> Tensor:
    """Rotate a working-layout tensor into the eigenbasis: ``x ×_i Q_iᵀ`` for every factor.

    Each ``tensordot`` contracts the leading dim and appends the result as the last dim, so after
    one pass over all dims the original order is restored.
    """
    for factor in q:
        if len(factor) > 0:
            x = torch.tensordot(x, factor, dims=[[0], [0]])
        else:
            x = x.permute(*range(1, x.dim()), 0)
    return x


def project_back(x: Tensor, q: Sequence[Any]) -> Tensor:
    """Rotate back to the parameter's frame: ``x ×_i Q_i`` for every factor."""
    for factor in q:
        if len(factor) > 0:
            x = torch.tensordot(x, factor, dims=[[0], [1]])
        else:
            x = x.permute(*range(1, x.dim()), 0)
    return x


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """LAPACK at one thread on the CPU: MKL's eigh/qr measured 15-140x faster there with one
    thread than with two, and one thread gives the same bits in every process."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.device.type != "cpu":
        return torch.linalg.eigh(x)
    with _one_thread():
        return torch.linalg.eigh(x)


def _qr(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.device.type != "cpu":
        return torch.linalg.qr(x)
    with _one_thread():
        return torch.linalg.qr(x)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 parameters are updated in fp64; fp32, bf16 and fp16 parameters in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def try_eigenbasis(gg: Tensor) -> Tensor | None:
    """Eigenvectors of a factor by descending eigenvalue, or ``None`` if ``eigh`` fails twice.

    First ``soap.py``'s call (``eigh(GG + 1e-30·I)`` in ``GG``'s dtype); if it raises or returns
    non-finite values, ``eigh`` in float64 with the relative jitter ``RETRY_JITTER·trace/d``.
    """
    jitter = 1e-30 * torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype)
    try:
        _, q = _eigh(gg + jitter)
        if _finite(q):
            return torch.flip(q, [1])
    except RuntimeError:  # torch.linalg.LinAlgError (no convergence) is a RuntimeError
        pass
    g64 = gg.double()
    if not _finite(g64):
        return None  # NaN/inf statistics: no basis can be computed from them
    d = g64.shape[0]
    scale = float(torch.diagonal(g64).sum()) / max(d, 1)
    g64.diagonal().add_(RETRY_JITTER * scale if scale > 0 else 0.0)
    try:
        _, q = _eigh(g64)
    except RuntimeError:
        return None
    q = q.to(gg.dtype)
    return torch.flip(q, [1]) if _finite(q) else None


def eigenbasis(gg: Tensor) -> Tensor:
    """Eigenvectors of a factor by descending eigenvalue (``eigh``, retried in fp64 on failure).

    If both attempts fail the identity is returned (no basis to keep yet: plain Adam in the
    parameter's own coordinates until the next refresh); :func:`try_eigenbasis` tells the failure.
    """
    q = try_eigenbasis(gg)
    return torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype) if q is None else q


def try_qr(x: Tensor) -> Tensor | None:
    """``qr(x).Q`` as ``soap.py`` computes it, retried in float64 if it raises or returns non-finite
    values; ``None`` if both fail (the caller keeps its previous basis)."""
    try:
        q = _qr(x)[0]
        if _finite(q):
            return q
    except RuntimeError:
        pass
    x64 = x.double()
    if not _finite(x64):
        return None
    try:
        q = _qr(x64)[0].to(x.dtype)
    except RuntimeError:
        return None
    return q if _finite(q) else None


def _report(on_failure: FailureHook | None, dim: int, shape: Sequence[int], what: str) -> None:
    if on_failure is not None:
        on_failure(dim, what)
    else:
        warnings.warn(f"SOAP: {what} (parameter of shape {tuple(shape)}, working dim {dim})", RuntimeWarning,
                      stacklevel=4)


def _shampoo_beta(group: dict) -> float:
    return group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]


def _accumulate_statistics(state: dict, grad_work: Tensor, shampoo_beta: float) -> None:
    for i, gg in enumerate(state["GG"]):
        if len(gg) > 0:
            gg.lerp_(gram(grad_work, i), 1.0 - shampoo_beta)


def _refresh(state: dict, layout: Layout, dims: set[int] | None = None,
             on_failure: FailureHook | None = None, second_moment: str = "adam") -> None:
    """Sort eigenvalue estimates, permute the second moment, power step + QR (reference order).

    ``dims``: the factors to refresh (``None``: all of them). A factor whose QR fails (see
    :func:`try_qr`) keeps its basis and its second-moment order. With ``second_moment="adafactor"``
    the factored accumulators are permuted instead of a full ``exp_avg_sq`` (rows along working
    dim 0, columns along the other dims)."""
    if second_moment == "adam":
        second = layout.to_work(state["exp_avg_sq"])
    else:
        rows, _ = _adafactor_rows_cols(layout)
        second = (state["exp_avg_sq"][:rows], state["exp_avg_sq"][rows:])
    new_q = []
    for i, (gg, q) in enumerate(zip(state["GG"], state["Q"])):
        if len(gg) == 0 or (dims is not None and i not in dims):
            new_q.append(q)
            continue
        est_eig = torch.diag(q.T @ gg @ q)
        order = torch.argsort(est_eig, descending=True)
        power_iter = gg @ q[:, order]
        q_new = try_qr(power_iter)
        if q_new is None:
            _report(on_failure, i, layout.shape, "eigenbasis refresh (QR) failed in float32 and float64; "
                    "kept the previous basis")
            new_q.append(q)
            continue
        second = _permute_second_moment(second, layout, i, order, second_moment)
        new_q.append(q_new)
    if second_moment == "adam":
        state["exp_avg_sq"] = layout.from_work(second).contiguous()
    else:
        state["exp_avg_sq"] = torch.cat(second)
    state["Q"] = new_q


def _permute_second_moment(second: Any, layout: Layout, dim: int, order: Tensor, second_moment: str) -> Any:
    if second_moment == "adam":
        return second.index_select(dim, order)
    row_acc, col_acc = second
    if dim == 0:
        return row_acc[order], col_acc
    return row_acc, col_acc.reshape(layout.work_shape[1:]).index_select(dim - 1, order).reshape(-1)


def init_state(grad: Tensor, layout: Layout, group: dict, second_moment: str = "adam",
               on_failure: FailureHook | None = None) -> dict:
    """The first step with a gradient: statistics from ``g`` and their eigenbasis; no update.

    A factor whose ``eigh`` fails in fp32 and fp64 starts from the identity basis."""
    grad = grad.to(math_dtype(grad.dtype))
    state: dict[str, Any] = {"step": 0}
    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
    state["exp_avg_sq"] = _zero_second_moment(grad, layout, second_moment)
    state["GG"] = [
        torch.zeros(d, d, device=grad.device, dtype=grad.dtype) if pre else NOT_PRECONDITIONED
        for d, pre in zip(layout.work_shape, layout.preconditioned)
    ]
    _accumulate_statistics(state, layout.to_work(grad), _shampoo_beta(group))
    state["Q"] = [initial_basis(gg, i, layout.shape, on_failure) if len(gg) > 0 else NOT_PRECONDITIONED
                  for i, gg in enumerate(state["GG"])]
    return state


def initial_basis(gg: Tensor, dim: int, shape: Sequence[int], on_failure: FailureHook | None = None) -> Tensor:
    """:func:`eigenbasis` of a first step's factor; a double failure is reported, the identity used."""
    q = try_eigenbasis(gg)
    if q is None:
        _report(on_failure, dim, shape, "initial eigendecomposition (eigh) failed in float32 and float64; "
                "started from the identity basis")
        return torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype)
    return q


def _zero_second_moment(grad: Tensor, layout: Layout, second_moment: str) -> Tensor:
    if second_moment == "adam":
        return torch.zeros_like(grad, memory_format=torch.contiguous_format)
    # Adafactor keeps one row and one column accumulator per matrix (see _adafactor_denominator).
    return torch.zeros(_adafactor_numel(layout), device=grad.device, dtype=grad.dtype)


def _adafactor_numel(layout: Layout) -> int:
    rows, cols = _adafactor_rows_cols(layout)
    return rows + cols


def _adafactor_rows_cols(layout: Layout) -> tuple[int, int]:
    """Adafactor factors a working tensor as a matrix: first dim × the rest."""
    shape = layout.work_shape
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows, cols


def _adafactor_denominator(state: dict, layout: Layout, rotated: Tensor, beta2: float, eps: float) -> Tensor:
    """Adafactor's second moment in the eigenbasis: row/column EMAs of ``G'²``, ``v̂ = r cᵀ / Σr``."""
    rows, cols = _adafactor_rows_cols(layout)
    matrix = rotated.reshape(rows, cols)
    acc = state["exp_avg_sq"]
    row_acc, col_acc = acc[:rows], acc[rows:]
    square = matrix * matrix
    row_acc.mul_(beta2).add_(square.sum(dim=1), alpha=1.0 - beta2)
    col_acc.mul_(beta2).add_(square.sum(dim=0), alpha=1.0 - beta2)
    v_hat = torch.outer(row_acc, col_acc) / row_acc.sum().clamp_min(1e-30)
    return v_hat.sqrt().add_(eps).reshape(rotated.shape)


@torch.no_grad()
def update_param(param: Tensor, grad: Tensor, state: dict, layout: Layout, group: dict,
                 refresh: bool | None = None, second_moment: str = "adam",
                 on_failure: FailureHook | None = None) -> None:
    """One SOAP step for one parameter that already has state (docs/DESIGN.md §1, step 3 and 4).

    ``refresh=None`` applies the reference's rule (``step % precondition_frequency == 0``); a bool
    overrides it (a refresh schedule decided).
    """
    beta1, beta2 = group["betas"]
    grad = grad.to(math_dtype(grad.dtype))
    grad_work = layout.to_work(grad)
    exp_avg = state["exp_avg"]
    rotated = project(grad_work, state["Q"])

    state["step"] += 1
    step = state["step"]
    exp_avg_work = layout.to_work(exp_avg)
    exp_avg_work.mul_(beta1).add_(rotated, alpha=1.0 - beta1)
    if second_moment == "adam":
        exp_avg_sq_work = layout.to_work(state["exp_avg_sq"])
        exp_avg_sq_work.mul_(beta2).add_(rotated.square(), alpha=1.0 - beta2)
        denom = exp_avg_sq_work.sqrt().add_(group["eps"])
    else:
        denom = _adafactor_denominator(state, layout, rotated, beta2, group["eps"])
    # to_work may have returned a copy (channels_last permutation): write the moments back.
    _write_back(state, "exp_avg", layout, exp_avg_work)
    if second_moment == "adam":
        _write_back(state, "exp_avg_sq", layout, exp_avg_sq_work)

    lr = float(group["lr"])  # a number or a one-element tensor
    step_size = lr
    if group["correct_bias"]:
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        step_size = step_size * (bias_correction2**0.5) / bias_correction1

    norm_grad = layout.from_work(project_back(layout.to_work(state["exp_avg"]) / denom, state["Q"]))
    if group["normalize_grads"]:
        norm_grad = norm_grad / (1e-30 + torch.mean(norm_grad**2) ** 0.5)

    # Math in fp32, one rounding into the parameter's dtype.
    new_param = param.to(math_dtype(param.dtype))
    new_param.add_(norm_grad, alpha=-step_size)
    if group["weight_decay"] > 0.0:
        new_param.add_(new_param, alpha=-lr * group["weight_decay"])
    param.copy_(new_param)

    # The statistics update happens after the step, with exp_avg carried in the original frame.
    exp_avg_orig = project_back(layout.to_work(state["exp_avg"]), state["Q"])
    _accumulate_statistics(state, grad_work, _shampoo_beta(group))
    if refresh is None:
        refresh = step % group["precondition_frequency"] == 0
    if refresh:
        _refresh(state, layout, None, on_failure, second_moment)
    state["exp_avg"] = layout.from_work(project(exp_avg_orig, state["Q"])).contiguous()


@torch.no_grad()
def refresh_param(state: dict, layout: Layout, dims: set[int], second_moment: str = "adam",
                  on_failure: FailureHook | None = None) -> None:
    """Refresh the factors ``dims`` of a parameter outside :func:`update_param` (a schedule
    decided after every parameter was updated): the same refresh, with ``exp_avg`` carried in the
    original frame across it."""
    exp_avg_orig = project_back(layout.to_work(state["exp_avg"]), state["Q"])
    _refresh(state, layout, dims, on_failure, second_moment)
    state["exp_avg"] = layout.from_work(project(exp_avg_orig, state["Q"])).contiguous()


def drift(state: dict, dim: int) -> float:
    """Off-diagonal drift of factor ``dim`` in its eigenbasis: ``||B − diag B||_F / ||B||_F``."""
    q, gg = state["Q"][dim], state["GG"][dim]
    rotated = q.T @ gg @ q
    off = rotated - torch.diag(torch.diag(rotated))
    return float(off.norm() / rotated.norm().clamp_min(torch.finfo(rotated.dtype).tiny))


def _write_back(state: dict, key: str, layout: Layout, work: Tensor) -> None:
    """``to_work`` returns a view unless the ``channels_last`` permutation forced a copy."""
    if layout.permute:
        state[key].copy_(layout.from_work(work))
