"""Per-kernel GPU benchmark of soap_kernels.triton at GPT-2-small shapes.

One command (needs a CUDA GPU and triton):

    python benchmarks/bench_kernels_gpu.py                  # everything, ~2-4 min on an H100
    python benchmarks/bench_kernels_gpu.py --quick          # fp32 only, no refresh
    python benchmarks/bench_kernels_gpu.py --dry-run        # CPU interpreter, tiny shapes, no timing:
                                                            # checks the script's plumbing anywhere

For each kernel and shape it reports the median time (``triton.testing.do_bench``), TFLOP/s by the
FLOP model in each kernel's docstring, and the share of the measured cuBLAS rate: a bare
``torch.matmul`` pair (or single matmul, one-sided) of the same shapes in the same precision,
timed in the same run. The torch implementation of the same op (``soap_kernels.ops``: cuBLAS plus
separate elementwise kernels) is timed too, so the fusion's gain is visible. Results are printed
and written to ``benchmarks/results/kernels_gpu_<device>.json`` with the device, versions and date.
Benchmarks measure; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import sys
from pathlib import Path

# name -> (m, n, batch, sides): GPT-2 small (d=768, 12 layers); the embedding is one-sided because
# 50257 > max_precond_dim (10000), so only its 768-side is rotated.
SHAPES = {
    "attn_qkv 768x2304": (768, 2304, 12, "both"),
    "attn_proj 768x768": (768, 768, 12, "both"),
    "mlp_fc 768x3072": (768, 3072, 12, "both"),
    "mlp_proj 3072x768": (3072, 768, 12, "both"),
    "embedding 50257x768": (50257, 768, 1, "right"),
}
DRY_SHAPES = {"tiny 24x40": (24, 40, 2, "both"), "tiny one-sided 33x16": (33, 16, 1, "right")}
REFRESH_SIZES = {"d=768 x12": (768, 12), "d=2304 x12": (2304, 12), "d=3072 x12": (3072, 12)}
DRY_REFRESH = {"d=20 x2": (20, 2)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", default="fp32,tf32,bf16", help="rotation GEMM precisions")
    p.add_argument(
        "--ops",
        default="rotate_in_adam,rotate_back_update,update_statistics,adam_step,refresh_factor",
        help="which kernels",
    )
    p.add_argument("--quick", action="store_true", help="fp32 only, skip the refresh")
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes, each op once, no timing")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels_gpu_<device>.json)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.dry_run:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
from soap_kernels import ops  # noqa: E402
from soap_kernels.triton import (  # noqa: E402
    adam_step,
    available,
    refresh_factor,
    rotate_back_update,
    rotate_in_adam,
    update_statistics,
)

DEVICE = "cpu" if ARGS.dry_run else "cuda"


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn`` (one untimed call in a dry run)."""
    if ARGS.dry_run:
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


