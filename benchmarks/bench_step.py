"""Time one optimizer step: AdamW(fused), SOAP reference and SOAP batched engine, in one run.

Reports per optimizer the median step, the step amortized over whole refresh cycles (refresh steps
included), the worst step, ratios measured in the same run, and the FLOP floor: DESIGN §2's lean
FLOPs over the fp32 matmul rate measured in the same run.

    python benchmarks/bench_step.py                       # CPU default set (d 256, 6 layers, vocab 16384)
    python benchmarks/bench_step.py --preset gpt2-small --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import soap_kernels  # noqa: E402
from soap_kernels import SOAP  # noqa: E402


def state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, SOAP) and opt._engine is not None:
        total = 0
        for _, b in opt._engine.buckets:
            tensors = [b.exp_avg, b.exp_avg_sq, b.step, *[t for t in (*b.q, *b.stats) if t is not None]]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
    total = 0
    for state in opt.state.values():
        for v in state.values():
            items = v if isinstance(v, list) else [v]
            total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


def make_optimizer(name: str, params, frequency: int, device: torch.device):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=device.type in ("cuda", "cpu"))
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    return SOAP(params, lr=1e-3, precondition_frequency=frequency, backend=name)


def bench(name: str, shapes, args, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device)) for s in shapes]
    # Two gradient sets, alternated, so no step sees exactly the gradient of the previous one.
    grad_sets = [[torch.randn(s, generator=gen).mul_(1e-2).to(device) for s in shapes] for _ in range(2)]
    opt = make_optimizer(name, params, args.frequency, device)

    def step(i: int) -> None:
        for p, g in zip(params, grad_sets[i % 2]):
            p.grad = g
        opt.step()

    # Warm-up: the initialising step plus a few updates (not timed), ending just after a refresh so
    # that the timed window holds whole refresh cycles.
    warm = args.frequency
    for i in range(warm + 1):
        step(i)
    times = []
    for i in range(args.cycles * args.frequency):
        t = harness.timer(device)
        step(warm + 1 + i)
        times.append(t())
    q = harness.quantiles(times)
    n_params = sum(p.numel() for p in params)
    return {
        "optimizer": name,
        "steps_timed": len(times),
        "median_s": q["median"],
        "p20_s": q["p20"],
        "p80_s": q["p80"],
        "worst_s": q["worst"],
        "amortized_s": sum(times) / len(times),
        "state_bytes": state_bytes(opt),
        "state_bytes_per_param": state_bytes(opt) / n_params,
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS), help="parameter set (default: cpu)")
    parser.add_argument("--shapes", help="custom shapes instead of a preset, e.g. 768x2304,768x768,768")
    parser.add_argument("--optimizers", default="adamw,reference,torch",
                        help="comma list of adamw, adamw-foreach, reference, torch, triton, cuda, auto")
    parser.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default 10)")
    parser.add_argument("--cycles", type=int, default=2, help="refresh cycles timed per optimizer (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = harness.parse_shapes(args.shapes) if args.shapes else harness.gpt_shapes(*harness.PRESETS[args.preset])
    label = "custom" if args.shapes else args.preset
    flops = harness.lean_flops(shapes)
    rate = harness.matmul_rate(device)
    floor = flops / rate
    print(f"soap_kernels {soap_kernels.__version__}  torch {torch.__version__}  device {device}  threads {torch.get_num_threads()}")
    print(f"parameter set {label}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes) / 1e6:.2f} M params")
    print(f"lean FLOPs/step {flops / 1e9:.2f} G; fp32 matmul rate {rate / 1e9:.1f} GFLOP/s; floor {floor * 1e3:.1f} ms")
    rows = []
    for name in args.optimizers.split(","):
        print(f"  timing {name} ...", flush=True)
        rows.append(bench(name, shapes, args, device))
    by = {r["optimizer"]: r for r in rows}
    adamw = by.get("adamw")
    ref = by.get("reference")
    header = f"{'optimizer':<14}{'median ms':>11}{'amort. ms':>11}{'worst ms':>10}{'x AdamW':>9}{'ref/this':>9}{'TFLOP/s':>9}{'%matmul':>9}{'/floor':>8}{'B/param':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        r["x_adamw"] = r["amortized_s"] / adamw["amortized_s"] if adamw else None
        r["speedup_vs_reference"] = ref["amortized_s"] / r["amortized_s"] if ref else None
        soap = r["optimizer"] not in ("adamw", "adamw-foreach")
        r["tflops"] = flops / r["amortized_s"] / 1e12 if soap else None
        r["pct_matmul_ceiling"] = 100 * flops / r["amortized_s"] / rate if soap else None
        r["over_floor"] = r["amortized_s"] / floor if soap else None

        def fmt(v, spec):
            return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))

        print(f"{r['optimizer']:<14}{r['median_s'] * 1e3:>11.1f}{r['amortized_s'] * 1e3:>11.1f}{r['worst_s'] * 1e3:>10.1f}"
              f"{fmt(r['x_adamw'], '9.1f')}{fmt(r['speedup_vs_reference'], '9.2f')}{fmt(r['tflops'], '9.3f')}"
              f"{fmt(r['pct_matmul_ceiling'], '9.1f')}{fmt(r['over_floor'], '8.2f')}{r['state_bytes_per_param']:>9.1f}")
    payload = {
        "benchmark": "step",
        "parameter_set": label,
        "shapes": shapes,
        "precondition_frequency": args.frequency,
        "lean_flops_per_step": flops,
        "matmul_rate_flops": rate,
        "floor_s": floor,
        "environment": harness.environment(device),
        "results": rows,
    }
    out = args.out or f"step_{label}_{device.type}.json"
    print(f"wrote {harness.write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    main()
