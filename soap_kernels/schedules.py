"""Preconditioner refresh schedules (DESIGN §4).

A schedule decides, after the update of step ``t``, whether SOAP refreshes its eigenbasis.
``t`` counts optimizer updates, 1-based; the initialising first step does not count (as in the
reference). ``SOAP(..., schedule=None)`` keeps the reference's rule: a parameter refreshes when its
own update count is a multiple of its group's ``precondition_frequency``. With a schedule object the
decision is global: the optimizer calls :meth:`RefreshSchedule.decide` once per step, after every
parameter has been updated, with the optimizer-wide update count.

Protocol (what the optimizer relies on):

* ``decide(t, *, loss=None, drift=None, cost=None) -> bool | torch.Tensor``. Return ``True`` to
  refresh every factor, ``False`` for none, or a 1-D ``torch.bool`` mask with one entry per factor
  (per-factor schedules). ``loss`` is a float, given when ``needs_loss``. ``drift`` and ``cost`` are
  1-D float64 CPU tensors with one entry per eigenbasis factor, in an order that is fixed for the
  optimizer's lifetime, given when ``needs_drift``: ``drift`` is the rotated-frame off-diagonal
  drift ``||B - diag B||_F / ||B||_F`` of each factor, ``cost`` its refresh cost in FLOPs.
* ``state_dict()`` / ``load_state_dict(state)``: plain Python values, saved with the optimizer.
* The decision depends only on ``t``, ``loss``, ``drift``, ``cost`` and the schedule's own state, so
  every rank of a distributed run that feeds the same values takes the same decision.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["RefreshSchedule", "Constant"]


class RefreshSchedule:
    """Base class of refresh schedules; see the module docstring for the protocol."""

    needs_loss: bool = False
    needs_drift: bool = False

    def decide(
        self,
        t: int,
        *,
        loss: float | None = None,
        drift: torch.Tensor | None = None,
        cost: torch.Tensor | None = None,
    ) -> bool | torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Constant(RefreshSchedule):
    """Refresh when ``t % every == 0`` (the reference's behaviour)."""

    def __init__(self, every: int = 10) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Constant(every=...) must be an integer >= 1, got {every!r}")
        self.every = every

    def decide(self, t: int, *, loss=None, drift=None, cost=None) -> bool:
        return t % self.every == 0
