"""The refresh family (``refresh_factor``, ``refresh_moments``, ``reorthonormalize_``;
soap_kernels/triton/refresh.py, soap_kernels/ops.py).

Part 1, conformance: every kernel table of ``tests/kernel_tables.py`` (the ``table`` fixture) through its
:class:`~soap_kernels.kernels.Kernels` methods, against the refresh written out in fp64 (sort
``diag(B)`` descending, Householder QR of ``PᵀBP`` with a positive diagonal, ``q ← (qP)·Q_m``,
``B ← R·Q_m``). Part 2, the Triton module's internals: CholeskyQR and its fallback counter, the
standalone re-expression and permutation, validation messages, GPU sizes.
"""

import pytest
import torch
from kernel_tables import TOLERANCE, check, orthonormal, rotate64

from soap_kernels import select

SIZES = [(3, 5), (1, 1), (1, 13), (2, 37)]  # (rows R, d)
TOL = TOLERANCE["refresh"]
# Moments re-expressed by an fp32 GEMM (K <= 13) and permuted (exact): the "gemm" tolerance.
TOL_MOMENTS = TOLERANCE["gemm"]


def orthonormality_error(q: torch.Tensor) -> float:
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)
    return (q.mT @ q - eye).abs().max().item()


def spd_stats(rows: int, d: int, gen: torch.Generator, device: str, spread: float = 1.0) -> torch.Tensor:
    """Symmetric positive definite, eigenvalues from 1 down to 1/spread, in a random basis."""
    basis, _ = torch.linalg.qr(torch.randn(rows, d, d, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), d, dtype=torch.float64)
    eig = eig[torch.randperm(d, generator=gen)]
    s = basis @ torch.diag_embed(eig.expand(rows, d)) @ basis.mT
    return (0.5 * (s + s.mT)).float().to(device)


def permute64(x: torch.Tensor, perm: torch.Tensor, axis: int) -> torch.Tensor:
    """``y[b, .., k, ..] = x[b, .., perm[b, k], ..]`` along ``axis`` of a batched tensor."""
    shape = [1] * x.dim()
    shape[0], shape[axis] = perm.shape
    index = perm.cpu().reshape(shape).expand(*x.shape[:axis], perm.shape[1], *x.shape[axis + 1:])
    return x.cpu().take_along_dim(index, dim=axis)


