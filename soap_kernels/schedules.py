"""Preconditioner refresh schedules (docs/DESIGN.md §4).

A schedule decides, after the update of step ``t``, whether SOAP refreshes its eigenbasis.
``t`` counts optimizer updates, 1-based; the initialising first step does not count (as in the
reference), so every eigenbasis counts as computed at step 0. ``SOAP(..., schedule=None)`` keeps the
reference's rule: a parameter refreshes when its own update count is a multiple of its group's
``precondition_frequency``. With a schedule object the decision is global: the optimizer calls
:meth:`RefreshSchedule.decide` once per step, after every parameter has been updated, with the
optimizer-wide update count.

Protocol (what the optimizer relies on):

* ``decide(t, *, loss=None, drift=None, cost=None) -> bool | torch.Tensor``. Return ``True`` to
  refresh every factor, ``False`` for none, or a 1-D ``torch.bool`` CPU mask with one entry per
  factor (per-factor schedules). ``loss`` is a float, given when ``needs_loss``. ``drift`` and
  ``cost`` are 1-D float64 CPU tensors with one entry per eigenbasis factor, in an order that is
  fixed for the optimizer's lifetime (factors may only be appended, e.g. by ``add_param_group``),
  given when ``needs_drift`` (``cost`` also when ``needs_cost``): ``drift`` is the rotated-frame
  off-diagonal drift ``||B - diag B||_F / ||B||_F`` of each factor, ``cost`` its refresh cost in
  FLOPs (``ops.FLOPS.refresh`` of that factor alone). A schedule with ``needs_owner`` also gets
  ``owner``, a 1-D int64 CPU tensor: the rank that holds each factor, when the factors are held
  by more than one rank (``ShardedSOAP``; never in one process). A schedule with ``needs_batch``
  also gets ``batch``, a 1-D int64 CPU tensor: factors with equal entries have the same working
  shape and dim, so the engine refreshes them in one batched call when they are chosen at the
  same step (one LAPACK batch, which it can split over threads).
* ``state_dict()`` / ``load_state_dict(state)``: plain Python values (ints, floats, strings, lists),
  saved with the optimizer. The dict holds the hyperparameters and the progress, and loading
  restores both (as ``torch.optim.lr_scheduler`` does), so a resumed run continues the same
  sequence of decisions.
* The decision depends only on ``t``, ``loss``, ``drift``, ``cost`` and the schedule's own state, so
  every rank of a distributed run that feeds the same values takes the same decision.

Schedules (the first five are those of the schedule study in ``seeds/``; ``f`` is the current
refresh interval and ``last`` the step of the last refresh, 0 at the start):

* ``Constant(every)``: ``t % every == 0``.
* ``Doubling(start=1, clip=8)``: ``t - last >= f``, then ``f <- min(clip, 2f)``.
* ``Halving(start=8, minimum=1)``: ``t - last >= f``, then ``f <- max(minimum, f // 2)``.
* ``IntervalDoubling(start, interval, clip=None)``: ``t - last >= f(t)`` with
  ``f(t) = min(clip, start * 2**((t - 1) // interval))``; ``clip=None`` means ``max(start, interval)``.
* ``LossThreshold(threshold)``: ``|loss - loss at the last refresh| >= threshold``.
* ``DriftAdaptive(threshold, min_every=1, max_every=100)``: per factor, drift above ``threshold``
  (at most every ``min_every`` steps), or ``max_every`` steps without a refresh.
* ``Budgeted(budget, max_every=100, by="count")``: per factor, a per-step budget (factors or FLOPs)
  spent on the most-drifted factors; factors ``max_every`` steps stale are forced.
* ``Staggered(every=10, blocks=None, together=1)``: per factor, ``t % every == phase[k]``: every
  factor refreshes once every ``every`` updates, as under ``Constant(every)``, with the phases spread
  by refresh cost so that each step carries about ``1/every`` of the refresh work (a flat step
  instead of a spike); ``together=k`` keeps factors of one batch in sets of ``k`` (one LAPACK
  batch that ``k`` threads share).

``Doubling`` and ``Halving`` test ``t - last >= f`` where the study writes ``==``: with consecutive
``t`` (what the optimizer feeds) the two are the same, and ``>=`` does not stall for good if a step
number is ever skipped.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Literal

import torch

__all__ = [
    "RefreshSchedule",
    "Constant",
    "Doubling",
    "Halving",
    "IntervalDoubling",
    "LossThreshold",
    "DriftAdaptive",
    "Budgeted",
    "Staggered",
]


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}({name}=...) must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(owner: str, name: str, value: Any, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}({name}=...) must be a finite number {bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{owner}({name}=...) must be a finite number {bound}, got {value!r}")
    return value


def _check_step(t: Any) -> int:
    try:
        step = operator.index(t)  # ints, numpy ints, one-element integer tensors
    except TypeError:
        raise TypeError(f"decide(t) needs an integer step count, got {t!r}") from None
    if step < 1:
        raise ValueError(f"decide(t) counts optimizer updates from 1, got t={step}")
    return step


def _as_factor_vector(name: str, value: Any, schedule: str) -> torch.Tensor:
    if value is None:
        raise ValueError(
            f"{schedule} needs `{name}` (one entry per eigenbasis factor); the optimizer passes it "
            "when schedule.needs_drift is True"
        )
    if isinstance(value, torch.Tensor):
        vector = value.detach().to(device="cpu", dtype=torch.float64)
    else:
        vector = torch.as_tensor(value, dtype=torch.float64)
    if vector.dim() != 1:
        shape = tuple(vector.shape)
        raise ValueError(f"{schedule}: `{name}` must be 1-D (one entry per factor), got shape {shape}")
    return vector


class RefreshSchedule:
    """Base class of refresh schedules; see the module docstring for the protocol.

    A user schedule subclasses this and implements :meth:`decide`, plus ``state_dict`` /
    ``load_state_dict`` if it keeps state (the defaults save nothing).
    """

    needs_loss: bool = False
    needs_drift: bool = False
    # True: ``decide`` gets ``cost`` (each factor's refresh FLOPs) even without ``needs_drift``.
    needs_cost: bool = False
    # True: ``decide`` also gets ``owner`` (the rank holding each factor) when factors are held by
    # more than one rank.
    needs_owner: bool = False
    # True: ``decide`` also gets ``batch`` (equal entries: factors refreshed in one batched call when
    # chosen together).
    needs_batch: bool = False

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


class _Schedule(RefreshSchedule):
    """Base of the built-in schedules: ``state_dict``, ``load_state_dict`` and ``__repr__`` built
    from ``_config`` (the constructor arguments) and ``_progress`` / ``_load_progress`` (what
    changes while training).

    The state dict is ``{"schedule": class name, **constructor arguments, **progress}``. Loading
    checks the class name, re-validates the arguments through the constructor and takes them over,
    then restores the progress.
    """

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _progress(self) -> dict[str, Any]:
        return {}

    def _load_progress(self, progress: dict[str, Any]) -> None:
        del progress

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": type(self).__name__, **self._config(), **self._progress()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        if state.get("schedule", name) != name:
            raise ValueError(f"cannot load the state of a {state['schedule']} schedule into a {name}")
        config = self._config()
        missing = [key for key in (*config, *self._progress()) if key not in state]
        if missing:
            raise ValueError(f"{name}.load_state_dict: the state lacks {missing}")
        fresh = type(self)(**{key: state[key] for key in config})
        vars(self).update(vars(fresh))
        self._load_progress(state)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"


class Constant(_Schedule):
    """Refresh when ``t % every == 0`` (the reference's behaviour). Stateless."""

    def __init__(self, every: int = 10) -> None:
        self.every = _check_int("Constant", "every", every, 1)

    def decide(self, t: int, *, loss=None, drift=None, cost=None) -> bool:
        return _check_step(t) % self.every == 0

    def _config(self) -> dict[str, Any]:
        return {"every": self.every}


class _GeometricInterval(_Schedule):
    """Shared body of Doubling and Halving: refresh after ``every`` steps, then rescale ``every``."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.every = start  # the current interval f
        self.last_refresh = 0

    def _next_every(self) -> int:
        raise NotImplementedError

    def decide(self, t: int, *, loss=None, drift=None, cost=None) -> bool:
        t = _check_step(t)
        if t - self.last_refresh < self.every:
            return False
        self.last_refresh = t
        self.every = self._next_every()
        return True

    def _progress(self) -> dict[str, Any]:
        return {"every": self.every, "last_refresh": self.last_refresh}

    def _load_progress(self, progress: dict[str, Any]) -> None:
        name = type(self).__name__
        self.every = _check_int(f"{name}.load_state_dict", "every", progress["every"], 1)
        self.last_refresh = _check_int(f"{name}.load_state_dict", "last_refresh", progress["last_refresh"], 0)


class Doubling(_GeometricInterval):
    """Refresh when ``t - last_refresh >= f``; then ``f <- min(clip, 2f)`` (study, Algorithm 2).

    ``f`` starts at ``start`` and ``last_refresh`` at 0. ``Doubling(1, 8)`` refreshes at steps
    1, 3, 7, 15, 23, 31, ... ``clip=None`` lets ``f`` grow without bound (refreshes at
    ``start * (2**k - 1)``).
    """

    def __init__(self, start: int = 1, clip: int | None = 8) -> None:
        start = _check_int("Doubling", "start", start, 1)
        if clip is not None:
            clip = _check_int("Doubling", "clip", clip, 1)
            if clip < start:
                raise ValueError(f"Doubling(clip=...) must be >= start={start}, got {clip}")
        super().__init__(start)
        self.clip = clip

    def _next_every(self) -> int:
        doubled = 2 * self.every
        return doubled if self.clip is None else min(self.clip, doubled)

    def _config(self) -> dict[str, Any]:
        return {"start": self.start, "clip": self.clip}


class Halving(_GeometricInterval):
    """Refresh when ``t - last_refresh >= f``; then ``f <- max(minimum, f // 2)`` (Algorithm 3).

    ``f`` starts at ``start`` and ``last_refresh`` at 0. ``Halving(8)`` refreshes at steps
    8, 12, 14, 15, 16, 17, ...
    """

    def __init__(self, start: int = 8, minimum: int = 1) -> None:
        start = _check_int("Halving", "start", start, 1)
        minimum = _check_int("Halving", "minimum", minimum, 1)
        if minimum > start:
            raise ValueError(f"Halving(minimum=...) must be <= start={start}, got {minimum}")
        super().__init__(start)
        self.minimum = minimum

    def _next_every(self) -> int:
        return max(self.minimum, self.every // 2)

    def _config(self) -> dict[str, Any]:
        return {"start": self.start, "minimum": self.minimum}


class IntervalDoubling(_Schedule):
    """Refresh every ``f`` steps, where ``f`` doubles at the end of each slot of ``interval`` steps.

    Slot ``k`` (0-based) is the steps ``k*interval + 1 ... (k+1)*interval``; at step ``t`` the slots
    before the current one are completed, ``(t - 1) // interval`` of them, so::

        f(t) = min(clip, start * 2**((t - 1) // interval))

    i.e. step ``interval`` is still in the first slot (``f = start``) and step ``interval + 1`` is
    the first with ``2*start``. A refresh happens when ``t - last_refresh >= f(t)`` (``last_refresh``
    starts at 0 and is not reset at slot boundaries). ``IntervalDoubling(1, 8)`` refreshes at
    1..8, then 10, 12, 14, 16, then 20, 24, then 32, 40, 48, ...

    ``clip=None`` clips at ``max(start, interval)``: ``f`` stops doubling once it spans a whole slot,
    so every slot still refreshes at least once. Without a clip, once ``f`` outgrows a slot the gap
    since the last refresh grows linearly while ``f`` grows exponentially, and refreshes stop for
    good. (The study's Algorithm 4 also freezes ``f`` once ``f >= interval``.) Pass an explicit
    ``clip`` larger than ``interval`` to allow gaps longer than one slot.
    """

    def __init__(self, start: int, interval: int, clip: int | None = None) -> None:
        self.start = _check_int("IntervalDoubling", "start", start, 1)
        self.interval = _check_int("IntervalDoubling", "interval", interval, 1)
        if clip is not None:
            clip = _check_int("IntervalDoubling", "clip", clip, 1)
            if clip < self.start:
                raise ValueError(f"IntervalDoubling(clip=...) must be >= start={self.start}, got {clip}")
        self.clip = clip
        self.last_refresh = 0

    @property
    def effective_clip(self) -> int:
        """The bound on ``f``: ``clip``, or ``max(start, interval)`` when ``clip`` is None."""
        return self.clip if self.clip is not None else max(self.start, self.interval)

    def every_at(self, t: int) -> int:
        """The refresh interval ``f(t)`` in force at step ``t``."""
        t = _check_step(t)
        clip = self.effective_clip
        doublings = (t - 1) // self.interval
        # start * 2**doublings >= clip as soon as 2**doublings >= clip; stop before huge powers.
        if doublings >= clip.bit_length():
            return clip
        return min(clip, self.start << doublings)

    def decide(self, t: int, *, loss=None, drift=None, cost=None) -> bool:
        t = _check_step(t)
        if t - self.last_refresh < self.every_at(t):
            return False
        self.last_refresh = t
        return True

    def _config(self) -> dict[str, Any]:
        return {"start": self.start, "interval": self.interval, "clip": self.clip}

    def _progress(self) -> dict[str, Any]:
        return {"last_refresh": self.last_refresh}

    def _load_progress(self, progress: dict[str, Any]) -> None:
        self.last_refresh = _check_int(
            "IntervalDoubling.load_state_dict", "last_refresh", progress["last_refresh"], 0
        )


class LossThreshold(_Schedule):
    """Refresh when ``|loss - reference_loss| >= threshold`` (study, Algorithm 5).

    ``reference_loss`` is the loss at the last refresh. The first call that sees a finite loss only
    records it as the reference and does not refresh: the eigenbasis was computed by the
    initialising step just before, so there is no change to react to yet. Hence step 1 never
    refreshes. The loss is whatever the optimizer was given for step ``t`` (the closure's return
    value or ``step(loss=...)``), taken as a Python float.

    A non-finite loss (NaN, inf) never triggers a refresh and never becomes the reference: a
    diverged batch should not rebuild the basis nor move the yardstick.
    """

    needs_loss = True

    def __init__(self, threshold: float) -> None:
        self.threshold = _check_float("LossThreshold", "threshold", threshold, positive=True)
        self.reference_loss: float | None = None

    def decide(self, t: int, *, loss: float | None = None, drift=None, cost=None) -> bool:
        _check_step(t)
        if loss is None:
            raise ValueError(
                "LossThreshold needs the loss of each step: call optimizer.step(closure) with a closure "
                "that returns the loss, or optimizer.step(loss=loss)"
            )
        loss = float(loss)
        if not math.isfinite(loss):
            return False
        if self.reference_loss is None:
            self.reference_loss = loss
            return False
        if abs(loss - self.reference_loss) < self.threshold:
            return False
        self.reference_loss = loss
        return True

    def _config(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def _progress(self) -> dict[str, Any]:
        return {"reference_loss": self.reference_loss}

    def _load_progress(self, progress: dict[str, Any]) -> None:
        reference = progress["reference_loss"]
        self.reference_loss = None if reference is None else float(reference)


class _PerFactor(_Schedule):
    """Shared bookkeeping of the per-factor schedules: the step of each factor's last refresh.

    The first call fixes the factor count, with every factor last refreshed at step 0 (the
    initialising step). Factors may be appended later (``add_param_group``): an appended factor
    counts as refreshed at the step it first appears, since its basis was just initialised. A call
    with fewer factors than before raises: the factor order is fixed for the optimizer's lifetime.
    """

    needs_drift = True

    def __init__(self) -> None:
        self._last_refresh: torch.Tensor | None = None  # int64 [factors], None before the first call

    def _steps_since(self, t: int, factors: int) -> torch.Tensor:
        name = type(self).__name__
        if self._last_refresh is None:
            self._last_refresh = torch.zeros(factors, dtype=torch.int64)
        known = self._last_refresh.numel()
        if factors < known:
            raise ValueError(
                f"{name} was tracking {known} factors and now got {factors}; the factor order is fixed "
                "for the optimizer's lifetime (factors may only be appended)"
            )
        if factors > known:
            appended = torch.full((factors - known,), t, dtype=torch.int64)
            self._last_refresh = torch.cat([self._last_refresh, appended])
        return t - self._last_refresh

    def _record(self, t: int, mask: torch.Tensor) -> torch.Tensor:
        assert self._last_refresh is not None
        self._last_refresh[mask] = t
        return mask

    @property
    def last_refresh(self) -> list[int] | None:
        """The step of each factor's last refresh (None before the first call)."""
        return None if self._last_refresh is None else self._last_refresh.tolist()

    def _progress(self) -> dict[str, Any]:
        return {"last_refresh": self.last_refresh}

    def _load_progress(self, progress: dict[str, Any]) -> None:
        last = progress["last_refresh"]
        if last is None:
            self._last_refresh = None
            return
        last = torch.as_tensor(last, dtype=torch.int64).reshape(-1).clone()
        if (last < 0).any():
            raise ValueError(f"{type(self).__name__}.load_state_dict: negative last_refresh steps")
        self._last_refresh = last


class DriftAdaptive(_PerFactor):
    """Per factor: refresh when its drift passes ``threshold``, at most every ``min_every`` steps and
    at least every ``max_every`` steps.

    Factor ``k`` refreshes at step ``t`` when
    ``(drift[k] > threshold and t - last[k] >= min_every) or t - last[k] >= max_every``.
    A NaN drift never passes the threshold (the ``max_every`` bound still applies). Returns a
    ``torch.bool`` mask with one entry per factor. See ``_PerFactor`` for factor bookkeeping.
    """

    def __init__(self, threshold: float, min_every: int = 1, max_every: int = 100) -> None:
        super().__init__()
        self.threshold = _check_float("DriftAdaptive", "threshold", threshold, positive=False)
        self.min_every = _check_int("DriftAdaptive", "min_every", min_every, 1)
        self.max_every = _check_int("DriftAdaptive", "max_every", max_every, 1)
        if self.max_every < self.min_every:
            raise ValueError(
                f"DriftAdaptive(max_every=...) must be >= min_every={self.min_every}, got {self.max_every}"
            )

    def decide(self, t: int, *, loss=None, drift: torch.Tensor | None = None, cost=None) -> torch.Tensor:
        t = _check_step(t)
        drift = _as_factor_vector("drift", drift, "DriftAdaptive")
        since = self._steps_since(t, drift.numel())
        mask = ((drift > self.threshold) & (since >= self.min_every)) | (since >= self.max_every)
        return self._record(t, mask)

    def _config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_every": self.min_every, "max_every": self.max_every}


class Budgeted(_PerFactor):
    """Per factor: a fixed refresh budget per step, spent on the factors that drifted most.

    ``by="count"``: at most ``budget`` factors (an integer) refresh per step. ``by="flops"``: the
    refreshed factors' ``cost`` (FLOPs, given by the optimizer) sums to at most ``budget``. So the
    refresh work is spread evenly instead of spiking on some steps.

    Each step:

    1. Factors not refreshed for ``max_every`` steps are forced, and their count / cost is taken
       from the budget first. If the forced ones alone exceed the budget, they are all refreshed
       anyway (staleness is bounded; that step goes over budget) and nothing else is.
    2. The rest of the budget goes greedily, in order of decreasing drift (ties: lower factor index
       first), to the factors with ``drift > min_drift`` that are neither forced nor appended at this
       step (see ``_PerFactor``): a factor is taken if its cost fits in what is left, else skipped
       for the next one (so with ``by="flops"`` a factor that costs more than the whole budget
       refreshes only when forced). NaN drift is never chosen.

    Choose ``budget * max_every`` at or above the number of factors (by count) or their total cost
    (by FLOPs), otherwise forced refreshes pile up and spike. Returns a ``torch.bool`` mask with one
    entry per factor. See ``_PerFactor`` for factor bookkeeping.
    """

    def __init__(
        self,
        budget: float,
        max_every: int = 100,
        by: Literal["count", "flops"] = "count",
        *,
        min_drift: float = 0.0,
    ) -> None:
        super().__init__()
        if by not in ("count", "flops"):
            raise ValueError(f'Budgeted(by=...) must be "count" or "flops", got {by!r}')
        self.by = by
        if by == "count":
            self.budget: int | float = _check_int("Budgeted", "budget", budget, 1)
        else:
            self.budget = _check_float("Budgeted", "budget", budget, positive=True)
        self.max_every = _check_int("Budgeted", "max_every", max_every, 1)
        self.min_drift = _check_float("Budgeted", "min_drift", min_drift, positive=False)

    def decide(
        self, t: int, *, loss=None, drift: torch.Tensor | None = None, cost: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = _check_step(t)
        drift = _as_factor_vector("drift", drift, "Budgeted")
        factors = drift.numel()
        if self.by == "flops":
            cost = _as_factor_vector("cost", cost, 'Budgeted(by="flops")')
            if cost.numel() != factors:
                raise ValueError(f"Budgeted: cost has {cost.numel()} entries, drift has {factors}")
            if not bool(torch.isfinite(cost).all()) or bool((cost < 0).any()):
                raise ValueError("Budgeted: cost must be finite and >= 0 FLOPs per factor")
            costs = cost.tolist()
        else:
            costs = [1] * factors
        since = self._steps_since(t, factors)
        mask = since >= self.max_every
        left = self.budget - sum(c for c, forced in zip(costs, mask.tolist(), strict=True) if forced)
        eligible = (~mask) & (since >= 1) & (drift > self.min_drift)
        candidates = eligible.nonzero().flatten()
        # Stable sort of -drift: decreasing drift, ties by factor index, the same on every rank.
        order = candidates[torch.argsort(-drift[candidates], stable=True)].tolist()
        for k in order:
            if left <= 0 and self.by == "count":
                break
            if costs[k] <= left:
                mask[k] = True
                left -= costs[k]
        return self._record(t, mask)

    def _config(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "max_every": self.max_every,
            "by": self.by,
            "min_drift": self.min_drift,
        }


class Staggered(_Schedule):
    """Per factor: ``Constant(every)``'s refresh rate with the refreshes spread over the steps.

    Factor ``k`` refreshes at step ``t`` when ``t % every == phase[k]``, so each factor refreshes
    exactly once in every window of ``every`` consecutive updates (every ``every`` updates, as
    ``Constant(every)`` and the reference's ``precondition_frequency`` do), but the factors do not
    all refresh at the same step. The phases balance the refresh cost: each step refreshes about
    ``1/every`` of the total refresh FLOPs instead of all of it every ``every``-th step, which
    flattens the step time. Opt-in; ``Constant(every)`` stays the reference's behaviour.

    **Phases.** At the first call, from the ``cost`` vector the optimizer passes (``needs_cost``):
    the blocks (see ``blocks``; by default every factor is its own block) are taken in order of
    decreasing cost (ties: lower first factor index first) and each goes to the phase ``0..every-1``
    with the least cost so far (ties: the lower phase). This greedy list scheduling bounds the most
    loaded phase by ``total / every + the largest block's cost``. The phases depend only on the cost
    vector, so every rank of a distributed run computes the same ones; they are saved in
    ``state_dict()``, so a resumed run keeps them. Later changes of the cost values do not move
    them (the costs come from the shapes and do not change).

    **Per rank.** With ``ShardedSOAP`` each rank refreshes only the factors it owns, so a balance
    over all factors could still give one rank all of its refreshes at one step. The optimizer
    passes each factor's owning rank (``owner``, as ``needs_owner`` asks; a single process passes
    none) and the greedy rule balances the phases of each rank's factors on their own: each rank's
    steps then carry about ``1/every`` of that rank's refresh work. A block goes with the owner of
    its first factor (a parameter's factors share one owner). With one owner the phases are the
    single-process ones; with several they differ from them (another valid staggering, so a
    sharded run and a single-process run under ``Staggered`` refresh at other steps).

    **First refresh.** Phase 0 is ``t = every, 2*every, ...`` (the reference's steps); phase
    ``p > 0`` refreshes first at step ``p``, i.e. earlier than under ``Constant(every)``. So no
    factor ever goes more than ``every`` updates without a refresh (counting the initialising step
    as the refresh at step 0), and the per-step refresh work is flat from the first window on.

    **Factor count changes.** Fewer factors than before raises (the factor order is fixed for the
    optimizer's lifetime). Appended factors (``add_param_group``) keep every existing phase and are
    placed, each as its own block (with ``together > 1``: in sets among themselves), by the same
    greedy rule onto the phase loads of the existing factors; so the bound above still holds.

    ``blocks``: ``None`` (per factor: the finest balance; a parameter's factors may refresh at
    different steps, which the refresh math allows: factor ``i``'s new basis depends only on its
    own statistics and basis, and re-expressing the moments along dim ``i`` commutes with the other
    dims) or a list of positive ints, the sizes of consecutive runs of factors in the canonical
    (group, parameter, dim) order that share one phase; e.g. the factor count of each parameter,
    ``[sum(opt.layout_of(p, g).preconditioned) for g in opt.param_groups for p in g["params"]
    if any(opt.layout_of(p, g).preconditioned)]``, keeps each parameter's factors together as the
    reference does. ``sum(blocks)`` may not exceed the factor count at the first call (a check that
    the blocks describe this optimizer); factors beyond it, appended ones included, are single
    blocks.

    ``together``: with ``k > 1``, the factors that the engine would refresh in one batched call
    (same working shape and dim: the ``batch`` ids the optimizer passes, as ``needs_batch`` asks)
    and that one rank holds are taken in canonical order in sets of ``k`` (the last set of a batch
    may be smaller), and each set is placed as one block. A step then hands LAPACK ``k`` matrices
    of one size at once, which ``k`` threads share (one matrix at a time leaves the other threads
    idle during its QR: at 2 threads on the ``cpu`` set ``together=1`` cost 11 % more per step
    amortized than ``Constant(every)``, benchmarks/NOTES.md item 35), at the price of a coarser
    balance (the bound above with a set's cost as the largest block). ``1`` (the default) places
    every factor on its own; not combinable with ``blocks``. Returns a ``torch.bool`` mask with one
    entry per factor.
    """

    needs_cost = True
    needs_owner = True

    @property
    def needs_batch(self) -> bool:  # type: ignore[override]
        """Only ``together > 1`` uses the batch ids (so a subclass written before them still
        gets the calls it expects)."""
        return self.together > 1

    def __init__(self, every: int = 10, blocks: list[int] | None = None, together: int = 1) -> None:
        self.every = _check_int("Staggered", "every", every, 1)
        if blocks is not None:
            if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
                raise ValueError(f"Staggered(blocks=...) must be None or a list of integers >= 1, got {blocks!r}")
            blocks = [_check_int("Staggered", "blocks", b, 1) for b in blocks]
        self.blocks = blocks
        self.together = _check_int("Staggered", "together", together, 1)
        if blocks is not None and self.together > 1:
            raise ValueError("Staggered(blocks=..., together=...): blocks and together > 1 cannot be combined (both decide which "
                             "factors share a phase); pass one of them")
        self._phase: list[int] | None = None  # one phase per factor, None before the first call

    @property
    def phases(self) -> list[int] | None:
        """Each factor's phase (``t % every`` of its refresh steps); None before the first call."""
        return None if self._phase is None else list(self._phase)

    def _units(self, factors: int, known: int, owners: list[int], batch: list[int] | None) -> list[list[int]]:
        """The blocks as lists of factor indices, then single factors up to ``factors``; with
        ``together > 1`` the factors from ``known`` on in sets of one (owner, batch)."""
        if self.together > 1:
            assert batch is not None
            sets: dict[tuple[int, int], list[list[int]]] = {}
            for k in range(known, factors):
                chunks = sets.setdefault((owners[k], batch[k]), [[]])
                if len(chunks[-1]) == self.together:
                    chunks.append([])
                chunks[-1].append(k)
            return sorted((chunk for chunks in sets.values() for chunk in chunks), key=lambda unit: unit[0])
        units, start = [], 0
        for size in self.blocks or ():
            units.append(list(range(start, start + size)))
            start += size
        units.extend([k] for k in range(start, factors))
        return units

    def _assign(self, costs: list[float], owners: list[int], batch: list[int] | None) -> None:
        factors = len(costs)
        phase = list(self._phase or [])
        known = len(phase)
        load: dict[int, list[float]] = {}  # per owner, per phase
        for k in range(known):
            load.setdefault(owners[k], [0.0] * self.every)[phase[k]] += costs[k]
        phase.extend([-1] * (factors - known))
        # Blocks lie within the factors of the first call (checked there), so a unit is either
        # placed already or wholly new.
        pending = [(sum(costs[k] for k in unit), unit) for unit in self._units(factors, known, owners, batch)
                   if unit[0] >= known]
        for cost, unit in sorted(pending, key=lambda item: (-item[0], item[1][0])):
            mine = load.setdefault(owners[unit[0]], [0.0] * self.every)
            p = min(range(self.every), key=lambda j: (mine[j], j))
            mine[p] += cost
            for k in unit:
                phase[k] = p
        self._phase = phase

    def decide(self, t: int, *, loss=None, drift=None, cost: torch.Tensor | None = None,
               owner: torch.Tensor | None = None, batch: torch.Tensor | None = None) -> torch.Tensor:
        """``owner``: each factor's owning rank (``None``: one process); ``batch``: each factor's
        batch id (used with ``together > 1``, which needs it)."""
        t = _check_step(t)
        if cost is None:
            raise ValueError(
                "Staggered needs `cost` (each factor's refresh FLOPs); the optimizer passes it when "
                "schedule.needs_cost is True"
            )
        cost = _as_factor_vector("cost", cost, "Staggered")
        if not bool(torch.isfinite(cost).all()) or bool((cost < 0).any()):
            raise ValueError("Staggered: cost must be finite and >= 0 FLOPs per factor")
        factors = cost.numel()
        known = 0 if self._phase is None else len(self._phase)
        if factors < known:
            raise ValueError(
                f"Staggered was tracking {known} factors and now got {factors}; the factor order is fixed "
                "for the optimizer's lifetime (factors may only be appended)"
            )
        if self._phase is None and self.blocks is not None and sum(self.blocks) > factors:
            raise ValueError(
                f"Staggered(blocks=...) covers {sum(self.blocks)} factors, the optimizer has {factors}"
            )
        if owner is None:
            owners = [0] * factors
        else:
            owner = torch.as_tensor(owner)
            if owner.shape != (factors,) or owner.is_floating_point() or bool((owner < 0).any()):
                raise ValueError(f"Staggered: owner must hold one rank (an integer >= 0) per factor ({factors}), "
                                 f"got {tuple(owner.shape)} {owner.dtype}")
            owners = owner.tolist()
        batches = None
        if self.together > 1 and (factors > known or self._phase is None):
            if batch is None:
                raise ValueError(
                    f"Staggered(together={self.together}) needs `batch` (each factor's batch id); the optimizer "
                    "passes it when schedule.needs_batch is True"
                )
            batch = torch.as_tensor(batch)
            if batch.shape != (factors,) or batch.is_floating_point():
                raise ValueError(f"Staggered: batch must hold one integer id per factor ({factors}), "
                                 f"got {tuple(batch.shape)} {batch.dtype}")
            batches = batch.tolist()
        if factors > known or self._phase is None:
            self._assign(cost.tolist(), owners, batches)
        assert self._phase is not None
        return torch.tensor(self._phase, dtype=torch.int64) == t % self.every

    def _config(self) -> dict[str, Any]:
        return {"every": self.every, "blocks": None if self.blocks is None else list(self.blocks),
                "together": self.together}

    def _progress(self) -> dict[str, Any]:
        return {"phases": self.phases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A state saved before ``together`` existed placed every factor on its own.
        super().load_state_dict({"together": 1, **state})

    def _load_progress(self, progress: dict[str, Any]) -> None:
        phases = progress["phases"]
        if phases is None:
            self._phase = None
            return
        phases = [_check_int("Staggered.load_state_dict", "phases", p, 0) for p in phases]
        if any(p >= self.every for p in phases):
            raise ValueError(f"Staggered.load_state_dict: phases must be < every={self.every}")
        self._phase = phases
