"""Where the optimizer's work runs and what it communicates (docs/DESIGN.md §5).

:class:`~soap_kernels.SOAP` holds one :class:`Placement` and asks it every question whose answer
depends on how many processes share the work: which buckets this process builds and from which
state, which parameters are stepped, what must be gathered before the engine runs and sent after
it, whether any process saw a non-finite gradient, the schedule's factors and their drift, and the
full state for a checkpoint. The optimizer keeps the math and the order of a step; the placement
keeps ownership and traffic. Two placements exist:

* :class:`Local` (here): one process holds every bucket; nothing is communicated.
* :class:`soap_kernels.distributed.Sharded`: buckets are owned by the ranks of a process group
  (``ShardedSOAP`` is SOAP holding one).

A placement never changes the numbers of a step: the same buckets are formed and updated with the
same kernels wherever they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .engine import NOT_PRECONDITIONED, Bucket
from .layout import Layout

if TYPE_CHECKING:
    from .optimizer import SOAP

__all__ = ["Placement", "StepTraffic", "Local", "soap_states", "to_reference_layout"]

# A factor of the schedule's canonical order: (the parameter's layout, working dim, the bucket
# that holds it here and its row, or None where another process holds it).
Factor = tuple[Layout, int, "Bucket | None", int]


class StepTraffic:
    """One step's exchange around the engine (:meth:`Placement.begin_step`); a single process
    has none."""

    def __init__(self, loss: float | None) -> None:
        self.loss = loss  # the loss the schedule sees (on every rank the same)

    def engine_done(self) -> None:
        """After the engine's step (also when it raised): undo what was set up for it."""

    def send_updates(self) -> Callable[[], None]:
        """Start returning the updated parameters to where they live; returns the function that
        waits for them (called after the refresh, which overlaps the traffic)."""
        return lambda: None

    def any_update(self, updated: list[tuple[Bucket, list[int]]]) -> bool:
        """Whether this step updated a parameter anywhere (then the schedule advances)."""
        return bool(updated)

    def publish(self, opt: SOAP, initialized: list[Tensor]) -> None:
        """``opt.state`` entries for the parameters that got state this step."""
        for p in initialized:
            opt.state[p] = opt._engine.live_state(p)


class Placement:
    """The interface (see the module docstring). ``bind`` is called once by the optimizer."""

    opt: SOAP

    def bind(self, opt: SOAP) -> None:
        self.opt = opt

    def reset(self) -> None:
        """Forget the buckets (a new engine, a loaded checkpoint): the next :meth:`ensure` builds
        them from the full states in ``opt.state``."""
        raise NotImplementedError

    def invalidate(self) -> None:
        """The parameters changed under the buckets (a cast; a resize or move before any state):
        rebuild at the next :meth:`ensure`, every state kept."""
        raise NotImplementedError

    def built(self) -> bool:
        """Whether buckets are built (the geometry checks look there)."""
        raise NotImplementedError

    def ensure(self) -> None:
        """Build the buckets this process owns if the param groups changed, and publish
        ``opt.state``."""
        raise NotImplementedError

    def has_state(self) -> bool:
        """Whether any parameter has state on any process (a first step only initialises)."""
        raise NotImplementedError

    def local_nonfinite_flag(self) -> Tensor:
        """1.0 if a gradient this process holds is non-finite, else 0.0 (0-dim float32)."""
        raise NotImplementedError

    def any_nonfinite(self, local_flag: Tensor) -> bool:
        """The step's decision from this process's flag: the same on every process."""
        raise NotImplementedError

    def begin_step(self, loss: float | None) -> StepTraffic:
        """Agree on what is stepped and bring the engine its inputs."""
        raise NotImplementedError

    def factors(self) -> list[Factor]:
        """Every factor of every parameter, in (group, parameter, dim) order, on every process the
        same list."""
        raise NotImplementedError

    def factor_owners(self) -> list[int]:
        """The rank holding each factor of :meth:`factors` (a staggered schedule balances each
        rank's refreshes on their own)."""
        raise NotImplementedError

    def all_reduce_sum(self, vector: Tensor) -> Tensor:
        """The sum over processes of a float64 CPU vector (each factor's drift is non-zero only
        where its bucket lives, so the sum is exact)."""
        raise NotImplementedError

    def full_state(self) -> dict[Tensor, dict]:
        """Every parameter's state in the reference's layout (fresh CPU-or-device tensors), on
        every process."""
        raise NotImplementedError


