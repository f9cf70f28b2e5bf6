"""second_moment="adafactor" is Shampoo with exponent 1/2 (the paper's equivalence).

With the eigenbasis exact for the current statistics (L = G Gᵀ, R = Gᵀ G: β2 = βs = 0) and no
momentum, Adafactor's row/column accumulators in the eigenbasis are the eigenvalues of L and R,
v̂ = r cᵀ / tr(L), so the update direction is  √tr(L) · L^{-1/2} G R^{-1/2}.
"""

from __future__ import annotations

import pytest
import torch
from conftest import report

from soap_kernels import SOAP


def exact_eigenbasis(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(m.double()).eigenvectors.flip(1).float()


def inverse_sqrt(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(m)
    return evecs @ torch.diag(evals.rsqrt()) @ evecs.T


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_adafactor_mode_is_shampoo_with_exponent_half(backend):
    torch.manual_seed(0)
    n, m = 6, 6  # square: L and R invertible
    p = torch.nn.Parameter(torch.randn(n, m))
    lr = 0.1
    opt = SOAP([p], lr=lr, betas=(0.0, 0.0), shampoo_beta=0.0, eps=0.0, weight_decay=0.0, correct_bias=False,
               precondition_frequency=10**6, second_moment="adafactor", backend=backend)
    p.grad = torch.randn(n, m)
    opt.step()  # initialises the state
    g = torch.randn(n, m, dtype=torch.float64)
    left, right = g @ g.T, g.T @ g
    # Put the exact eigenbasis of this step's statistics in place (as if recomputed every step).
    sd = opt.state_dict()
    state = sd["state"][0]
    state["Q"] = [exact_eigenbasis(left), exact_eigenbasis(right)]
    state["GG"] = [left.float(), right.float()]
    state.pop("GG_eigenbasis", None)
    state.pop("Q_refreshes", None)
    opt.load_state_dict(sd)
    before = p.detach().double().clone()
    p.grad = g.float()
    opt.step()
    direction = (before - p.detach().double()) / lr
    shampoo = torch.trace(left).sqrt() * inverse_sqrt(left) @ g @ inverse_sqrt(right)
    assert report("adafactor direction vs sqrt(tr L) L^-1/2 G R^-1/2", direction, shampoo) < 1e-4


def test_adam_mode_differs_from_shampoo():
    """The same construction with Adam's full second moment is not Shampoo (the test can fail)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 6))
    # eps = 1e-30, not 0: a rotated entry that comes out exactly 0 would be 0/0 in Adam's division.
    opt = SOAP([p], lr=0.1, betas=(0.0, 0.0), shampoo_beta=0.0, eps=1e-30, weight_decay=0.0, correct_bias=False,
               precondition_frequency=10**6, backend="reference")
    p.grad = torch.randn(6, 6)
    opt.step()
    g = torch.randn(6, 6, dtype=torch.float64)
    left, right = g @ g.T, g.T @ g
    opt.state[p]["Q"] = [exact_eigenbasis(left), exact_eigenbasis(right)]
    before = p.detach().double().clone()
    p.grad = g.float()
    opt.step()
    direction = (before - p.detach().double()) / 0.1
    shampoo = torch.trace(left).sqrt() * inverse_sqrt(left) @ g @ inverse_sqrt(right)
    assert torch.linalg.norm(direction - shampoo) / torch.linalg.norm(shampoo) > 0.1
