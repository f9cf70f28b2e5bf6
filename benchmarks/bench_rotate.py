"""The two rotations of a SOAP step, per bucket of a parameter set, on every backend here.

- ``rotate_in_adam``: ``G' = Q_Lᵀ G Q_R``, then Adam's moment update and the division in the
  eigenbasis (the epilogue), returning ``G'`` and ``exp_avg / (√exp_avg_sq + eps)``.
- ``rotate_back_update``: ``p ← (p − s·Q_L D Q_Rᵀ)·decay`` (the epilogue writes the parameter).

Implementations: ``reference`` (the literal per-parameter statement, ``reference.project`` /
``project_back`` and separate elementwise ops), ``torch`` (``soap_kernels.ops``, called the way the
engine calls it: on the CPU reading each gradient in place and writing reused workspaces),
``triton`` (``soap_kernels.triton``, CUDA only; ``triton-tf32`` / ``triton-bf16`` rotation
precisions with ``--precisions``), and ``gemm-only``: the bare batched GEMMs of the rotation with no
epilogue, timed in the same run: the ceiling for that shape. FLOPs per call: ``2·B·m·n·(m+n)``
(one side: ``2·B·m·n·d``).

    python benchmarks/bench_rotate.py                         # CPU set
    python benchmarks/bench_rotate.py --preset gpt2-small --device cuda --precisions fp32,tf32,bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import ops, reference  # noqa: E402

BETA1, BETA2, EPS, LR, DECAY = 0.95, 0.95, 1e-8, 1e-3, 1.0 - 1e-3 * 0.01


class BucketInputs:
    """One copy of a matrix bucket's inputs and state (the harness rotates over a few copies)."""

    def __init__(self, bucket: harness.BucketSpec, device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        b, (m, n) = bucket.count, bucket.work_shape
        left, right = bucket.preconditioned
        self.qs = [harness.orthonormal(b, m, device, gen) if left else None,
                   harness.orthonormal(b, n, device, gen) if right else None]
        self.grads = [torch.randn(m, n, generator=gen).mul_(1e-2).to(device) for _ in range(b)]
        self.exp_avg = torch.zeros(b, m, n, device=device)
        self.exp_avg_sq = torch.full((b, m, n), 1e-4, device=device)
        self.direction = torch.randn(b, m, n, generator=gen).to(device)
        self.params = [torch.randn(m, n, generator=gen).mul_(0.02).to(device) for _ in range(b)]
        self.step_size = torch.full((b,), LR, device=device)
        # The engine keeps two bucket-sized buffers on the CPU (GPU buckets allocate per step).
        self.workspace = (torch.empty_like(self.exp_avg), torch.empty_like(self.exp_avg)) if device.type == "cpu" else None
        self.grad_stack = torch.stack(self.grads)
        self.gemm_out = (torch.empty_like(self.exp_avg), torch.empty_like(self.exp_avg))

    def row_qs(self, i: int) -> list:
        return [reference.NOT_PRECONDITIONED if q is None else q[i] for q in self.qs]

    def bare_gemms(self, x: torch.Tensor, back: bool) -> None:
        """The rotation's batched GEMMs alone, into preallocated outputs (no epilogue)."""
        q_left, q_right = self.qs
        out0, out1 = self.gemm_out
        if q_left is not None:
            torch.matmul(q_left if back else q_left.mT, x, out=out0)
            x = out0
        if q_right is not None:
            torch.matmul(x, q_right.mT if back else q_right, out=out1)


def rotate_in_impls(sets: list[BucketInputs], device: torch.device, backends: list[str], precisions: list[str]) -> dict:
    def pick(i: int) -> BucketInputs:
        return sets[i % len(sets)]

    def ref(i: int) -> None:
        s = pick(i)
        for r, g in enumerate(s.grads):
            rotated = reference.project(g, s.row_qs(r))
            s.exp_avg[r].mul_(BETA1).add_(rotated, alpha=1 - BETA1)
            s.exp_avg_sq[r].mul_(BETA2).add_(rotated.square(), alpha=1 - BETA2)
            _ = s.exp_avg[r] / s.exp_avg_sq[r].sqrt().add_(EPS)

    def torch_ops(i: int) -> None:
        s = pick(i)
        grad = s.grads if s.workspace is not None else torch.stack(s.grads)
        ops.rotate_in_adam(grad, s.qs, s.exp_avg, s.exp_avg_sq, BETA1, BETA2, EPS, workspace=s.workspace)

    def gemm_only(i: int) -> None:
        s = pick(i)
        s.bare_gemms(s.grad_stack, back=False)

    impls: dict = {}
    if "reference" in backends:
        impls["reference"] = ref
    if "torch" in backends:
        impls["torch"] = torch_ops
    if "triton" in backends:
        from soap_kernels import triton as tk

        for precision in precisions:
            def run(i: int, precision: str = precision) -> None:
                s = pick(i)
                tk.rotate_in_adam(torch.stack(s.grads), s.qs, s.exp_avg, s.exp_avg_sq, BETA1, BETA2, EPS,
                                  precision=precision)

            impls["triton" if precision == "fp32" else f"triton-{precision}"] = run
    impls["gemm-only"] = gemm_only
    return impls


def rotate_back_impls(sets: list[BucketInputs], device: torch.device, backends: list[str], precisions: list[str]) -> dict:
    def pick(i: int) -> BucketInputs:
        return sets[i % len(sets)]

    def ref(i: int) -> None:
        s = pick(i)
        for r, p in enumerate(s.params):
            update = reference.project_back(s.direction[r], s.row_qs(r))
            new = p.float()
            new.add_(update, alpha=-LR)
            new.add_(new, alpha=-(1.0 - DECAY))
            p.copy_(new)

    def torch_ops(i: int) -> None:
        s = pick(i)
        ops.rotate_back_update(s.direction, s.qs, s.params, [LR] * len(s.params), DECAY,
                               workspace=None if s.workspace is None else s.workspace[0])

    def gemm_only(i: int) -> None:
        s = pick(i)
        s.bare_gemms(s.direction, back=True)

    impls: dict = {}
    if "reference" in backends:
        impls["reference"] = ref
    if "torch" in backends:
        impls["torch"] = torch_ops
    if "triton" in backends:
        from soap_kernels import triton as tk

        for precision in precisions:
            def run(i: int, precision: str = precision) -> None:
                s = pick(i)
                tk.rotate_back_update(s.direction, s.qs, s.params, s.step_size, DECAY, precision=precision)

            impls["triton" if precision == "fp32" else f"triton-{precision}"] = run
    impls["gemm-only"] = gemm_only
    return impls


def cases(label: str, shapes, args, device: torch.device) -> tuple[list[dict], dict]:
    backends, skipped = harness.soap_backends(device)
    precisions = args.precisions.split(",")
    rows: list[dict] = []
    for bucket in harness.buckets(shapes):
        if not bucket.is_matrix:
            continue
        factors = sum(d * d for d, pre in zip(bucket.work_shape, bucket.preconditioned) if pre)
        per_set = 4 * (9 * bucket.numel + factors * bucket.count)
        sets = [BucketInputs(bucket, device, seed) for seed in range(harness.input_sets(per_set, device))]
        flops = harness.rotation_flops(bucket)
        for op, make in (("rotate_in_adam", rotate_in_impls), ("rotate_back_update", rotate_back_impls)):
            impls = harness.select(make(sets, device, backends, precisions), args)
            rows += harness.run_impls(op, bucket.label, impls, device, args.budget, flops=flops)
        del sets
    return rows, {"skipped": skipped, "constants": {"beta1": BETA1, "beta2": BETA2, "eps": EPS, "lr": LR, "decay": DECAY}}


def extra_args(parser) -> None:
    parser.add_argument("--precisions", default="fp32", help="Triton rotation precisions, comma list of fp32,tf32,bf16")


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.op_main("rotate", __doc__, cases, argv, extra_args)


if __name__ == "__main__":
    main()
