"""Shared benchmark harness: parameter sets shaped like real models, timing, FLOP floors, metadata.

Benchmarks measure and report; nothing here asserts a speed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from soap_kernels import ops
from soap_kernels.reference import make_layout

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (d_model, layers, vocab, context)
PRESETS = {
    "cpu": (256, 6, 16384, 256),
    "gpt2-small": (768, 12, 50257, 1024),
    "gpt2-medium": (1024, 24, 50257, 1024),
    "tiny": (64, 2, 1000, 64),
}


def gpt_shapes(d_model: int, layers: int, vocab: int, context: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model (tied embedding/head, nn.Linear [out, in] layout)."""
    shapes: list[tuple[int, ...]] = [(vocab, d_model), (context, d_model)]
    for _ in range(layers):
        shapes += [(d_model,), (d_model,)]  # ln_1
        shapes += [(3 * d_model, d_model), (3 * d_model,)]  # attn qkv
        shapes += [(d_model, d_model), (d_model,)]  # attn proj
        shapes += [(d_model,), (d_model,)]  # ln_2
        shapes += [(4 * d_model, d_model), (4 * d_model,)]  # mlp fc
        shapes += [(d_model, 4 * d_model), (d_model,)]  # mlp proj
    shapes += [(d_model,), (d_model,)]  # ln_f
    return shapes


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"768x2304,768,50257x768"`` -> shapes."""
    return [tuple(int(d) for d in item.split("x")) for item in text.split(",") if item]


def lean_flops(shapes, max_precond_dim: int = 10000, precondition_1d: bool = False) -> int:
    """DESIGN §2's per-step FLOPs of the lean engine (6·m·n·(m+n) for a two-sided m×n matrix)."""
    total = 0
    for s in shapes:
        layout = make_layout(s, max_precond_dim=max_precond_dim, merge_dims=False,
                             precondition_1d=precondition_1d, channels_last=False)
        total += ops.FLOPS.step(layout.work_shape, layout.preconditioned)
    return total


def reference_flops(shapes, max_precond_dim: int = 10000) -> int:
    """The reference rotates exp_avg back and forth every step as well: 10·m·n·(m+n)."""
    return lean_flops(shapes, max_precond_dim) * 10 // 6


def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 1024, reps: int = 10) -> float:
    """Best measured FLOP/s of an n×n×n matmul: the ceiling a step's GEMMs are held against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        t = timer(device)
        torch.matmul(a, b)
        best = min(best, t())
    return 2 * n**3 / best


def timer(device: torch.device) -> Callable[[], float]:
    """Start a timer; calling the result returns elapsed seconds (CUDA-synchronised on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return stop
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]

    return {"median": statistics.median(xs), "p20": q(0.2), "p80": q(0.8), "worst": xs[-1], "best": xs[0]}


def environment(device: torch.device) -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        rev = ""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": rev or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2))
    return path
