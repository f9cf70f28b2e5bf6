"""The Triton kernel table: :class:`soap_kernels.kernels.Kernels` through the fused Triton kernels.

Chosen by :func:`soap_kernels.select.select` for Adam buckets with fp32 state whose working layout
is a matrix ``[B, m, n]`` or has no factor. Where a fused kernel does not apply (``normalize_grads``
needs the whole update before the write; parameters that are not contiguous working-shaped views;
the un-preconditioned path with ``normalize_grads``) the table composes its unfused kernels with
the torch table's elementwise helpers, so a bucket keeps one table for its whole life.
"""

from __future__ import annotations

import torch

from ..kernels import Kernels, StepScalars
from ..ops import TORCH, apply_update, normalize_rows_
from . import adam, refresh, rotate, statistics

__all__ = ["TritonKernels"]


class TritonKernels(Kernels):
    name = "triton"
    takes_row_subsets = False  # the fused kernels run whole buckets (partial updates: the torch table)

    def __init__(self, precision: str = "fp32") -> None:
        self.precision = precision

    def rotate_in_moments(self, grads, qs, exp_avg, exp_avg_sq, beta1, beta2, eps, *, second_moment, workspace):
        grad = torch.stack([g if g.dtype == torch.float32 else g.float() for g in grads])
        return rotate.rotate_in_adam(grad, qs, exp_avg, exp_avg_sq, beta1, beta2, eps, precision=self.precision)

    def update_statistics(self, stats, rotated, shampoo_beta):
        statistics.update_statistics(stats, rotated, shampoo_beta)

    def rotate_back_update(self, direction, qs, params, views, scalars: StepScalars, *, normalize, from_work,
                           workspace):
        sizes = scalars.device_sizes()
        if normalize or views is None or not all(v.is_contiguous() for v in views):
            update = rotate.rotate_back(direction, qs, precision=self.precision)
            if normalize:
                normalize_rows_(update)
            update.mul_(sizes.view(-1, 1, 1))
            apply_update(params, [from_work(u) for u in update.unbind(0)], None if scalars.decay == 1.0 else scalars.decay)
            return
        rotate.rotate_back_update(direction, qs, views, sizes, scalars.decay, precision=self.precision)

    def adam_step(self, params, grads, exp_avg, exp_avg_sq, scalars: StepScalars, beta1, beta2, eps, *,
                  second_moment, normalize, views, from_work):
        if normalize or views is None:  # the multi-tensor kernel neither normalises nor reshapes
            TORCH.adam_step(params, grads, exp_avg, exp_avg_sq, scalars, beta1, beta2, eps, second_moment=second_moment,
                            normalize=normalize, views=views, from_work=from_work)
            return
        adam.adam_step(views, [g.contiguous() for g in grads], list(exp_avg.unbind(0)), list(exp_avg_sq.unbind(0)),
                       scalars.device_sizes(), beta1, beta2, eps, scalars.decay)

    def refresh_factor(self, stats, q):
        return refresh.refresh_factor(stats, q)

    def refresh_moments(self, exp_avg, exp_avg_sq, dim, perm, q_mix, *, second_moment, work_shape):
        refresh.refresh_moments_(exp_avg, exp_avg_sq, perm, q_mix, axis=dim + 1)

    def reorthonormalize_(self, q):
        refresh.reorthonormalize_(q)
