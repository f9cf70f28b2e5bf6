"""Plain Adam over the parameters SOAP leaves un-preconditioned (biases, LayerNorms: the 1-D tensors
of a parameter set), as one multi-tensor update (memory-bound).

Implementations, all on the same tensors:

- ``reference``: ``SOAP(backend="reference").step()`` (the literal per-parameter statement);
- ``torch``: ``SOAP(backend="torch").step()`` (the engine: one bucket per shape);
- ``torch-foreach``: the same math as one ``torch._foreach_*`` sequence over the list;
- ``triton``: ``soap_kernels.triton.adam_step`` (one launch for the whole list, CUDA);
- ``native``: ``soap_kernels._native.adam_step`` (the compiled extension, when built);
- ``adamw-fused`` / ``adamw-foreach``: ``torch.optim.AdamW(fused=True)`` / ``(foreach=True)``
  (decoupled decay order differs; the same memory traffic), the yardstick of docs/DESIGN.md §6.

Bytes per element (fp32 parameters): 28 (read p, g, m, v; write p, m, v). The ceiling is the
copy bandwidth measured in the same run (``%bw``).

    python benchmarks/bench_adam.py
    python benchmarks/bench_adam.py --preset gpt2-small --device cuda
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import SOAP  # noqa: E402

BETA1, BETA2, EPS, LR, WD = 0.95, 0.95, 1e-8, 1e-3, 0.01
BYTES_PER_ELEMENT = 28


class Inputs:
    def __init__(self, shapes, device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device)) for s in shapes]
        self.grads = [torch.randn(s, generator=gen).mul_(1e-2).to(device) for s in shapes]
        self.exp_avg = [torch.zeros_like(g) for g in self.grads]
        self.exp_avg_sq = [torch.full_like(g, 1e-4) for g in self.grads]
        self.step_sizes = torch.full((len(shapes),), LR, device=device)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        opt = self.optimizers.get(name)
        if opt is None:
            for p, g in zip(self.params, self.grads):
                p.grad = g
            if name == "adamw-fused":
                opt = torch.optim.AdamW(self.params, lr=LR, betas=(BETA1, BETA2), weight_decay=WD, fused=True)
            elif name == "adamw-foreach":
                opt = torch.optim.AdamW(self.params, lr=LR, betas=(BETA1, BETA2), weight_decay=WD, foreach=True)
            else:
                opt = SOAP(self.params, lr=LR, betas=(BETA1, BETA2), weight_decay=WD, backend=name)
                opt.step()  # the initialising step (no update)
            self.optimizers[name] = opt
        return opt


def foreach_adam(s: Inputs) -> None:
    """SOAP's plain-Adam math as one foreach sequence (bias correction folded into the step size)."""
    torch._foreach_lerp_(s.exp_avg, s.grads, 1.0 - BETA1)
    torch._foreach_mul_(s.exp_avg_sq, BETA2)
    torch._foreach_addcmul_(s.exp_avg_sq, s.grads, s.grads, value=1.0 - BETA2)
    denom = torch._foreach_sqrt(s.exp_avg_sq)
    torch._foreach_add_(denom, EPS)
    torch._foreach_addcdiv_(s.params, s.exp_avg, denom, value=-LR)
    torch._foreach_mul_(s.params, 1.0 - LR * WD)


def impls(sets: list[Inputs], backends: list[str], native) -> dict:
    def pick(i: int) -> Inputs:
        return sets[i % len(sets)]

    def optimizer_step(name: str):
        def run(i: int) -> None:
            s = pick(i)
            opt = s.optimizer(name)
            for p, g in zip(s.params, s.grads):
                p.grad = g
            opt.step()

        return run

    found: dict = {}
    for name in ("reference", "torch"):
        if name in backends:
            found[name] = optimizer_step(name)
    found["torch-foreach"] = lambda i: foreach_adam(pick(i))
    if "triton" in backends:
        from soap_kernels import triton as tk

        def run_triton(i: int) -> None:
            s = pick(i)
            tk.adam_step(s.params, s.grads, s.exp_avg, s.exp_avg_sq, s.step_sizes, BETA1, BETA2, EPS, 1.0 - LR * WD)

        found["triton"] = run_triton
    if native is not None:
        def run_native(i: int) -> None:
            s = pick(i)
            native.adam_step(s.params, s.grads, s.exp_avg, s.exp_avg_sq, s.step_sizes, beta1=BETA1, beta2=BETA2,
                             eps=EPS, lr_weight_decay=LR * WD)

        found["native"] = run_native
    found["adamw-fused"] = optimizer_step("adamw-fused")
    found["adamw-foreach"] = optimizer_step("adamw-foreach")
    return found


def cases(label: str, shapes, args, device: torch.device) -> tuple[list[dict], dict]:
    backends, skipped = harness.soap_backends(device)
    ok, why = harness.native_status()
    native = None
    if ok:
        from soap_kernels import _native as native
    else:
        skipped["native"] = why
    plain = [tuple(s) for b in harness.buckets(shapes) if not any(b.preconditioned) for s in [b.shape] * b.count]
    if not plain:
        return [], {"skipped": skipped, "note": "no un-preconditioned tensors in this set"}
    numel = sum(math.prod(s) for s in plain)
    case = f"{len(plain)} tensors, {numel / 1e3:.0f}k"
    with torch.no_grad():
        sets = [Inputs(plain, device, seed) for seed in range(harness.input_sets(20 * numel, device))]
        rows = harness.run_impls("adam_step", case, harness.select(impls(sets, backends, native), args), device,
                                 args.budget, bytes_moved=BYTES_PER_ELEMENT * numel)
    return rows, {"skipped": skipped, "bytes_per_element": BYTES_PER_ELEMENT, "tensors": len(plain), "numel": numel}


COLUMNS = [c for c in harness.OP_COLUMNS if c[0] not in ("tflops", "pct_matmul")] + [("x_adamw-fused", "AdamW/this", "10.2f", 1)]


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.op_main("adam", __doc__, cases, argv, baselines=("torch", "reference", "adamw-fused"), columns=COLUMNS)


if __name__ == "__main__":
    main()