class _Tf32:
    """Sets torch's cuBLAS TF32 switch for the baselines of one precision mode."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def orthonormal(b: int, d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(b, d, d, device=DEVICE))
    return q.contiguous()


def bare_pair(x: torch.Tensor, qs, precision: str, back: bool):
    """A closure running the bare cuBLAS GEMM(s) of one rotation in the given precision."""
    q_left, q_right = qs
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    x = x.to(dt)
    ql = q_left.to(dt) if q_left is not None else None
    qr = q_right.to(dt) if q_right is not None else None

    def run():
        y = x
        if qr is not None:
            y = torch.matmul(y, qr.mT if back else qr)
        if ql is not None:
            y = torch.matmul(ql if back else ql.mT, y)
        return y

    return run


def rotation_flops(b: int, m: int, n: int, sides: str) -> int:
    return 2 * b * m * n * ((m if sides in ("both", "left") else 0) + (n if sides in ("both", "right") else 0))


def row(kernel, shape, precision, ms, flops, ms_torch=None, ms_cublas=None, bytes_moved=None) -> dict:
    r = {"kernel": kernel, "shape": shape, "precision": precision, "us": ms * 1e3, "flops": flops}
    r["tflops"] = flops / (ms * 1e-3) / 1e12 if flops else None
    if ms_torch is not None:
        r["torch_us"] = ms_torch * 1e3
        r["speedup_vs_torch"] = ms_torch / ms
    if ms_cublas is not None:
        r["cublas_us"] = ms_cublas * 1e3
        r["cublas_tflops"] = flops / (ms_cublas * 1e-3) / 1e12
        r["pct_of_cublas_rate"] = 100.0 * ms_cublas / ms
    if bytes_moved is not None:
        r["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
    return r


def bench_rotate_in_adam(shapes, precisions) -> list[dict]:
    out = []
    for name, (m, n, b, sides) in shapes.items():
        grad = torch.randn(b, m, n, device=DEVICE)
        qs = [orthonormal(b, m) if sides in ("both", "left") else None, orthonormal(b, n) if sides != "left" else None]
        exp_avg, exp_avg_sq = torch.zeros_like(grad), torch.ones_like(grad)
        flops = rotation_flops(b, m, n, sides)
        args = (grad, qs, exp_avg, exp_avg_sq, 0.95, 0.95, 1e-8)
        for precision in precisions:
            with _Tf32(precision == "tf32"):
                ms = bench_ms(functools.partial(rotate_in_adam, *args, precision=precision))
                ms_torch = bench_ms(functools.partial(ops.rotate_in_adam, *args))
                ms_cublas = bench_ms(bare_pair(grad, qs, precision, back=False))
            torch_ms = ms_torch if precision != "bf16" else None  # torch has no bf16-operand mode of this op
            out.append(row("rotate_in_adam", name, precision, ms, flops, torch_ms, ms_cublas))
            report(out[-1])
    return out


def _torch_rotate_back_update(direction, qs, params) -> None:
    update = ops.rotate_back(direction, qs)
    for i, p in enumerate(params):
        p.add_(update[i].to(p.dtype), alpha=-1e-6).mul_(0.9999)


def _bare_grams(stats, rotated) -> None:
    for i, s in enumerate(stats):
        if s is not None:
            x = rotated if i == 0 else rotated.mT
            torch.matmul(x, x.mT)


def bench_rotate_back_update(shapes, precisions) -> list[dict]:
    out = []
    for name, (m, n, b, sides) in shapes.items():
        direction = torch.randn(b, m, n, device=DEVICE)
        qs = [orthonormal(b, m) if sides in ("both", "left") else None, orthonormal(b, n) if sides != "left" else None]
        params = [torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(b)]
        step_size = torch.full((b,), 1e-6, device=DEVICE)
        flops = rotation_flops(b, m, n, sides)

        for precision in precisions:
            with _Tf32(precision == "tf32"):
                ms = bench_ms(functools.partial(rotate_back_update, direction, qs, params, step_size, 0.9999, precision))
                ms_torch = bench_ms(functools.partial(_torch_rotate_back_update, direction, qs, params))
                ms_cublas = bench_ms(bare_pair(direction, qs, precision, back=True))
            torch_ms = ms_torch if precision != "bf16" else None
            out.append(row("rotate_back_update(bf16 p)", name, precision, ms, flops, torch_ms, ms_cublas))
            report(out[-1])
    return out


def bench_update_statistics(shapes) -> list[dict]:
    out = []
    for name, (m, n, b, sides) in shapes.items():
        rotated = torch.randn(b, m, n, device=DEVICE)
        stats = [
            torch.zeros(b, m, m, device=DEVICE) if sides in ("both", "left") else None,
            torch.zeros(b, n, n, device=DEVICE) if sides != "left" else None,
        ]
        # Dense-equivalent FLOPs (the kernel computes only the upper tiles, about half).
        flops = rotation_flops(b, m, n, sides)

        with _Tf32(False):
            ms = bench_ms(functools.partial(update_statistics, stats, rotated, 0.95))
            ms_torch = bench_ms(functools.partial(ops.update_statistics, stats, rotated, 0.95))
            ms_cublas = bench_ms(functools.partial(_bare_grams, stats, rotated))
        out.append(row("update_statistics", name, "fp32", ms, flops, ms_torch, ms_cublas))
        report(out[-1])
    return out


def bench_adam_step() -> list[dict]:
    """GPT-2 small's un-preconditioned tensors: biases and LayerNorms (1-D), bf16 params."""
    d, layers = (768, 12) if not ARGS.dry_run else (16, 2)
    shapes = [(d,)] * 2 + [(d,), (d,), (3 * d,), (d,), (d,), (d,), (4 * d,), (d,)] * layers
    params = [torch.randn(s, device=DEVICE, dtype=torch.bfloat16) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros(s, device=DEVICE) for s in shapes]
    exp_avg_sqs = [torch.ones(s, device=DEVICE) for s in shapes]
    steps = torch.full((len(shapes),), 1e-3, device=DEVICE)
    numel = sum(p.numel() for p in params)

    def torch_foreach():
        torch._foreach_lerp_(exp_avgs, [g.float() for g in grads], 0.05)
        torch._foreach_mul_(exp_avg_sqs, 0.95)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=0.05)
        denom = torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), 1e-8)
        upd = torch._foreach_div(exp_avgs, denom)
        torch._foreach_add_(params, [u.to(torch.bfloat16) for u in upd], alpha=-1e-3)
        torch._foreach_mul_(params, 0.9999)

    ms = bench_ms(lambda: adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, 0.95, 0.95, 1e-8, 0.9999))
    ms_torch = bench_ms(torch_foreach)
    r = row("adam_step(bf16 p)", f"{len(shapes)} tensors, {numel} elems", "fp32", ms, 12 * numel, ms_torch, None, numel * 22)
    report(r)
    out = [r]
    if not ARGS.dry_run:  # fused AdamW on the same tensors: the yardstick docs/DESIGN.md §6 names
        fp = [torch.nn.Parameter(p.float()) for p in params]
        for p, g in zip(fp, grads):
            p.grad = g.float()
        opt = torch.optim.AdamW(fp, lr=1e-3, betas=(0.95, 0.95), weight_decay=0.01, fused=True)
        out.append(row("torch AdamW(fused, fp32 p)", r["shape"], "fp32", bench_ms(opt.step), 12 * numel, None, None, numel * 28))
        report(out[-1])
    return out


