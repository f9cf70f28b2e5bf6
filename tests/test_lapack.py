"""The CPU LAPACK wrappers give torch.linalg's bits whatever way they run, their choice of way
follows the latest timings (a busy period does not lock one in), and the refresh's blocked
triangular product equals the plain one."""

from __future__ import annotations

import pytest
import torch

from soap_kernels import lapack, ops


def spd_batch(batch: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, d, d + 7, generator=gen)
    return g @ g.mT


@pytest.mark.parametrize("d", [1, 5, 64, 131])
def test_qr_has_the_bits_of_torch_linalg_qr(d):
    x = spd_batch(3, d)
    q, r = lapack.qr(x)
    # lapack.qr factors every matrix alone and single-threaded (its module docstring), as the
    # reference backend does: inside one batch a matrix of odd size lies off 64-byte alignment
    # and MKL rounds it differently (d = 131 here).
    with lapack._threads(1):
        want = [torch.linalg.qr(m) for m in x]
    assert torch.equal(q, torch.stack([w[0] for w in want]))
    assert torch.equal(r, torch.stack([w[1] for w in want]))


def test_qr_of_rectangular_matrices_goes_through_torch():
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(1))
    q, r = lapack.qr(x)
    with lapack._threads(1):
        want_q, want_r = torch.linalg.qr(x)
    assert torch.equal(q, want_q) and torch.equal(r, want_r)


@pytest.mark.parametrize("batch,d", [(2, 48), (5, 48), (3, 83)])  # 83: rows off 64-byte alignment
def test_split_batch_equals_one_thread(batch, d):
    x = spd_batch(batch, d, seed=batch)
    one = lapack._one(lapack._householder_qr, x)
    split = lapack._split(lapack._householder_qr, x, 2)
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])
    # The same layout too: a GEMM reading a row-major copy of LAPACK's column-major Q rounds
    # differently (docs/DESIGN.md §7).
    assert one[0].stride() == split[0].stride() and one[1].stride() == split[1].stride()
    assert torch.equal(one[0] @ x, split[0] @ x)


def test_one_forced_thread_is_the_default_one_thread_way(monkeypatch):
    x = spd_batch(3, 83, seed=6)  # odd size: a batched call would round it differently
    want = lapack._one(lapack._householder_qr, x)
    monkeypatch.setenv("SOAP_LAPACK_THREADS", "1")
    q, r = lapack.qr(x)
    assert torch.equal(q, want[0]) and torch.equal(r, want[1])


def test_split_eigh_keeps_the_layout():
    x = spd_batch(3, 20, seed=4)
    one = lapack._one(torch.linalg.eigh, x)
    split = lapack._split(torch.linalg.eigh, x, 2)
    for a, b in zip(one, split):
        assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("d", [7, 128, 131, 200])
