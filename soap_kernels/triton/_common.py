"""Shared pieces of the Triton kernels: the GEMM main loop, launch configs, host-side checks.

Interpreter mode: ``TRITON_INTERPRET=1`` must be set before ``triton`` is imported (Triton decides
at ``@triton.jit`` time whether a kernel is compiled or interpreted). In that mode the kernels run
on CPU tensors with exactly one launch config, which is how CI tests them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Read by mma_tile (a module-level constexpr, which both the compiler and the interpreter accept):
# under the interpreter the tensor-core input rounding of the tf32/bf16 modes is done explicitly.
EMULATE_TENSOR_CORES = tl.constexpr(INTERPRET)

PRECISIONS = ("fp32", "tf32", "bf16")

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class GemmConfig:
    """One launch config of a tiled GEMM (all structural, hence compile-time)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict[str, int]:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


# 16 is the smallest tile tl.dot accepts; under the interpreter one config keeps CI fast.
INTERPRET_CONFIG = GemmConfig(16, 16, 16, 1, 1)
GPU_CONFIGS = (
    GemmConfig(32, 32, 32, 4, 3),
    GemmConfig(64, 64, 32, 4, 3),
    GemmConfig(128, 64, 32, 4, 3),
    GemmConfig(64, 128, 32, 4, 3),
    GemmConfig(128, 128, 32, 8, 3),
    GemmConfig(128, 128, 64, 8, 3),
)

_picked: dict[Hashable, GemmConfig] = {}


def pick_config(
    key: Hashable,
    bench: Callable[[GemmConfig], None],
    square: bool = False,
) -> GemmConfig:
    """The fastest config for ``key``, timed once per key on the GPU; the single one when interpreted.

    ``bench(config)`` must launch the kernel WITHOUT side effects on user tensors (scratch outputs,
    clones of in-place operands): this replaces ``triton.autotune``, whose repeated launches would
    apply an in-place epilogue (moment update, parameter write) several times, and which cannot
    restore tensors reached through a pointer table. ``square`` keeps configs with
    ``block_m == block_n`` (symmetric-tile kernels). The first call for a key is slow (tuning) and
    must happen outside CUDA-graph capture.
    """
    if INTERPRET:
        return INTERPRET_CONFIG
    hit = _picked.get(key)
    if hit is not None:
        return hit
    candidates = [c for c in GPU_CONFIGS if not square or c.block_m == c.block_n]
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: bench(cfg), warmup=5, rep=20)
        except Exception:  # a config that does not fit (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _picked[key] = best
    return best


def tl_precision(precision: str) -> tuple[str, bool]:
    """``(input_precision for tl.dot, cast operands to bf16)`` for a rotation precision option."""
    if precision == "fp32":
        return "ieee", False
    if precision == "tf32":
        return "tf32", False
    if precision == "bf16":
        return "ieee", True
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def tl_dtype(dtype: torch.dtype, what: str):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"{what}: dtype {dtype} is not supported (use float32, bfloat16 or float16)") from None


# --------------------------------------------------------------------------------------------
# Host-side validation
# --------------------------------------------------------------------------------------------


def check_device(t: Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            f"{name} is on the CPU: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is first imported (CPU interpreter, for tests); use soap_kernels.ops instead"
        )
    raise RuntimeError(f"{name} is on {t.device}: the Triton kernels support CUDA (or CPU when interpreted)")


