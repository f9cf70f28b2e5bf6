"""CPU benchmark of the native ops (soap_kernels._C) against the same math as separate torch ops.

- ``moment_update`` (fused lerp / second moment / division, fp32) vs the engine's torch ops
  (``m.lerp_(g, 1-β1); v.mul_(β2).addcmul_(g, g, value=1-β2); d = m / v.sqrt().add_(eps)``), and
  vs that function under ``torch.compile`` (Inductor's fused C++ loop), on GPT-2-small shapes.
- ``adam_step`` (plain Adam, SOAP's semantics) vs the ``torch._foreach_*`` sequence with the same
  math, and vs torch's own fused CPU AdamW kernel (``torch._fused_adamw_``: the same memory traffic,
  decay order differs), on GPT-2 small's un-preconditioned (1-D) parameters and on one layer's
  matrices.

Timing: ``time.perf_counter`` around each call after warm-up, the candidates interleaved within
each repetition; median (10th/90th percentile, minimum) over many repetitions;
``torch.set_num_threads(--threads)`` for every candidate (the native CPU kernels spread their
chunks with at::parallel_for on torch's OpenMP threads). On a shared machine the multi-thread
figures include waiting for the other cores; the load average is recorded. Bytes moved per
element: 24 for ``moment_update`` (read m, v, g; write m, v, d), 28 for fp32 ``adam_step``. Prints
a table and writes JSON (device, versions, date, shapes) to ``--out``.

    python benchmarks/bench_native.py                  # full run, 2 threads
    python benchmarks/bench_native.py --quick --no-compile
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from soap_kernels import _native
from soap_kernels._info import cpu_model

BETA1, BETA2, EPS, LR, WEIGHT_DECAY = 0.95, 0.95, 1e-8, 3e-3, 0.01
D_MODEL, N_LAYER, D_MLP = 768, 12, 3072
# Buckets the engine's moment update sees for GPT-2 small: each matrix shape on its own, and the
# 12 layers' matrices of one shape stacked into one bucket.
MOMENT_SHAPES: list[tuple[int, ...]] = [
    (D_MODEL, 3 * D_MODEL),  # attn.c_attn
    (D_MODEL, D_MODEL),  # attn.c_proj
    (D_MODEL, D_MLP),  # mlp.c_fc
    (D_MLP, D_MODEL),  # mlp.c_proj
    (1024, D_MODEL),  # wpe
    (N_LAYER, D_MODEL, D_MODEL),  # a bucket: 12 stacked c_proj
    (N_LAYER, D_MODEL, 3 * D_MODEL),  # a bucket: 12 stacked c_attn
]
MOMENT_BYTES_PER_ELEMENT = 24
ADAM_BYTES_PER_ELEMENT = 28  # fp32: read p, g, m, v; write p, m, v


def gpt2_small_1d_shapes() -> list[tuple[int, ...]]:
    """The parameters SOAP leaves un-preconditioned in GPT-2 small: biases and LayerNorm vectors."""
    per_layer = [(D_MODEL,), (D_MODEL,), (3 * D_MODEL,), (D_MODEL,), (D_MODEL,), (D_MODEL,), (D_MLP,), (D_MODEL,)]
    return per_layer * N_LAYER + [(D_MODEL,), (D_MODEL,)]


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Wall time of each candidate in milliseconds: median, 10th/90th percentile and minimum.

    The candidates run in turn within each repetition, so a change in machine load (other jobs on
    shared cores) hits them alike and the ratios stay meaningful even when absolute times do not.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    stats = {}
    for name, times in samples.items():
        times.sort()
        stats[name] = {
            "median_ms": statistics.median(times),
            "p10_ms": times[int(0.1 * (len(times) - 1))],
            "p90_ms": times[int(0.9 * (len(times) - 1))],
            "min_ms": times[0],
        }
    return stats


def torch_moment_update(m: Tensor, v: Tensor, g: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """The engine's op sequence today (soap_kernels/ops.py rotate_in_adam minus the rotation)."""
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return m / v.sqrt().add_(eps)


