"""Refresh schedules (soap_kernels/schedules.py): pinned sequences, resume, triggers, validation."""

from __future__ import annotations

import io
import math

import numpy
import pytest
import torch

from soap_kernels.schedules import (
    Budgeted,
    Constant,
    Doubling,
    DriftAdaptive,
    Halving,
    IntervalDoubling,
    LossThreshold,
    RefreshSchedule,
    Staggered,
)


def refresh_steps(schedule: RefreshSchedule, steps: range, **inputs) -> list[int]:
    return [t for t in steps if schedule.decide(t, **inputs)]


def torch_round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_plain(value) -> None:
    """state_dict values are plain Python (what torch.load(weights_only=True) and JSON accept)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)
    else:
        assert value is None or type(value) in (bool, int, float, str), type(value)


# --- pinned sequences -----------------------------------------------------------------------------

STEPS = range(1, 41)

PINNED = [
    (Constant(1), list(STEPS)),
    (Constant(10), [10, 20, 30, 40]),
    (Constant(7), [7, 14, 21, 28, 35]),
    (Doubling(), [1, 3, 7, 15, 23, 31, 39]),
    (Doubling(start=2, clip=16), [2, 6, 14, 30]),
    (Doubling(start=1, clip=None), [1, 3, 7, 15, 31]),
    (Halving(), [8, 12, 14, *range(15, 41)]),
    (Halving(start=16, minimum=4), [16, 24, 28, 32, 36, 40]),
    # f = 1 in 1..8, 2 in 9..16, 4 in 17..24, then 8 (= interval, the default clip).
    (IntervalDoubling(1, 8), [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 40]),
    # f = 2 in 1..5, 4 in 6..10, 8 in 11..15, then clip 10: after 8, step 16 is in slot 3 (f = 10).
    (IntervalDoubling(2, 5, clip=10), [2, 4, 8, 18, 28, 38]),
    # An explicit clip above the interval allows gaps longer than one slot.
    (IntervalDoubling(1, 4, clip=16), [1, 2, 3, 4, 6, 8, 12, 28]),
]


@pytest.mark.parametrize("schedule, expected", PINNED, ids=[repr(s) for s, _ in PINNED])
def test_pinned_refresh_steps(schedule, expected):
    assert refresh_steps(schedule, STEPS) == expected


def test_interval_doubling_slot_boundary():
    """Step `interval` is the last of slot 0 (f = start); step interval + 1 is the first with 2*start."""
    schedule = IntervalDoubling(3, 10, clip=1000)
    assert [schedule.every_at(t) for t in (1, 10, 11, 20, 21, 31, 1_000_000)] == [3, 3, 6, 6, 12, 24, 1000]
    assert IntervalDoubling(1, 256).every_at(10**9) == 256  # default clip: one slot; no huge powers


def test_geometric_schedules_do_not_stall_on_skipped_steps():
    schedule = Doubling(start=4, clip=8)
    assert refresh_steps(schedule, range(1, 4)) == []
    assert schedule.decide(6)  # step 4 was never asked; the first later step refreshes
    assert refresh_steps(schedule, range(7, 30)) == [14, 22]


# --- resume ---------------------------------------------------------------------------------------

RESUMABLE = [
    lambda: Constant(6),
    lambda: Doubling(),
    lambda: Doubling(start=3, clip=None),
    lambda: Halving(),
    lambda: IntervalDoubling(1, 8),
    lambda: IntervalDoubling(2, 5, clip=10),
]


@pytest.mark.parametrize("make", RESUMABLE, ids=lambda make: repr(make()))
@pytest.mark.parametrize("split", [1, 5, 15, 23])
@pytest.mark.parametrize("through_torch_save", [False, True])
def test_resume_continues_the_sequence(make, split, through_torch_save):
    expected = refresh_steps(make(), STEPS)
    first = make()
    before = refresh_steps(first, range(1, split + 1))
    state = first.state_dict()
    assert_plain(state)
    if through_torch_save:
        state = torch_round_trip(state)
    resumed = make()
    resumed.load_state_dict(state)
    assert before + refresh_steps(resumed, range(split + 1, 41)) == expected


def test_load_state_dict_restores_hyperparameters_and_rejects_other_schedules():
    schedule = Doubling(start=4, clip=64)
    refresh_steps(schedule, range(1, 13))
    other = Doubling()
    other.load_state_dict(schedule.state_dict())
    assert repr(other) == "Doubling(start=4, clip=64)"
    assert other.state_dict() == schedule.state_dict()
    with pytest.raises(ValueError, match="Doubling schedule into a Halving"):
        Halving().load_state_dict(schedule.state_dict())
    with pytest.raises(ValueError, match="clip"):
        Doubling().load_state_dict({**schedule.state_dict(), "clip": 0})
    with pytest.raises(ValueError, match="lacks"):
        Doubling().load_state_dict({"schedule": "Doubling", "start": 1, "clip": 8})


def test_user_schedule_keeps_the_base_defaults():
    class EveryOther(RefreshSchedule):
        def __init__(self, offset: int) -> None:
            self.offset = offset

        def decide(self, t, *, loss=None, drift=None, cost=None):
            return (t + self.offset) % 2 == 0

    schedule = EveryOther(1)
    assert schedule.state_dict() == {}
    schedule.load_state_dict({})
    assert repr(schedule) == "EveryOther(offset=1)"
    assert refresh_steps(schedule, range(1, 6)) == [1, 3, 5]


def test_loss_threshold_resume():
    losses = [3.0, 2.9, 2.4, 2.3, 2.0, 1.95, 1.8, 1.6, 1.2, 1.1, 1.0, 0.6]
    reference = LossThreshold(0.5)
    expected = [t for t, loss in enumerate(losses, 1) if reference.decide(t, loss=loss)]
    assert expected == [3, 7, 9, 12]  # moved >= 0.5 from 3.0 (2.4), 2.4 (1.8), 1.8 (1.2), 1.2 (0.6)
    first = LossThreshold(0.5)
    got = [t for t, loss in enumerate(losses[:5], 1) if first.decide(t, loss=loss)]
    state = first.state_dict()
    assert_plain(state)
    resumed = LossThreshold(1.0)
    resumed.load_state_dict(torch_round_trip(state))
    assert resumed.threshold == 0.5
    got += [t for t, loss in enumerate(losses[5:], 6) if resumed.decide(t, loss=loss)]
    assert got == expected


# --- loss trigger ---------------------------------------------------------------------------------


def test_loss_threshold_first_call_records_and_does_not_refresh():
    schedule = LossThreshold(0.5)
    assert schedule.state_dict()["reference_loss"] is None
    assert not schedule.decide(1, loss=10.0)
    assert schedule.state_dict()["reference_loss"] == 10.0


def test_loss_threshold_fires_at_threshold_and_is_quiet_below():
    schedule = LossThreshold(0.25)  # exact in binary, so the boundary is exact
    assert not schedule.decide(1, loss=2.0)
    assert not schedule.decide(2, loss=1.875)  # moved 0.125
    assert not schedule.decide(3, loss=2.125)  # moved 0.125 the other way: still measured from 2.0
    assert schedule.decide(4, loss=1.75)  # moved exactly 0.25
    assert not schedule.decide(5, loss=1.75)  # reference is now 1.75
    assert not schedule.decide(6, loss=1.5 + 1e-9)
    assert schedule.decide(7, loss=2.0)  # a rise counts too
    assert schedule.decide(8, loss=torch.tensor(1.5))  # a 0-d tensor loss is accepted


def test_loss_threshold_ignores_non_finite_losses():
    schedule = LossThreshold(0.1)
    assert not schedule.decide(1, loss=math.nan)
    assert schedule.state_dict()["reference_loss"] is None
    assert not schedule.decide(2, loss=1.0)
    assert not schedule.decide(3, loss=math.inf)
    assert not schedule.decide(4, loss=math.nan)
    assert schedule.decide(5, loss=0.5)


def test_loss_threshold_missing_loss_raises():
    schedule = LossThreshold(0.3)
    assert schedule.needs_loss and not schedule.needs_drift
    with pytest.raises(ValueError, match=r"step\(closure\).*step\(loss=loss\)"):
        schedule.decide(1)


# --- drift-adaptive -------------------------------------------------------------------------------


def drift(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_drift_adaptive_fires_above_threshold_only():
    schedule = DriftAdaptive(0.1, min_every=1, max_every=1000)
    assert schedule.needs_drift and not schedule.needs_loss
    mask = schedule.decide(1, drift=drift(0.05, 0.1, 0.11, math.nan))
    assert mask.dtype == torch.bool and mask.shape == (4,)
    assert mask.tolist() == [False, False, True, False]  # strictly above; NaN never passes
    assert schedule.last_refresh == [0, 0, 1, 0]
    for t in range(2, 50):
        assert not schedule.decide(t, drift=drift(0.0, 0.1, 0.05, 0.09)).any()


def test_drift_adaptive_min_every_rate_limits():
    schedule = DriftAdaptive(0.1, min_every=3, max_every=1000)
    high = drift(0.5, 0.0)
    fired = [t for t in range(1, 13) if schedule.decide(t, drift=high)[0]]
    assert fired == [3, 6, 9, 12]  # counted from the initialising step 0, then every 3


def test_drift_adaptive_max_every_forces():
    schedule = DriftAdaptive(0.1, min_every=2, max_every=5)
    steps = [refresh_steps_of(schedule, t, drift(0.0, 0.0, 0.9)) for t in range(1, 13)]
    assert [t for t, m in enumerate(steps, 1) if m[0]] == [5, 10]
    assert [t for t, m in enumerate(steps, 1) if m[2]] == [2, 4, 6, 8, 10, 12]


def refresh_steps_of(schedule: RefreshSchedule, t: int, values: torch.Tensor) -> list[bool]:
    return schedule.decide(t, drift=values).tolist()


def test_drift_adaptive_factor_growth_and_shrink():
    schedule = DriftAdaptive(0.1, min_every=2, max_every=4)
    schedule.decide(1, drift=drift(0.0, 0.0))
    schedule.decide(2, drift=drift(0.0, 0.0))
    # A factor appended at step 3 counts as initialised there: min_every and max_every run from 3.
    assert schedule.decide(3, drift=[0.0, 0.0, 0.9]).tolist() == [False, False, False]
    assert schedule.last_refresh == [0, 0, 3]
    assert schedule.decide(4, drift=drift(0.0, 0.0, 0.0)).tolist() == [True, True, False]
    assert schedule.decide(5, drift=drift(0.0, 0.0, 0.9)).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="fixed for the optimizer's lifetime"):
        schedule.decide(6, drift=drift(0.0, 0.0))
    with pytest.raises(ValueError, match="1-D"):
        schedule.decide(6, drift=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="needs `drift`"):
        schedule.decide(6)


def drift_trace(factors: int, steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(factors, generator=generator, dtype=torch.float64) ** 3 for _ in range(steps)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: DriftAdaptive(0.3, min_every=2, max_every=7),
        lambda: Budgeted(2, max_every=6),
        lambda: Budgeted(300.0, max_every=9, by="flops"),
    ],
    ids=["drift", "budget-count", "budget-flops"],
)
@pytest.mark.parametrize("split", [0, 1, 17])
def test_per_factor_resume(make, split):
    trace = drift_trace(6, 40, seed=0)
    cost = drift(100.0, 100.0, 50.0, 200.0, 10.0, 80.0)
    reference = make()
    expected = [reference.decide(t, drift=d, cost=cost).tolist() for t, d in enumerate(trace, 1)]
    first = make()
    got = [first.decide(t, drift=d, cost=cost).tolist() for t, d in enumerate(trace[:split], 1)]
    state = first.state_dict()
    assert_plain(state)
    resumed = make()
    resumed.load_state_dict(torch_round_trip(state))
    got += [resumed.decide(t, drift=d, cost=cost).tolist() for t, d in enumerate(trace[split:], split + 1)]
    assert got == expected


def test_drift_adaptive_bounds_hold_on_a_random_trace():
    min_every, max_every = 3, 8
    schedule = DriftAdaptive(0.2, min_every=min_every, max_every=max_every)
    last = [0] * 5
    for t, d in enumerate(drift_trace(5, 200, seed=1), 1):
        mask = schedule.decide(t, drift=d).tolist()
        for k, refreshed in enumerate(mask):
            if refreshed:
                assert min_every <= t - last[k] <= max_every
                assert d[k] > 0.2 or t - last[k] == max_every
                last[k] = t
            else:
                assert t - last[k] < max_every


# --- budgeted -------------------------------------------------------------------------------------


def test_budgeted_count_spends_on_most_drifted():
    schedule = Budgeted(2, max_every=100)
    assert schedule.needs_drift
    mask = schedule.decide(1, drift=drift(0.1, 0.5, 0.3, 0.5, 0.0))
    assert mask.tolist() == [False, True, False, True, False]  # tie 0.5/0.5 broken by index
    # Zero drift is never chosen, even with budget left.
    assert schedule.decide(2, drift=drift(0.0, 0.0, 0.2, 0.0, 0.0)).tolist() == [False, False, True, False, False]


def test_budgeted_respects_count_budget_on_a_random_trace():
    schedule = Budgeted(3, max_every=50)
    for t, d in enumerate(drift_trace(10, 40, seed=2), 1):
        assert int(schedule.decide(t, drift=d).sum()) == 3  # 40 steps < max_every: nothing forced


def test_budgeted_flops_budget_is_respected_greedily():
    schedule = Budgeted(100.0, max_every=100, by="flops")
    cost = drift(60.0, 50.0, 30.0, 20.0)
    # Order by drift: 0 (60 fits, 40 left), 1 (50 does not fit, skipped), 2 (30 fits, 10 left), 3 (no).
    mask = schedule.decide(1, drift=drift(0.9, 0.8, 0.7, 0.6), cost=cost)
    assert mask.tolist() == [True, False, True, False]
    for t, d in enumerate(drift_trace(4, 40, seed=3), 2):
        mask = schedule.decide(t, drift=d, cost=cost)
        assert float(cost[mask].sum()) <= 100.0
    with pytest.raises(ValueError, match="needs `cost`"):
        schedule.decide(50, drift=drift(0.1, 0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="cost has 3 entries"):
        schedule.decide(50, drift=drift(0.1, 0.1, 0.1, 0.1), cost=drift(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        schedule.decide(50, drift=drift(0.1, 0.1, 0.1, 0.1), cost=drift(1.0, -1.0, 1.0, 1.0))


def test_budgeted_forces_at_max_every_and_counts_forced_first():
    schedule = Budgeted(2, max_every=4)
    quiet, busy = 0.0, 0.9
    # Factor 0 never drifts; factors 1 and 2 always do and take the whole budget.
    masks = [schedule.decide(t, drift=drift(quiet, busy, busy)).tolist() for t in range(1, 10)]
    assert [t for t, m in enumerate(masks, 1) if m[0]] == [4, 8]
    assert masks[3] == [True, True, False]  # step 4: forced factor 0 uses one unit of the budget
    assert all(sum(m) == 2 for m in masks)


def test_budgeted_forced_refreshes_exceed_the_budget_when_they_must():
    schedule = Budgeted(1, max_every=3)
    masks = [schedule.decide(t, drift=drift(0.0, 0.0, 0.0, 0.5)).tolist() for t in range(1, 5)]
    assert masks[0] == masks[1] == [False, False, False, True]
    assert masks[2] == [True, True, True, False]  # three forced, over a budget of one; nothing else
    flops = Budgeted(10.0, max_every=2, by="flops")
    cost = drift(8.0, 8.0, 1.0)
    assert flops.decide(1, drift=drift(0.0, 0.0, 0.0), cost=cost).tolist() == [False, False, False]
    assert flops.decide(2, drift=drift(0.0, 0.0, 0.5), cost=cost).tolist() == [True, True, True]


def test_budgeted_factor_too_costly_refreshes_only_when_forced():
    schedule = Budgeted(10.0, max_every=5, by="flops")
    cost = drift(50.0, 1.0)
    fired = [t for t in range(1, 16) if schedule.decide(t, drift=drift(0.9, 0.0), cost=cost)[0]]
    assert fired == [5, 10, 15]


def test_per_factor_schedules_are_deterministic():
    trace = drift_trace(8, 30, seed=4)
    cost = torch.linspace(1.0, 8.0, 8, dtype=torch.float64)
    for make in (lambda: DriftAdaptive(0.2, 2, 9), lambda: Budgeted(9.0, 7, "flops")):
        runs = []
        for _ in range(2):
            schedule = make()
            runs.append([schedule.decide(t, drift=d.clone(), cost=cost).tolist() for t, d in enumerate(trace, 1)])
        assert runs[0] == runs[1]


# --- arguments, repr ------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (Constant, (0,), {}),
    (Constant, (2.5,), {}),
    (Constant, (True,), {}),
    (Doubling, (0,), {}),
    (Doubling, (), {"clip": 0}),
    (Doubling, (16,), {"clip": 8}),
    (Halving, (0,), {}),
    (Halving, (4,), {"minimum": 8}),
    (Halving, (8,), {"minimum": 0}),
    (IntervalDoubling, (0, 8), {}),
    (IntervalDoubling, (1, 0), {}),
    (IntervalDoubling, (4, 8), {"clip": 2}),
    (LossThreshold, (0.0,), {}),
    (LossThreshold, (-1.0,), {}),
    (LossThreshold, (math.nan,), {}),
    (LossThreshold, ("0.3",), {}),
    (DriftAdaptive, (-0.1,), {}),
    (DriftAdaptive, (math.inf,), {}),
    (DriftAdaptive, (0.1,), {"min_every": 0}),
    (DriftAdaptive, (0.1,), {"min_every": 10, "max_every": 5}),
    (Budgeted, (0,), {}),
    (Budgeted, (1.5,), {}),
    (Budgeted, (0.0,), {"by": "flops"}),
    (Budgeted, (1,), {"by": "bytes"}),
    (Budgeted, (1,), {"max_every": 0}),
    (Budgeted, (1,), {"min_drift": -1.0}),
    (Staggered, (0,), {}),
    (Staggered, (2.0,), {}),
    (Staggered, (4,), {"blocks": [2, 0]}),
    (Staggered, (4,), {"blocks": 3}),
    (Staggered, (4,), {"together": 0}),
    (Staggered, (4,), {"together": 1.5}),
    (Staggered, (4,), {"blocks": [2], "together": 2}),
]


@pytest.mark.parametrize("cls, args, kwargs", BAD_ARGUMENTS)
def test_bad_arguments_are_rejected(cls, args, kwargs):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\("):
        cls(*args, **kwargs)


@pytest.mark.parametrize("t", [0, -3])
def test_step_counts_from_one(t):
    with pytest.raises(ValueError, match="from 1"):
        Doubling().decide(t)


def test_step_must_be_an_integer():
    with pytest.raises(TypeError, match="integer step"):
        Constant().decide(1.5)
    assert Constant(4).decide(torch.tensor(8))
    assert Constant(4).decide(numpy.int64(8))


REPRS = [
    (Constant(3), "Constant(every=3)"),
    (Doubling(), "Doubling(start=1, clip=8)"),
    (Halving(), "Halving(start=8, minimum=1)"),
    (IntervalDoubling(1, 256), "IntervalDoubling(start=1, interval=256, clip=None)"),
    (LossThreshold(0.3), "LossThreshold(threshold=0.3)"),
    (DriftAdaptive(0.1), "DriftAdaptive(threshold=0.1, min_every=1, max_every=100)"),
    (Budgeted(4), "Budgeted(budget=4, max_every=100, by='count', min_drift=0.0)"),
    (Staggered(), "Staggered(every=10, blocks=None, together=1)"),
    (Staggered(4, blocks=[2, 1]), "Staggered(every=4, blocks=[2, 1], together=1)"),
    (Staggered(4, together=2), "Staggered(every=4, blocks=None, together=2)"),
]


@pytest.mark.parametrize("schedule, text", REPRS, ids=[text for _, text in REPRS])
def test_repr_round_trips(schedule, text):
    import soap_kernels.schedules as schedules

    assert repr(schedule) == text
    assert repr(eval(text, dict(vars(schedules)))) == text


def test_all_schedules_are_exported():
    import soap_kernels
    import soap_kernels.schedules as schedules

    names = "RefreshSchedule Constant Doubling Halving IntervalDoubling LossThreshold DriftAdaptive Budgeted Staggered"
    for name in names.split():
        assert name in schedules.__all__
        assert getattr(soap_kernels, name) is getattr(schedules, name)


# --- staggered ------------------------------------------------------------------------------------


def staggered_masks(schedule: Staggered, cost: torch.Tensor, steps: range) -> dict[int, list[int]]:
    """Factor -> the steps at which it refreshed."""
    fired: dict[int, list[int]] = {k: [] for k in range(cost.numel())}
    for t in steps:
        mask = schedule.decide(t, cost=cost)
        assert mask.dtype == torch.bool and mask.shape == cost.shape
        for k in mask.nonzero().flatten().tolist():
            fired[k].append(t)
    return fired


def test_staggered_pinned_phases_and_steps():
    schedule = Staggered(3)
    assert schedule.needs_cost and not schedule.needs_drift and not schedule.needs_loss
    assert schedule.phases is None
    cost = drift(5.0, 1.0, 4.0, 3.0, 2.0)
    # Largest first onto the least loaded phase: 5 -> 0, 4 -> 1, 3 -> 2, 2 -> 2 (3 < 4 < 5), 1 -> 1.
    fired = staggered_masks(schedule, cost, range(1, 10))
    assert schedule.phases == [0, 1, 1, 2, 2]
    assert fired == {0: [3, 6, 9], 1: [1, 4, 7], 2: [1, 4, 7], 3: [2, 5, 8], 4: [2, 5, 8]}
    # Ties (equal costs, equal loads) go by factor index and phase index.
    equal = Staggered(2)
    equal.decide(1, cost=drift(1.0, 1.0, 1.0, 1.0))
    assert equal.phases == [0, 1, 0, 1]
    # every=1 is Constant(1); one phase only.
    assert Staggered(1).decide(1, cost=cost).all()


def test_staggered_blocks_share_a_phase():
    cost = drift(5.0, 1.0, 4.0, 3.0, 2.0)
    schedule = Staggered(3, blocks=[2, 2, 1])
    schedule.decide(1, cost=cost)
    # Blocks {0, 1} = 6, {2, 3} = 7, {4} = 2: 7 -> 0, 6 -> 1, 2 -> 2.
    assert schedule.phases == [1, 1, 0, 0, 2]
    # Factors beyond the blocks are single blocks.
    partial = Staggered(3, blocks=[2])
    partial.decide(1, cost=cost)
    assert partial.phases == [0, 0, 1, 2, 2]  # {0,1}=6 -> 0, 4 -> 1, 3 -> 2, 2 -> 2
    with pytest.raises(ValueError, match="covers 6 factors"):
        Staggered(3, blocks=[3, 3]).decide(1, cost=cost)


@pytest.mark.parametrize("every", [1, 3, 10])
@pytest.mark.parametrize("blocks", [None, "pairs"])
def test_staggered_balance_and_once_per_window(every, blocks):
    generator = torch.Generator().manual_seed(every)
    cost = (torch.rand(37, generator=generator, dtype=torch.float64) * 100) ** 2
    schedule = Staggered(every, blocks=[2] * 18 if blocks else None)
    fired = staggered_masks(schedule, cost, range(1, 5 * every + 1))
    largest = max(cost.tolist()) if blocks is None else max(float(cost[k : k + 2].sum()) for k in range(0, 37, 2))
    bound = largest + float(cost.sum()) / every
    for t in range(1, 5 * every + 1):
        mask = schedule.decide(t, cost=cost)
        assert float(cost[mask].sum()) <= bound * (1 + 1e-12)
    for steps in fired.values():
        # Exactly once in every window of `every` consecutive steps: equally spaced, first by `every`.
        assert len(steps) == 5
        assert steps[0] <= every and all(b - a == every for a, b in zip(steps, steps[1:]))
    if blocks:
        for k in range(0, 36, 2):
            assert fired[k] == fired[k + 1]


def test_staggered_flattens_the_bench_set():
    """The bench set's factors (issue 14: a d256, 6-layer GPT, vocab 16384), f = 10, by the cost
    model: the heaviest step carries 1.26x the average refresh work (Constant(10): 10x)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import harness
    from bench_schedules import factor_costs

    cost = torch.tensor([c for _, c in factor_costs(harness.gpt_shapes(*harness.PRESETS["cpu"]))], dtype=torch.float64)
    schedule = Staggered(10)
    per_step = [float(cost[schedule.decide(t, cost=cost)].sum()) for t in range(1, 11)]
    assert sum(per_step) == pytest.approx(float(cost.sum()))
    assert max(per_step) <= float(cost.max()) + float(cost.sum()) / 10
    assert max(per_step) / (float(cost.sum()) / 10) < 1.3


