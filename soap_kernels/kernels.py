"""The kernel table: one signature per hot op of the batched engine (docs/DESIGN.md §3).

A :class:`Kernels` table is chosen once per bucket by :func:`soap_kernels.select.select` and the
bucket never asks "which backend?" again. Tables: :class:`soap_kernels.ops.TorchKernels` (plain
PyTorch on any device, with the native CPU ops of ``soap_kernels._C`` as its internal fast path)
and :class:`soap_kernels.triton.table.TritonKernels`. Kernels know nothing of the optimizer: they
take tensors and numbers, never a param group or a bucket.

Conventions, fixed here for every table:

* a bucket is ``B`` parameters stacked along a leading dim, in the working layout
  ``[B, d0, ..., dk]``; ``qs[i]`` is the eigenbasis ``Q_i`` ``[B, d_i, d_i]`` of working dim ``i``
  or ``None`` where that dim has no factor; ``stats[i]`` likewise (rotated-frame statistics
  ``B_i = Q_iᵀ GG_i Q_i``);
* "rotate in" is ``x ×_i Q_iᵀ`` for every factor (``Q_Lᵀ X Q_R``), "rotate back" ``x ×_i Q_i``;
* state and math are in the bucket's state dtype (fp32, or fp64 for fp64 parameters);
* the step scalars come in one :class:`StepScalars`: per-row step sizes
  ``lr·√(1−β2ᵗ)/(1−β1ᵗ)`` (host floats and the same on the device) and the weight-decay factor;
* ``refresh_factor`` returns ``(perm [R, d], q_mix [R, d, d])`` and leaves the moments to
  ``refresh_moments``; a permutation is a ``[R, d]`` int64 tensor of source indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Kernels", "StepScalars", "step_scalars"]


@dataclass
class StepScalars:
    """Everything scalar one update needs, computed once per bucket and step (:func:`step_scalars`)."""

    sizes: list[float]  # per row: lr·bias correction (lr alone without correct_bias)
    decay: float  # 1 − lr·weight_decay (1.0 without weight decay)
    step: Tensor  # per row, on the device: the update count t after this step
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    correct_bias: bool
    _device_sizes: Tensor | None = field(default=None, repr=False)

    def device_sizes(self) -> Tensor:
        """The step sizes computed on the device from ``step`` (no host round trip; the fused
        kernels read them there)."""
        if self._device_sizes is None:
            beta1, beta2 = self.betas
            if self.correct_bias:
                step = self.step
                self._device_sizes = self.lr * torch.sqrt(1.0 - torch.pow(beta2, step)) / (1.0 - torch.pow(beta1, step))
            else:
                self._device_sizes = torch.full_like(self.step, self.lr)
        return self._device_sizes


def step_scalars(step: Tensor, host_steps: Sequence[int], lr: float, betas: tuple[float, float],
                 weight_decay: float, correct_bias: bool) -> StepScalars:
    """The one place the step size and the decay factor are derived (the reference's order of
    operations: ``step_size = lr·(√(1−β2ᵗ)/(1−β1ᵗ))``, then ``p ← p − lr·wd·p`` on the updated ``p``)."""
    beta1, beta2 = betas
    sizes = [lr * (math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)) if correct_bias else lr for t in host_steps]
    decay = 1.0 - lr * weight_decay if weight_decay > 0 else 1.0
    return StepScalars(sizes, decay, step, lr, weight_decay, (beta1, beta2), correct_bias)


class Kernels:
    """The interface every table implements (same names, same signatures, same conventions)."""

    name = "abstract"
    # Whether the table runs an update or refresh of a subset of a bucket's rows (index-selected
    # copies); a table that does not leaves those to the torch table, as a partial update is rare
    # (a parameter without a gradient, a staggered refresh).
    takes_row_subsets = True

    def rotate_in_moments(self, grads: Sequence[Tensor], qs: Sequence[Tensor | None], exp_avg: Tensor,
                          exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float, *, second_moment: str,
                          workspace: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``G' = rotate in(stack(grads))``; in place ``exp_avg ← β1·m + (1−β1)·G'`` and the second
        moment (``"adam"``: ``v ← β2·v + (1−β2)·G'²``; ``"adafactor"``: row/column EMAs); returns
        ``(G', direction = m / (√v + eps))``. ``grads``: the rows' gradients in the working shape."""
        raise NotImplementedError

    def update_statistics(self, stats: Sequence[Tensor | None], rotated: Tensor, shampoo_beta: float) -> None:
        """``B_i ← βs·B_i + (1−βs)·G'_(i) G'_(i)ᵀ`` in place, for every factor."""
        raise NotImplementedError

    def rotate_back_update(self, direction: Tensor, qs: Sequence[Tensor | None], params: Sequence[Tensor],
                           views: Sequence[Tensor] | None, scalars: StepScalars, *, normalize: bool,
                           from_work, workspace: Tensor | None) -> None:
        """``N = rotate back(direction)`` (divided by its RMS per row if ``normalize``);
        ``p ← (p − s_b·N)·decay``, written once in the parameter's dtype. ``views``: the parameters
        as working-shaped views (``None`` if impossible); ``from_work`` maps a working-shaped
        tensor to the parameter's shape."""
        raise NotImplementedError

    def adam_step(self, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor,
                  scalars: StepScalars, beta1: float, beta2: float, eps: float, *, second_moment: str,
                  normalize: bool, views: Sequence[Tensor] | None, from_work) -> None:
        """The un-preconditioned buckets: plain Adam (or Adafactor), the preconditioned path's rule
        with no rotation. ``grads``: the rows' gradients in the working shape."""
        raise NotImplementedError

    def refresh_factor(self, stats: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """Sort ``diag(B)`` descending (``P``), ``Q_m R = qr(Pᵀ B P)`` with ``diag R > 0``,
        ``q ← (q P)·Q_m``, ``stats ← R·Q_m`` (in place); returns ``(perm, q_mix = Q_m)``."""
        raise NotImplementedError

    def refresh_moments(self, exp_avg: Tensor, exp_avg_sq: Tensor, dim: int, perm: Tensor, q_mix: Tensor, *,
                        second_moment: str, work_shape: Sequence[int]) -> None:
        """After ``refresh_factor`` of working dim ``dim``: ``exp_avg ← Q_mᵀ Pᵀ exp_avg`` along it and
        the second moment permuted by ``perm`` (in place)."""
        raise NotImplementedError

    def reorthonormalize_(self, q: Tensor) -> None:
        """Re-orthonormalise a product of orthogonal factors in place (QR, positive-diagonal R)."""
        raise NotImplementedError
