"""Worst step vs median step of SOAP(backend="torch") under refresh schedules (issue 7's acceptance:
with ``Budgeted`` the worst step of the CPU step benchmark is at most 1.5x the median).

Schedules, all stepped in the same process on the same gradients, *interleaved* (one step of each
in turn), so that a load spike on a shared machine hits all of them rather than one:

* ``constant10``: ``Constant(10)``, every factor every 10 steps (the reference's default);
* ``budgeted``: ``Budgeted(ceil(factors / 10), max_every=20)``: about every factor every 10 steps,
  by count;
* ``budgeted_flops``: ``Budgeted(total refresh FLOPs / 10, max_every=20, by="flops")``: the same
  refresh work per step by cost;
* ``no_refresh``: ``Constant(10**9)``: the step without any refresh (the floor the others add to).

Per schedule: median, p80, worst, worst/median, amortized (mean) step time over the timed window,
the refresh time inside each step (the engine's ``Bucket.refresh``, wrapped) and the factors
refreshed per step. Afterwards, the time of one refresh of one factor of each size, to tell how far a
schedule can spread the work: a step that must refresh one factor costing more than half a median
step cannot stay within 1.5x.

    python benchmarks/bench_schedules.py                      # cpu set, 20 warm-up + 40 timed steps
    python benchmarks/bench_schedules.py --steps 80 --threads 2

Writes ``benchmarks/results/schedules_cpu.json``. Benchmarks measure and report; nothing asserts.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "python"))
import harness  # noqa: E402
from study_meter import RefreshMeter  # noqa: E402

from soap_kernels import SOAP, ops  # noqa: E402
from soap_kernels.reference import make_layout  # noqa: E402
from soap_kernels.schedules import Budgeted, Constant  # noqa: E402

SCHEDULES = ("constant10", "budgeted", "budgeted_flops", "no_refresh")


def factor_costs(shapes) -> list[tuple[int, float]]:
    """(size, refresh FLOPs) of every factor, with SOAP's default layout options."""
    out = []
    for s in shapes:
        layout = make_layout(s, max_precond_dim=10000, merge_dims=False, precondition_1d=False, channels_last=False)
        for i, pre in enumerate(layout.preconditioned):
            if pre:
                flags = [j == i for j in range(len(layout.preconditioned))]
                out.append((layout.work_shape[i], float(ops.FLOPS.refresh(layout.work_shape, flags))))
    return out


