"""The optional native extension ``soap_kernels._C`` (C++/CUDA kernels in ``csrc/``).

Importing this module never fails: when the extension is missing (not built, build switched off
with ``SOAP_KERNELS_NO_EXT=1``, failed build, torch ABI mismatch) :func:`available` is False and
:func:`load_error` says why; the engine then keeps its PyTorch ops. When present, the ops are
``torch.ops.soap_kernels.*``; their fake (meta) implementations, registered here, let
``torch.compile`` trace them.

Ops (math, dtypes and bytes moved in ``csrc/adam.h``):

- :func:`moment_update`: Adam's moment update in the eigenbasis, over a list of fp32 buckets.
- :func:`adam_step`: plain Adam with SOAP's reference semantics for un-preconditioned parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["available", "load_error", "cpu_kernel_variant", "moment_update", "adam_step"]

_load_error: str | None = None
try:
    importlib.import_module("soap_kernels._C")
except Exception as err:  # ImportError, OSError (undefined symbols after a torch upgrade), ...
    _load_error = f"soap_kernels._C could not be loaded ({type(err).__name__}: {err})"
    if isinstance(err, ModuleNotFoundError) and err.name == "soap_kernels._C":
        _load_error = (
            "soap_kernels._C is not built (install with a C++ compiler and without "
            "SOAP_KERNELS_NO_EXT=1: pip install --no-build-isolation -e .)"
        )


def available() -> bool:
    """True when the native ops are loaded and callable."""
    return _load_error is None


def load_error() -> str | None:
    """Why the extension is not available, or None when it is."""
    return _load_error


def _require() -> None:
    if _load_error is not None:
        raise RuntimeError(_load_error)


def cpu_kernel_variant() -> str:
    """The CPU kernel variant in use: ``"AVX2"`` (also on AVX512 CPUs) or ``"DEFAULT"`` (baseline ISA).

    It follows torch's own choice (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` overrides), so fused multiply-adds happen where torch's kernels have them.
    """
    _require()
    return torch.ops.soap_kernels.cpu_kernel_variant()


def moment_update(
    exp_avg: Sequence[Tensor],
    exp_avg_sq: Sequence[Tensor],
    grad: Sequence[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    *,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Fused moment update and division, one pass over memory per tensor.

    In place ``exp_avg ← β1·exp_avg + (1-β1)·grad`` (as ``exp_avg.lerp_(grad, 1-β1)``) and
    ``exp_avg_sq ← β2·exp_avg_sq + (1-β2)·grad²``; returns ``exp_avg / (√exp_avg_sq + eps)`` in new
    tensors, or written into ``out`` (fp32, same shapes, not overlapping the inputs) when given, so
    a caller can reuse one buffer every step. All fp32, contiguous, one device, same shape per index.
    """
    _require()
    direction = list(out) if out is not None else [torch.empty_like(m, memory_format=torch.contiguous_format) for m in exp_avg]
    if len(exp_avg) == 0 and len(exp_avg_sq) == 0 and len(grad) == 0 and len(direction) == 0:
        return direction  # no tensor to dispatch on
    torch.ops.soap_kernels.moment_update(
        list(exp_avg), list(exp_avg_sq), list(grad), direction, float(beta1), float(beta2), float(eps)
    )
    return direction


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step_size: Sequence[float] | Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    lr_weight_decay: float,
) -> None:
    """Plain Adam with SOAP's reference semantics, in place, one pass over memory per tensor.

    Per tensor ``i``: the moment update of :func:`moment_update`, then
    ``p ← p − step_size[i]·exp_avg/(√exp_avg_sq + eps)``, then ``p ← p − lr_weight_decay·p`` on the
    updated ``p`` (the reference's order, unlike AdamW). ``step_size[i]`` carries lr and the bias
    correction; pass ``lr_weight_decay = lr·weight_decay``, or 0.0 when ``weight_decay <= 0`` (the
    reference then skips the decay). Params/grads fp32, bf16 or fp16 (equal per index), state fp32,
    math fp32, params rounded once. ``step_size`` as a float32 tensor on the params' device keeps
    the step free of host synchronisation.
    """
    _require()
    if len(params) == 0 and len(grads) == 0 and len(exp_avgs) == 0 and len(exp_avg_sqs) == 0:
        return
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs))
    hyper = (float(beta1), float(beta2), float(eps), float(lr_weight_decay))
    if isinstance(step_size, Tensor):
        torch.ops.soap_kernels.adam_step.tensor(*args, step_size, *hyper)
    else:
        torch.ops.soap_kernels.adam_step(*args, [float(s) for s in step_size], *hyper)


if _load_error is None:
    # The ops only write into their arguments (declared in the schemas), so the fakes do nothing.
    @torch.library.register_fake("soap_kernels::moment_update")
    def _moment_update_fake(
        exp_avg: list[Tensor],
        exp_avg_sq: list[Tensor],
        grad: list[Tensor],
        direction: list[Tensor],
        beta1: float,
        beta2: float,
        eps: float,
    ) -> None:
        return None

    @torch.library.register_fake("soap_kernels::adam_step")
    def _adam_step_fake(
        param: list[Tensor],
        grad: list[Tensor],
        exp_avg: list[Tensor],
        exp_avg_sq: list[Tensor],
        step_size: list[float],
        beta1: float,
        beta2: float,
        eps: float,
        lr_weight_decay: float,
    ) -> None:
        return None

    @torch.library.register_fake("soap_kernels::adam_step.tensor")
    def _adam_step_tensor_fake(
        param: list[Tensor],
        grad: list[Tensor],
        exp_avg: list[Tensor],
        exp_avg_sq: list[Tensor],
        step_size: Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        lr_weight_decay: float,
    ) -> None:
        return None
