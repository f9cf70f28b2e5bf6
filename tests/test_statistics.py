"""Triton statistics update (soap_kernels.triton.statistics) against soap_kernels.ops and plain math."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from soap_kernels import ops  # noqa: E402

pytest.importorskip("triton")
from soap_kernels.triton import available  # noqa: E402

if not available()[0]:
    pytest.skip(available()[1], allow_module_level=True)

from soap_kernels.triton.statistics import gram, update_statistics  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (large shapes)")

# (atol, rtol) against the torch op / fp64 math: statistics are always exact-fp32-product GEMMs.
TOL = {"fp32_vs_torch": (2e-5, 2e-5), "fp32_vs_fp64": (5e-5, 5e-5), "gpu_large": (2e-4, 1e-4)}

SHAPES = [(3, 5, 7), (1, 5, 7), (3, 1, 9), (1, 13, 1), (2, 37, 20)]  # (B, m, n); 37: 3x3 tiles
SIDES = ["both", "left", "right"]


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    print(f"{name}: max {err.max().item():.3e}  mean {err.mean().item():.3e}  (atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def make_stats(b, m, n, sides, gen, symmetric):
    def one(d):
        s = torch.randn(b, d, d, generator=gen)
        return (s + s.mT if symmetric else s).to(DEVICE)

    return [one(m) if sides in ("both", "left") else None, one(n) if sides in ("both", "right") else None]


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_update_statistics_matches_ops(shape, sides):
    b, m, n = shape
    gen = torch.Generator().manual_seed(m * 31 + n)
    rotated = torch.randn(b, m, n, generator=gen).to(DEVICE)
    # A non-symmetric start: each mirrored tile must be updated from its own old value.
    stats = make_stats(b, m, n, sides, gen, symmetric=False)
    want = [s.clone() if s is not None else None for s in stats]
    ops.update_statistics(want, rotated, 0.95)
    update_statistics(stats, rotated, 0.95)
    for name, got, ref in zip(("B_L", "B_R"), stats, want):
        if ref is not None:
            check(name, got, ref, *TOL["fp32_vs_torch"])


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.99])
def test_update_statistics_plain_math(beta):
    gen = torch.Generator().manual_seed(1)
    b, m, n = 2, 19, 33
    rotated = torch.randn(b, m, n, generator=gen).to(DEVICE)
    stats = make_stats(b, m, n, "both", gen, symmetric=True)
    g = rotated.double()
    want_l = beta * stats[0].double() + (1 - beta) * g @ g.mT
    want_r = beta * stats[1].double() + (1 - beta) * g.mT @ g
    update_statistics(stats, rotated, beta)
    check("B_L", stats[0], want_l, *TOL["fp32_vs_fp64"])
    check("B_R", stats[1], want_r, *TOL["fp32_vs_fp64"])
    assert torch.equal(stats[0], stats[0].mT) and torch.equal(stats[1], stats[1].mT)


def test_gram_and_strided_stats():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 21, 10, generator=gen).to(DEVICE)
    check("gram", gram(x), x.double() @ x.double().mT, *TOL["fp32_vs_fp64"])
    stats = torch.randn(3, 10, 10, generator=gen).to(DEVICE).mT  # a transposed (strided) view
    want = 0.9 * stats.double() + 0.1 * x.double().mT @ x.double()
    update_statistics([None, stats], x, 0.9)
    check("strided B_R", stats, want, *TOL["fp32_vs_fp64"])


def test_validation_messages():
    x = torch.randn(2, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"stats\[0\] \(B_L\) must have shape"):
        update_statistics([torch.zeros(2, 3, 3, device=DEVICE), None], x, 0.9)
    with pytest.raises(TypeError, match="rotated_grad must have dtype"):
        update_statistics([None, None], x.double(), 0.9)
    with pytest.raises(ValueError, match="bucket of matrices"):
        update_statistics([None, None], x[0], 0.9)
    with pytest.raises(ValueError, match="stats must be"):
        update_statistics([None], x, 0.9)


@gpu_only
@pytest.mark.parametrize("shape", [(4, 768, 256), (2, 300, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_large(shape):
    b, m, n = shape
    gen = torch.Generator().manual_seed(3)
    rotated = torch.randn(b, m, n, generator=gen).to(DEVICE)
    stats = make_stats(b, m, n, "both", gen, symmetric=True)
    g = rotated.double()
    want_l = 0.95 * stats[0].double() + 0.05 * g @ g.mT
    want_r = 0.95 * stats[1].double() + 0.05 * g.mT @ g
    update_statistics(stats, rotated, 0.95)
    check("B_L", stats[0], want_l, *TOL["gpu_large"])
    check("B_R", stats[1], want_r, *TOL["gpu_large"])
