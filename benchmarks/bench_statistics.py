"""The Shampoo statistics update of a SOAP step, per matrix bucket of a parameter set.

``B_i ← βs·B_i + (1-βs)·G'_(i) G'_(i)ᵀ`` for each preconditioned side (the engine keeps the
statistics in the rotated frame and feeds the rotated gradient it already has).

Implementations: ``reference`` (per parameter, ``GG_i.lerp_(gram(g, i), 1-βs)`` on the unrotated
gradient, as the reference does), ``torch`` (``ops.update_statistics``: one ``baddbmm_`` per side),
``triton`` (``soap_kernels.triton.update_statistics``: computes the upper tiles only, CUDA), and
``gemm-only``: the bare Gram GEMMs into preallocated outputs (the ceiling for that shape).
FLOPs per call (dense-equivalent): ``2·B·m·n·(m+n)`` for a two-sided bucket.

    python benchmarks/bench_statistics.py
    python benchmarks/bench_statistics.py --preset gpt2-small --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import ops, reference  # noqa: E402

SHAMPOO_BETA = 0.95


class Inputs:
    def __init__(self, bucket: harness.BucketSpec, device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        b, (m, n) = bucket.count, bucket.work_shape
        self.rotated = torch.randn(b, m, n, generator=gen).mul_(1e-2).to(device)
        self.stats = [torch.zeros(b, d, d, device=device) if pre else None
                      for d, pre in zip(bucket.work_shape, bucket.preconditioned)]
        self.gram_out = [None if s is None else torch.empty_like(s) for s in self.stats]


def impls(sets: list[Inputs], backends: list[str]) -> dict:
    def pick(i: int) -> Inputs:
        return sets[i % len(sets)]

    def ref(i: int) -> None:
        s = pick(i)
        for r in range(s.rotated.shape[0]):
            g = s.rotated[r]
            for dim, stat in enumerate(s.stats):
                if stat is not None:
                    stat[r].lerp_(reference.gram(g, dim), 1.0 - SHAMPOO_BETA)

    def torch_ops(i: int) -> None:
        s = pick(i)
        ops.update_statistics(s.stats, s.rotated, SHAMPOO_BETA)

    def gemm_only(i: int) -> None:
        s = pick(i)
        for dim, out in enumerate(s.gram_out):
            if out is not None:
                x = s.rotated if dim == 0 else s.rotated.mT
                torch.matmul(x, x.mT, out=out)

    found: dict = {}
    if "reference" in backends:
        found["reference"] = ref
    if "torch" in backends:
        found["torch"] = torch_ops
    if "triton" in backends:
        from soap_kernels import triton as tk

        def run(i: int) -> None:
            s = pick(i)
            tk.update_statistics(s.stats, s.rotated, SHAMPOO_BETA)

        found["triton"] = run
    found["gemm-only"] = gemm_only
    return found


def cases(label: str, shapes, args, device: torch.device) -> tuple[list[dict], dict]:
    backends, skipped = harness.soap_backends(device)
    rows: list[dict] = []
    for bucket in harness.buckets(shapes):
        if not bucket.is_matrix:
            continue
        factors = sum(d * d for d, pre in zip(bucket.work_shape, bucket.preconditioned) if pre)
        per_set = 4 * (bucket.numel + 2 * factors * bucket.count)
        sets = [Inputs(bucket, device, seed) for seed in range(harness.input_sets(per_set, device))]
        rows += harness.run_impls("update_statistics", bucket.label, harness.select(impls(sets, backends), args),
                                  device, args.budget, flops=harness.rotation_flops(bucket))
    return rows, {"skipped": skipped, "shampoo_beta": SHAMPOO_BETA}


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.op_main("statistics", __doc__, cases, argv)


if __name__ == "__main__":
    main()