def test_triangular_product_symmetric(d):
    m = spd_batch(2, d, seed=d)
    q_m, r = torch.linalg.qr(m)
    out = torch.empty_like(m)
    ops._triangular_product_symmetric(r, q_m, out=out)
    want = q_m.mT.double() @ m.double() @ q_m.double()
    assert torch.equal(out, out.mT)
    err = (out.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5


def test_single_matrix_choice_does_not_decide_for_batches(monkeypatch):
    # The reference backend factors one matrix at a time; its calls must not pin the way the
    # batched engine's calls run (a single matrix has no "split" candidate).
    monkeypatch.setattr(lapack, "_choice", {})
    monkeypatch.setattr(lapack, "_choosers", {})
    monkeypatch.delenv("SOAP_LAPACK_THREADS", raising=False)
    with lapack._threads(2):
        lapack.qr(spd_batch(1, 40)[0])
        lapack.qr(spd_batch(3, 40))
    choices = lapack.thread_choice()
    assert ("qr-single", 40) in choices and ("qr", 40) in choices
    assert choices[("qr-single", 40)] == "1"


# ---------------------------------------------------------------- the choice follows the timings
class FakeTimings:
    """``lapack._clock`` and ``lapack._execute`` replaced: each call really runs (so its bits are
    checked) and the clock advances by ``cost[way]`` seconds per matrix, as the test sets them."""

    def __init__(self, monkeypatch, cost):
        self.now = 0.0
        self.cost = dict(cost)
        self.ran: list[str] = []
        self.sizes: list[int] = []
        real = lapack._execute

        def execute(way, fn, x, full, batch):
            out = real(way, fn, x, full, batch)
            self.ran.append(way)
            self.sizes.append(batch)
            self.now += self.cost[way] * batch
            return out

        monkeypatch.setattr(lapack, "_clock", lambda: self.now)
        monkeypatch.setattr(lapack, "_execute", execute)
        monkeypatch.setattr(lapack, "_choosers", {})
        monkeypatch.setattr(lapack, "_choice", {})
        monkeypatch.delenv("SOAP_LAPACK_THREADS", raising=False)
        monkeypatch.delenv("SOAP_LAPACK_MULTITHREAD", raising=False)
        monkeypatch.delenv("SOAP_LAPACK_SPLIT", raising=False)


def _calls(timings, n, x, want):
    """``n`` calls of lapack.qr on ``x`` at two threads; every result has the one-thread bits.
    Returns the way chosen after each call."""
    chosen = []
    with lapack._threads(2):
        for _ in range(n):
            q, r = lapack.qr(x)
            assert torch.equal(q, want[0]) and torch.equal(r, want[1])
            chosen.append(lapack.thread_choice()[("qr", x.shape[-1])])
    return chosen


@pytest.fixture
def batch():
    x = spd_batch(4, 24, seed=3)
    return x, lapack._one(lapack._householder_qr, x)


def test_a_busy_first_measurement_does_not_lock_in_a_choice(monkeypatch, batch):
    x, want = batch
    # The first measurements happen while another process is busy: the split looks slow.
    t = FakeTimings(monkeypatch, {"1": 1.0, "split": 3.0})
    assert _calls(t, 3, x, want)[-1] == "1"
    # The machine goes quiet and the split is now the faster way: the choice moves to it within
    # one probe interval, however long "1" had been chosen before.
    _calls(t, 200, x, want)
    t.cost["split"] = 0.5
    chosen = _calls(t, lapack.MAX_PROBE_INTERVAL + 2, x, want)
    assert chosen[-1] == "split"


def test_a_busy_period_moves_the_choice_away_and_back(monkeypatch, batch):
    x, want = batch
    t = FakeTimings(monkeypatch, {"1": 1.0, "split": 0.6})
    assert _calls(t, 10, x, want)[-1] == "split"
    # A busy period that makes the split slower than one thread: the choice leaves it at once
    # (the split's time jumped, so "1" is probed on the next call).
    t.cost["split"] = 3.0
    chosen = _calls(t, 3, x, want)
    assert chosen[1:] == ["1", "1"]
    during = _calls(t, 50, x, want)
    assert during.count("1") == len(during)
    # While it lasts, the slow way is only tried now and then (backing off), not every call.
    assert t.ran[-50:].count("split") <= 50 // lapack.MIN_PROBE_INTERVAL // 2
    # The busy period ends: back to the split.
    t.cost["split"] = 0.6
    assert _calls(t, lapack.MAX_PROBE_INTERVAL + 2, x, want)[-1] == "split"


def test_the_chosen_way_never_stays_slower_than_one_thread(monkeypatch, batch):
    # Whatever the load does, the calls run the slower way only on probes: for every stretch of
    # constant costs, after the first two calls the chosen way is the faster one.
    x, want = batch
    t = FakeTimings(monkeypatch, {"1": 1.0, "split": 0.7})
    for split_cost in (0.7, 2.5, 0.4, 1.6, 0.9, 5.0, 0.5):
        t.cost["split"] = split_cost
        chosen = _calls(t, 40, x, want)
        faster = "split" if split_cost < 1.0 else "1"
        assert chosen[-1] == faster
        assert chosen[lapack.MAX_PROBE_INTERVAL + 2:].count(faster) == len(chosen) - lapack.MAX_PROBE_INTERVAL - 2


def test_one_slow_call_does_not_move_the_choice_for_long(monkeypatch, batch):
    x, want = batch
    t = FakeTimings(monkeypatch, {"1": 1.0, "split": 0.6})
    _calls(t, 10, x, want)
    t.cost["split"] = 4.0  # one call during a spike
    _calls(t, 1, x, want)
    t.cost["split"] = 0.6
    assert _calls(t, 4, x, want)[-1] == "split"


def test_a_probe_runs_the_other_way_on_part_of_the_batch(monkeypatch):
    # Six matrices, the split chosen: a probe of one thread factors one matrix that way and the
    # other five the split way, joined into the batched call's layout with the one-thread bits.
    x = spd_batch(6, 24, seed=4)
    want = lapack._one(lapack._householder_qr, x)
    t = FakeTimings(monkeypatch, {"1": 1.0, "split": 0.5})
    _calls(t, 1, x, want)
    assert list(zip(t.ran, t.sizes)) == [("split", 6)]  # the first call: the split, whole
    with lapack._threads(2):
        q, r = lapack.qr(x)  # the next one probes one thread
    assert list(zip(t.ran, t.sizes))[1:] == [("1", 1), ("split", 5)]
    assert torch.equal(q, want[0]) and torch.equal(r, want[1])
    assert q.stride() == want[0].stride() and r.stride() == want[1].stride()
    stats = next(s for s in lapack.choice_stats() if s["op"] == "qr" and s["size"] == 24)
    assert stats["latest_s_per_matrix"] == {"split": 0.5, "1": 1.0}  # per matrix of the part
    assert stats["way"] == "split"
    # One thread chosen (the split got slow): a probe of the split runs one round of it, two
    # matrices on the two cores.
    t.cost["split"] = 3.0
    _calls(t, 4, x, want)
    assert lapack.thread_choice()[("qr", 24)] == "1"
    t.cost["split"] = 0.4
    t.ran.clear()
    t.sizes.clear()
    chosen = _calls(t, lapack.MAX_PROBE_INTERVAL + 2, x, want)
    assert chosen[-1] == "split"
    first = t.ran.index("split")
    assert (t.ran[first], t.sizes[first]) == ("split", 2) and (t.ran[first + 1], t.sizes[first + 1]) == ("1", 4)


def test_probes_back_off_while_the_choice_holds():
    c = lapack._Chooser(("1", "split"))
    cost = {"1": 1.0, "split": 0.5}
    ran = []
    for _ in range(400):
        way = c.pick()
        ran.append(way)
        c.record(way, cost[way])
    assert c.current == "split"
    assert c.interval == lapack.MAX_PROBE_INTERVAL
    assert ran[-200:].count("1") <= 200 // lapack.MAX_PROBE_INTERVAL + 1
    assert c.stats()["switches"] == 1  # "1" ran first, then the split won once and kept winning


def test_one_candidate_is_not_timed(monkeypatch):
    # A single matrix has one way (one thread): it runs without a clock.
    def no_clock():
        raise AssertionError("a call with one candidate must not be timed")

    monkeypatch.setattr(lapack, "_clock", no_clock)
    monkeypatch.setattr(lapack, "_choosers", {})
    monkeypatch.delenv("SOAP_LAPACK_THREADS", raising=False)
    monkeypatch.delenv("SOAP_LAPACK_MULTITHREAD", raising=False)
    with lapack._threads(2):
        lapack.qr(spd_batch(1, 20)[0])
    assert lapack.thread_choice()[("qr-single", 20)] == "1"
    assert any(s["op"] == "qr-single" and s["way"] == "1" for s in lapack.choice_stats())
