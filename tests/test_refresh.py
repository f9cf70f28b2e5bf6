"""Triton/CholeskyQR refresh (soap_kernels.triton.refresh) against soap_kernels.ops and plain math."""

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

from soap_kernels.triton import refresh  # noqa: E402
from soap_kernels.triton.refresh import (  # noqa: E402
    cholesky_qr,
    permute_along,
    reexpress_exp_avg,
    refresh_factor,
    refresh_moments_,
    reorthonormalize_,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (large factors)")

# (atol, rtol). Against ops.refresh_factor (fp32 Householder) on well-conditioned statistics both
# are accurate to a few fp32 ulps; orthonormality and A = QR are checked in fp64 terms.
TOL = {
    "vs_ops": (1e-5, 1e-5),
    "orthonormal": 1e-5,  # max |QᵀQ − I| of an fp32 result
    "orthonormal_fp64": 1e-12,  # same, CholeskyQR's fp64 result
    "residual_fp64": 1e-12,  # max |A − QR| / max |A|, fp64 input
    "gemm_fp32": (2e-5, 2e-5),
    "gpu_vs_ops": (2e-4, 2e-4),
}

SIZES = [(3, 5), (1, 1), (1, 13), (2, 37)]  # (rows R, d)


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    print(f"{name}: max {err.max().item():.3e}  mean {err.mean().item():.3e}  (atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def orthonormality_error(q: torch.Tensor) -> float:
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)
    return (q.mT @ q - eye).abs().max().item()


def spd_stats(rows: int, d: int, gen: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    """Symmetric positive definite, eigenvalues in [spread⁻¹, 1]-ish times d, well separated diagonal."""
    basis, _ = torch.linalg.qr(torch.randn(rows, d, d, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), d, dtype=torch.float64)
    eig = eig[torch.randperm(d, generator=gen)]
    s = basis @ torch.diag_embed(eig.expand(rows, d)) @ basis.mT
    return (0.5 * (s + s.mT)).float().to(DEVICE)


def orthonormal(rows: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, d, d, generator=gen, dtype=torch.float64))
    return q.float().contiguous().to(DEVICE)


@pytest.mark.parametrize("rows,d", SIZES)
def test_refresh_factor_matches_ops(rows, d):
    gen = torch.Generator().manual_seed(d)
    stats = spd_stats(rows, d, gen, spread=1e3)
    q = orthonormal(rows, d, gen)
    s_ref, q_ref = stats.clone(), q.clone()
    perm_ref, mix_ref = ops.refresh_factor(s_ref, q_ref)
    perm, mix = refresh_factor(stats, q)
    assert torch.equal(perm, perm_ref)
    check("q_mix", mix, mix_ref, *TOL["vs_ops"])
    check("q", q, q_ref, *TOL["vs_ops"])
    check("stats", stats, s_ref, *TOL["vs_ops"])
    assert torch.equal(stats, stats.mT)


def test_refresh_factor_converged_basis_stays_put():
    """A diagonal (already converged) rotated-frame statistic: Q only gets permuted, B stays diagonal."""
    gen = torch.Generator().manual_seed(0)
    d = 9
    diag = torch.rand(2, d, generator=gen) + 0.1
    stats = torch.diag_embed(diag).to(DEVICE)
    q = orthonormal(2, d, gen)
    q_start = q.clone()
    perm, mix = refresh_factor(stats, q)
    check("q_mix", mix, torch.eye(d).expand(2, d, d), 1e-6, 0)
    check("q", q, q_start.take_along_dim(perm[:, None, :], dim=2), 1e-6, 0)
    check("stats", stats, torch.diag_embed(diag.sort(dim=-1, descending=True).values), 1e-6, 0)


def test_refresh_factor_ill_conditioned_no_fallback():
    """Eigenvalues over 10 decades: shifted CholeskyQR3 still gives an orthonormal, accurate Q_m."""
    gen = torch.Generator().manual_seed(1)
    rows, d = 2, 24
    stats = spd_stats(rows, d, gen, spread=1e10)
    q = orthonormal(rows, d, gen)
    permuted_before = stats.clone()
    before = dict(refresh.FALLBACKS)
    perm, mix = refresh_factor(stats, q)
    assert refresh.FALLBACKS["rows"] == before["rows"], "well-defined ill-conditioned input fell back"
    print("orthonormality q_mix", orthonormality_error(mix), "q", orthonormality_error(q))
    assert orthonormality_error(mix) < TOL["orthonormal"]
    assert orthonormality_error(q) < TOL["orthonormal"]
    a = permuted_before.take_along_dim(perm[:, :, None], dim=1).take_along_dim(perm[:, None, :], dim=2)
    # stats = R Q_m = Q_mᵀ A Q_m (exact arithmetic): check it in the norm of A.
    check("stats = Q_mᵀ A Q_m", stats, mix.double().mT @ a.double() @ mix.double(), 1e-6, 0)


def test_cholesky_qr_properties_and_fallback():
    gen = torch.Generator().manual_seed(2)
    d = 20
    x = torch.randn(4, d, 3, generator=gen, dtype=torch.float64)
    a = x @ x.mT  # rank 3
    a[1] = torch.randn(d, d, generator=gen, dtype=torch.float64)  # generic, full rank
    a[2, 4, :] = 0  # an exactly zero row and column: CholeskyQR cannot factor this one
    a[2, :, 4] = 0
    a[3] = 0  # all zero (a parameter that never saw a gradient)
    before = refresh.FALLBACKS["rows"]
    q, r = cholesky_qr(a.to(DEVICE))
    print("fallback rows:", refresh.FALLBACKS["rows"] - before)
    assert refresh.FALLBACKS["rows"] - before >= 2  # rows 2 and 3 at least
    for i in range(4):
        assert orthonormality_error(q[i]) < TOL["orthonormal_fp64"], i
        residual = (a[i] - (q[i] @ r[i]).cpu()).abs().max() / a[i].abs().max().clamp_min(1e-300)
        assert residual < TOL["residual_fp64"], (i, residual)
        assert torch.equal(r[i], r[i].triu())
        assert (r[i].diagonal() >= 0).all()
    # The generic row is unique (positive diag R): equal to Householder's, sign-fixed.
    q_h, r_h = torch.linalg.qr(a[1])
    signs = torch.sign(r_h.diagonal())
    check("generic row vs Householder", q[1], q_h * signs, 1e-12, 0)


def test_reexpress_and_permute_match_torch():
    gen = torch.Generator().manual_seed(3)
    b, m, n = 3, 13, 6
    exp_avg = torch.randn(b, m, n, generator=gen).to(DEVICE)
    for axis, d in ((1, m), (2, n)):
        perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(b)]).to(DEVICE)
        mix = orthonormal(b, d, gen)
        if axis == 1:
            want = mix.mT @ exp_avg.take_along_dim(perm[:, :, None], dim=1)
            want_perm = exp_avg.take_along_dim(perm[:, :, None], dim=1)
        else:
            want = exp_avg.take_along_dim(perm[:, None, :], dim=2) @ mix
            want_perm = exp_avg.take_along_dim(perm[:, None, :], dim=2)
        check(f"reexpress axis {axis}", reexpress_exp_avg(exp_avg, perm, mix, axis), want, *TOL["gemm_fp32"])
        assert torch.equal(permute_along(exp_avg, perm, axis), want_perm)


