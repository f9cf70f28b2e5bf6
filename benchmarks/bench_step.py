"""Time one whole optimizer step: AdamW (fused and foreach), SOAP on every backend that can run
here, and optionally the paper authors' soap.py, in one run on the same parameters and gradients.

Reports per optimizer the median step and p20/p80, the medians of the steps between refreshes and
of the refresh steps, the step amortized over whole refresh cycles (refresh steps included), the
worst step, ratios measured in the same run (× AdamW(fused=True), speed-up over the reference),
achieved TFLOP/s against DESIGN §2's lean FLOP model, the share of the fp32 matmul rate measured in
the same run, the lean-FLOP floor, and optimizer-state bytes per parameter.

    python benchmarks/bench_step.py                          # CPU set (d 256, 6 layers, vocab 16384)
    python benchmarks/bench_step.py --preset gpt2-small,gpt2-medium --device cuda
    python benchmarks/bench_step.py --shapes 4*1024x1024,1024 --optimizers adamw,torch
    python benchmarks/bench_step.py --upstream ~/src/SOAP/soap.py     # + the authors' SOAP class

``--optimizers`` (default ``auto``: everything that can run here): ``adamw`` (fused=True),
``adamw-foreach``, ``reference``, ``torch``, ``triton`` (``triton-tf32``, ``triton-bf16``: rotation
GEMM precision), ``cuda``, ``auto`` (SOAP's own choice), ``upstream`` (needs ``--upstream``).
Writes ``step_<set>_<device>.json/.csv/.png`` under benchmarks/results/ (or ``--out-dir``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import soap_kernels  # noqa: E402
from soap_kernels import SOAP  # noqa: E402

ADAMW = ("adamw", "adamw-foreach")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(persistent optimizer state, reusable workspace the engine keeps between steps) in bytes."""
    if isinstance(opt, SOAP) and opt._engine is not None:
        total = 0
        for _, b in opt._engine.buckets:
            tensors = [b.exp_avg, b.exp_avg_sq, b.step, *[t for t in (*b.q, *b.stats) if t is not None]]
            total += sum(t.numel() * t.element_size() for t in tensors)
        work = sum(t.numel() * t.element_size() for t in opt._engine.workspace_pool.buffers.values())
        return total, work
    total = 0
    for state in opt.state.values():
        for v in state.values():
            items = v if isinstance(v, (list, tuple)) else [v]
            total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total, 0


