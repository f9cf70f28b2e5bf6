"""The preconditioner refresh of a SOAP step, per (eigenbasis size d, batch) of a parameter set.

Ops (each on the ``[R, d, d]`` batches the engine refreshes together, one per bucket and side):

- ``refresh_factor``: sort ``diag(B)``, ``Q_m R = qr(Pᵀ B P)``, ``Q ← Q P Q_m``, ``B ← R Q_m``.
  ``reference`` (per factor: ``diag(Qᵀ GG Q)``, sort, ``qr(GG Q P)``, the reference's order),
  ``torch`` (``ops.refresh_factor``: Householder QR through ``soap_kernels.lapack``), ``triton``
  (``soap_kernels.triton.refresh_factor``: shifted CholeskyQR3 in fp64 + Triton GEMMs, CUDA).
  FLOP model ``16/3·d³`` per factor (``ops.FLOPS.refresh`` without the moment re-expression).
- ``qr``: the factorisation alone on ``Pᵀ B P``: Householder (``torch.linalg.qr``) through
  ``soap_kernels.lapack`` as the engine calls it (``householder-auto``: the thread mode its
  calibration picked), and on the CPU each LAPACK thread mode forced (``householder-1t``: one
  thread; ``householder-all``: all threads; ``householder-split``: the batch split over the cores,
  one thread each), against ``cholesky-qr3`` (shifted CholeskyQR3 in fp64, the Triton backend's
  QR; plain torch ops, so it runs on the CPU too) and ``cholesky-qr2`` (no shift: what the Triton
  backend re-orthonormalises Q with). FLOP model ``4/3·d³`` (Householder) for every row.
- ``eigh`` (with ``--eigh``; the initialising step's eigendecomposition): the same thread modes.

The statistics are a realistic rotated-frame ``B``: nearly diagonal with a decaying spectrum
(condition ~1e6), so CholeskyQR's conditioning limits are exercised. Inputs are restored before
every call (untimed).

    python benchmarks/bench_refresh.py
    python benchmarks/bench_refresh.py --preset gpt2-small --device cuda
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# The Triton backend's CholeskyQR is plain torch code, but its module refuses CPU tensors unless
# Triton runs in interpreter mode (set before triton is first imported). No Triton kernel is timed
# on the CPU (harness.soap_backends leaves the triton backend out there).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import lapack, ops  # noqa: E402


def rotated_statistics(rows: int, d: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``B = diag(λ) + E`` (λ from 1 down to 1e-6, ``‖E‖`` ~1e-3·λ_max, symmetric), the shape of
    statistics a few steps after a refresh, with the diagonal order shuffled so the sort does work."""
    lam = torch.logspace(0, -6, d)
    noise = torch.randn(rows, d, d, generator=gen) * (1e-3 / d**0.5)
    b = torch.diag_embed(lam.expand(rows, d)) + 0.5 * (noise + noise.mT)
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(rows)])
    b = torch.stack([m.index_select(0, p).index_select(1, p) for m, p in zip(b, perm)])
    return b.contiguous().to(device)