def make_moments(shape: Sequence[int], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = 1e-2 * torch.randn(shape, generator=gen)
    v = 1e-4 * torch.rand(shape, generator=gen)
    g = 1e-2 * torch.randn(shape, generator=gen)
    return m, v, g


def moment_update_row(shape: tuple[int, ...], compiled: Callable[..., Tensor] | None, args: argparse.Namespace) -> dict[str, Any]:
    numel = int(torch.Size(shape).numel())
    m, v, g = make_moments(shape, seed=0)
    out = [torch.empty_like(m)]
    row: dict[str, Any] = {"op": "moment_update", "shape": list(shape), "numel": numel, "dtype": "float32"}
    candidates: dict[str, Callable[[], object]] = {
        "native": lambda: _native.moment_update([m], [v], [g], BETA1, BETA2, EPS),
        "native_out": lambda: _native.moment_update([m], [v], [g], BETA1, BETA2, EPS, out=out),
        "torch_ops": lambda: torch_moment_update(m, v, g, BETA1, BETA2, EPS),
    }
    if compiled is not None:
        candidates["torch_compile"] = lambda: compiled(m, v, g, BETA1, BETA2, EPS)
    row.update(time_interleaved(candidates, args.reps, args.warmup))
    row["native_GBps"] = numel * MOMENT_BYTES_PER_ELEMENT / (row["native"]["median_ms"] * 1e-3) / 1e9
    row["speedup_vs_torch_ops"] = row["torch_ops"]["median_ms"] / row["native"]["median_ms"]
    row["min_time_ratio_vs_torch_ops"] = row["torch_ops"]["min_ms"] / row["native"]["min_ms"]
    if compiled is not None:
        row["speedup_vs_torch_compile"] = row["torch_compile"]["median_ms"] / row["native"]["median_ms"]
    return row


def bench_moment_update(args: argparse.Namespace) -> list[dict[str, Any]]:
    compiled = None if args.no_compile else torch.compile(torch_moment_update, dynamic=True)
    rows = []
    for shape in MOMENT_SHAPES[:3] if args.quick else MOMENT_SHAPES:
        rows.append(moment_update_row(shape, compiled, args))
        print_row(rows[-1])
    return rows


def make_adam_lists(shapes: Sequence[tuple[int, ...]], seed: int) -> tuple[list[Tensor], ...]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [1e-2 * torch.randn(s, generator=gen) for s in shapes]
    exp_avgs = [1e-2 * torch.randn(s, generator=gen) for s in shapes]
    exp_avg_sqs = [1e-4 * torch.rand(s, generator=gen) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def foreach_adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    neg_step_sizes: list[float],
    lr_wd: float,
) -> None:
    """The same math as adam_step with torch's multi-tensor ops (as torch.optim's foreach Adam)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - BETA1)
    torch._foreach_mul_(exp_avg_sqs, BETA2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - BETA2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, EPS)
    torch._foreach_addcdiv_(params, exp_avgs, denom, neg_step_sizes)
    torch._foreach_add_(params, params, alpha=-lr_wd)


def adam_step_row(name: str, shapes: Sequence[tuple[int, ...]], args: argparse.Namespace) -> dict[str, Any]:
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    params, grads, exp_avgs, exp_avg_sqs = make_adam_lists(shapes, seed=1)
    steps = [10 + i % 3 for i in range(len(shapes))]  # a few different step counts in one call
    step_sizes = [LR * (1 - BETA2**t) ** 0.5 / (1 - BETA1**t) for t in steps]
    neg_step_sizes = [-s for s in step_sizes]
    lr_wd = LR * WEIGHT_DECAY
    state_steps = [torch.tensor(float(t)) for t in steps]

    def native() -> None:
        _native.adam_step(
            params, grads, exp_avgs, exp_avg_sqs, step_sizes, beta1=BETA1, beta2=BETA2, eps=EPS, lr_weight_decay=lr_wd
        )

    def fused_adamw() -> None:
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            state_steps,
            lr=LR,
            beta1=BETA1,
            beta2=BETA2,
            weight_decay=WEIGHT_DECAY,
            eps=EPS,
            amsgrad=False,
            maximize=False,
        )

    row: dict[str, Any] = {"op": "adam_step", "case": name, "tensors": len(shapes), "numel": numel, "dtype": "float32"}
    candidates: dict[str, Callable[[], object]] = {
        "native": native,
        "torch_foreach": lambda: foreach_adam_step(params, grads, exp_avgs, exp_avg_sqs, neg_step_sizes, lr_wd),
        "torch_fused_adamw": fused_adamw,
    }
    row.update(time_interleaved(candidates, args.reps, args.warmup))
    row["native_GBps"] = numel * ADAM_BYTES_PER_ELEMENT / (row["native"]["median_ms"] * 1e-3) / 1e9
    row["speedup_vs_torch_foreach"] = row["torch_foreach"]["median_ms"] / row["native"]["median_ms"]
    row["min_time_ratio_vs_torch_foreach"] = row["torch_foreach"]["min_ms"] / row["native"]["min_ms"]
    row["speedup_vs_torch_fused_adamw"] = row["torch_fused_adamw"]["median_ms"] / row["native"]["median_ms"]
    return row


def bench_adam_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = {
        "gpt2-small 1-D params (98 tensors)": gpt2_small_1d_shapes(),
        "one layer's matrices (4 tensors)": [(D_MODEL, 3 * D_MODEL), (D_MODEL, D_MODEL), (D_MODEL, D_MLP), (D_MLP, D_MODEL)],
    }
    rows = []
    for name, shapes in cases.items():
        rows.append(adam_step_row(name, shapes, args))
        print_row(rows[-1])
    return rows


def print_row(row: dict[str, Any]) -> None:
    label = str(tuple(row["shape"])) if "shape" in row else row["case"]
    cols = [
        f"{key} {row[key]['median_ms']:8.3f} ms"
        for key in ("native", "native_out", "torch_ops", "torch_compile", "torch_foreach", "torch_fused_adamw")
        if key in row
    ]
    ratios = [f"{k.removeprefix('speedup_')} {v:5.2f}x" for k, v in row.items() if k.startswith("speedup_")]
    ratios += [f"(min-time ratio {v:5.2f}x)" for k, v in row.items() if k.startswith("min_time_ratio_")]
    print(
        f"{row['op']:<14} {label:<36} {row['numel']:>10}  "
        + "  ".join(cols)
        + f"  native {row['native_GBps']:6.1f} GB/s  "
        + "  ".join(ratios),
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", default="2", help="torch.set_num_threads; a comma list runs each in turn (default 2, e.g. 1,2)"
    )
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per case (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (default 5)")
    parser.add_argument("--quick", action="store_true", help="the first three moment shapes only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "native_cpu.json",
        help="JSON output path (default benchmarks/results/native_cpu.json)",
    )
    args = parser.parse_args(argv)
    if not _native.available():
        print(f"native extension not available: {_native.load_error()}", file=sys.stderr)
        return 1
    thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    torch.manual_seed(0)
    meta = {
        "device": cpu_model(),
        "threads": thread_counts,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_cpu_kernel_variant": _native.cpu_kernel_variant(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reps": args.reps,
        "warmup": args.warmup,
        "hyperparameters": {"beta1": BETA1, "beta2": BETA2, "eps": EPS, "lr": LR, "weight_decay": WEIGHT_DECAY},
        "timer": "time.perf_counter, candidates interleaved per repetition, median over reps after warm-up",
    }
    print(
        f"{meta['device']}, torch {meta['torch']} ({meta['torch_cpu_capability']}), "
        f"native variant {meta['native_cpu_kernel_variant']}, load average {meta['load_average_at_start']}"
    )
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"-- {torch.get_num_threads()} thread(s)")
        rows = bench_moment_update(args) + bench_adam_step(args)
        for row in rows:
            row["threads"] = threads
        results += rows
    meta["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
