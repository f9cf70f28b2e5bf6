"""Re-run of the SOAP refresh-schedule study (seeds/003) on offline data, with every schedule of
``soap_kernels.schedules`` and an Adam baseline.

Tasks (``--task``):

* ``cnn``: a small residual CNN with dropout 0.3 and stochastic depth 0.3 (the study's "dynamic"
  setting) on scikit-learn's 8x8 digits, several seeds;
* ``lm``: ``train_lm.py``'s GPT (the ``cpu`` preset's size, smaller batch) on its character corpus.

Schedules (``--schedules``; intervals scale with the run length ``N`` = ``--steps``, with
``S`` = the power of two nearest N/5: the study's 256 for its 1250 steps, 64 at N = 240, 16 at N = 80):

    adam               torch.optim.AdamW, same betas / weight decay / LR schedule (the baseline)
    const1|10|100      Constant(1), Constant(10), Constant(100)
    doubling           Doubling(start=1, clip=S)           (study: clip 256 and 1024)
    halving            Halving(start=S, minimum=1)         (study: start not given)
    interval_doubling  IntervalDoubling(start=1, interval=S)  (study: interval 256)
    loss_threshold     LossThreshold(0.3)                  (study: 0.3; --loss-threshold)
    drift_adaptive     DriftAdaptive(0.2, max_every=100)   (--drift-threshold)
    budgeted           Budgeted(ceil(factors/10), max_every=20): every factor about every 10 steps
    staggered          Staggered(10): every factor every 10 steps, phases spread by refresh cost
    staggered_params   Staggered(10, blocks=factors per parameter): the same, a parameter's factors together
    staggered_pairs    Staggered(10, together=2): the same, the factors of one shape and dim in pairs

For each (task, schedule, seed): the training loss of every step, the cumulative training time
(data, forward, backward, optimizer step; evaluations excluded) as wall-clock and as process CPU
time, the time inside ``optimizer.step()``, the factor refreshes and the time spent refreshing
(measured by wrapping the engine's ``Bucket.refresh``, see ``study_meter.py``), the schedule's
decision overhead, the final test loss (and accuracy for the CNN). On a shared CPU the wall-clock
of one run depends on what else runs; the CPU time (one torch thread by default) much less, so the
time comparisons (table, claims, plots) use CPU time and report wall-clock beside it.

Writes ``results.json``, ``<task>_study.png`` and prints a table per task plus the checks of the
study's claims. Runs of one seed are paired (same weights, batches and dropout draws), and the run
order rotates over seeds so that load drift spreads evenly.

    python python/schedule_study.py                      # both tasks: ~5 min CPU (15 min wall at load 8-10)
    python python/schedule_study.py --task cnn --seeds 0,1,2,3,4,5   # python/SCHEDULES.md's CNN table
    python python/schedule_study.py --reanalyse runs/<folder>/results.json   # tables/claims/plots again
    python python/schedule_study.py --quick --task cnn --schedules const1,doubling   # CI size

Timings on a shared CPU are noisy: the load average is recorded per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # study_* modules and the lm package next to this file
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # soap_kernels from this checkout when it is not installed

from lm.lr import warmup_cosine  # noqa: E402
from study_meter import RefreshMeter, engine_refresh_count  # noqa: E402
from study_report import check_claims, format_claims, format_table, plot_task, summarize_task  # noqa: E402
from study_tasks import TASKS, Task  # noqa: E402

from soap_kernels import SOAP  # noqa: E402
from soap_kernels.reference import make_layout  # noqa: E402
from soap_kernels.schedules import (  # noqa: E402
    Budgeted,
    Constant,
    Doubling,
    DriftAdaptive,
    Halving,
    IntervalDoubling,
    LossThreshold,
    RefreshSchedule,
    Staggered,
)

SCHEDULES = (
    "adam",
    "const1",
    "const10",
    "const100",
    "doubling",
    "halving",
    "interval_doubling",
    "loss_threshold",
    "drift_adaptive",
    "budgeted",
    "staggered",
    "staggered_params",
    "staggered_pairs",
)
DEFAULT_SEEDS = {"cnn": [0, 1, 2], "lm": [0]}
QUICK = {
    "cnn": {"steps": 24, "eval_every": 12, "config": {"width": 8, "batch_size": 32}},
    "lm": {
        "steps": 6,
        "eval_every": 3,
        "config": {"d_model": 32, "n_layers": 2, "n_heads": 2, "ctx": 32, "batch_size": 8, "eval_batches": 1},
    },
}


# -------------------------------------------------------------------------------------- schedules
def slot_length(steps: int) -> int:
    """The power of two nearest (in log scale) to steps / 5, at least 2: the study's 256 for its 1250."""
    return max(2, 1 << round(math.log2(max(2.0, steps / 5))))