def load_upstream(path: str, class_name: str = "SOAP") -> type:
    """Import a copy of the paper authors' soap.py (never bundled here) and return its class."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "soap.py"
    spec = importlib.util.spec_from_file_location("upstream_soap", file)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--upstream {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise SystemExit(f"--upstream {file}: no class {class_name!r} in it")
    return cls


def _upstream_kwargs(cls: type, frequency: int) -> dict:
    """The same hyperparameters as our SOAP rows, limited to what this copy of the class accepts."""
    wanted = {"lr": 1e-3, "betas": (0.95, 0.95), "weight_decay": 0.01, "precondition_frequency": frequency,
              "shampoo_beta": 0.95}
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def make_optimizer(name: str, params, frequency: int, device: torch.device, upstream: type | None = None):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    if name == "upstream":
        if upstream is None:
            raise ValueError("the 'upstream' optimizer needs --upstream PATH/TO/soap.py")
        return upstream(params, **_upstream_kwargs(upstream, frequency))
    if name.startswith("triton-"):
        return SOAP(params, lr=1e-3, precondition_frequency=frequency, backend="triton",
                    rotation_precision=name.split("-", 1)[1])
    return SOAP(params, lr=1e-3, precondition_frequency=frequency, backend=name)


def is_soap(name: str) -> bool:
    return name not in ADAMW


def optimizer_list(spec: str, device: torch.device, upstream: type | None) -> tuple[list[str], dict[str, str]]:
    """``auto``: AdamW (fused, foreach), every SOAP backend that can run here, upstream if given."""
    if spec != "auto":
        return [s.strip() for s in spec.split(",") if s.strip()], {}
    names = list(ADAMW)
    backends, skipped = harness.soap_backends(device)
    names += backends
    if upstream is not None:
        names.append("upstream")
    return names, skipped


def bench(name: str, shapes, args, device: torch.device, dtype: torch.dtype, upstream: type | None) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device=device, dtype=dtype)) for s in shapes]
    # Gradient sets used in turn, so no step sees exactly the gradient of the previous one.
    grad_sets = [[torch.randn(s, generator=gen).mul_(1e-2).to(device=device, dtype=dtype) for s in shapes]
                 for _ in range(args.grad_sets)]
    opt = make_optimizer(name, params, args.frequency, device, upstream)

    def step(i: int) -> None:
        for p, g in zip(params, grad_sets[i % len(grad_sets)]):
            p.grad = g
        opt.step()

    # Warm-up (untimed): the initialising step plus one refresh cycle, ending with a refresh, so
    # the timed window holds whole cycles. Call c (c >= 1) is update number c, a refresh when
    # c % frequency == 0 (the constant schedule, here and in the authors' soap.py).
    f = args.frequency
    warm = f
    for i in range(warm + 1):
        step(i)
    harness.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for i in range(args.cycles * f):
        t = harness.timer(device)
        step(warm + 1 + i)
        times.append(t())
    refresh_at = [i for i in range(len(times)) if (warm + 1 + i) % f == 0] if is_soap(name) else []
    steady = [t for i, t in enumerate(times) if i not in refresh_at]
    refresh = [times[i] for i in refresh_at]
    q = harness.quantiles(times)
    between = statistics.median(steady)
    refresh_median = statistics.median(refresh) if refresh else None
    # Amortized over whole cycles from per-kind medians: one load spike on a shared machine then
    # moves it by a little, not by spike/steps (the plain mean is kept as mean_s).
    amortized = ((f - 1) * between + refresh_median) / f if refresh else between
    n_params = sum(p.numel() for p in params)
    state, workspace = state_bytes(opt)
    row = {
        "optimizer": name,
        "param_dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "steps_timed": len(times),
        "median_s": q["median"],
        "p20_s": q["p20"],
        "p80_s": q["p80"],
        "worst_s": q["worst"],
        "between_refresh_s": between,
        "refresh_step_s": refresh_median,
        "amortized_s": amortized,
        "mean_s": q["mean"],
        "state_bytes": state,
        "state_bytes_per_param": state / n_params,
        "workspace_bytes": workspace,
        "refresh_steps": refresh_at,
        "times_s": times,
    }
    if device.type == "cuda":
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return row


COLUMNS = [
    ("optimizer", "optimizer", "<14", 1),
    ("param_dtype", "p", "<4", 1),
    ("median_s", "median ms", "10.1f", 1e3),
    ("p20_s", "p20", "8.1f", 1e3),
    ("p80_s", "p80", "8.1f", 1e3),
    ("between_refresh_s", "between", "8.1f", 1e3),
    ("refresh_step_s", "refresh", "8.1f", 1e3),
    ("amortized_s", "amort. ms", "10.1f", 1e3),
    ("worst_s", "worst", "8.1f", 1e3),
    ("x_adamw", "x AdamW", "8.2f", 1),
    ("speedup_vs_reference", "ref/this", "9.2f", 1),
    ("tflops", "TFLOP/s", "8.3f", 1),
    ("pct_matmul_ceiling", "%matmul", "8.1f", 1),
    ("over_floor", "/floor", "7.2f", 1),
    ("state_bytes_per_param", "B/param", "8.1f", 1),
]


def add_figures(rows: list[dict], flops: int, rate: float, floor: float) -> None:
    """Ratios within the same run and parameter dtype; FLOP rates against the lean model."""
    for r in rows:
        if "amortized_s" not in r:
            continue
        same = {x["optimizer"]: x for x in rows if x.get("param_dtype") == r["param_dtype"] and "amortized_s" in x}
        adamw, ref = same.get("adamw"), same.get("reference")
        r["x_adamw"] = r["amortized_s"] / adamw["amortized_s"] if adamw else None
        r["speedup_vs_reference"] = ref["amortized_s"] / r["amortized_s"] if ref else None
        soap = is_soap(r["optimizer"])
        r["tflops"] = flops / r["amortized_s"] / 1e12 if soap else None
        r["pct_matmul_ceiling"] = 100 * flops / r["amortized_s"] / rate if soap else None
        r["over_floor"] = r["amortized_s"] / floor if soap else None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, default_preset="cpu")
    parser.add_argument("--optimizers", default="auto", help="comma list (see above); default auto = all that run here")
    parser.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default 10)")
    parser.add_argument("--cycles", type=int, default=3, help="refresh cycles timed per optimizer (default 3)")
    parser.add_argument("--grad-sets", type=int, default=2, help="gradient sets used in turn (default 2)")
    parser.add_argument("--param-dtypes", default=None,
                        help="parameter storage dtypes, comma list of fp32,bf16,fp16 (default fp32; fp32,bf16 on cuda)")
    parser.add_argument("--upstream", default=None, help="path to the paper authors' soap.py (its SOAP class is timed)")
    parser.add_argument("--out", default=None, help="JSON file name (default step_<set>_<device>.json)")
    args = parser.parse_args(argv)
    device = harness.setup_device(args)
    sets = harness.parameter_sets(args.preset, args.shapes)
    upstream = load_upstream(args.upstream) if args.upstream else None
    names, skipped = optimizer_list(args.optimizers, device, upstream)
    dtypes = (args.param_dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    rate = harness.matmul_rate(device)
    env = harness.environment(device)
    print(f"soap_kernels {soap_kernels.__version__}  torch {torch.__version__}  device {env['device']}  "
          f"threads {torch.get_num_threads()}  load {env['load_average']}")
    for name, why in skipped.items():
        print(f"  skipping backend {name}: {why}")
    payloads = []
    for label, shapes in sets:
        flops = harness.lean_flops(shapes)
        floor = flops / rate
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"\nparameter set {label}: {len(shapes)} tensors, {n / 1e6:.2f} M params; lean FLOPs/step "
              f"{flops / 1e9:.2f} G; fp32 matmul {rate / 1e9:.1f} GFLOP/s; floor {floor * 1e3:.1f} ms")
        rows = []
        for dtype_name in dtypes:
            for name in names:
                print(f"  timing {name} ({dtype_name}) ...", flush=True)
                try:
                    rows.append(bench(name, shapes, args, device, DTYPES[dtype_name], upstream))
                except Exception as exc:  # one optimizer failing (OOM, a backend bug) must not lose the rest
                    print(f"    FAILED: {type(exc).__name__}: {exc}")
                    rows.append({"optimizer": name, "param_dtype": dtype_name, "error": f"{type(exc).__name__}: {exc}"[:500]})
                gc.collect()  # the last optimizer's state goes before the next one is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        add_figures(rows, flops, rate, floor)
        harness.print_table(rows, COLUMNS)
        env = harness.environment(device)  # the load average at the end of this set
        payload = {
            "benchmark": "step",
            "parameter_set": label,
            "shapes": shapes,
            "params": n,
            "precondition_frequency": args.frequency,
            "lean_flops_per_step": flops,
            "reference_flops_per_step": harness.reference_flops(shapes),
            "refresh_flops_per_refresh": harness.refresh_flops(shapes),
            "matmul_rate_flops": rate,
            "floor_s": floor,
            "skipped": skipped,
            "upstream": str(Path(args.upstream).expanduser()) if args.upstream else None,
            "environment": env,
            "results": rows,
        }
        if args.out:
            stem = Path(args.out).stem + (f"_{label}" if len(sets) > 1 else "")
        else:
            stem = harness.result_stem("step", label, device, args.tag)
        harness.write_results(stem, payload, args)
        payloads.append(payload)
    if len(payloads) > 1 and not args.no_plot:
        import plot

        joined = "+".join(p["parameter_set"] for p in payloads)
        path = harness.out_dir(args) / f"{harness.result_stem('step', joined, device, args.tag)}.png"
        print(f"wrote {plot.plot_payloads(payloads, path)}")
    return payloads


if __name__ == "__main__":
    main()