@pytest.mark.parametrize("axis", [1, 2])
def test_refresh_keeps_the_momentum_in_the_parameter_frame(axis):
    """After refresh + re-expression, rotating exp_avg back gives the same parameter-frame momentum."""
    gen = torch.Generator().manual_seed(4 + axis)
    b, m, n = 2, 11, 7
    d = m if axis == 1 else n
    stats = spd_stats(b, d, gen, spread=1e2)
    q = orthonormal(b, d, gen)
    exp_avg = torch.randn(b, m, n, generator=gen).to(DEVICE)
    exp_avg_sq = torch.rand(b, m, n, generator=gen).to(DEVICE)
    qs_old = [q.clone(), None] if axis == 1 else [None, q.clone()]
    frame_before = ops.rotate_back(exp_avg, qs_old)
    sq_before = exp_avg_sq.clone()
    perm, mix = refresh_factor(stats, q)
    refresh_moments_(exp_avg, exp_avg_sq, perm, mix, axis)
    qs_new = [q, None] if axis == 1 else [None, q]
    check("parameter-frame exp_avg", ops.rotate_back(exp_avg, qs_new), frame_before, *TOL["gemm_fp32"])
    index = perm[:, :, None] if axis == 1 else perm[:, None, :]
    assert torch.equal(exp_avg_sq, sq_before.take_along_dim(index, dim=axis))


def test_reorthonormalize_matches_ops():
    gen = torch.Generator().manual_seed(5)
    q = orthonormal(3, 17, gen)
    q = (q + 1e-4 * torch.randn(q.shape, generator=gen).to(DEVICE)).contiguous()  # drifted
    q_ref = q.clone()
    ops.reorthonormalize_(q_ref)
    reorthonormalize_(q)
    print("orthonormality", orthonormality_error(q))
    assert orthonormality_error(q) < TOL["orthonormal"]
    check("q", q, q_ref, *TOL["vs_ops"])


def test_validation_messages():
    with pytest.raises(ValueError, match="stats must be"):
        refresh_factor(torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="q must have shape"):
        refresh_factor(torch.zeros(2, 3, 3, device=DEVICE), torch.zeros(1, 3, 3, device=DEVICE))
    x = torch.zeros(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="axis must be"):
        permute_along(x, torch.zeros(2, 3, dtype=torch.int64, device=DEVICE), 0)
    with pytest.raises(TypeError, match="perm must have dtype"):
        permute_along(x, torch.zeros(2, 3, dtype=torch.int32, device=DEVICE), 1)
    with pytest.raises(ValueError, match="q_mix must have shape"):
        reexpress_exp_avg(x, torch.zeros(2, 4, dtype=torch.int64, device=DEVICE), torch.zeros(2, 3, 3, device=DEVICE), 2)


@gpu_only
@pytest.mark.parametrize("d", [256, 768])
def test_gpu_refresh_large(d):
    gen = torch.Generator().manual_seed(6)
    stats = spd_stats(2, d, gen, spread=1e4)
    q = orthonormal(2, d, gen)
    s_ref, q_ref = stats.clone(), q.clone()
    torch.backends.cuda.matmul.allow_tf32 = False
    perm_ref, mix_ref = ops.refresh_factor(s_ref, q_ref)
    perm, mix = refresh_factor(stats, q)
    assert torch.equal(perm, perm_ref)
    assert orthonormality_error(q) < 1e-4
    check("stats", stats, s_ref, *TOL["gpu_vs_ops"])
    check("q", q, q_ref, *TOL["gpu_vs_ops"])