def refresh64(stats: torch.Tensor, q: torch.Tensor):
    """The refresh of one factor in fp64: ``(perm, q_mix, q_new, stats_new)``."""
    perm = torch.argsort(stats.cpu().diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
    a = permute64(permute64(stats.double(), perm, 1), perm, 2)
    q_mix, r = torch.linalg.qr(a)
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    q_mix, r = q_mix * sign[:, None, :], r * sign[:, :, None]
    return perm, q_mix, permute64(q.double(), perm, 2) @ q_mix, r @ q_mix


# ================================================================================================
# Part 1: conformance of every table
# ================================================================================================


@pytest.mark.parametrize("rows,d", SIZES)
def test_refresh_factor(table, rows, d):
    gen = torch.Generator().manual_seed(d)
    stats = spd_stats(rows, d, gen, table.device, spread=1e3)
    q = orthonormal(rows, d, gen, table.device)
    want_perm, want_mix, want_q, want_stats = refresh64(stats, q)
    perm, mix = table.make().refresh_factor(stats, q)
    assert perm.dtype == torch.int64 and torch.equal(perm.cpu(), want_perm)
    check("q_mix", mix, want_mix, *TOL)
    check("q", q, want_q, *TOL)
    check("stats", stats, want_stats, *TOL)
    assert torch.equal(stats, stats.mT)


def test_refresh_factor_converged_basis_stays_put(table):
    """A diagonal (already converged) rotated-frame statistic: Q only gets permuted, B stays diagonal."""
    gen = torch.Generator().manual_seed(0)
    d = 9
    diag = torch.rand(2, d, generator=gen) + 0.1
    stats = torch.diag_embed(diag).to(table.device)
    q = orthonormal(2, d, gen, table.device)
    q_start = q.clone()
    perm, mix = table.make().refresh_factor(stats, q)
    # Exact in exact arithmetic; fp32 QR of a diagonal matrix leaves rounding-level off-diagonals.
    check("q_mix", mix, torch.eye(d).expand(2, d, d), 1e-6, 0)
    check("q", q, permute64(q_start, perm, 2), 1e-6, 0)
    check("stats", stats, torch.diag_embed(diag.sort(dim=-1, descending=True).values), 1e-6, 0)


def test_refresh_factor_ill_conditioned(table):
    """Eigenvalues over 10 decades: Q_m and Q stay orthonormal and B = Q_mᵀ A Q_m in A's norm
    (elementwise agreement with fp64 QR is not expected: its factors' sensitivity grows with the
    spread)."""
    gen = torch.Generator().manual_seed(1)
    rows, d = 2, 24
    stats = spd_stats(rows, d, gen, table.device, spread=1e10)
    q = orthonormal(rows, d, gen, table.device)
    before = stats.clone()
    perm, mix = table.make().refresh_factor(stats, q)
    print("orthonormality q_mix", orthonormality_error(mix), "q", orthonormality_error(q))
    assert orthonormality_error(mix) < TOLERANCE["orthonormal"]
    assert orthonormality_error(q) < TOLERANCE["orthonormal"]
    a = permute64(permute64(before.double(), perm, 1), perm, 2)
    mix64 = mix.double().cpu()
    check("stats = Q_mᵀ A Q_m", stats, mix64.mT @ a @ mix64, 1e-6, 0)  # |A| <= 1: fp32 rounding of A's scale


@pytest.mark.parametrize("dim", [0, 1])
def test_refresh_moments(table, dim):
    """``exp_avg ← Q_mᵀ Pᵀ exp_avg`` along working dim ``dim``, ``exp_avg_sq`` permuted."""
    gen = torch.Generator().manual_seed(3 + dim)
    b, m, n = 3, 13, 6
    d = (m, n)[dim]
    exp_avg = torch.randn(b, m, n, generator=gen).to(table.device)
    exp_avg_sq = torch.rand(b, m, n, generator=gen).to(table.device)
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(b)]).to(table.device)
    mix = orthonormal(b, d, gen, table.device)
    qs = [mix if i == dim else None for i in range(2)]
    want_m = rotate64(permute64(exp_avg, perm, dim + 1), [q.cpu() if q is not None else None for q in qs])
    want_v = permute64(exp_avg_sq, perm, dim + 1)
    table.make().refresh_moments(exp_avg, exp_avg_sq, dim, perm, mix, second_moment="adam", work_shape=(m, n))
    check("exp_avg", exp_avg, want_m, *TOL_MOMENTS)
    assert torch.equal(exp_avg_sq.cpu(), want_v)


@pytest.mark.parametrize("dim", [0, 1])
def test_refresh_keeps_the_momentum_in_the_parameter_frame(table, dim):
    """After refresh_factor + refresh_moments, rotating exp_avg back gives the same parameter-frame
    momentum (the two methods agree on what ``perm`` and ``q_mix`` mean)."""
    gen = torch.Generator().manual_seed(4 + dim)
    b, m, n = 2, 11, 7
    d = (m, n)[dim]
    kernels = table.make()
    stats = spd_stats(b, d, gen, table.device, spread=1e2)
    q = orthonormal(b, d, gen, table.device)
    exp_avg = torch.randn(b, m, n, generator=gen).to(table.device)
    exp_avg_sq = torch.rand(b, m, n, generator=gen).to(table.device)
    frame_before = rotate64(exp_avg, [q if i == dim else None for i in range(2)], back=True)
    sq_before = exp_avg_sq.clone()
    perm, mix = kernels.refresh_factor(stats, q)
    kernels.refresh_moments(exp_avg, exp_avg_sq, dim, perm, mix, second_moment="adam", work_shape=(m, n))
    frame_after = rotate64(exp_avg, [q if i == dim else None for i in range(2)], back=True)
    check("parameter-frame exp_avg", frame_after, frame_before, *TOL_MOMENTS)
    assert torch.equal(exp_avg_sq.cpu(), permute64(sq_before, perm, dim + 1))


# Buckets only the torch table is given: (working shape, second moment, dim refreshed).
TORCH_ONLY_MOMENTS = {
    "3d-adam-dim1": ((4, 5, 3), "adam", 1),
    "matrix-adafactor-dim0": ((6, 5), "adafactor", 0),
    "3d-adafactor-dim2": ((4, 5, 3), "adafactor", 2),
}


