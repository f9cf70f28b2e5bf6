"""One multi-tensor launch of plain Adam (SOAP's semantics) for the un-preconditioned parameters.

Every parameter of a group is cut into chunks of ``BLOCK`` elements; one program per chunk finds
its tensor through device tables of data pointers (cached while the pointers stay the same), so
a whole set of biases, norms and other un-preconditioned tensors is one launch per
(param dtype, grad dtype) pair — in practice one launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, PointerTableCache, check_tensor, tl_dtype, to_storage

__all__ = ["adam_step"]

# Memory-bound: a fixed, large chunk per program (no autotune: the kernel updates tensors reached
# through pointer tables, which triton.autotune could neither restore nor repeat safely).
_BLOCK = 128 if INTERPRET else 2048
_NUM_WARPS = 1 if INTERPRET else 8

_pointer_tables = PointerTableCache()
_chunk_tables = PointerTableCache()


@triton.jit
def _adam_kernel(
    pointer_table,
    chunk_table,
    step_size_ptr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    decay,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Adam on one ``BLOCK``-element chunk of one tensor, in place.

    ``chunk_table`` int64 ``[C, 3]``: (tensor index t, first element, numel of t).
    ``pointer_table`` int64 ``[T, 5]``: data pointers of (param, grad, exp_avg, exp_avg_sq) and
    the index of t's entry in ``step_size`` (fp32). Per element, math in fp32:
    ``m ← lerp(m, g, 1-β1)``; ``v ← β2·v + (1-β2)·g²``;
    ``p ← (p − step_size[t]·m/(√v + eps))·decay`` (decay after the update, multiplicative).
    Param in its dtype (one rounding on store), grad any float dtype, m/v fp32.
    FLOPs ≈ 12 per element; bytes per element ``2·sizeof(p) + sizeof(g) + 16``.
    """
    chunk = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_table + chunk * 3)
    start = tl.load(chunk_table + chunk * 3 + 1)
    numel = tl.load(chunk_table + chunk * 3 + 2)
    row = pointer_table + t * 5
    p_ptr = tl.load(row).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    step_size = tl.load(step_size_ptr + tl.load(row + 4))

    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch.lerp's two-branch formula (matches exp_avg.lerp_(grad, 1-β1) bit for bit).
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    p = (p - step_size * tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)) * decay
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, to_storage(p, PARAM_DTYPE), mask=mask)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step_sizes: Tensor | Sequence[float] | float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
) -> None:
    """Plain Adam with SOAP's semantics on every tensor of the lists, in place, one launch per dtype pair.

    Per tensor ``i``: ``exp_avg.lerp_(grad, 1-β1)``; ``exp_avg_sq ← β2·exp_avg_sq + (1-β2)·grad²``;
    ``p ← p − step_sizes[i]·exp_avg/(√exp_avg_sq + eps)``; then ``p ← p·decay``.
    params: contiguous, fp32/bf16/fp16; grads: contiguous, same shape, fp32/bf16/fp16;
    exp_avgs/exp_avg_sqs: fp32 contiguous, same shape. ``step_sizes``: an fp32 ``[T]`` tensor on
    the params' device (lr and bias correction folded in by the caller; no host sync), or floats.
    ``decay = 1 − lr·wd`` (or 1.0). All runtime values: changing them never recompiles.
    """
    count = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == count):
        raise ValueError(
            f"adam_step: params/grads/exp_avgs/exp_avg_sqs must have equal lengths, got "
            f"{count}/{len(grads)}/{len(exp_avgs)}/{len(exp_avg_sqs)}"
        )
    if count == 0:
        return
    device = params[0].device
    if isinstance(step_sizes, Tensor):
        check_tensor(step_sizes, "step_sizes", (count,), device=device)
    elif isinstance(step_sizes, (int, float)):
        step_sizes = torch.full((count,), float(step_sizes), dtype=torch.float32, device=device)
    else:
        if len(step_sizes) != count:
            raise ValueError(f"step_sizes: expected {count} values, got {len(step_sizes)}")
        step_sizes = torch.tensor([float(s) for s in step_sizes], dtype=torch.float32, device=device)

    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        check_tensor(p, f"params[{i}]", dtype=_FLOATS, device=device)
        check_tensor(g, f"grads[{i}]", p.shape, dtype=_FLOATS, device=device)
        check_tensor(m, f"exp_avgs[{i}]", p.shape, device=device)
        check_tensor(v, f"exp_avg_sqs[{i}]", p.shape, device=device)
        if g.is_sparse:
            raise TypeError(f"grads[{i}] is sparse: SOAP does not support sparse gradients")
        if p.numel():
            groups.setdefault((p.dtype, g.dtype), []).append(i)

    for (p_dtype, g_dtype), idx in groups.items():
        rows = [(params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), i) for i in idx]
        pointer_table = _pointer_tables.get(tuple(rows), rows, device)
        numels = tuple(params[i].numel() for i in idx)
        chunk_table = _chunk_tables.get(
            (numels, _BLOCK),
            lambda numels=numels: [(t, s, n) for t, n in enumerate(numels) for s in range(0, n, _BLOCK)],
            device,
        )
        _adam_kernel[(chunk_table.shape[0],)](
            pointer_table, chunk_table, step_sizes,
            1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), float(decay),
            PARAM_DTYPE=tl_dtype(p_dtype, "params"), GRAD_DTYPE=tl_dtype(g_dtype, "grads"),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )  # fmt: skip
