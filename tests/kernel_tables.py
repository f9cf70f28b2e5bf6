"""The kernel tables the conformance tests run over, and the plain fp64 math they are judged by.

Every hot op of :class:`soap_kernels.kernels.Kernels` is tested through the table's own methods on
each table listed here (``tests/test_rotate.py``, ``test_statistics.py``, ``test_refresh.py``,
``test_adam.py``; the ``table`` fixture is in ``conftest.py``). A table that cannot run here is
skipped with the reason; a case a table is never given (``select`` keeps it on the torch table)
is skipped with that reason. Expected values are written out in fp64 PyTorch below, never taken
from another table.

Tables:

* ``torch-native``: :data:`soap_kernels.ops.TORCH` with the native CPU ops of ``soap_kernels._C``
  (its fused moment update and Adam step), on CPU tensors;
* ``torch-plain``: the same table with ``ops.NATIVE_OPS`` switched off (what
  ``SOAP_KERNELS_NATIVE_OPS=0`` does), on CPU tensors;
* ``triton``: :class:`soap_kernels.triton.table.TritonKernels` in fp32 rotation precision, on CUDA
  tensors, or on CPU tensors under the interpreter (``TRITON_INTERPRET=1``, set by conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from soap_kernels import _native, ops, select
from soap_kernels.kernels import Kernels
from soap_kernels.layout import Layout

# Tolerances (atol, rtol) of every table against the fp64 math, all state fp32:
TOLERANCE = {
    # Elementwise fp32 math (moments, direction, Adam step) with no GEMM: a few ulps of fp32 from
    # the order of operations (lerp vs β·m + (1−β)·g, fused multiply-adds, sqrt then divide).
    "elementwise": (1e-6, 1e-6),
    # fp32 GEMMs with K <= 37 on O(1) inputs: rounding error ~K·2⁻²⁴ per entry, different
    # reassociation per table (blocked Triton dots, MKL); the direction m / (√v + eps) inherits it
    # with √v >= 0.3 in these tests. Measured: max 1.1e-5 absolute, on Gram entries of size ~40.
    "gemm": (2e-5, 2e-5),
    # Refresh of well-conditioned factors (eigenvalue spread <= 1e3): fp32 QR (Householder in
    # LAPACK, shifted CholeskyQR in Triton) against fp64 Householder; the QR factors' sensitivity
    # scales with the spread. Measured: max 1.1e-5 (q, d = 37); 5e-5 leaves a factor of ~4.
    "refresh": (5e-5, 5e-5),
    "orthonormal": 1e-5,  # max |QᵀQ − I| of an fp32 result
}
# The parameter write, per parameter dtype: fp32 math rounded once to the dtype, against the fp64
# result rounded once; fp32 as "gemm", bf16/fp16 one ulp of the dtype (a fp32 result that straddles
# a rounding boundary) plus the GEMM's error.
TOLERANCE_PARAM = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 8e-3), torch.float16: (1e-3, 1e-3)}

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Table:
    """One kernel table as the tests see it: the table, where its tensors live, whether the torch
    table's native fast path is on while it runs."""

    name: str
    make: Callable[[], Kernels]
    device: str
    native: bool | None  # True/False: ops.NATIVE_OPS for the test; None: not the torch table

    def available(self) -> tuple[bool, str]:
        if self.name == "triton":
            return select.backend_available("triton")
        if self.native and not ops.NATIVE_OPS:
            why = _native.load_error() or "switched off by SOAP_KERNELS_NATIVE_OPS=0"
            return False, f"the native CPU ops are not in use: {why}"
        return True, "plain PyTorch"

    def takes(self, work_shape: Sequence[int], second_moment: str = "adam", dtype: torch.dtype = torch.float32,
              preconditioned: Sequence[bool] | None = None) -> tuple[bool, str]:
        """Whether :func:`soap_kernels.select.select` ever gives this table such a bucket."""
        if self.name != "triton":
            return True, "the torch table takes every bucket"
        pre = tuple(preconditioned) if preconditioned is not None else (True,) * len(work_shape)
        layout = Layout(work_shape, work_shape, False, pre)
        if select._triton_takes(layout, second_moment, dtype, torch.device(self.device)):
            return True, "eligible"
        return False, (f"select keeps a {second_moment} bucket with {dtype} state and working shape "
                       f"{tuple(work_shape)} on the torch table")


TABLES = [
    Table("torch-native", lambda: ops.TORCH, "cpu", native=True),
    Table("torch-plain", lambda: ops.TORCH, "cpu", native=False),
    Table("triton", lambda: _triton_table(), TRITON_DEVICE, native=None),
]


def _triton_table() -> Kernels:
    from soap_kernels.triton.table import TritonKernels

    return TritonKernels("fp32")


def check(name: str, got: Tensor, want: Tensor, atol: float, rtol: float) -> None:
    """Print the max and mean error, then assert (both sides compared in fp64 on the CPU)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel():
        err = (got - want).abs()
        print(f"{name}: max {err.max().item():.3e}  mean {err.mean().item():.3e}  (atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def orthonormal(b: int, d: int, gen: torch.Generator, device: str) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=torch.float64))
    return q.float().contiguous().to(device)


def make_qs(b: int, work_shape: Sequence[int], sides: str | Sequence[bool], gen: torch.Generator,
            device: str) -> list[Tensor | None]:
    """One basis per working dim; ``sides``: ``"both"``/``"left"``/``"right"``/``"none"`` for a
    matrix, or one flag per dim."""
    if isinstance(sides, str):
        sides = {"both": (True, True), "left": (True, False), "right": (False, True), "none": (False, False)}[sides]
    return [orthonormal(b, d, gen, device) if pre else None for d, pre in zip(work_shape, sides)]


def rotate64(x: Tensor, qs: Sequence[Tensor | None], *, back: bool = False) -> Tensor:
    """``x ×_i Q_iᵀ`` (rotate in) or ``x ×_i Q_i`` (rotate back) over every factor, in fp64."""
    y = x.double()
    for i, q in enumerate(qs):
        if q is None:
            continue
        q = q.double()
        moved = y.movedim(i + 1, -1)
        flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
        y = torch.matmul(flat, q.mT if back else q).reshape(moved.shape).movedim(-1, i + 1)
    return y


def unfold_gram64(x: Tensor, dim: int) -> Tensor:
    """``x_(i) x_(i)ᵀ`` per row of a bucket (working dim ``dim``), in fp64."""
    moved = x.double().movedim(dim + 1, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1)
    return flat @ flat.mT


def step_sizes64(steps: Sequence[int], lr: float, betas: tuple[float, float], correct_bias: bool = True) -> Tensor:
    """``lr·√(1−β2ᵗ)/(1−β1ᵗ)`` per row, in fp64."""
    beta1, beta2 = betas
    t = torch.tensor(steps, dtype=torch.float64)
    if not correct_bias:
        return torch.full_like(t, lr)
    return lr * torch.sqrt(1 - beta2**t) / (1 - beta1**t)
