"""The refresh step under load: ours against ``backend="reference"``, with and without a competing
busy process, interleaved.

Once, while other processes were installing packages on the same 2-core machine, our refresh step
took 3.55 s against 1.48 s for the reference in the same run: the LAPACK way (one thread, or the
batch split over the cores) had been chosen once and kept. ``soap_kernels.lapack`` now follows its
latest timings; this script checks the claim that a refresh is never slower than the reference's,
whatever else runs. Each round times one whole refresh cycle (``--frequency`` steps, one by one)
of every optimizer twice: on the machine as it is ("quiet") and while ``--busy-procs`` processes
spin in pure Python (one core each, by default as many as there are cores: "busy"); the order of
the conditions and of the optimizers alternates between rounds, so a slow drift of the machine
falls on both. The busy processes are started before and stopped (by their pid) after each busy
stretch.

Reports per condition and optimizer the refresh step (median, p20, p80, worst over the rounds),
the median step between refreshes, the amortized step, and ``ref/this`` (the reference's refresh
step / ours, same condition); the LAPACK choices after each stretch (``lapack.choice_stats()``)
show where the choice moved. Benchmarks measure and report; nothing here asserts a speed.

    python benchmarks/bench_load.py                       # the cpu set, ours (auto) and reference, 4 rounds
    python benchmarks/bench_load.py --preset tiny --rounds 2 --optimizers torch,reference
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import soap_kernels  # noqa: E402
from soap_kernels import SOAP, lapack  # noqa: E402

SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


class Busy:
    """``n`` processes spinning on a core each (pure Python, nothing shared), for one ``with``
    block; they also stop by themselves after ``limit`` seconds should this process die."""

    def __init__(self, n: int, limit: float = 600.0):
        self.n, self.limit = n, limit
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Busy:
        code = SPIN.format(limit=self.limit)
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.5)  # let them get going
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


class Run:
    def __init__(self, name: str, shapes, args):
        gen = torch.Generator().manual_seed(0)
        self.name = name
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02)) for s in shapes]
        self.grads = [[torch.randn(s, generator=gen).mul_(1e-2) for s in shapes] for _ in range(2)]
        self.opt = SOAP(self.params, lr=1e-3, betas=(0.95, 0.95), weight_decay=0.01,
                        precondition_frequency=args.frequency, backend=name)
        self.calls = 0

    def step(self) -> float:
        for p, g in zip(self.params, self.grads[self.calls % 2]):
            p.grad = g
        t0 = time.perf_counter()
        self.opt.step()
        self.calls += 1
        return time.perf_counter() - t0

    def cycle(self, f: int) -> tuple[list[float], list[float]]:
        """One whole cycle; (refresh step times, other step times). Call c >= 1 is update c, a
        refresh when c % f == 0 (the constant schedule)."""
        refresh, other = [], []
        for _ in range(f):
            is_refresh = self.calls % f == 0 and self.calls > 0
            (refresh if is_refresh else other).append(self.step())
        return refresh, other


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, default_preset="cpu")
    parser.add_argument("--optimizers", default="auto,reference", help="SOAP backends (default auto,reference)")
    parser.add_argument("--frequency", type=int, default=10, help="precondition_frequency (default 10)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each times a cycle per optimizer and condition")
    parser.add_argument("--busy-procs", type=int, default=os.cpu_count() or 2,
                        help="spinning processes in the busy condition (default: one per core)")
    args = parser.parse_args(argv)
    device = harness.setup_device(args)
    if device.type != "cpu":
        raise SystemExit("bench_load.py measures the CPU's LAPACK choice: --device cpu only")
    label, shapes = harness.parameter_sets(args.preset, args.shapes)[0]
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    f = args.frequency
    env_before = harness.environment(device)
    print(f"bench_load: {env_before['device']}  torch {env_before['torch']}  soap_kernels {soap_kernels.__version__}  "
          f"threads {env_before['threads']}  load {env_before['load_average']}  busy procs {args.busy_procs}")
    runs = {}
    for name in names:
        run = Run(name, shapes, args)
        t0 = time.perf_counter()
        for _ in range(f + 1):  # the initialising step and one cycle ending with a refresh
            run.step()
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        runs[name] = run
    samples: dict[tuple[str, str], dict[str, list[float]]] = {
        (c, n): {"refresh": [], "other": []} for c in ("quiet", "busy") for n in names}
    history = []
    for r in range(args.rounds):
        conditions = ("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")
        for condition in conditions:
            order = names if (r // 2) % 2 == 0 else names[::-1]
            load = harness.load_average()
            if condition == "busy":
                with Busy(args.busy_procs):
                    times = {n: runs[n].cycle(f) for n in order}
            else:
                times = {n: runs[n].cycle(f) for n in order}
            line = []
            for n in order:
                refresh, other = times[n]
                samples[(condition, n)]["refresh"] += refresh
                samples[(condition, n)]["other"] += other
                line.append(f"{n} {statistics.fmean(refresh) * 1e3:.0f} ms")
            choices = {f"{k[0]} {k[1]}": v for k, v in lapack.thread_choice().items()}
            history.append({"round": r, "condition": condition, "load_average": load,
                            "refresh_s": {n: times[n][0] for n in order}, "lapack_choice": choices})
            print(f"  round {r + 1}/{args.rounds} {condition:<5}: refresh step {', '.join(line)}; "
                  f"LAPACK {choices}", flush=True)
        gc.collect()
    rows = []
    for condition in ("quiet", "busy"):
        for n in names:
            s = samples[(condition, n)]
            if not s["refresh"]:
                continue
            between = statistics.median(s["other"])
            row = harness.op_row("refresh step", condition, n, s["refresh"], between_refresh_s=between,
                                 amortized_s=((f - 1) * between + statistics.median(s["refresh"])) / f,
                                 times_s=s["refresh"])
            rows.append(row)
    harness.add_op_figures(rows, baselines=("reference",))
    columns = [c for c in harness.OP_COLUMNS if c[0] not in ("tflops", "pct_matmul", "gbps", "pct_bandwidth", "x_torch")]
    columns.insert(-1, ("between_refresh_s", "between ms", "10.1f", 1e3))
    columns.insert(-1, ("worst_s", "worst ms", "9.1f", 1e3))
    harness.print_table(rows, columns)
    payload = {
        "benchmark": "load",
        "parameter_set": label,
        "shapes": shapes,
        "precondition_frequency": f,
        "rounds": args.rounds,
        "busy_procs": args.busy_procs,
        "load_average_before": env_before["load_average"],
        "history": history,
        "lapack_choices": lapack.choice_stats(),
        "environment": harness.environment(device),
        "results": rows,
    }
    harness.write_results(harness.result_stem("load", label, device, args.tag), payload, args)
    return payload


if __name__ == "__main__":
    main()
