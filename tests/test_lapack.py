"""The CPU LAPACK wrappers give torch.linalg's bits whatever way they run, and the refresh's
blocked triangular product equals the plain one."""

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
    with lapack._threads(1):  # lapack.qr factors every matrix single-threaded (its module docstring)
        want_q, want_r = torch.linalg.qr(x)
    assert torch.equal(q, want_q)
    assert torch.equal(r, want_r)


def test_qr_of_rectangular_matrices_goes_through_torch():
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(1))
    q, r = lapack.qr(x)
    with lapack._threads(1):
        want_q, want_r = torch.linalg.qr(x)
    assert torch.equal(q, want_q) and torch.equal(r, want_r)


@pytest.mark.parametrize("batch", [2, 5])
def test_split_batch_equals_one_thread(batch):
    x = spd_batch(batch, 48, seed=batch)
    one = lapack._one(lapack._householder_qr, x)
    split = lapack._split(lapack._householder_qr, x, 2)
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])


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
    monkeypatch.delenv("SOAP_LAPACK_THREADS", raising=False)
    with lapack._threads(2):
        lapack.qr(spd_batch(1, 40)[0])
        lapack.qr(spd_batch(3, 40))
    choices = lapack.thread_choice()
    assert ("qr-single", 40) in choices and ("qr", 40) in choices
    assert choices[("qr-single", 40)] == "1"