def factor_blocks(param_groups: list[dict]) -> list[int]:
    """Factors of each parameter that has any, in SOAP's canonical (group, parameter) order, with its
    default layout options (one factor per preconditioned dim): ``Staggered``'s ``blocks``."""
    blocks = []
    for group in param_groups:
        for p in group["params"]:
            layout = make_layout(p.shape, max_precond_dim=10000, merge_dims=False, precondition_1d=False, channels_last=False)
            if any(layout.preconditioned):
                blocks.append(sum(layout.preconditioned))
    return blocks


def count_factors(param_groups: list[dict]) -> int:
    """Eigenbasis factors SOAP keeps with its default layout options (one per preconditioned dim)."""
    return sum(factor_blocks(param_groups))


def make_schedule(
    name: str, steps: int, factors: int, args: argparse.Namespace, blocks: list[int] | None = None
) -> RefreshSchedule:
    s = slot_length(steps)
    if name.startswith("const"):
        return Constant(int(name[len("const") :]))
    if name == "doubling":
        return Doubling(start=1, clip=s)
    if name == "halving":
        return Halving(start=s, minimum=1)
    if name == "interval_doubling":
        return IntervalDoubling(start=1, interval=s)
    if name == "loss_threshold":
        return LossThreshold(args.loss_threshold)
    if name == "drift_adaptive":
        return DriftAdaptive(args.drift_threshold, min_every=1, max_every=100)
    if name == "budgeted":
        return Budgeted(max(1, math.ceil(factors / 10)), max_every=20)
    if name == "staggered":
        return Staggered(10)
    if name == "staggered_params":
        if blocks is None:
            raise ValueError("staggered_params needs the factors per parameter (blocks)")
        return Staggered(10, blocks=blocks)
    if name == "staggered_pairs":
        return Staggered(10, together=2)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def make_optimizer(name: str, param_groups: list[dict], steps: int, args: argparse.Namespace, lr: float):
    betas = (0.95, 0.95)  # SOAP's defaults, used by every optimizer (as train_lm.py does)
    if name == "adam":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=1e-8), None
    schedule = make_schedule(name, steps, count_factors(param_groups), args, factor_blocks(param_groups))
    return SOAP(param_groups, lr=lr, betas=betas, eps=1e-8, backend=args.backend, schedule=schedule), schedule