@pytest.mark.parametrize("case", list(TORCH_ONLY_MOMENTS))
def test_refresh_moments_tensor_and_adafactor_buckets(table, case):
    work, second_moment, dim = TORCH_ONLY_MOMENTS[case]
    ok, why = table.takes(work, second_moment)
    if not ok:
        pytest.skip(f"{table.name}: {why}")
    gen = torch.Generator().manual_seed(8)
    b, d = 2, work[dim]
    rows = work[0]
    exp_avg = torch.randn(b, *work, generator=gen).to(table.device)
    if second_moment == "adam":
        exp_avg_sq = torch.rand(b, *work, generator=gen).to(table.device)
    else:  # [B, rows + cols]: the row accumulator, then the column accumulator over work[1:]
        exp_avg_sq = torch.rand(b, rows + torch.Size(work[1:]).numel(), generator=gen).to(table.device)
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(b)]).to(table.device)
    mix = orthonormal(b, d, gen, table.device)
    qs = [mix.cpu() if i == dim else None for i in range(len(work))]
    want_m = rotate64(permute64(exp_avg, perm, dim + 1), qs)
    if second_moment == "adam":
        want_v = permute64(exp_avg_sq, perm, dim + 1)
    elif dim == 0:
        want_v = torch.cat([permute64(exp_avg_sq[:, :rows], perm, 1), exp_avg_sq[:, rows:].cpu()], dim=1)
    else:
        cols = exp_avg_sq[:, rows:].reshape(b, *work[1:])
        want_v = torch.cat([exp_avg_sq[:, :rows].cpu(), permute64(cols, perm, dim).reshape(b, -1)], dim=1)
    table.make().refresh_moments(exp_avg, exp_avg_sq, dim, perm, mix, second_moment=second_moment, work_shape=work)
    check("exp_avg", exp_avg, want_m, *TOL_MOMENTS)
    assert torch.equal(exp_avg_sq.cpu(), want_v)


def test_reorthonormalize(table):
    gen = torch.Generator().manual_seed(5)
    q = orthonormal(3, 17, gen, table.device)
    q = (q + 1e-4 * torch.randn(q.shape, generator=gen).to(table.device)).contiguous()  # drifted
    q_h, r_h = torch.linalg.qr(q.double().cpu())
    want = q_h * torch.sign(r_h.diagonal(dim1=-2, dim2=-1))[:, None, :]
    table.make().reorthonormalize_(q)
    print("orthonormality", orthonormality_error(q))
    assert orthonormality_error(q) < TOLERANCE["orthonormal"]
    check("q", q, want, *TOL)


@pytest.mark.parametrize("d", [1, 13, 128, 600])
def test_reorthonormalize_first_order_and_householder_rows(d, monkeypatch):
    """The torch table's re-orthonormalisation is QR to first order in ``S = qᵀq − I`` from d = 128
    on the CPU (by 2×2 blocks from d = 512), Householder QR below: q = Q₀·(I + T) with T upper
    triangular, ‖T‖ = 1.5e-4 (``‖S‖_F`` under fp32's √eps), must come back to Q₀ at fp32 rounding,
    and a row drifted 100× further, in the same batch, goes to Householder QR (only that row)."""
    from soap_kernels import ops

    gen = torch.Generator().manual_seed(d)
    q0, _ = torch.linalg.qr(torch.randn(3, d, d, generator=gen, dtype=torch.float64))
    t = torch.randn(3, d, d, generator=gen, dtype=torch.float64).triu()
    t = t * (1.5e-4 / torch.linalg.matrix_norm(t))[:, None, None]
    t[2] *= 100
    q = (q0 @ (torch.eye(d, dtype=torch.float64) + t)).float()
    householder_rows = []
    real = ops._householder_reorthonormalize_

    def spy(x):
        householder_rows.append(x.shape[0])
        real(x)

    monkeypatch.setattr(ops, "_householder_reorthonormalize_", spy)
    got = q.clone()
    ops.reorthonormalize_(got)
    assert householder_rows == ([1] if d >= ops._REORTH_FIRST_ORDER_FROM else [3])
    for row in range(3):
        err = (got[row].double() - q0[row]).abs().max().item()
        print(f"row {row}: max |Q - Q0| {err:.2e} (input {(q[row].double() - q0[row]).abs().max().item():.2e})")
        assert err < 4e-7
    assert orthonormality_error(got) < TOLERANCE["orthonormal"]