def test_staggered_appended_factors_keep_existing_phases():
    schedule = Staggered(3)
    schedule.decide(1, cost=drift(5.0, 4.0, 3.0))
    assert schedule.phases == [0, 1, 2]
    # Appended factors go onto the existing loads (5, 4, 3): 3 -> phase 2, 1 -> phase 1.
    mask = schedule.decide(2, cost=drift(5.0, 4.0, 3.0, 1.0, 3.0))
    assert schedule.phases == [0, 1, 2, 1, 2]
    assert mask.tolist() == [False, False, True, False, True]
    with pytest.raises(ValueError, match="fixed for the optimizer's lifetime"):
        schedule.decide(3, cost=drift(5.0, 4.0))
    # With blocks: the appended factors are single blocks on the existing loads (6, 4, 0).
    blocks = Staggered(3, blocks=[2, 1])
    blocks.decide(1, cost=drift(5.0, 1.0, 4.0))
    assert blocks.phases == [0, 0, 1]
    blocks.decide(2, cost=drift(5.0, 1.0, 4.0, 9.0, 2.0))
    assert blocks.phases == [0, 0, 1, 2, 1]  # 9 -> 2 (load 0), 2 -> 1 (load 4)


def test_staggered_together_sets_share_a_phase():
    # Batches: {0, 2, 3, 5} (cost 4 each) and {1, 4} (cost 1 each); sets of 2 in canonical order.
    cost = drift(4.0, 1.0, 4.0, 4.0, 1.0, 4.0)
    batch = torch.tensor([7, 3, 7, 7, 3, 7])
    schedule = Staggered(3, together=2)
    schedule.decide(1, cost=cost, batch=batch)
    # Sets {0, 2} = 8, {3, 5} = 8, {1, 4} = 2: 8 -> 0, 8 -> 1, 2 -> 2.
    assert schedule.phases == [0, 2, 0, 1, 2, 1]
    # An odd batch ends with a smaller set; sets of 3 may take a whole batch.
    odd = Staggered(3, together=2)
    odd.decide(1, cost=drift(4.0, 4.0, 4.0), batch=torch.tensor([0, 0, 0]))
    assert odd.phases == [0, 0, 1]
    whole = Staggered(2, together=3)
    whole.decide(1, cost=cost, batch=batch)
    assert whole.phases == [0, 1, 0, 0, 1, 1]  # {0, 2, 3} = 12 -> 0, {5} = 4 -> 1, {1, 4} = 2 -> 1
    # Per owner: a set never mixes ranks.
    owned = Staggered(3, together=2)
    owned.decide(1, cost=drift(4.0, 4.0, 4.0, 4.0), owner=torch.tensor([0, 1, 0, 1]), batch=torch.tensor([0, 0, 0, 0]))
    assert owned.phases[0] == owned.phases[2] and owned.phases[1] == owned.phases[3]
    with pytest.raises(ValueError, match="needs `batch`.*needs_batch"):
        Staggered(3, together=2).decide(1, cost=cost)
    with pytest.raises(ValueError, match="batch must hold"):
        Staggered(3, together=2).decide(1, cost=cost, batch=torch.zeros(6))
    # together=1 ignores batch: the same phases as without it.
    assert Staggered(3).decide(1, cost=cost, batch=batch).tolist() == Staggered(3).decide(1, cost=cost).tolist()


