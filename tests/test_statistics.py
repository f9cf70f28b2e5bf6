"""The statistics update ``update_statistics`` (soap_kernels/triton/statistics.py, soap_kernels/ops.py).

Part 1, conformance: every kernel table of ``tests/kernel_tables.py`` (the ``table`` fixture) through
:meth:`~soap_kernels.kernels.Kernels.update_statistics`, against ``βs·B + (1−βs)·G'_(i) G'_(i)ᵀ``
written out in fp64. Part 2, the Triton module's internals: ``gram``, validation messages, GPU shapes.
"""

import pytest
import torch
from kernel_tables import TOLERANCE, check, unfold_gram64

from soap_kernels import select

SHAPES = [(3, 5, 7), (1, 5, 7), (3, 1, 9), (1, 13, 1), (2, 37, 20)]  # (B, m, n); 37: 3x3 tiles
SIDES = ["both", "left", "right"]
# fp32 GEMM (K <= 37 here) plus the EMA, against fp64: the "gemm" tolerance; statistics are
# exact-fp32-product GEMMs in every table.
TOL = TOLERANCE["gemm"]


def make_stats(b, dims, sides, gen, symmetric, device):
    def one(d):
        s = torch.randn(b, d, d, generator=gen)
        return (s + s.mT if symmetric else s).to(device)

    return [one(d) if pre else None for d, pre in zip(dims, sides)]


SIDE_FLAGS = {"both": (True, True), "left": (True, False), "right": (False, True)}


# ================================================================================================
# Part 1: conformance of every table
# ================================================================================================


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_update_statistics(table, shape, sides):
    b, m, n = shape
    gen = torch.Generator().manual_seed(m * 31 + n)
    rotated = torch.randn(b, m, n, generator=gen).to(table.device)
    # A non-symmetric start: each mirrored tile must be updated from its own old value.
    stats = make_stats(b, (m, n), SIDE_FLAGS[sides], gen, symmetric=False, device=table.device)
    want = [0.95 * s.double() + 0.05 * unfold_gram64(rotated, i) if s is not None else None
            for i, s in enumerate(stats)]
    table.make().update_statistics(stats, rotated, 0.95)
    for name, got, ref in zip(("B_L", "B_R"), stats, want):
        if ref is not None:
            check(name, got, ref, *TOL)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.99])
def test_update_statistics_betas(table, beta):
    """A symmetric start, βs from a plain copy of the Gram matrix to a slow EMA. (Symmetric to
    rounding only: the torch table's ``baddbmm`` does not mirror; the Triton kernel's exact
    symmetry is checked in part 2.)"""
    gen = torch.Generator().manual_seed(1)
    b, m, n = 2, 19, 33
    rotated = torch.randn(b, m, n, generator=gen).to(table.device)
    stats = make_stats(b, (m, n), (True, True), gen, symmetric=True, device=table.device)
    want = [beta * s.double() + (1 - beta) * unfold_gram64(rotated, i) for i, s in enumerate(stats)]
    table.make().update_statistics(stats, rotated, beta)
    check("B_L", stats[0], want[0], *TOL)
    check("B_R", stats[1], want[1], *TOL)


def test_update_statistics_strided_stats(table):
    """A statistic that is a transposed (strided) view is updated in place."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 21, 10, generator=gen).to(table.device)
    stats = torch.randn(3, 10, 10, generator=gen).to(table.device).mT
    want = 0.9 * stats.double() + 0.1 * unfold_gram64(x, 1)
    table.make().update_statistics([None, stats], x, 0.9)
    check("strided B_R", stats, want, *TOL)


def test_update_statistics_tensor_bucket(table):
    """A 3-D working layout (one factor per dim, the middle one absent): the torch table only."""
    work, sides = (4, 3, 5), (True, False, True)
    ok, why = table.takes(work, preconditioned=sides)
    if not ok:
        pytest.skip(f"{table.name}: {why}")
    gen = torch.Generator().manual_seed(4)
    rotated = torch.randn(2, *work, generator=gen).to(table.device)
    stats = make_stats(2, work, sides, gen, symmetric=True, device=table.device)
    want = [0.8 * s.double() + 0.2 * unfold_gram64(rotated, i) if s is not None else None
            for i, s in enumerate(stats)]
    table.make().update_statistics(stats, rotated, 0.8)
    for i, (got, ref) in enumerate(zip(stats, want)):
        if ref is not None:
            check(f"B_{i}", got, ref, *TOL)


# ================================================================================================
# Part 2: the Triton module's internals
# ================================================================================================

TRITON_OK, TRITON_WHY = select.backend_available("triton")
triton_only = pytest.mark.skipif(not TRITON_OK, reason=f"Triton module internals: {TRITON_WHY}")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not (CUDA and TRITON_OK), reason="needs a CUDA device and Triton (large shapes)")

if TRITON_OK:
    from soap_kernels.triton.statistics import gram, update_statistics


@triton_only
def test_gram():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 21, 10, generator=gen).to(DEVICE)
    check("gram", gram(x), unfold_gram64(x, 0), *TOL)


@triton_only
def test_mirrored_tiles_exactly_symmetric():
    """The kernel computes the upper tiles and mirrors them: a symmetric start stays bitwise symmetric."""
    gen = torch.Generator().manual_seed(1)
    rotated = torch.randn(2, 19, 33, generator=gen).to(DEVICE)
    stats = make_stats(2, (19, 33), (True, True), gen, symmetric=True, device=DEVICE)
    update_statistics(stats, rotated, 0.99)
    assert torch.equal(stats[0], stats[0].mT) and torch.equal(stats[1], stats[1].mT)


@triton_only
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
    stats = make_stats(b, (m, n), (True, True), gen, symmetric=True, device=DEVICE)
    want = [0.95 * s.double() + 0.05 * unfold_gram64(rotated, i) for i, s in enumerate(stats)]
    update_statistics(stats, rotated, 0.95)
    check("B_L", stats[0], want[0], 2e-4, 1e-4)  # K up to 1000: fp32 sums of 1000 products
    check("B_R", stats[1], want[1], 2e-4, 1e-4)