# ================================================================================================
# Part 2: the Triton module's internals
# ================================================================================================

TRITON_OK, TRITON_WHY = select.backend_available("triton")
triton_only = pytest.mark.skipif(not TRITON_OK, reason=f"Triton module internals: {TRITON_WHY}")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not (CUDA and TRITON_OK), reason="needs a CUDA device and Triton (large factors)")

if TRITON_OK:
    from soap_kernels.triton import refresh
    from soap_kernels.triton.refresh import cholesky_qr, permute_along, reexpress_exp_avg, refresh_factor

# CholeskyQR's fp64 results: orthonormal and A = QR to fp64 rounding (d = 20).
TOL_FP64 = {"orthonormal": 1e-12, "residual": 1e-12}


@triton_only
def test_ill_conditioned_needs_no_fallback():
    """Eigenvalues over 10 decades: shifted CholeskyQR3 handles them without Householder."""
    gen = torch.Generator().manual_seed(1)
    stats = spd_stats(2, 24, gen, DEVICE, spread=1e10)
    q = orthonormal(2, 24, gen, DEVICE)
    before = dict(refresh.FALLBACKS)
    refresh_factor(stats, q)
    assert refresh.FALLBACKS["rows"] == before["rows"], "well-defined ill-conditioned input fell back"


@triton_only
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
        assert orthonormality_error(q[i]) < TOL_FP64["orthonormal"], i
        residual = (a[i] - (q[i] @ r[i]).cpu()).abs().max() / a[i].abs().max().clamp_min(1e-300)
        assert residual < TOL_FP64["residual"], (i, residual)
        assert torch.equal(r[i], r[i].triu())
        assert (r[i].diagonal() >= 0).all()
    # The generic row is unique (positive diag R): equal to Householder's, sign-fixed.
    q_h, r_h = torch.linalg.qr(a[1])
    signs = torch.sign(r_h.diagonal())
    check("generic row vs Householder", q[1], q_h * signs, 1e-12, 0)


@triton_only
def test_standalone_reexpress_and_permute():
    gen = torch.Generator().manual_seed(3)
    b, m, n = 3, 13, 6
    exp_avg = torch.randn(b, m, n, generator=gen).to(DEVICE)
    for axis, d in ((1, m), (2, n)):
        perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(b)]).to(DEVICE)
        mix = orthonormal(b, d, gen, DEVICE)
        permuted = permute64(exp_avg, perm, axis)
        want = rotate64(permuted, [mix.cpu() if i == axis - 1 else None for i in range(2)])
        check(f"reexpress axis {axis}", reexpress_exp_avg(exp_avg, perm, mix, axis), want, *TOL_MOMENTS)
        assert torch.equal(permute_along(exp_avg, perm, axis).cpu(), permuted)


