"""``torch.compile(opt.step)``: a small fixed set of graphs, no graph break on a non-refresh step,
the same parameters as eager."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from soap_kernels import SOAP

pytest.importorskip("torch._dynamo")
import torch._dynamo.testing  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

STEPS = 24
FREQUENCY = 5


def _run(compiled: bool, backend: str = "torch", **opts):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3))
    opt = SOAP(model.parameters(), backend=backend, precondition_frequency=FREQUENCY, nonfinite="ignore", **opts)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(opt.step, backend=counter) if compiled else opt.step
    gen = torch.Generator().manual_seed(1)
    trace = []
    for _ in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        breaks = sum(counters["graph_break"].values())
        step()
        trace.append((counter.frame_count, sum(counters["graph_break"].values()) - breaks))
    return [p.detach().clone() for p in model.parameters()], trace


@pytest.mark.parametrize("opts", [{}, {"normalize_grads": True}, {"weight_decay": 0.0, "correct_bias": False}],
                         ids=["default", "normalize-grads", "no-decay-no-bias"])
def test_compiled_step_is_a_fixed_set_of_graphs_and_matches_eager(opts):
    torch._dynamo.reset()
    compiled, trace = _run(True, **opts)
    eager, _ = _run(False, **opts)
    print("(frames compiled so far, graph breaks while compiling) per step:", trace)
    # Step 0 initialises (LAPACK eigh: graph breaks), steps 1..4 settle the dynamic step counters,
    # step 5 is the first refresh (QR: graph breaks). After that nothing is compiled again, at
    # refresh steps (10, 15, 20) or between them.
    frames_after_warmup = trace[FREQUENCY + 1][0]
    assert all(frames == frames_after_warmup for frames, _ in trace[FREQUENCY + 1:]), trace
    # A non-refresh step compiles without a graph break.
    assert all(breaks == 0 for _, breaks in trace[1:FREQUENCY]), trace
    assert frames_after_warmup <= 60
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-6
