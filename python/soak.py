"""Long-run soak of SOAP: thousands of steps on a toy problem, checking what must hold forever.

The problem: a two-layer tanh MLP student fitting a fixed teacher of the same shape (so the loss
can keep falling for as long as one runs), on minibatches drawn from a fixed set, evaluated on the
whole set. For each refresh frequency ``f`` and parameter dtype (fp32, bf16) the run checks:

* no parameter and no optimizer state tensor ever holds a NaN or an inf;
* the loss keeps falling: the mean evaluation loss of each tenth of the run is below the first
  tenth's, and the last tenth's is below the middle tenth's (bf16 is allowed to have reached its
  rounding floor: the last tenth may be within ``--bf16-floor`` of the middle one);
* the eigenbases stay orthonormal: ``max ||QᵀQ − I||_F`` over every factor and every step is below
  ``--q-bound`` (default 1e-5, for this problem's factors of size <= 48; the engine re-orthonormalises
  each basis every ``REORTHONORMALIZE_EVERY`` refreshes, and between two the error grows by about one
  fp32 rounding per refresh: measured 7.3e-6 over 3000 refreshes, the fp32 eigh's own error level).

It also reports the share of step time spent re-orthonormalising. Exit status 1 if a check fails.

    python python/soak.py                       # 3000 steps, f = 1, 10, 100, fp32 and bf16
    python python/soak.py --steps 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soap_kernels import SOAP, engine, ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Measured bound on max ||QᵀQ − I||_F (see the module docstring); the soak fails above it.
Q_BOUND = 1e-5


class _Timer:
    """Wraps ``ops.reorthonormalize_`` to count its calls and time (the engine looks it up there)."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._original = ops.reorthonormalize_

    def __call__(self, q: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self._original(q)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def __enter__(self) -> _Timer:
        ops.reorthonormalize_ = self
        return self

    def __exit__(self, *exc: object) -> None:
        ops.reorthonormalize_ = self._original


def _mlp(dims: tuple[int, int, int], generator: torch.Generator, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    d_in, hidden, d_out = dims
    shapes = [(hidden, d_in), (hidden,), (d_out, hidden), (d_out,)]
    scales = [1 / math.sqrt(d_in), 0.1, 1 / math.sqrt(hidden), 0.1]
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * c).to(dtype)) for s, c in zip(shapes, scales)]


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _q_error(opt: SOAP) -> float:
    worst = 0.0
    for state in opt.state.values():
        for q in state.get("Q", []):
            if isinstance(q, torch.Tensor) and q.numel():
                eye = torch.eye(q.shape[0], dtype=torch.float64)
                worst = max(worst, float(torch.linalg.matrix_norm(q.double().T @ q.double() - eye)))
    return worst


def _all_finite(opt: SOAP, params: list[torch.Tensor]) -> bool:
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return False
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                    return False
    return True


