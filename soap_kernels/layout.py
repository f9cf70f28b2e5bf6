"""How the batched engine sees a parameter: its working layout (docs/DESIGN.md §1.1).

Written apart from :mod:`soap_kernels.reference` on purpose: the oracle shares no code with what
it judges. ``tests/test_layout.py`` checks that both state the same rule on every shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["Layout", "make_layout", "merge_dims"]


class Layout:
    """``work_shape``: the shape the statistics are taken over (after the ``channels_last``
    permutation and ``merge_dims``); ``preconditioned[i]``: whether working dim ``i`` has a factor."""

    __slots__ = ("shape", "work_shape", "permute", "preconditioned")

    def __init__(self, shape: Sequence[int], work_shape: Sequence[int], permute: bool,
                 preconditioned: Sequence[bool]) -> None:
        self.shape = tuple(shape)
        self.work_shape = tuple(work_shape)
        self.permute = permute
        self.preconditioned = tuple(preconditioned)

    def to_work(self, x: Tensor) -> Tensor:
        """A parameter-shaped tensor (optionally with a leading batch dim) in the working layout."""
        batch = x.dim() - len(self.shape)
        if self.permute:
            x = x.permute(*range(batch), batch, batch + 3, batch + 1, batch + 2)
        return x.reshape(tuple(x.shape[:batch]) + self.work_shape)

    def from_work(self, x: Tensor) -> Tensor:
        """A working-layout tensor (optionally batched) back in the parameter's shape."""
        batch = x.dim() - len(self.work_shape)
        lead = x.shape[:batch]
        if self.permute:
            n, h, w, c = self.shape
            return x.reshape(*lead, n, c, h, w).permute(*range(batch), batch, batch + 2, batch + 3, batch + 1)
        return x.reshape(tuple(lead) + self.shape)

    @property
    def any_preconditioned(self) -> bool:
        return any(self.preconditioned)

    @property
    def factor_dims(self) -> list[int]:
        return [i for i, pre in enumerate(self.preconditioned) if pre]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    def __repr__(self) -> str:
        return f"Layout(shape={self.shape}, work_shape={self.work_shape}, preconditioned={self.preconditioned})"


def merge_dims(shape: Sequence[int], max_precond_dim: int) -> list[int]:
    """Consecutive dims merged greedily, left to right, while their product stays ``<= max_precond_dim``."""
    merged: list[int] = []
    run = 1
    for size in shape:
        if run * size <= max_precond_dim:
            run *= size
        elif run > 1:
            merged.append(run)
            run = size
        else:
            merged.append(size)
    if run > 1 or not merged:
        merged.append(run)
    return merged


def make_layout(shape: Sequence[int], *, max_precond_dim: int, merge_dims_: bool, precondition_1d: bool,
                channels_last: bool) -> Layout:
    """A 1-D tensor is never merged and has a factor only with ``precondition_1d``; with
    ``merge_dims`` a 4-D ``channels_last`` tensor is first seen as NCHW; a working dim has a factor
    iff its size is ``<= max_precond_dim``. A tensor with no elements has no factor."""
    shape = tuple(int(d) for d in shape)
    if 0 in shape:
        return Layout(shape, shape, False, (False,) * len(shape))
    if len(shape) == 1:
        return Layout(shape, shape, False, (precondition_1d and shape[0] <= max_precond_dim,))
    permute = merge_dims_ and channels_last and len(shape) == 4
    work = [shape[0], shape[3], shape[1], shape[2]] if permute else list(shape)
    if merge_dims_:
        work = merge_dims(work, max_precond_dim)
    return Layout(shape, work, permute, tuple(d <= max_precond_dim for d in work))
