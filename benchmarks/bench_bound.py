"""A measured lower bound of the ``torch`` engine's amortized SOAP step.

The engine cannot do less than the BLAS/LAPACK calls of docs/DESIGN.md §2: per step the lean GEMMs (rotate
in, rotate back, statistics: ``6·m·n·(m+n)`` FLOPs per two-sided matrix), and per refresh one
Householder QR per factor (``geqrf`` + ``orgqr`` through ``soap_kernels.lapack``, run the way its
calibration picked), ``Q·Q_m``, the blocked ``R·Q_m`` and the re-expression of ``exp_avg``. This
script times exactly those calls, batched per bucket as the engine batches them, on random data of
the right shapes, with nothing else (no moment updates, no permutations, no Python around them),
and reports

    bound = bare step GEMMs + (bare QRs + bare refresh GEMMs) / f

against the lean-FLOP floor (lean FLOPs over the fp32 matmul rate measured in the same run), so
a target such as "amortized step within 1.5x the floor" can be checked for feasibility on the
machine at hand. Benchmarks measure and report; nothing here asserts a speed.

    python benchmarks/bench_bound.py                      # CPU default set, f = 10
    python benchmarks/bench_bound.py --preset gpt2-small --frequency 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import lapack, ops  # noqa: E402
from soap_kernels.reference import make_layout  # noqa: E402


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bare_calls(shapes) -> tuple[list, list, list]:
    """``(step GEMMs, QRs, refresh GEMMs)``: closures over random tensors, one per batched call."""
    buckets: Counter = Counter()
    for s in shapes:
        layout = make_layout(s, max_precond_dim=harness.MAX_PRECOND_DIM, merge_dims=False, precondition_1d=False,
                             channels_last=False)
        if layout.any_preconditioned and len(layout.work_shape) == 2:
            buckets[(tuple(layout.work_shape), tuple(layout.preconditioned))] += 1
    step, qrs, refresh = [], [], []
    gen = torch.Generator().manual_seed(0)
    for ((m, n), pre), count in buckets.items():
        g = torch.randn(count, m, n, generator=gen)
        out = torch.empty(count, m, n)
        for side, (d, on) in enumerate(zip((m, n), pre)):
            if not on:
                continue
            q = torch.linalg.qr(torch.randn(count, d, d, generator=gen))[0].contiguous()
            stats = torch.zeros(count, d, d)
            spd = torch.randn(count, d, d + 5, generator=gen)
            spd = spd @ spd.mT
            r = torch.linalg.qr(spd)[1]
            sq = torch.empty(count, d, d)
            if side == 0:
                mode = lambda q=q, g=g, out=out: torch.matmul(q.mT, g, out=out)  # noqa: E731
                gram = lambda s=stats, g=g: s.baddbmm_(g, g.mT, beta=0.95, alpha=0.05)  # noqa: E731
            else:
                mode = lambda q=q, g=g, out=out: torch.matmul(g, q, out=out)  # noqa: E731
                gram = lambda s=stats, g=g: s.baddbmm_(g.mT, g, beta=0.95, alpha=0.05)  # noqa: E731
            step += [mode, mode, gram]  # rotate in, rotate back, statistics
            qrs.append(lambda x=spd: lapack.qr(x))
            refresh.append(lambda q=q, o=sq: torch.matmul(q, q, out=o))  # Q <- (Q P) Q_m
            refresh.append(lambda r=r, q=q, o=sq: ops._triangular_product_symmetric(r, q, out=o))  # B <- R Q_m
            refresh.append(mode)  # exp_avg re-expressed along this side
    return step, qrs, refresh


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS))
    p.add_argument("--frequency", type=int, default=10, help="refresh every this many steps (default 10)")
    p.add_argument("--reps", type=int, default=5, help="best of this many timings of each group")
    p.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (benchmarks/results/)")
    p.add_argument("--tag", default="", help="suffix of the result name (bound_<set>_cpu_<tag>.json), so that a run "
                   "on another machine does not overwrite a committed one")
    args = p.parse_args(argv)
    shapes = harness.gpt_shapes(*harness.PRESETS[args.preset])
    device = torch.device("cpu")
    rate = harness.matmul_rate(device)
    floor = harness.lean_flops(shapes) / rate
    step, qrs, refresh = bare_calls(shapes)
    for call in qrs + step + refresh:  # LAPACK calibration and one-off costs
        call()
    t_step = best_of(lambda: [c() for c in step], args.reps)
    t_qr = best_of(lambda: [c() for c in qrs], args.reps)
    t_refresh = best_of(lambda: [c() for c in refresh], args.reps)
    bound = t_step + (t_qr + t_refresh) / args.frequency
    print(f"parameter set {args.preset}: fp32 matmul {rate / 1e9:.1f} GFLOP/s, lean floor {floor * 1e3:.1f} ms "
          f"(1.5x = {1.5 * floor * 1e3:.1f} ms), {torch.get_num_threads()} threads, load {harness.load_average()}")
    print(f"  bare step GEMMs      {t_step * 1e3:8.1f} ms  ({t_step / floor:.2f}x floor)")
    print(f"  bare QRs per refresh {t_qr * 1e3:8.1f} ms  (LAPACK ways {lapack.thread_choice()})")
    print(f"  bare refresh GEMMs   {t_refresh * 1e3:8.1f} ms")
    print(f"  lower bound of the amortized step at f={args.frequency}: {bound * 1e3:.1f} ms = {bound / floor:.2f}x floor")
    payload = {
        "preset": args.preset,
        "frequency": args.frequency,
        "matmul_rate_flops": rate,
        "floor_s": floor,
        "bare_step_gemms_s": t_step,
        "bare_qr_per_refresh_s": t_qr,
        "bare_refresh_gemms_s": t_refresh,
        "bound_amortized_s": bound,
        "bound_over_floor": bound / floor,
        "lapack_ways": {f"{op}-{n}": way for (op, n), way in lapack.thread_choice().items()},
        "environment": harness.environment(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    path = harness.write_json(harness.result_stem("bound", args.preset, device, args.tag) + ".json", payload, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