class Inputs:
    def __init__(self, rows: int, d: int, device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.stats0 = rotated_statistics(rows, d, device, gen)
        self.q0 = harness.orthonormal(rows, d, device, gen)
        self.stats = self.stats0.clone()
        self.q = self.q0.clone()
        # The reference keeps GG in the parameter frame: GG = Q B Qᵀ.
        self.gg = self.q0 @ self.stats0 @ self.q0.mT
        perm = torch.argsort(self.stats0.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        self.permuted = torch.stack([s.index_select(0, p).index_select(1, p) for s, p in zip(self.stats0, perm)])

    def restore(self) -> None:
        self.stats.copy_(self.stats0)
        self.q.copy_(self.q0)


def refresh_impls(sets: list[Inputs], backends: list[str]) -> dict:
    def pick(i: int) -> Inputs:
        return sets[i % len(sets)]

    def restore(i: int) -> None:
        pick(i).restore()

    def ref(i: int) -> None:
        s = pick(i)
        for gg, q in zip(s.gg, s.q):
            est = torch.diag(q.T @ gg @ q)
            order = torch.argsort(est, descending=True)
            q.copy_(lapack.qr(gg @ q[:, order])[0])

    found: dict = {}
    if "reference" in backends:
        found["reference"] = (ref, restore)
    if "torch" in backends:
        found["torch"] = (lambda i: ops.refresh_factor(pick(i).stats, pick(i).q), restore)
    if "triton" in backends:
        from soap_kernels import triton as tk

        found["triton"] = (lambda i: tk.refresh_factor(pick(i).stats, pick(i).q), restore)
    return found


def _forced(fn, mode: str):
    """Run a LAPACK call in one thread mode of soap_kernels.lapack (CPU)."""
    full = torch.get_num_threads()

    def run(x: torch.Tensor):
        if mode == "1t":
            return lapack._one(fn, x)
        if mode == "split":
            return lapack._split(fn, x, min(full, x.shape[0]))
        return fn(x)

    return run


def qr_impls(sets: list[Inputs], device: torch.device) -> dict:
    from soap_kernels.triton.refresh import cholesky_qr

    def pick(i: int) -> Inputs:
        return sets[i % len(sets)]

    found: dict = {"householder-auto": lambda i: lapack.qr(pick(i).permuted)}
    if device.type == "cpu" and torch.get_num_threads() > 1:
        for mode in ("1t", "all", "split"):  # split with one row: one piece on one pool thread
            run = _forced(torch.linalg.qr, mode)
            found[f"householder-{mode}"] = lambda i, run=run: run(pick(i).permuted)
    found["cholesky-qr3"] = lambda i: cholesky_qr(pick(i).permuted)
    found["cholesky-qr2"] = lambda i: cholesky_qr(pick(i).q0, shift=False)
    return found


def eigh_impls(sets: list[Inputs], device: torch.device) -> dict:
    def pick(i: int) -> Inputs:
        return sets[i % len(sets)]

    found: dict = {"eigh-auto": lambda i: lapack.eigh(pick(i).gg)}
    if device.type == "cpu" and torch.get_num_threads() > 1:
        for mode in ("1t", "all", "split"):
            run = _forced(torch.linalg.eigh, mode)
            found[f"eigh-{mode}"] = lambda i, run=run: run(pick(i).gg)
    return found


def refresh_cases(shapes) -> list[tuple[int, int, int]]:
    """``(d, R, how many such batches per refresh step)``: one batch per (bucket, side)."""
    counts: dict[tuple[int, int], int] = {}
    for b in harness.buckets(shapes):
        for d, pre in zip(b.work_shape, b.preconditioned):
            if pre:
                counts[(d, b.count)] = counts.get((d, b.count), 0) + 1
    return [(d, r, k) for (d, r), k in sorted(counts.items())]


def cases(label: str, shapes, args, device: torch.device) -> tuple[list[dict], dict]:
    backends, skipped = harness.soap_backends(device)
    rows: list[dict] = []
    per_step: dict[tuple[str, str], float] = {}
    seen: dict[tuple[str, str], int] = {}
    all_cases = refresh_cases(shapes)
    for d, r, k in all_cases:
        case = f"{r}x[{d}x{d}]" + (f" (x{k})" if k > 1 else "")
        sets = [Inputs(r, d, device, seed) for seed in range(harness.input_sets(6 * 4 * r * d * d, device))]
        groups = [("refresh_factor", refresh_impls(sets, backends), r * int(16 * d**3 / 3)),
                  ("qr", qr_impls(sets, device), r * int(4 * d**3 / 3))]
        if args.eigh:
            groups.append(("eigh", eigh_impls(sets, device), None))
        for op, impls, flops in groups:
            got = harness.run_impls(op, case, harness.select(impls, args), device, args.budget, flops=flops,
                                    min_reps=args.min_reps, d=d, rows=r, batches_per_step=k)
            for row in got:
                if "median_s" in row:
                    key = (op, row["backend"])
                    per_step[key] = per_step.get(key, 0.0) + k * row["median_s"]
                    seen[key] = seen.get(key, 0) + 1
            rows += got
        del sets
    # The whole refresh of one refresh step (every factor of the set), from the medians above.
    # Only for implementations measured on every case (a missing or failed case would undercount).
    totals = [{"op": op, "case": f"all factors / {'init' if op == 'eigh' else 'refresh'} step", "backend": backend,
               "median_s": t, "derived": True}
              for (op, backend), t in per_step.items() if seen[(op, backend)] == len(all_cases)]
    info = {"skipped": skipped, "lapack_choices": {f"{op}:{n}": way for (op, n), way in lapack.thread_choice().items()},
            "refresh_flops_per_refresh_step": harness.refresh_flops(shapes)}
    return rows + totals, info


def extra_args(parser) -> None:
    parser.add_argument("--eigh", action="store_true", help="also time eigh (the initialising step), every thread mode")
    parser.add_argument("--min-reps", type=int, default=3, help="at least this many timed calls per row (default 3)")


COLUMNS = [c for c in harness.OP_COLUMNS if c[0] not in ("gbps", "pct_bandwidth")] + [
    ("x_householder-auto", "hh-auto/this", "12.2f", 1)]


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.op_main("refresh", __doc__, cases, argv, extra_args, baselines=("torch", "reference", "householder-auto"),
                           columns=COLUMNS)


if __name__ == "__main__":
    main()