def run_soak(frequency: int, dtype: str = "fp32", steps: int = 3000, *, backend: str = "torch",
             dims: tuple[int, int, int] = (24, 48, 12), samples: int = 512, batch: int = 64, lr: float = 3e-3,
             seed: int = 0, check_every: int = 1, bf16_floor: float = 0.05, q_bound: float = Q_BOUND) -> dict[str, Any]:
    """One soak run; returns its measurements and ``ok`` (every check passed) with the reasons."""
    g = torch.Generator().manual_seed(seed)
    teacher = _mlp(dims, g, torch.float32)
    x = torch.randn(samples, dims[0], generator=g)
    with torch.no_grad():
        y = _forward(teacher, x) * 3.0
    params = _mlp(dims, g, DTYPES[dtype])
    opt = SOAP(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, precondition_frequency=frequency, backend=backend)
    x_typed, y_typed = x.to(DTYPES[dtype]), y.to(DTYPES[dtype])
    losses: list[float] = []
    q_max = 0.0
    finite = True
    t0 = time.perf_counter()
    with _Timer() as timer:
        for step in range(steps):
            idx = torch.randint(0, samples, (batch,), generator=g)
            out = _forward(params, x_typed[idx])
            loss = torch.nn.functional.mse_loss(out.float(), y_typed[idx].float())
            for p in params:
                p.grad = None
            loss.backward()
            opt.step()
            with torch.no_grad():
                losses.append(float(torch.nn.functional.mse_loss(_forward(params, x_typed).float(), y)))
            if step % check_every == 0 or step == steps - 1:
                q_max = max(q_max, _q_error(opt))
                if not math.isfinite(losses[-1]) or not _all_finite(opt, params):
                    finite = False
                    break
    seconds = time.perf_counter() - t0
    tenth = max(1, len(losses) // 10)
    windows = [sum(losses[i : i + tenth]) / len(losses[i : i + tenth]) for i in range(0, len(losses) - tenth + 1, tenth)]
    failures = []
    if not finite:
        failures.append(f"non-finite value at step {len(losses) - 1}")
    if len(windows) >= 3:
        first, middle, last = windows[0], windows[len(windows) // 2], windows[-1]
        if not all(w < first for w in windows[1:]):
            failures.append("a later tenth of the run has a mean loss above the first tenth's")
        slack = bf16_floor * middle if dtype == "bf16" else 0.0
        if not last < middle + slack:
            failures.append(f"the loss stopped falling: last tenth {last:.4g} vs middle tenth {middle:.4g}")
    if not q_max < q_bound:
        failures.append(f"max ||QᵀQ − I||_F = {q_max:.2e} above the bound {q_bound:.0e}")
    return {
        "frequency": frequency, "dtype": dtype, "backend": backend, "steps": len(losses),
        "initial_loss": losses[0] if losses else float("nan"), "final_loss": losses[-1] if losses else float("nan"),
        "window_means": windows, "max_q_error_fro": q_max, "finite": finite,
        "seconds": seconds, "reorthonormalize_calls": timer.calls,
        "reorthonormalize_share": timer.seconds / seconds if seconds else 0.0,
        "ok": not failures, "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (default 3000)")
    parser.add_argument("--frequencies", type=int, nargs="+", default=[1, 10, 100],
                        help="precondition_frequency values (default 1 10 100)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="parameter dtypes (default fp32 bf16)")
    parser.add_argument("--backend", default="torch", help="SOAP backend (default torch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=1, help="check finiteness and ||QᵀQ − I|| every N steps")
    parser.add_argument("--q-bound", type=float, default=Q_BOUND, help=f"fail above this ||QᵀQ − I||_F (default {Q_BOUND:g})")
    parser.add_argument("--bf16-floor", type=float, default=0.05,
                        help="bf16 runs may end within this fraction above the middle tenth's loss (default 0.05)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the matrices are tiny, and on a busy 2-core machine "
                             "OpenMP made a 512x48 tanh take 8.7 ms with 2 threads against 0.013 ms with 1)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    results = []
    print(f"soak: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, REORTHONORMALIZE_EVERY={engine.REORTHONORMALIZE_EVERY}")
    print(f"{'f':>4} {'dtype':>5} {'steps':>6} {'loss0':>9} {'final':>9} {'max|QtQ-I|F':>12} {'reorth%':>8} {'s':>7}  ok")
    for frequency in args.frequencies:
        for dtype in args.dtypes:
            r = run_soak(frequency, dtype, args.steps, backend=args.backend, seed=args.seed,
                         check_every=args.check_every, bf16_floor=args.bf16_floor, q_bound=args.q_bound)
            results.append(r)
            print(f"{frequency:>4} {dtype:>5} {r['steps']:>6} {r['initial_loss']:>9.4g} {r['final_loss']:>9.4g} "
                  f"{r['max_q_error_fro']:>12.2e} {100 * r['reorthonormalize_share']:>7.2f}% {r['seconds']:>7.1f}  "
                  f"{'yes' if r['ok'] else 'NO: ' + '; '.join(r['failures'])}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