@pytest.mark.parametrize("every", [3, 10])
def test_staggered_together_balance_and_once_per_window(every):
    generator = torch.Generator().manual_seed(every)
    sizes = torch.randint(0, 4, (37,), generator=generator)
    cost = ((sizes + 1).to(torch.float64) * 10) ** 3  # equal cost within a batch, as the shapes give
    schedule = Staggered(every, together=2)
    fired: dict[int, list[int]] = {k: [] for k in range(37)}
    for t in range(1, 5 * every + 1):
        mask = schedule.decide(t, cost=cost, batch=sizes)
        for k in mask.nonzero().flatten().tolist():
            fired[k].append(t)
        assert float(cost[mask].sum()) <= 2 * float(cost.max()) + float(cost.sum()) / every
    for steps in fired.values():
        assert len(steps) == 5 and steps[0] <= every and all(b - a == every for a, b in zip(steps, steps[1:]))
    # Within each batch the factors pair up, in canonical order.
    for b in sizes.unique().tolist():
        members = (sizes == b).nonzero().flatten().tolist()
        for k in range(0, len(members) - 1, 2):
            assert fired[members[k]] == fired[members[k + 1]]


def test_staggered_together_appended_and_old_state():
    schedule = Staggered(3, together=2)
    schedule.decide(1, cost=drift(4.0, 4.0), batch=torch.tensor([0, 0]))
    assert schedule.phases == [0, 0]
    # Appended factors pair among themselves, also with a batch already seen.
    schedule.decide(2, cost=drift(4.0, 4.0, 4.0, 4.0, 1.0), batch=torch.tensor([0, 0, 0, 0, 1]))
    assert schedule.phases == [0, 0, 1, 1, 2]
    # Later calls that add no factor need no batch.
    assert schedule.decide(3, cost=drift(4.0, 4.0, 4.0, 4.0, 1.0)).tolist() == [True, True, False, False, False]
    # A state saved before `together` existed loads as together=1.
    old = Staggered(5)
    old.load_state_dict({"schedule": "Staggered", "every": 3, "blocks": None, "phases": [0, 2]})
    assert old.together == 1 and old.phases == [0, 2]
    state = schedule.state_dict()
    assert_plain(state)
    resumed = Staggered()
    resumed.load_state_dict(torch_round_trip(state))
    assert resumed.together == 2 and resumed.phases == schedule.phases


