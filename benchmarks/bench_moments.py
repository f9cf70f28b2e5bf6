"""The fused moment update of a SOAP step (memory-bound), per bucket and over all buckets.

In place ``exp_avg ← β1·exp_avg + (1-β1)·G'``, ``exp_avg_sq ← β2·exp_avg_sq + (1-β2)·G'²``, and
the direction ``exp_avg / (√exp_avg_sq + eps)`` written to a reused buffer: 24 bytes per element
(read m, v, G'; write m, v, direction), about 6 FLOPs per element.

Implementations: ``reference`` (per parameter, the reference's ``mul_/add_`` sequence with fresh
temporaries), ``torch`` (the engine's ops on the stacked bucket: ``lerp_``, ``mul_().addcmul_()``,
``sqrt(out=)``, ``div(out=)``), ``torch-compile`` (that function under ``torch.compile``, with
``--compile``), and ``native`` (``soap_kernels._native.moment_update``, one pass over memory, when
the extension is built; it takes a list of buckets, so the "all buckets" case is one call).
Triton has no stand-alone moment update: it is fused into ``rotate_in_adam`` (bench_rotate.py).
The ceiling is the copy bandwidth measured in the same run (``%bw``).

    python benchmarks/bench_moments.py
    python benchmarks/bench_moments.py --preset gpt2-small --device cuda --compile
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BETA1, BETA2, EPS = 0.95, 0.95, 1e-8
BYTES_PER_ELEMENT = 24


def torch_moments(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """The engine's torch sequence (ops.rotate_in_adam with a workspace)."""
    m.lerp_(g, 1.0 - BETA1)
    v.mul_(BETA2).addcmul_(g, g, value=1.0 - BETA2)
    torch.sqrt(v, out=out).add_(EPS)
    torch.div(m, out, out=out)


def reference_moments(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    m.mul_(BETA1).add_(g, alpha=1.0 - BETA1)
    v.mul_(BETA2).add_(g.square(), alpha=1.0 - BETA2)
    return m / v.sqrt().add_(EPS)


class Inputs:
    """One copy of the moment tensors of a list of buckets."""

    def __init__(self, buckets: list[harness.BucketSpec], device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.grad = [torch.randn(b.count, *b.work_shape, generator=gen).to(device) for b in buckets]
        self.exp_avg = [torch.zeros_like(g) for g in self.grad]
        self.exp_avg_sq = [torch.full_like(g, 1e-4) for g in self.grad]
        self.out = [torch.empty_like(g) for g in self.grad]


def impls(sets: list[Inputs], args, native) -> dict:
    def pick(i: int) -> Inputs:
        return sets[i % len(sets)]

    def ref(i: int) -> None:
        s = pick(i)
        for m, v, g in zip(s.exp_avg, s.exp_avg_sq, s.grad):
            for r in range(g.shape[0]):
                reference_moments(m[r], v[r], g[r])

    def torch_ops(i: int) -> None:
        s = pick(i)
        for m, v, g, o in zip(s.exp_avg, s.exp_avg_sq, s.grad, s.out):
            torch_moments(m, v, g, o)

    found: dict = {"reference": ref, "torch": torch_ops}
    if args.compile:
        compiled = torch.compile(torch_moments)

        def comp(i: int) -> None:
            s = pick(i)
            for m, v, g, o in zip(s.exp_avg, s.exp_avg_sq, s.grad, s.out):
                compiled(m, v, g, o)

        found["torch-compile"] = comp
    if native is not None:
        def nat(i: int) -> None:
            s = pick(i)
            native.moment_update(s.exp_avg, s.exp_avg_sq, s.grad, BETA1, BETA2, EPS, out=s.out)

        found["native"] = nat
    return found


def cases(label: str, shapes, args, device: torch.device) -> tuple[list[dict], dict]:
    ok, why = harness.native_status()
    native = None
    if ok:
        from soap_kernels import _native as native
    skipped = {} if ok else {"native": why}
    skipped["triton"] = "no stand-alone moment update: fused into rotate_in_adam (bench_rotate.py)"
    rows: list[dict] = []
    all_buckets = harness.buckets(shapes)
    groups = [(b.label, [b]) for b in all_buckets] + [(f"all {len(all_buckets)} buckets", all_buckets)]
    for case, group in groups:
        numel = sum(b.numel for b in group)
        sets = [Inputs(group, device, seed) for seed in range(harness.input_sets(16 * numel, device))]
        rows += harness.run_impls("moment_update", case, harness.select(impls(sets, args, native), args), device,
                                  args.budget, bytes_moved=BYTES_PER_ELEMENT * numel)
    return rows, {"skipped": skipped, "bytes_per_element": BYTES_PER_ELEMENT}


def extra_args(parser) -> None:
    parser.add_argument("--compile", action="store_true", help="also time the torch ops under torch.compile")


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.op_main("moments", __doc__, cases, argv, extra_args)


if __name__ == "__main__":
    main()
