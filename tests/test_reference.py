"""The reference backend states docs/DESIGN.md §1 literally: checked against an independent 2-D transcription."""

from __future__ import annotations

import pytest
import torch
from conftest import make_params, report

from soap_kernels import SOAP
from soap_kernels.reference import merged_shape


def textbook_soap(p0, grads, lr, b1, b2, bs, eps, wd, freq):
    """SOAP for one matrix, written from the algorithm's statement with explicit matrices."""
    p = p0.clone()
    L = R = QL = QR = None
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    t = 0
    for g in grads:
        if QL is None:  # first step: statistics and eigenbasis only
            L, R = (1 - bs) * g @ g.T, (1 - bs) * g.T @ g
            QL = torch.linalg.eigh(L).eigenvectors.flip(1)
            QR = torch.linalg.eigh(R).eigenvectors.flip(1)
            continue
        t += 1
        gr = QL.T @ g @ QR
        m = b1 * m + (1 - b1) * gr
        v = b2 * v + (1 - b2) * gr * gr
        n = QL @ (m / (v.sqrt() + eps)) @ QR.T
        p = p - lr * (1 - b2**t) ** 0.5 / (1 - b1**t) * n
        p = p - lr * wd * p  # decoupled decay on the updated parameter
        m_orig = QL @ m @ QR.T
        L, R = bs * L + (1 - bs) * g @ g.T, bs * R + (1 - bs) * g.T @ g
        if t % freq == 0:
            oL = torch.argsort(torch.diag(QL.T @ L @ QL), descending=True)
            oR = torch.argsort(torch.diag(QR.T @ R @ QR), descending=True)
            v = v[oL][:, oR]
            QL = torch.linalg.qr(L @ QL[:, oL]).Q
            QR = torch.linalg.qr(R @ QR[:, oR]).Q
        m = QL.T @ m_orig @ QR
    return p, m, v, QL, QR, L, R


def test_reference_matches_textbook_statement():
    # Square, so that both factors are full rank at the first step: for a 9×6 gradient the 9×9
    # factor has a 3-dim null space whose eigenvectors are arbitrary (fp32 and fp64 pick different
    # ones), and the reference's trajectory depends on that choice.
    torch.manual_seed(0)
    p = make_params([(7, 7)])
    p0 = p[0].detach().clone()
    grads = [torch.randn(7, 7) for _ in range(23)]
    kw = dict(lr=0.05, b1=0.9, b2=0.97, bs=0.8, eps=1e-8, wd=0.1, freq=5)
    opt = SOAP(p, backend="reference", lr=kw["lr"], betas=(kw["b1"], kw["b2"]), shampoo_beta=kw["bs"],
               eps=kw["eps"], weight_decay=kw["wd"], precondition_frequency=kw["freq"])
    for g in grads:
        p[0].grad = g.clone()
        opt.step()
    ref = textbook_soap(p0.double(), [g.double() for g in grads], **kw)
    state = opt.state[p[0]]
    assert state["step"] == len(grads) - 1
    assert report("param", p[0].detach(), ref[0]) < 1e-5
    signs_l = torch.sign((state["Q"][0].double() * ref[3]).sum(0))
    signs_r = torch.sign((state["Q"][1].double() * ref[4]).sum(0))
    assert report("Q[0]", state["Q"][0] * signs_l, ref[3]) < 1e-4
    assert report("Q[1]", state["Q"][1] * signs_r, ref[4]) < 1e-4
    assert report("exp_avg", state["exp_avg"] * signs_l[:, None] * signs_r[None, :], ref[1]) < 1e-4
    assert report("exp_avg_sq", state["exp_avg_sq"], ref[2]) < 1e-4
    assert report("GG[0]", state["GG"][0], ref[5]) < 1e-5
    assert report("GG[1]", state["GG"][1], ref[6]) < 1e-5


def test_first_step_only_initialises():
    p = make_params([(5, 4), (3,)])
    before = [x.detach().clone() for x in p]
    opt = SOAP(p, backend="reference", shampoo_beta=0.9)
    g = torch.randn(5, 4)
    p[0].grad, p[1].grad = g.clone(), torch.randn(3)
    opt.step()
    for x, b in zip(p, before):
        assert torch.equal(x.detach(), b), "the first step must not move the parameters"
    state = opt.state[p[0]]
    assert state["step"] == 0
    assert torch.allclose(state["GG"][0], 0.1 * g @ g.T)
    evals = torch.diag(state["Q"][0].T @ state["GG"][0] @ state["Q"][0])
    assert torch.all(evals[:-1] >= evals[1:] - 1e-6), "eigenvectors by descending eigenvalue"
    assert opt.state[p[1]]["GG"] == [[]], "1-D parameters have no factor without precondition_1d"


def test_weight_decay_applies_after_the_update():
    """With lr·wd = 0.5 the order is visible: p_new = (p − s·N)·(1 − lr·wd)."""
    p = make_params([(4,)])
    p0 = p[0].detach().clone()
    opt = SOAP(p, backend="reference", lr=0.5, weight_decay=1.0, betas=(0.0, 0.0), eps=0.0)
    g = torch.tensor([1.0, -2.0, 3.0, -4.0])
    for _ in range(2):
        p[0].grad = g.clone()
        opt.step()
    # Adam with beta = 0 in an unrotated 1-D basis: N = sign(g), bias factors 1.
    expected = (p0 - 0.5 * torch.sign(g)) * (1 - 0.5 * 1.0)
    assert torch.allclose(p[0].detach(), expected)


@pytest.mark.parametrize("shape,max_dim,expected", [
    ((64, 32, 3, 3), 10000, [6144, 3]),
    ((128, 64, 3, 3), 10000, [8192, 9]),
    ((5, 5), 10, [5, 5]),
    ((2, 3, 4), 100, [24]),
    ((20000, 8), 10000, [20000, 8]),
    ((), 10000, [1]),
])
def test_merged_shape(shape, max_dim, expected):
    assert merged_shape(shape, max_dim) == expected