def test_staggered_rejects_bad_cost():
    with pytest.raises(ValueError, match="needs `cost`.*needs_cost"):
        Staggered(3).decide(1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        Staggered(3).decide(1, cost=drift(1.0, math.nan))
    with pytest.raises(ValueError, match="1-D"):
        Staggered(3).decide(1, cost=torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("split", [0, 1, 7, 12])
@pytest.mark.parametrize("blocks", [None, [2, 1, 3]])
def test_staggered_resume(split, blocks):
    cost = drift(100.0, 100.0, 50.0, 200.0, 10.0, 80.0)
    reference = Staggered(4, blocks)
    expected = [reference.decide(t, cost=cost).tolist() for t in range(1, 30)]
    first = Staggered(4, blocks)
    got = [first.decide(t, cost=cost).tolist() for t in range(1, split + 1)]
    state = first.state_dict()
    assert_plain(state)
    assert state["phases"] == (None if split == 0 else reference.phases)
    resumed = Staggered(9)
    resumed.load_state_dict(torch_round_trip(state))
    assert resumed.every == 4 and resumed.blocks == blocks
    # Resumed with other cost values: the saved phases stay (they are not recomputed).
    later = cost if split == 0 else cost.flip(0)
    got += [resumed.decide(t, cost=later).tolist() for t in range(split + 1, 30)]
    assert got == expected
    with pytest.raises(ValueError, match="phases must be < every"):
        Staggered(4).load_state_dict({"schedule": "Staggered", "every": 4, "blocks": None, "phases": [0, 4]})


# --- staggered with the optimizer -----------------------------------------------------------------

STAGGER_SHAPES = [(12, 8), (12, 8), (8,), (6, 5, 4), (20, 3), (5, 4)]


def _run_soap(backend: str, schedule, steps: int, shapes=STAGGER_SHAPES, cls=None, **kwargs):
    from conftest import apply_grads, grad_stream, make_params

    from soap_kernels import SOAP

    params = make_params(shapes)
    opt = (cls or SOAP)(params, lr=1e-2, weight_decay=0.01, max_precond_dim=16, backend=backend, schedule=schedule, **kwargs)
    for grads in grad_stream(shapes, steps):
        apply_grads(params, grads)
        opt.step()
    return opt, params


class _Recording(Staggered):
    """Staggered that keeps what the optimizer passed."""

    def decide(self, t, *, loss=None, drift=None, cost=None, **extra):
        self.seen = (t, cost.clone())
        self.extra = extra
        mask = super().decide(t, loss=loss, drift=drift, cost=cost, **extra)
        self.fired = [*getattr(self, "fired", []), mask.clone()]
        return mask


def test_staggered_reference_and_engine_in_lockstep():
    from conftest import assert_lockstep

    ref, _ = _run_soap("reference", Staggered(4), 13)
    eng, _ = _run_soap("torch", Staggered(4), 13)
    assert ref.schedule.phases == eng.schedule.phases
    assert len(set(ref.schedule.phases)) > 1  # the factors really are spread
    assert_lockstep(ref, eng)


def test_staggered_gets_the_cost_and_refreshes_what_it_says():
    from soap_kernels.reference import make_layout

    schedule = _Recording(4)
    opt, _ = _run_soap("torch", schedule, 13)  # the initialising step, then updates 1..12
    layouts = [
        make_layout(s, max_precond_dim=16, merge_dims=False, precondition_1d=False, channels_last=False) for s in STAGGER_SHAPES
    ]
    factors = sum(sum(layout.preconditioned) for layout in layouts)
    t, cost = schedule.seen
    assert t == 12 and cost.dtype == torch.float64 and cost.numel() == factors
    assert (cost > 0).all()
    # 12 updates, every=4: every factor refreshed exactly three times; the engine counted them.
    assert torch.stack(schedule.fired).sum(0).tolist() == [3] * factors
    assert sum(b["refreshes"] for b in opt.buckets_info()) == 3 * factors
    # Spread: no step refreshed every factor.
    assert max(int(m.sum()) for m in schedule.fired) < factors


@pytest.mark.parametrize("together", [2, 3])
def test_staggered_together_with_the_optimizer(together):
    """The optimizer passes equal batch ids to factors of one shape and dim, on both backends; the
    sets refresh together and the engine stays in lockstep with the reference."""
    from conftest import assert_lockstep

    ref, _ = _run_soap("reference", Staggered(4, together=together), 13)
    schedule = _Recording(4, together=together)
    eng, _ = _run_soap("torch", schedule, 13)
    batch = schedule.extra["batch"]
    # STAGGER_SHAPES: (12, 8) twice, (8,), (6, 5, 4), (20, 3), (5, 4); max_precond_dim 16.
    assert batch.dtype == torch.int64 and batch.tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]
    assert ref.schedule.phases == eng.schedule.phases
    phases = eng.schedule.phases
    assert phases[0] == phases[2] and phases[1] == phases[3]  # the two (12, 8) parameters' factors
    assert torch.stack(schedule.fired).sum(0).tolist() == [3] * len(phases)
    assert_lockstep(ref, eng)


def test_staggered_one_block_is_constant():
    """All factors in one block share phase 0, i.e. t % every == 0: Constant(every), bit for bit."""
    shapes = [(12, 8)]
    a, pa = _run_soap("torch", Staggered(3, blocks=[2]), 10, shapes)
    b, pb = _run_soap("torch", Constant(3), 10, shapes)
    assert a.schedule.phases == [0, 0]
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_staggered_optimizer_state_dict_resume():
    from conftest import apply_grads, grad_stream, make_params

    from soap_kernels import SOAP

    full, full_params = _run_soap("torch", Staggered(4), 14)
    params = make_params(STAGGER_SHAPES)
    first = SOAP(params, lr=1e-2, weight_decay=0.01, max_precond_dim=16, backend="torch", schedule=Staggered(4))
    stream = list(grad_stream(STAGGER_SHAPES, 14))
    for grads in stream[:7]:
        apply_grads(params, grads)
        first.step()
    state = torch_round_trip(first.state_dict())
    assert state["schedule"]["phases"] == full.schedule.phases
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SOAP(resumed_params, lr=1e-2, weight_decay=0.01, max_precond_dim=16, backend="torch", schedule=Staggered(4))
    resumed.load_state_dict(state)
    for grads in stream[7:]:
        apply_grads(resumed_params, grads)
        resumed.step()
    assert resumed.schedule.phases == full.schedule.phases
    assert all(torch.equal(x, y) for x, y in zip(resumed_params, full_params))


def test_staggered_with_sharded_soap_without_process_group():
    """ShardedSOAP at world size 1 passes the same cost vector and refreshes the same factors."""
    from soap_kernels.distributed import ShardedSOAP

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, pa = _run_soap("torch", Staggered(4), 11)
        b, pb = _run_soap("torch", Staggered(4), 11, cls=ShardedSOAP)
    finally:
        torch.set_num_threads(threads)
    assert b.world_size == 1
    assert a.schedule.phases == b.schedule.phases
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_staggered_balances_each_owner_on_its_own():
    """The global balance would give owner 0 both of its factors at phase 0 (costs 4, 4, 2, 2)."""
    cost = torch.tensor([4.0, 4.0, 2.0, 2.0], dtype=torch.float64)
    one = Staggered(2)
    one.decide(1, cost=cost)
    assert one.phases == [0, 1, 0, 1]
    per_owner = Staggered(2)
    per_owner.decide(1, cost=cost, owner=torch.tensor([0, 1, 0, 1]))
    assert per_owner.phases == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="owner"):
        Staggered(2).decide(1, cost=cost, owner=torch.tensor([0, 1]))


def test_staggered_asks_for_batch_ids_only_when_it_uses_them():
    assert not Staggered(4).needs_batch and Staggered(4, together=2).needs_batch

    class OldStyle(Staggered):  # a subclass written before `batch` existed
        def decide(self, t, *, loss=None, drift=None, cost=None, owner=None):
            return super().decide(t, loss=loss, drift=drift, cost=cost, owner=owner)

    opt, _ = _run_soap("torch", OldStyle(4), 9)
    assert len(set(opt.schedule.phases)) > 1