def _refresh_from(fn, stats, q, stats0, q0) -> None:
    stats.copy_(stats0)
    q.copy_(q0)
    fn(stats, q)


def bench_refresh(sizes) -> list[dict]:
    out = []
    for name, (d, b) in sizes.items():
        x = torch.randn(b, d, d, device=DEVICE)
        stats0 = x @ x.mT / d
        q0 = orthonormal(b, d)
        flops = b * int(16 * d**3 / 3)  # ops.FLOPS.refresh's model (Householder QR + 2 GEMMs)
        stats, q = stats0.clone(), q0.clone()
        with _Tf32(False):  # each timed call restores the inputs first (two d×d copies, noise here)
            ms = bench_ms(functools.partial(_refresh_from, refresh_factor, stats, q, stats0, q0))
            ms_torch = bench_ms(functools.partial(_refresh_from, ops.refresh_factor, stats, q, stats0, q0))
        out.append(row("refresh_factor (CholeskyQR3 fp64)", name, "fp32/fp64", ms, flops, ms_torch))
        report(out[-1])
    return out


def report(r: dict) -> None:
    parts = [f"{r['kernel']:<34} {r['shape']:<28} {r['precision']:<9} {r['us']:>10.1f} us"]
    if r.get("tflops") is not None:
        parts.append(f"{r['tflops']:7.2f} TFLOP/s")
    if r.get("gbps") is not None:
        parts.append(f"{r['gbps']:7.1f} GB/s")
    if r.get("pct_of_cublas_rate") is not None:
        parts.append(f"{r['pct_of_cublas_rate']:6.1f}% of cuBLAS ({r['cublas_tflops']:.2f} TFLOP/s)")
    if r.get("speedup_vs_torch") is not None:
        parts.append(f"x{r['speedup_vs_torch']:.2f} vs torch ops ({r['torch_us']:.1f} us)")
    print("  ".join(parts), flush=True)


def main() -> int:
    ok, why = available()
    if not ok or (not ARGS.dry_run and not torch.cuda.is_available()):
        print(f"cannot run: {why if not ok else 'no CUDA device'} (use --dry-run to check the script on a CPU)")
        return 1
    torch.manual_seed(0)
    precisions = ["fp32"] if ARGS.quick else ARGS.precisions.split(",")
    wanted = set(ARGS.ops.split(","))
    shapes = DRY_SHAPES if ARGS.dry_run else SHAPES
    import triton

    meta = {
        "device": torch.cuda.get_device_name() if not ARGS.dry_run else "cpu (triton interpreter, dry run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)",
    }
    print(json.dumps(meta))
    results: list[dict] = []
    if "rotate_in_adam" in wanted:
        results += bench_rotate_in_adam(shapes, precisions)
    if "rotate_back_update" in wanted:
        results += bench_rotate_back_update(shapes, precisions)
    if "update_statistics" in wanted:
        results += bench_update_statistics(shapes)
    if "adam_step" in wanted:
        results += bench_adam_step()
    if "refresh_factor" in wanted and not ARGS.quick:
        results += bench_refresh(DRY_REFRESH if ARGS.dry_run else REFRESH_SIZES)
    if ARGS.dry_run:
        print("dry run OK (no timings)")
        return 0
    slug = re.sub(r"[^A-Za-z0-9]+", "_", meta["device"]).strip("_").lower()
    path = Path(ARGS.out) if ARGS.out else Path(__file__).resolve().parent / "results" / f"kernels_gpu_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