class Local(Placement):
    """One process holds every bucket: the engine's buckets are a cache of ``opt.state``."""

    def __init__(self) -> None:
        self._signature: tuple | None = None

    def reset(self) -> None:
        self._signature = None

    invalidate = reset  # the live views in opt.state are the full state

    def built(self) -> bool:
        return self._signature is not None

    def ensure(self) -> None:
        opt = self.opt
        signature = opt._group_signature()
        if signature == self._signature:
            return
        # opt.state is the truth: live views of the buckets, or what a checkpoint or a copy put there.
        opt._engine.build(opt.param_groups, opt.layout_of, soap_states(opt.state))
        self._signature = signature
        for p in [k for k in opt.state if isinstance(k, Tensor)]:
            del opt.state[p]  # entries that are not a parameter's (a hook's) stay
        for p in opt._engine.where:
            live = opt._engine.live_state(p)
            if live is not None:
                opt.state[p] = live

    def has_state(self) -> bool:
        return bool(soap_states(self.opt.state))

    def local_nonfinite_flag(self) -> Tensor:
        """Non-finite: a NaN or an inf, or a squared norm beyond fp32's range (``||g|| ≳ 1.8e19``),
        which would turn SOAP's fp32 statistics (sums of squares of the gradient) into inf/NaN for
        good. One fused reduction per (device, dtype) of gradients: ``torch._foreach_norm`` (2-norm,
        accumulated and returned in fp32, so fp16 gradients do not overflow at 65504). The 2-norm,
        not the max |g|: on the CPU a max-reduction ran 12× slower (23 ms against 1.8 ms for 2 M
        values, one thread). No host synchronisation here."""
        by_kind: dict[tuple, list[Tensor]] = {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is not None and grad.numel() > 0:
                    by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        # fp64 gradients feed fp64 statistics: their norm in fp64 (fp32 would refuse to narrow them).
        flags = [torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64 if kind[1] == torch.float64 else
                                                 torch.float32)).isfinite().all().logical_not()
                 for kind, grads in by_kind.items()]
        if not flags:
            return torch.zeros(())
        device = flags[0].device
        return torch.stack([f.to(device) for f in flags]).any().float()

    def any_nonfinite(self, local_flag: Tensor) -> bool:
        return bool(local_flag.item())  # the one host read of the check

    def begin_step(self, loss: float | None) -> StepTraffic:
        return StepTraffic(loss)

    def factors(self) -> list[Factor]:
        opt = self.opt
        out = []
        for group in opt.param_groups:
            for p in group["params"]:
                bucket, row = opt._engine.where[p]
                out.extend((bucket.layout, dim, bucket, row) for dim in bucket.factor_dims)
        return out

    def factor_owners(self) -> list[int]:
        return [0] * len(self.factors())

    def all_reduce_sum(self, vector: Tensor) -> Tensor:
        return vector

    def full_state(self) -> dict[Tensor, dict]:
        return {p: to_reference_layout(s) for p, s in soap_states(self.opt.state).items()}


def soap_states(state: dict) -> dict[Tensor, dict]:
    """The entries of ``opt.state`` that are SOAP parameter states (a hook may add others)."""
    return {p: s for p, s in state.items() if isinstance(p, Tensor) and isinstance(s, dict) and "Q" in s}


def to_reference_layout(state: dict) -> dict:
    """A fresh copy of one parameter's state in the reference's layout: ``step`` an int, tensors
    contiguous; an engine state gets ``GG = Q·GG_eigenbasis·Qᵀ`` and its counts as a list."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Tensor) and k == "Q_refreshes":
            out[k] = [int(c) for c in v.tolist()]
        elif isinstance(v, Tensor):
            out[k] = v.detach().clone()
        elif isinstance(v, list):
            out[k] = [x.detach().clone() if isinstance(x, Tensor) else x for x in v]
        else:
            out[k] = v
    step = out["step"]
    out["step"] = int(step.item()) if isinstance(step, Tensor) else int(step)
    if "GG" not in out and "GG_eigenbasis" in out:
        out["GG"] = [NOT_PRECONDITIONED if len(q) == 0 else q @ b @ q.T for q, b in zip(out["Q"], out["GG_eigenbasis"])]
    first = ("step", "exp_avg", "exp_avg_sq", "GG", "Q")
    return {k: out[k] for k in (*first, *[k for k in out if k not in first])}
