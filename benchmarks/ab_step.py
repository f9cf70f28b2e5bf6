"""Same-process A/B of the whole SOAP step: implementation variants swapped in per refresh cycle.

One optimizer on the ``cpu`` set (bench_step's hyperparameters, ``backend="torch"``); each round
runs one whole refresh cycle (f steps) per variant, the order rotating per round, so load that
comes and goes on a shared machine falls on every variant alike. Variants must give the same bits
(not checked here: check bits with the tests).
Reports per variant the median non-refresh step and refresh step, and their ratio to the first.

    python benchmarks/ab_step.py --variants before-N,current --rounds 6

Variants: ``current`` (the code as it is), ``env:NAME=VALUE[+NAME=VALUE]`` (the code as it is with
those environment variables set, e.g. ``env:SOAP_LAPACK_THREADS=2``), ``lapack@COMMIT`` (soap_kernels/lapack.py
as it was at that commit, loaded as a module of its own, e.g. ``lapack@c3b8ef1,lapack@HEAD`` for NOTES item 25),
and ``before-N``: the code path as it was before
benchmarks/NOTES.md item N, added to ``PATCHES`` as a copy while item N is measured. None now:
item 18 was reverted; to repeat its A/B apply results/notes18_in_place_qr_reverted.patch and put
the old ``ops.refresh_factor`` back here as ``before-18``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import SOAP  # noqa: E402

# name -> [(module, attribute, replacement)]. Empty while no change is under measurement (item 18's
# "before" copy equalled the current code once the item was reverted, so it went).
PATCHES: dict[str, list] = {}


def _lapack_at(commit: str):
    """soap_kernels/lapack.py as it was at ``commit``, loaded as a module of its own (its own
    choosers and pool: each variant starts fresh, as a new run would)."""
    source = subprocess.run(["git", "show", f"{commit}:soap_kernels/lapack.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent).stdout
    module = types.ModuleType(f"lapack_{commit}")
    exec(compile(source, f"lapack@{commit}", "exec"), module.__dict__)
    return module


def _add_lapack_variant(name: str) -> None:
    """``lapack@COMMIT``: soap_kernels/lapack.py as it was at COMMIT, swapped in for the current one."""
    from soap_kernels import lapack
    module = _lapack_at(name.split("@", 1)[1])
    PATCHES[name] = [(lapack, "qr", module.qr), (lapack, "eigh", module.eigh)]


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Swap in a patched variant, or set environment variables for ``env:NAME=VALUE[+NAME=VALUE]``
    (e.g. ``env:SOAP_LAPACK_THREADS=2``: lapack.py reads its settings at every call)."""
    settings = dict(kv.split("=", 1) for kv in name[4:].split("+")) if name.startswith("env:") else {}
    old_env = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in PATCHES.get(name, [])]
    for mod, attr, fn in PATCHES.get(name, []):
        setattr(mod, attr, fn)
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="current")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--frequency", type=int, default=10)
    p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS))
    args = p.parse_args(argv)
    names = args.variants.split(",")
    for n in names:
        if n.startswith("lapack@"):
            _add_lapack_variant(n)
    for n in names:
        if n != "current" and n not in PATCHES and not (n.startswith("env:") and "=" in n):
            raise SystemExit(f"unknown variant {n!r}: known are " + ", ".join(["current", "env:NAME=VALUE", "lapack@COMMIT",
                                                                             *PATCHES]))
    shapes = harness.gpt_shapes(*harness.PRESETS[args.preset])
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02)) for s in shapes]
    grads = [[torch.randn(s, generator=gen).mul_(1e-2) for s in shapes] for _ in range(2)]
    opt = SOAP(params, lr=1e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01,
               precondition_frequency=args.frequency, backend="torch")
    calls = 0

    def step() -> float:
        nonlocal calls
        for prm, g in zip(params, grads[calls % 2]):
            prm.grad = g
        t0 = time.perf_counter()
        opt.step()
        calls += 1
        return time.perf_counter() - t0

    for _ in range(args.frequency + 1):  # initialising step + one cycle ending with a refresh
        step()
    rate = harness.matmul_rate(torch.device("cpu"))
    floor = harness.lean_flops(shapes) / rate
    print(f"{args.preset}: threads {torch.get_num_threads()}, matmul {rate / 1e9:.1f} GFLOP/s, floor "
          f"{floor * 1e3:.1f} ms, load before {harness.load_average()}", flush=True)
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            with variant(n):
                for _ in range(args.frequency):
                    t = step()
                    # call c (from 0) is update c, a refresh when c % f == 0
                    (times[n][1] if (calls - 1) % args.frequency == 0 else times[n][0]).append(t)
    base = names[0]
    med = {n: (statistics.median(a), statistics.median(b)) for n, (a, b) in times.items()}
    print(f"load after {harness.load_average()}; {args.rounds} rounds, medians (ms):")
    for n in names:
        between, refresh = med[n]
        amort = ((args.frequency - 1) * between + refresh) / args.frequency
        b0, r0 = med[base]
        a0 = ((args.frequency - 1) * b0 + r0) / args.frequency
        print(f"  {n:12s} non-refresh {between * 1e3:7.1f} ({between / b0:.3f}x)  refresh {refresh * 1e3:7.1f} "
              f"({refresh / r0:.3f}x)  amortized {amort * 1e3:7.1f} ({amort / a0:.3f}x; {amort / floor:.2f}x floor)"
              f"  refresh steps {[round(x * 1e3) for x in times[n][1]]}")


if __name__ == "__main__":
    main()