# ------------------------------------------------------------------------------------------- runs
def train_run(task: Task, config: dict, name: str, seed: int, args: argparse.Namespace) -> dict:
    steps, eval_every = config["steps"], config["eval_every"]
    run = task.make_run(seed, config["model"])
    model = run.model
    model.train()
    optimizer, schedule = make_optimizer(name, run.param_groups, steps, args, config["lr"])
    lr_schedule = LambdaLR(optimizer, warmup_cosine(max(1, steps // 20), steps))
    record: dict = {
        "schedule": name,
        "seed": seed,
        "status": "ok",
        "error": None,
        "schedule_repr": repr(schedule) if schedule is not None else "AdamW",
        "factors": count_factors(run.param_groups) if schedule is not None else 0,
        "train_loss": [],
        "time_s": [],
        "cpu_s": [],
        "refreshed_factors": [],
        "refresh_step_s": [],
        "eval_steps": [],
        "eval": [],
        "train_time_s": 0.0,
        "optimizer_time_s": 0.0,
        "refresh_time_s": 0.0,
        "decision_time_s": 0.0,
        "train_cpu_s": 0.0,
        "optimizer_cpu_s": 0.0,
        "refresh_cpu_s": 0.0,
        "decision_cpu_s": 0.0,
        "factor_refreshes": 0,
        "refresh_steps": 0,
        "engine_refresh_count": None,
        "load_before": os.getloadavg(),
        "load_after": None,
    }

    def log_eval(step: int) -> None:
        record["eval_steps"].append(step)
        record["eval"].append(run.evaluate(model))

    meter = RefreshMeter()
    try:
        with meter:
            log_eval(0)
            elapsed = elapsed_cpu = 0.0
            for step in range(1, steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                xb, yb = run.next_batch()
                loss = run.loss_fn(model, xb, yb)
                loss.backward()
                before = meter.snapshot()
                t1, c1 = time.perf_counter(), time.process_time()
                if schedule is None:
                    optimizer.step()
                else:
                    optimizer.step(loss=loss.detach())
                t2, c2 = time.perf_counter(), time.process_time()
                optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
                loss_value = loss.item()
                elapsed += time.perf_counter() - t0
                elapsed_cpu += time.process_time() - c0
                after = meter.snapshot()
                refreshed = after[0] - before[0]
                record["train_loss"].append(loss_value)
                record["time_s"].append(elapsed)
                record["cpu_s"].append(elapsed_cpu)
                record["refreshed_factors"].append(refreshed)
                record["refresh_step_s"].append(after[1] - before[1])
                record["optimizer_time_s"] += t2 - t1
                record["optimizer_cpu_s"] += c2 - c1
                record["refresh_steps"] += int(refreshed > 0)
                if not math.isfinite(loss_value):
                    record["status"] = "diverged"
                    break
                if step % eval_every == 0 or step == steps:
                    log_eval(step)
            record["train_time_s"] = elapsed
            record["train_cpu_s"] = elapsed_cpu
    except Exception as exc:  # noqa: BLE001 -- one failing schedule must not lose the others' results
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  [{task.name} {name} seed {seed}] failed: {record['error']}", file=sys.stderr)
    record["factor_refreshes"] = meter.factor_refreshes
    record["refresh_time_s"] = meter.refresh_s
    record["decision_time_s"] = max(0.0, meter.schedule_s - meter.refresh_s)
    record["refresh_cpu_s"] = meter.refresh_cpu_s
    record["decision_cpu_s"] = max(0.0, meter.schedule_cpu_s - meter.refresh_cpu_s)
    if isinstance(optimizer, SOAP):
        record["engine_refresh_count"] = engine_refresh_count(optimizer)
    record["load_after"] = os.getloadavg()
    return record


def task_config(task: Task, args: argparse.Namespace) -> dict:
    model = dict(task.config)
    steps, eval_every = task.steps, task.eval_every
    if args.quick:
        quick = QUICK[task.name]
        steps, eval_every = quick["steps"], quick["eval_every"]
        model.update(quick["config"])
    if args.steps:
        steps = args.steps
        eval_every = max(1, steps // 8)
    if args.batch_size:
        model["batch_size"] = args.batch_size
    seeds = parse_ints(args.seeds) if args.seeds else ([0] if args.quick else DEFAULT_SEEDS[task.name])
    return {
        "task": task.name,
        "description": task.description,
        "steps": steps,
        "eval_every": eval_every,
        "lr": args.lr or task.lr,
        "lr_schedule": f"linear warm-up {max(1, steps // 20)} steps, cosine to 0.1x",
        "betas": [0.95, 0.95],
        "seeds": seeds,
        "model": model,
        "slot_length": slot_length(steps),
    }


def run_task(task: Task, config: dict, schedules: list[str], args: argparse.Namespace) -> list[dict]:
    # Untimed warm-up (first-call costs: allocator, LAPACK/oneDNN setup, lazy imports) so that the
    # first timed run is not penalised.
    # --quick (CI) warms up one schedule for two steps only: its timings mean nothing anyway.
    warm = {**config, "steps": 2 if args.quick else min(5, config["steps"]), "eval_every": config["steps"]}
    for name in schedules[:1] if args.quick else dict.fromkeys(["adam", "const1", *schedules]):
        train_run(task, warm, name, config["seeds"][0], args)
    runs = []
    total = len(config["seeds"]) * len(schedules)
    for i, seed in enumerate(config["seeds"]):
        order = schedules[i % len(schedules) :] + schedules[: i % len(schedules)]  # rotate: spread load drift
        for name in order:
            record = train_run(task, config, name, seed, args)
            runs.append(record)
            if not args.no_progress:
                final = record["train_loss"][-1] if record["train_loss"] else float("nan")
                print(
                    f"  [{len(runs)}/{total}] {task.name} {name:<17} seed {seed}: loss {final:.4f}  "
                    f"{record['train_time_s']:.1f} s ({record['train_cpu_s']:.1f} s CPU)  {record['factor_refreshes']} "
                    f"factor refreshes ({record['refresh_time_s']:.2f} s)  load {record['load_before'][0]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


# --------------------------------------------------------------------------------------- plumbing
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="schedule_study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=("cnn", "lm", "both"), default="both", help="which task(s) to run (default: both)")
    p.add_argument("--seeds", help="comma list of seeds for every task (default: cnn 0,1,2; lm 0; --quick: 0)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: cnn 240, lm 80; --quick: cnn 24, lm 6)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list from %(default)s")
    p.add_argument("--quick", action="store_true", help="CI size: tiny models, a few dozen steps, one seed")
    p.add_argument("--lr", type=float, help="peak learning rate for every optimizer (default: cnn 2e-2, lm 3e-3)")
    p.add_argument("--batch-size", type=int, help="batch size (default: cnn 64 images, lm 16 x 64 characters)")
    p.add_argument("--loss-threshold", type=float, default=0.3, help="LossThreshold's threshold (study: 0.3)")
    p.add_argument("--drift-threshold", type=float, default=0.2, help="DriftAdaptive's drift threshold (default 0.2)")
    p.add_argument("--backend", default="torch", help="SOAP backend (default torch: the metered batched engine)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared, loaded machine more threads oversubscribe)",
    )
    p.add_argument("--out", type=Path, help="output folder (default runs/schedule-study-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no per-run lines on stderr")
    p.add_argument(
        "--reanalyse",
        type=Path,
        metavar="RESULTS_JSON",
        help="no training: recompute tables, claims and plots from a results.json (into --out, default its folder)",
    )
    return p


def environment(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import soap_kernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "soap_kernels": getattr(soap_kernels, "__version__", "unknown"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def analyse(name: str, config: dict, runs: list[dict], schedules: list[str], out: Path) -> dict:
    """Summary, claim checks, table and plot of one task's runs (printed, and returned for the JSON)."""
    summary = summarize_task(runs, schedules)
    claims = {metric: check_claims(summary, metric) for metric in ("final_loss", "clean_loss")}
    table = format_table(name, summary)
    plot = out / f"{name}_study.png"
    plot_task(name, summary, runs, plot, f"{config['description']}; {config['steps']} steps, seeds {config['seeds']}")
    print(table)
    print(format_claims(claims["final_loss"], "the final training loss (the study's metric)"))
    print(format_claims(claims["clean_loss"], f"the clean loss ({summary['clean_loss_is']})"))
    return {"config": config, "summary": summary, "claims": claims, "table": table, "plot": plot.name, "runs": runs}


def reanalyse(path: Path, out: Path | None) -> dict:
    """Recompute summaries, claims, tables and plots from a results.json, without training."""
    results = json.loads(path.read_text())
    out = out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    for name, task in results["tasks"].items():
        results["tasks"][name] = analyse(name, task["config"], task["runs"], results["schedules"], out)
    results["reanalysed"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1))
    print(f"wrote {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.reanalyse:
        return reanalyse(args.reanalyse, args.out)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = sorted(set(schedules) - set(SCHEDULES))
    if unknown or not schedules:
        raise SystemExit(f"--schedules: unknown {unknown}; choose from {', '.join(SCHEDULES)}")
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"schedule-study-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    task_names = ["cnn", "lm"] if args.task == "both" else [args.task]

    started = time.perf_counter()
    load_start = os.getloadavg()
    results: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["schedule_study.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(args.threads),
        "schedules": schedules,
        "load_average_start": load_start,
        "tasks": {},
    }
    for name in task_names:
        task = TASKS[name]()
        config = task_config(task, args)
        print(
            f"{name}: {task.description}; {config['steps']} steps, seeds {config['seeds']}, {len(schedules)} schedules",
            file=sys.stderr,
        )
        runs = run_task(task, config, schedules, args)
        results["tasks"][name] = analyse(name, config, runs, schedules, out)
    results["total_time_s"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1))
    print(
        f"total {results['total_time_s']:.0f} s, load average {load_start[0]:.1f} -> {results['load_average_end'][0]:.1f}; "
        f"wrote {out / 'results.json'}"
    )
    return results


if __name__ == "__main__":
    main()