def check_tensor(
    t: Tensor,
    name: str,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = torch.float32,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> None:
    """Raise with an actionable message when ``t`` does not have the layout a kernel assumes."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(t, name)
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() on it first)")


class PointerTableCache:
    """Device int64 tables of data pointers, rebuilt only when the tensors behind them change.

    The key is the tuple of pointers (plus anything the caller adds), so the usual optimizer loop
    (same parameter and state tensors every step) pays one host->device copy per bucket, once.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._tables: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._capacity = capacity

    def get(
        self,
        key: Hashable,
        rows: Sequence[Sequence[int]] | Callable[[], Sequence[Sequence[int]]],
        device: torch.device,
    ) -> Tensor:
        """The int64 table of ``rows`` (a callable is only called on a miss) for ``key``."""
        full_key = (key, device)
        table = self._tables.get(full_key)
        if table is None:
            table = torch.tensor(rows() if callable(rows) else rows, dtype=torch.int64).to(device)
            self._tables[full_key] = table
            if len(self._tables) > self._capacity:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(full_key)
        return table


# --------------------------------------------------------------------------------------------
# Device-side building blocks
# --------------------------------------------------------------------------------------------


@triton.jit
def round_mantissa(x, DROP_BITS: tl.constexpr, NEAREST: tl.constexpr):
    """fp32 ``x`` with its low ``DROP_BITS`` mantissa bits cleared, returned as fp32.

    ``NEAREST``: round to nearest even (``DROP_BITS=16``: bf16, as ``cvt.rn.bf16.f32`` and torch);
    otherwise truncate (round toward zero), which is what the tensor cores do to fp32 operands of a
    tf32 MMA (``DROP_BITS=13``): the sm_90 PTX Triton 3.9 emits for ``input_precision="tf32"``
    feeds the fp32 bits straight to ``wgmma``/``mma.sync ... .tf32`` (checked: no ``cvt.rna.tf32``),
    the PTX ISA says ``wgmma`` truncates the lower 13 bits, and ``tl.dot``'s docstring warns that
    tf32 inputs "may be truncated ... without rounding". Integer arithmetic on the bit pattern: a
    carry out of the mantissa bumps the exponent (so overflow gives ±inf), ±inf stays ±inf and NaN
    passes through unchanged.
    """
    bits = x.to(tl.uint32, bitcast=True)
    if NEAREST:
        bits = bits + ((1 << (DROP_BITS - 1)) - 1) + ((bits >> DROP_BITS) & 1)
    rounded = (bits >> DROP_BITS) << DROP_BITS
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """fp32 -> the parameter's dtype, rounding to nearest even.

    bf16 is rounded with integer arithmetic because Triton's CPU interpreter (the CI lane) truncates
    fp32 -> bf16 casts and ignores ``fp_downcast_rounding``: measured, 504 of 1024 random values
    differed from torch, drifting a bf16 parameter by one ulp per step. The integer form is exact
    RTNE on the GPU as well (NaNs pass through unchanged); the final cast is then exact.
    """
    if DTYPE == tl.bfloat16:
        return round_mantissa(x, 16, True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row-tiles share their column tiles in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group = pid // num_in_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def mma_tile(
    a_ptr,
    b_ptr,
    a_index_ptr,
    b_index_ptr,
    offs_m,
    offs_n,
    M,
    N,
    K,
    k_start,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    PRECISION: tl.constexpr,
    CAST_BF16: tl.constexpr,
    A_GATHER_K: tl.constexpr,
    B_GATHER_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc[BLOCK_M, BLOCK_N] = Σ_{k ≥ k_start} A[offs_m, k] · B[k, offs_n]`` in fp32.

    A and B are addressed through strides, so transposes cost nothing. ``A_GATHER_K`` reads A's
    column ``k`` from column ``a_index[k]`` (a permutation fused into the load); ``B_GATHER_K``
    reads B's row ``k`` from row ``b_index[k]``. ``PRECISION`` is tl.dot's input_precision ("ieee"
    = exact fp32 products, "tf32"); ``CAST_BF16`` rounds both operands to bf16 first (fp32
    accumulation either way). Out-of-range rows/columns/k read as 0.

    Under the interpreter (``EMULATE_TENSOR_CORES``) the low-precision modes reduce the operands
    with :func:`round_mantissa` as the tensor cores do (tf32: truncated to 10 mantissa bits; bf16:
    rounded to nearest even, 7 bits), then take an exact fp32 dot (products of such operands are
    exact in fp32), because the interpreter's own paths model neither mode. Measured with Triton
    3.9 (16x16x16 tiles of randn): ``input_precision="tf32"`` (and ``"tf32x3"``) gives results
    bit-identical to ``"ieee"``, i.e. exact fp32 products; a bf16 ``tl.dot`` multiplies the raw
    uint16 bit patterns the interpreter stores bf16 in (max error 2.4e10 against fp64), and
    fp32 -> bf16 casts truncate (530 of 1024 randn values differ from torch's rounding).
    On a GPU the native paths run unchanged.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mask_m = offs_m < M
    mask_n = offs_n < N
    for k0 in range(k_start, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if A_GATHER_K:
            a_k = tl.load(a_index_ptr + offs_k, mask=mask_k, other=0)
        else:
            a_k = offs_k
        if B_GATHER_K:
            b_k = tl.load(b_index_ptr + offs_k, mask=mask_k, other=0)
        else:
            b_k = offs_k
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + a_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if CAST_BF16:
            if EMULATE_TENSOR_CORES:
                a = round_mantissa(a.to(tl.float32), 16, True)
                b = round_mantissa(b.to(tl.float32), 16, True)
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if EMULATE_TENSOR_CORES:
                if PRECISION == "tf32":
                    a = round_mantissa(a, 13, False)
                    b = round_mantissa(b, 13, False)
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


# --------------------------------------------------------------------------------------------
# A plain batched GEMM (used for intermediates and by refresh.py)
# --------------------------------------------------------------------------------------------


@triton.jit
def bmm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_index_ptr,
    b_index_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_cb,
    stride_cm,
    stride_cn,
    index_stride_b,
    PRECISION: tl.constexpr,
    CAST_BF16: tl.constexpr,
    A_GATHER_K: tl.constexpr,
    B_GATHER_K: tl.constexpr,
    A_UPPER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``C[b] = A[b] @ B[b]`` (any strides; optional gathered K index, shared by A and B per batch).

    Shapes: A ``[Bt, M, K]``, B ``[Bt, K, N]``, C ``[Bt, M, N]`` (C's dtype: fp32 or bf16, the
    store casts). ``A_UPPER``: A is upper-triangular, so the K loop of a row tile starts at the
    tile's first row (half the FLOPs of a triangular-times-full product).
    FLOPs ``2·Bt·M·N·K``; bytes ≈ ``Bt·(M·K·N/BLOCK_N + K·N·M/BLOCK_M)·4 + C`` (L2 reuse aside).
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = 0
    if A_UPPER:
        k_start = (pid_m * BLOCK_M // BLOCK_K) * BLOCK_K
    acc = mma_tile(
        a_ptr + pid_b * stride_ab,
        b_ptr + pid_b * stride_bb,
        a_index_ptr + pid_b * index_stride_b,
        b_index_ptr + pid_b * index_stride_b,
        offs_m,
        offs_n,
        M,
        N,
        K,
        k_start,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        PRECISION,
        CAST_BF16,
        A_GATHER_K,
        B_GATHER_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    c_ptrs = c_ptr + pid_b * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    # to_storage: a bf16 intermediate (bf16 mode) is rounded to nearest even in the interpreter too.
    tl.store(c_ptrs, to_storage(acc, c_ptr.dtype.element_ty), mask=mask)


def bmm(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    precision: str = "fp32",
    index: Tensor | None = None,
    gather: str | None = None,
    a_upper: bool = False,
) -> Tensor:
    """Launch :func:`bmm_kernel`: ``out[i] = a[i] @ b[i]`` for 3-D strided views (no copies).

    ``gather="a"``: use ``a[i][:, index[i]]``; ``gather="b"``: use ``b[i][index[i], :]``
    (``index`` int64 ``[Bt, K]``, contiguous).
    """
    bt, m, k = a.shape
    n = b.shape[2]
    input_precision, cast_bf16 = tl_precision(precision)
    dummy = index if index is not None else out
    idx_stride = index.stride(0) if index is not None else 0

    def launch(cfg: GemmConfig, c: Tensor) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), bt)
        bmm_kernel[grid](
            a, b, c, dummy, dummy, m, n, k,
            a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2),
            c.stride(0), c.stride(1), c.stride(2),
            idx_stride,
            PRECISION=input_precision,
            CAST_BF16=cast_bf16,
            A_GATHER_K=gather == "a",
            B_GATHER_K=gather == "b",
            A_UPPER=a_upper,
            GROUP_M=8,
            **cfg.meta(),
        )  # fmt: skip

    key = ("bmm", bt, m, n, k, a.stride(), b.stride(), precision, gather, a_upper, out.dtype, a.device)
    cfg = pick_config(key, lambda cfg: launch(cfg, torch.empty_like(out)))
    launch(cfg, out)
    return out