@triton_only
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
    """Large factors: the properties that hold whatever the conditioning (the permutation, an
    orthonormal Q, B = Q_mᵀ A Q_m in A's norm, Q = (Q P)·Q_m)."""
    gen = torch.Generator().manual_seed(6)
    stats = spd_stats(2, d, gen, DEVICE, spread=1e4)
    q = orthonormal(2, d, gen, DEVICE)
    before, q_before = stats.clone(), q.clone()
    want_perm = torch.argsort(stats.cpu().diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
    perm, mix = refresh_factor(stats, q)
    assert torch.equal(perm.cpu(), want_perm)
    assert orthonormality_error(q) < 1e-4
    a = permute64(permute64(before.double(), perm, 1), perm, 2)
    mix64 = mix.double().cpu()
    check("stats = Q_mᵀ A Q_m", stats, mix64.mT @ a @ mix64, 2e-5, 0)  # K = d fp32 sums, |A| <= 1
    check("q = (q P)·Q_m", q, permute64(q_before.double(), perm, 2) @ mix64, 2e-4, 2e-4)


# ------------------------------------------------------------------ the refresh scratch (ops.py)
def test_refresh_scratch_reuses_a_buffer_per_tag_only_inside_the_block():
    from soap_kernels import ops

    like = torch.zeros(1)
    outside = ops.scratch_empty("permuted", (4, 8, 8), like)
    with ops.refresh_scratch():
        a = ops.scratch_empty("permuted", (4, 8, 8), like)
        b = ops.scratch_empty("permuted", (2, 8, 8), like)  # smaller: a view of the same buffer
        c = ops.scratch_empty("q_perm", (4, 8, 8), like)
        big = ops.scratch_empty("permuted", (8, 8, 8), like)  # larger: a new buffer
        assert a.data_ptr() == b.data_ptr() != c.data_ptr()
        assert big.shape == (8, 8, 8) and big.is_contiguous() and big.data_ptr() != a.data_ptr()
        assert outside.data_ptr() not in (a.data_ptr(), c.data_ptr())
        with ops.refresh_scratch():  # nested: the outer block's buffers
            assert ops.scratch_empty("q_perm", (4, 8, 8), like).data_ptr() == c.data_ptr()
    after = ops.scratch_empty("q_perm", (4, 8, 8), like)
    del c
    assert after.shape == (4, 8, 8)
    with ops.refresh_scratch():  # a new block starts empty
        assert ops.scratch_empty("q_perm", (4, 8, 8), like).data_ptr() != after.data_ptr()


def test_refresh_scratch_keeps_the_bits(monkeypatch):
    """Buckets of one factor size refreshed in one step share the scratch: the same bits as with a
    fresh allocation per temporary, over refreshes that re-orthonormalise too."""
    from soap_kernels import SOAP, engine, ops

    served = []
    real = ops.scratch_empty

    def counting(tag, shape, like):
        out = real(tag, shape, like)
        served.append(getattr(ops._local, "scratch", None) is not None)
        return out

    def run(scratch: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(ops, "REFRESH_SCRATCH", scratch)
        gen = torch.Generator().manual_seed(0)
        shapes = [(24, 8), (24, 8), (8, 24), (24,)]  # a (24, 8) bucket and an (8, 24) one: d = 24 twice
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = SOAP(params, lr=1e-2, precondition_frequency=2, backend="torch")
        for _ in range(2 * 2 * engine.REORTHONORMALIZE_EVERY + 1):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    monkeypatch.setattr(ops, "scratch_empty", counting)  # engine calls it as ops.scratch_empty
    with_scratch = run(True)
    assert served and all(served)
    served.clear()
    without = run(False)
    assert served and not any(served)
    assert all(torch.equal(a, b) for a, b in zip(with_scratch, without))


def test_kept_refresh_scratch_keeps_the_bits_and_the_buffers(monkeypatch):
    """keep_refresh_scratch=True: the refresh temporaries outlive the step (reported as workspace)
    and are reused; the bits equal the default's, and a fresh allocation per temporary's, over
    refreshes that re-orthonormalise by the first-order correction (d = 128, which borrows the
    refresh's scratch tags)."""
    import copy
    import pickle

    from soap_kernels import SOAP, engine, ops

    def run(keep: bool):
        gen = torch.Generator().manual_seed(1)
        shapes = [(128, 16), (128, 16), (16,)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = SOAP(params, lr=1e-2, precondition_frequency=2, backend="torch", keep_refresh_scratch=keep)
        sizes = []
        for _ in range(2 * engine.REORTHONORMALIZE_EVERY + 3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            sizes.append(opt.memory_info()["workspace_bytes"])
        return opt, [p.detach().clone() for p in params], sizes

    kept, kept_params, kept_sizes = run(True)
    fresh, fresh_params, fresh_sizes = run(False)
    assert all(torch.equal(a, b) for a, b in zip(kept_params, fresh_params))
    monkeypatch.setattr(ops, "REFRESH_SCRATCH", False)
    _, unshared_params, _ = run(False)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(kept_params, unshared_params))
    scratch = kept._engine.kept_scratch
    assert scratch and {tag for tag, _ in scratch} >= {"saved_stats", "saved_q", "permuted", "q_perm"}
    held = sum(t.numel() * t.element_size() for t in scratch.values())
    assert kept_sizes[-1] == fresh_sizes[-1] + held
    assert kept_sizes[-2] == kept_sizes[-1]  # reused, not grown, once every size has refreshed
    assert fresh._engine.kept_scratch is None
    for clone in (copy.deepcopy(kept), pickle.loads(pickle.dumps(kept))):
        assert clone.keep_refresh_scratch and clone._engine.kept_scratch == {}
    with pytest.raises(TypeError, match="keep_refresh_scratch must be a bool"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], keep_refresh_scratch=1)