def make_schedule(name: str, costs: list[tuple[int, float]], every: int, max_every: int):
    if name == "constant10":
        return Constant(every)
    if name == "budgeted":
        return Budgeted(math.ceil(len(costs) / every), max_every=max_every)
    if name == "budgeted_flops":
        return Budgeted(sum(c for _, c in costs) / every, max_every=max_every, by="flops")
    if name == "no_refresh":
        return Constant(10**9)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def single_refresh_ms(opt: SOAP, reps: int = 3) -> dict[str, float]:
    """Best-of-``reps`` time of refreshing one factor (one row of one dim) of each distinct size."""
    out: dict[str, float] = {}
    for _, bucket in opt._engine.buckets:
        for dim in bucket.factor_dims:
            size = bucket.layout.work_shape[dim]
            key = f"{size} (of {'x'.join(map(str, bucket.layout.work_shape))})"
            if key in out:
                continue
            best = math.inf
            for _ in range(reps):
                t0 = time.perf_counter()
                bucket.refresh({dim: [0]})
                best = min(best, time.perf_counter() - t0)
            out[key] = best * 1e3
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS), help="parameter set (default: cpu)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list from %(default)s")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per schedule (default 40)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed updates after the initialising step (default 20)")
    parser.add_argument("--every", type=int, default=10, help="target refresh interval (default 10)")
    parser.add_argument("--max-every", type=int, default=20, help="Budgeted's max_every (default 20)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared, loaded 2-core machine more threads oversubscribe "
        "and the worst step measures the neighbours; 0 = torch's default)",
    )
    parser.add_argument("--out", default="schedules_cpu.json", help="JSON name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    names = [s.strip() for s in args.schedules.split(",") if s.strip()]
    shapes = harness.gpt_shapes(*harness.PRESETS[args.preset])
    costs = factor_costs(shapes)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).mul_(0.02) for s in shapes]
    # Two gradient sets, alternated (as bench_step.py does): no step sees the previous one's gradient.
    grad_sets = [[torch.randn(s, generator=gen).mul_(1e-2) for s in shapes] for _ in range(2)]
    runs = {}
    for name in names:
        params = [torch.nn.Parameter(x.clone()) for x in init]
        schedule = make_schedule(name, costs, args.every, args.max_every)
        runs[name] = {"params": params, "opt": SOAP(params, lr=1e-3, backend="torch", schedule=schedule), "schedule": schedule}
    print(
        f"soap_kernels SOAP(backend='torch'), parameter set {args.preset}: {len(shapes)} tensors, "
        f"{sum(torch.Size(s).numel() for s in shapes) / 1e6:.2f} M params, {len(costs)} factors "
        f"(sizes {sorted({d for d, _ in costs})}); threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}"
    )
    for name, run in runs.items():
        print(f"  {name}: {run['schedule']!r}")
    meter = RefreshMeter()
    samples = {name: {"times_s": [], "cpu_s": [], "refresh_s": [], "refreshed": []} for name in names}
    load_before = os.getloadavg()
    with meter:
        for i in range(args.warmup + 1 + args.steps):
            timed = i > args.warmup
            for name, run in runs.items():
                for p, g in zip(run["params"], grad_sets[i % 2]):
                    p.grad = g
                before = meter.snapshot()
                t, c0 = harness.timer(device), time.process_time()
                run["opt"].step()
                elapsed, cpu = t(), time.process_time() - c0
                after = meter.snapshot()
                if timed:
                    samples[name]["times_s"].append(elapsed)
                    samples[name]["cpu_s"].append(cpu)
                    samples[name]["refresh_s"].append(after[1] - before[1])
                    samples[name]["refreshed"].append(after[0] - before[0])
            if i % 10 == 0:
                print(f"  step {i}/{args.warmup + args.steps} load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()
    refresh_ms = single_refresh_ms(runs[names[0]]["opt"])
    rows = []
    for name in names:
        s = samples[name]
        q = harness.quantiles(s["times_s"])
        worst_i = max(range(len(s["times_s"])), key=s["times_s"].__getitem__)
        cq = harness.quantiles(s["cpu_s"])
        rows.append(
            {
                "schedule": name,
                "schedule_repr": repr(runs[name]["schedule"]),
                "steps_timed": len(s["times_s"]),
                "median_s": q["median"],
                "p80_s": q["p80"],
                "worst_s": q["worst"],
                "worst_over_median": q["worst"] / q["median"],
                "amortized_s": statistics.fmean(s["times_s"]),
                "cpu_median_s": cq["median"],
                "cpu_worst_s": cq["worst"],
                "cpu_worst_over_median": cq["worst"] / cq["median"],
                "refresh_s_median": statistics.median(s["refresh_s"]),
                "refresh_s_worst": max(s["refresh_s"]),
                "worst_step_refresh_s": s["refresh_s"][worst_i],
                "worst_step_refreshed_factors": s["refreshed"][worst_i],
                "non_refresh_s_worst": max(t - r for t, r in zip(s["times_s"], s["refresh_s"])),
                "refreshed_factors_per_step_max": max(s["refreshed"]),
                "refreshed_factors_per_step_mean": statistics.fmean(s["refreshed"]),
                "times_s": s["times_s"],
                "cpu_s": s["cpu_s"],
                "refresh_s": s["refresh_s"],
                "refreshed_factors": s["refreshed"],
            }
        )
    header = (
        f"{'schedule':<16}{'median ms':>10}{'p80':>8}{'worst':>8}{'worst/med':>10}{'amort.':>8}{'refr. med':>10}"
        f"{'refr. max':>10}{'worst: refr.':>13}{'factors/step':>14}{'cpu w/m':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['schedule']:<16}{1e3 * r['median_s']:>10.1f}{1e3 * r['p80_s']:>8.1f}{1e3 * r['worst_s']:>8.1f}"
            f"{r['worst_over_median']:>10.2f}{1e3 * r['amortized_s']:>8.1f}{1e3 * r['refresh_s_median']:>10.1f}"
            f"{1e3 * r['refresh_s_worst']:>10.1f}{1e3 * r['worst_step_refresh_s']:>13.1f}"
            f"{r['refreshed_factors_per_step_mean']:>8.1f} /{r['refreshed_factors_per_step_max']:>3}"
            f"{r['cpu_worst_over_median']:>9.2f}"
        )
    print(
        "refr. = refresh ms inside a step (median, max, in the worst step); factors/step = mean / max; "
        "cpu w/m = worst / median of the step's process CPU time"
    )
    print("one refresh of one factor (best of 3), ms: " + ", ".join(f"{k}: {v:.1f}" for k, v in refresh_ms.items()))
    payload = {
        "benchmark": "schedules",
        "parameter_set": args.preset,
        "environment": harness.environment(device),
        "config": {
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "warmup": args.warmup,
            "every": args.every,
            "max_every": args.max_every,
            "interleaved": True,
            "gradient_sets": 2,
            "backend": "torch",
        },
        "load_average_before": load_before,
        "load_average_after": load_after,
        "factors": len(costs),
        "single_factor_refresh_ms": refresh_ms,
        "results": rows,
    }
    path = harness.write_json(args.out, payload)
    print(f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
