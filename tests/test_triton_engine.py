"""The whole optimizer with backend="triton" in lockstep with the reference (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_lockstep, clone_params, make_params, run_lockstep

from soap_kernels import SOAP
from soap_kernels.ops import backend_available

ok, why = backend_available("triton")
pytestmark = pytest.mark.skipif(not ok, reason=f"Triton cannot run here: {why}")

# Tiny shapes: the interpreter runs every program instance in Python.
CASES = [
    ("two-sided", [(6, 5), (6, 5)], {}),
    ("one-sided", [(12, 5)], {"max_precond_dim": 8}),
    ("unpreconditioned", [(7,), (7,), ()], {}),
    ("normalize", [(5, 4)], {"normalize_grads": True}),
    ("mixed", [(6, 5), (5,), (4, 3, 2)], {"precondition_frequency": 4}),
]


@pytest.mark.parametrize("shapes,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_triton_matches_reference(shapes, kwargs):
    params = make_params(shapes)
    opts = {"lr": 3e-2, "precondition_frequency": 6, **kwargs}
    ref, tri = run_lockstep(params, clone_params(params), shapes, 22, opts, backends=("reference", "triton"))
    assert_lockstep(ref, tri)


def test_triton_bf16_parameters():
    shapes = [(6, 5), (5,)]
    params = make_params(shapes, dtype=torch.bfloat16)
    ref, tri = run_lockstep(params, clone_params(params), shapes, 14, {"lr": 3e-2, "precondition_frequency": 5},
                            backends=("reference", "triton"))
    assert_lockstep(ref, tri, torch.bfloat16)


def test_precision_option_needs_triton():
    with pytest.raises(ValueError, match="rotation_precision"):
        SOAP(make_params([(3, 3)]), backend="torch", rotation_precision="bf16")
    with pytest.raises(ValueError, match="rotation_precision"):
        SOAP(make_params([(3, 3)]), rotation_precision="fp8")
