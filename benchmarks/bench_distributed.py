"""ShardedSOAP across processes: per-rank optimizer step time and bytes communicated per step.

Spawns 1, 2, 3 (``--worlds``) gloo processes on the CPU, each running ``ShardedSOAP`` on the same
GPT-shaped parameter set with the same gradients (as after DDP's all-reduce), one torch thread and
single-threaded LAPACK per rank. Every step starts after a barrier, so its wall time is the step
itself. Per rank it reports:

* ``wall_ms``: the step's wall time (median, mean, worst over the measured steps; the mean counts the
  refresh steps, i.e. the amortised step);
* ``cpu_ms``: CPU time of the rank's main thread during the step — the optimizer work this rank
  does, which should fall as ~1/world (wall time falls only while there are cores for every rank:
  ``os.cpu_count()`` is stored with the results);
* ``bytes_sent``/``bytes_received``/``collectives`` per step (payload this rank puts on / takes off
  the wire, as counted by ``ShardedSOAP.comm_stats``);
* ``load_flops``: the FLOP model's load the balancer gave each rank, and the buckets it owns.

The single-process figures (``SOAP``, no process group) are measured in the 1-rank run.
Benchmarks measure; nothing here asserts a speed.

    python benchmarks/bench_distributed.py                       # d 128, 4 layers, vocab 2000
    python benchmarks/bench_distributed.py --shape 256,6,4096,256 --worlds 1,2 --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from soap_kernels import SOAP  # noqa: E402
from soap_kernels.distributed import ShardedSOAP  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "distributed_cpu.json"


def _shapes(spec: str) -> list[tuple[int, ...]]:
    d_model, layers, vocab, context = (int(x) for x in spec.split(","))
    return harness.gpt_shapes(d_model, layers, vocab, context)


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "worst": max(xs), "best": min(xs)}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["SOAP_LAPACK_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    shapes = _shapes(args.shape)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    comm_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.comm_dtype]
    kwargs = {"precondition_frequency": args.frequency, "max_precond_dim": args.max_precond_dim}
    optimizers = {"ShardedSOAP": lambda: ShardedSOAP(params, **kwargs, comm_dtype=comm_dtype)}
    if world == 1:
        optimizers["SOAP"] = lambda: SOAP(params, **kwargs)
    result: dict = {"rank": rank}
    for name, make in optimizers.items():
        opt = make()
        wall, cpu, sent, received, collectives = [], [], [], [], []
        for step in range(args.warmup + args.steps):
            for p, grad in zip(params, grads):
                p.grad = grad
            if world > 1:
                dist.barrier()
            stats = dict(getattr(opt, "comm_stats", {}))
            t0, c0 = time.perf_counter(), time.thread_time()
            opt.step()
            t1, c1 = time.perf_counter(), time.thread_time()
            if step < args.warmup:
                continue
            wall.append((t1 - t0) * 1e3)
            cpu.append((c1 - c0) * 1e3)
            if stats:
                sent.append(opt.comm_stats["bytes_sent"] - stats["bytes_sent"])
                received.append(opt.comm_stats["bytes_received"] - stats["bytes_received"])
                collectives.append(opt.comm_stats["collectives"] - stats["collectives"])
        entry = {"wall_ms": _summary(wall), "cpu_ms": _summary(cpu)}
        if isinstance(opt, ShardedSOAP):
            plan = opt.ownership()
            entry.update({
                "bytes_sent_per_step": statistics.fmean(sent),
                "bytes_received_per_step": statistics.fmean(received),
                "collectives_per_step": statistics.fmean(collectives),
                "load_flops": plan["load_flops"],
                "owned_parameters": sum(1 for o in plan["owners"] if o == rank),
                "owned_buckets": len(opt.buckets_info()),
            })
        result[name] = entry
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    for f in scratch.glob("rank*.pt"):
        f.unlink()
    if world == 1:  # in this process (no process group); the thread settings are restored after
        threads, lapack = torch.get_num_threads(), os.environ.get("SOAP_LAPACK_THREADS")
        try:
            _worker(0, 1, 0, args, str(scratch))
        finally:
            torch.set_num_threads(threads)
            if lapack is None:
                os.environ.pop("SOAP_LAPACK_THREADS", None)
            else:
                os.environ["SOAP_LAPACK_THREADS"] = lapack
        return [torch.load(scratch / "rank0.pt")]
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, str(scratch))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(args.timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise RuntimeError(f"world {world}: exit codes {codes}")
    return [torch.load(scratch / f"rank{r}.pt") for r in range(world)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,4,2000,128", help="GPT parameter set: d_model,layers,vocab,context")
    parser.add_argument("--worlds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (refresh steps included)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frequency", type=int, default=10, help="precondition_frequency")
    parser.add_argument("--max-precond-dim", type=int, default=1024)
    parser.add_argument("--comm-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    shapes = _shapes(args.shape)
    env = harness.environment(torch.device("cpu"))
    env["cpu_count"] = os.cpu_count()
    env["threads_per_rank"] = 1
    env["load_average_before"] = list(os.getloadavg())
    scratch = args.out.parent / ".bench_distributed_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    worlds: dict[str, list[dict]] = {}
    for world in (int(w) for w in args.worlds.split(",")):
        worlds[str(world)] = run_world(world, args, scratch)
        for r in worlds[str(world)]:
            s = r["ShardedSOAP"]
            print(f"world {world} rank {r['rank']}: wall {s['wall_ms']['median']:8.1f} ms (mean {s['wall_ms']['mean']:8.1f})"
                  f"  cpu {s['cpu_ms']['median']:8.1f} ms (mean {s['cpu_ms']['mean']:8.1f})"
                  f"  sent {s['bytes_sent_per_step'] / 1e6:6.2f} MB  received {s['bytes_received_per_step'] / 1e6:6.2f} MB"
                  f"  collectives {s['collectives_per_step']:.1f}  owns {s['owned_parameters']} params"
                  f"  load {s['load_flops'][r['rank']] / 1e9:.2f} GFLOP", flush=True)
            if "SOAP" in r:
                print(f"world 1 plain SOAP: wall {r['SOAP']['wall_ms']['median']:8.1f} ms "
                      f"(mean {r['SOAP']['wall_ms']['mean']:8.1f})", flush=True)
    for f in scratch.glob("rank*.pt"):
        f.unlink()
    scratch.rmdir()
    env["load_average_after"] = list(os.getloadavg())
    payload = {
        "benchmark": "bench_distributed",
        "environment": env,
        "config": {
            "shape": args.shape, "parameters": len(shapes), "numel": sum(int(torch.Size(s).numel()) for s in shapes),
            "steps": args.steps, "warmup": args.warmup, "precondition_frequency": args.frequency,
            "max_precond_dim": args.max_precond_dim, "comm_dtype": args.comm_dtype, "backend": "gloo",
            "lean_flops_per_step": harness.lean_flops(shapes, args.max_precond_dim),
        },
        "worlds": worlds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
