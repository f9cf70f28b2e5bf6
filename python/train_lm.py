"""Train a small GPT on real text with AdamW, SOAP and Shampoo and compare them.

Every optimizer sees the same model initialisation, the same batches in the same order, the same
batch size, token budget and LR schedule (linear warm-up, cosine decay); only the optimizer and its
learning rate differ. For each (optimizer, lr, seed) the program records the training loss of
every step, the validation loss at every evaluation, the training wall-clock, the time spent
inside ``optimizer.step()``, peak memory and the optimizer-state bytes. It then picks each
optimizer's best LR (lowest final validation loss, mean over seeds) and reports the steps and the
wall-clock each needs to reach AdamW's final validation loss, with the ratios to AdamW.

    python python/train_lm.py                        # the default comparison (CPU, <= 10 min)
    python python/train_lm.py --preset tiny --optimizers adamw
    python python/train_lm.py --preset gpu --device cuda --bf16 \\
        --lr-grid adamw=1e-3,2e-3,4e-3 soap=1.5e-3,3e-3,6e-3 --seeds 0,1
    torchrun --nproc_per_node=2 python/train_lm.py --ddp --preset tiny      # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 python/train_lm.py --ddp --device cuda     # 8 GPUs (nccl)

``--ddp`` (under ``torchrun``): the model is wrapped in DistributedDataParallel and each rank
takes its share of the same global batch (so the token budget and the batches match a
single-process run); SOAP and Shampoo run as ``soap_kernels.distributed.ShardedSOAP``, each rank
updating the buckets it owns. Rank 0 prints and writes the results.

Optimizers: ``adamw`` (torch.optim.AdamW), ``soap`` (soap_kernels.SOAP) and ``shampoo``
(soap_kernels.SOAP with ``second_moment="adafactor"``: Shampoo with exponent 1/2 in the SOAP
engine). Writes ``results.json`` and ``loss_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import time
import types
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the lm package next to this file
sys.path.append(str(HERE.parent))  # soap_kernels from this checkout when it is not installed

from lm import GPT, PRESETS, CharCorpus, GPTConfig, load_text, warmup_cosine  # noqa: E402
from lm.data import DEFAULT_CORPUS  # noqa: E402
from lm.report import format_table, plot_curves, summarize  # noqa: E402

OPTIMIZERS = ("adamw", "soap", "shampoo")
LAPACK_THREADS_VARIABLE = "SOAP_LAPACK_THREADS"  # read by soap_kernels.lapack at every call


# ---------------------------------------------------------------------------------------- options
def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_lr_item(item: str) -> tuple[str, list[float]]:
    """One ``--lr-grid`` item: ``"adamw=1e-3,3e-3"`` -> ``("adamw", [1e-3, 3e-3])``."""
    name, sep, values = item.partition("=")
    name = name.strip()
    try:
        lrs = parse_floats(values)
    except ValueError:
        lrs = []
    if not sep or name not in OPTIMIZERS or not lrs or min(lrs) <= 0:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=LR[,LR...] with NAME in {OPTIMIZERS} and LR > 0")
    return name, lrs


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
    p = argparse.ArgumentParser(prog="train_lm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help=f"model and budget ({presets})")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list from %(default)s")
    p.add_argument(
        "--lr-grid",
        nargs="+",
        type=parse_lr_item,
        default=[],
        metavar="NAME=LR[,LR...]",
        help="per-optimizer learning rates to try, e.g. adamw=1e-3,3e-3 soap=3e-3,1e-2 "
        "(an optimizer left out uses the preset's tuned LR)",
    )
    p.add_argument("--seeds", default="0", help="comma list of seeds (model init and data order)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (preset's if omitted)")
    p.add_argument("--batch-size", type=int, help="sequences per step (preset's if omitted)")
    p.add_argument("--ctx", type=int, help="context length in characters (preset's if omitted)")
    p.add_argument("--eval-every", type=int, help="steps between validation evaluations (preset's if omitted)")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation (preset's if omitted)")
    p.add_argument("--warmup-steps", type=int, help="linear LR warm-up steps (default: 10%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of the LR")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled, on matrices only (all optimizers)")
    p.add_argument("--betas", default="0.95,0.95", help="(beta1, beta2) for every optimizer (SOAP's default)")
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--precondition-frequency", type=int, default=10, help="SOAP/Shampoo eigenbasis refresh")
    p.add_argument("--soap-backend", default="auto", help="soap_kernels backend for soap and shampoo")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="UTF-8 text file, may be .xz or .gz")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the corpus")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the model (not the optimizer)")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch's default if omitted)")
    p.add_argument(
        "--lapack-threads", type=int,
        help="threads for SOAP's CPU eigh/qr (sets SOAP_LAPACK_THREADS for the run). 0: soap_kernels picks by "
        "timing between one thread and the batch split over the cores at one thread each, which give the same "
        "bits. Default: $SOAP_LAPACK_THREADS, else 0",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default runs/lm-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--ddp",
        action="store_true",
        help="data parallel under torchrun (gloo on cpu, nccl on cuda); SOAP/Shampoo shard their work",
    )
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """The effective settings of this invocation: the preset with the command line's overrides."""
    preset = PRESETS[args.preset]
    optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown or not optimizers:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {OPTIMIZERS}")
    grid = dict(args.lr_grid)

    def pick(value: int | None, default: int) -> int:
        return default if value is None else value

    steps = pick(args.steps, preset.steps)
    if steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {steps}")
    betas = parse_floats(args.betas)
    if len(betas) != 2:
        raise SystemExit(f"--betas needs two numbers, got {args.betas!r}")
    config = {
        "preset": args.preset,
        "d_model": preset.d_model,
        "n_layers": preset.n_layers,
        "n_heads": preset.n_heads,
        "ctx": pick(args.ctx, preset.ctx),
        "batch_size": pick(args.batch_size, preset.batch_size),
        "steps": steps,
        "eval_every": pick(args.eval_every, preset.eval_every),
        "eval_batches": pick(args.eval_batches, preset.eval_batches),
        "warmup_steps": pick(args.warmup_steps, max(1, steps // 10)),
        "min_lr_ratio": args.min_lr_ratio,
        "weight_decay": args.weight_decay,
        "betas": betas,
        "eps": args.eps,
        "precondition_frequency": args.precondition_frequency,
        "soap_backend": args.soap_backend,
        "optimizers": optimizers,
        "lr_grid": {name: grid.get(name, [preset.lr[name]]) for name in optimizers},
        "seeds": [int(s) for s in args.seeds.split(",") if s.strip()],
        "corpus": str(args.corpus),
        "val_fraction": args.val_fraction,
        "device": args.device,
        "bf16": args.bf16,
        "threads": args.threads,
        "lapack_threads": _lapack_threads(args.lapack_threads),
        "ddp": args.ddp,
        "world_size": _world_size(),
    }
    for key in ("ctx", "batch_size", "eval_every", "eval_batches"):
        if config[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if config["batch_size"] % config["world_size"]:
        raise SystemExit(f"--batch-size {config['batch_size']} must be a multiple of the {config['world_size']} ranks")
    config["tokens_per_step"] = config["batch_size"] * config["ctx"]
    config["token_budget"] = config["tokens_per_step"] * steps
    return config


# ----------------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, param_groups: list[dict], lr: float, config: dict) -> torch.optim.Optimizer:
    betas = tuple(config["betas"])
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=config["eps"], fused=True)
    # Imported here so that the AdamW path runs without soap_kernels (or before SOAP exists).
    from soap_kernels import SOAP

    second_moment = {"soap": "adam", "shampoo": "adafactor"}[name]
    if config.get("ddp"):  # the same arguments; each rank updates the buckets it owns
        from soap_kernels.distributed import ShardedSOAP as optimizer_class
    else:
        optimizer_class = SOAP
    return optimizer_class(
        param_groups,
        lr=lr,
        betas=betas,
        eps=config["eps"],
        precondition_frequency=config["precondition_frequency"],
        backend=config["soap_backend"],
        second_moment=second_moment,
    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors reachable from ``optimizer`` other than the parameters, storages counted once.

    Walks the optimizer object rather than ``optimizer.state`` alone: soap_kernels keeps its state in
    stacked per-bucket tensors (some, like the rotated-frame statistics, not shown in ``state``), and
    ``state_dict()`` would instead count a freshly exported copy in the reference's layout.
    """
    parameters = {p.untyped_storage().data_ptr() for g in optimizer.param_groups for p in g["params"]}
    skipped = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, str, bytes, int, float)
    storages: dict[int, int] = {}
    visited: set[int] = set()
    pending: list = [optimizer]
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in visited or isinstance(obj, skipped):
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            pending.extend(obj.keys())
            pending.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            pending.extend(obj)
        else:
            pending.extend(getattr(obj, "__dict__", {}).values())
            for slot in getattr(type(obj), "__slots__", ()):
                pending.append(getattr(obj, slot, None))
    return sum(storages.values())


# ------------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: GPT, batches: list, device: torch.device, bf16: bool) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses.append(model(x.to(device), y.to(device)).float())
    model.train()
    return torch.stack(losses).mean().item()


def train_run(name: str, lr: float, seed: int, corpus: CharCorpus, val_batches: list, config: dict, progress: bool) -> dict:
    """One training run; returns its record (status "ok", "diverged" or "failed")."""
    device = torch.device(config["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps, bf16 = config["steps"], config["bf16"]
    record: dict = {
        "optimizer": name, "lr": lr, "seed": seed, "status": "ok", "error": None,
        "train_loss": [], "eval_steps": [], "val_loss": [], "train_time_at_eval_s": [],
        "steps_done": 0, "train_time_s": 0.0, "optimizer_time_s": 0.0, "optimizer_share": 0.0,
        "eval_time_s": 0.0, "run_time_s": 0.0, "peak_memory_bytes": 0, "optimizer_state_bytes": 0,
    }  # fmt: skip
    run_start = time.perf_counter()
    # The same seed gives every optimizer the same initial weights and the same batches.
    torch.manual_seed(seed)
    model = GPT(GPTConfig(corpus.vocab_size, config["ctx"], config["d_model"], config["n_layers"], config["n_heads"])).to(device)
    data_generator = torch.Generator().manual_seed(seed)
    module, rank, world = model, _rank(), config["world_size"]
    if config.get("ddp"):
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def log_eval(step: int) -> None:
        t0 = time.perf_counter()
        loss = evaluate(module, val_batches, device, bf16)
        record["eval_time_s"] += time.perf_counter() - t0
        record["eval_steps"].append(step)
        record["val_loss"].append(loss)
        record["train_time_at_eval_s"].append(record["train_time_s"])

    bar = tqdm(total=steps, desc=f"{name} lr={lr:g} seed={seed}", disable=not progress, leave=True)
    try:
        optimizer = make_optimizer(name, module.param_groups(config["weight_decay"]), lr, config)
        scheduler = LambdaLR(optimizer, warmup_cosine(config["warmup_steps"], steps, config["min_lr_ratio"]))
        log_eval(0)
        for step in range(1, steps + 1):
            sync()
            t0 = time.perf_counter()
            x, y = corpus.train_batch(config["batch_size"], config["ctx"], data_generator)
            if world > 1:  # this rank's share of the global batch
                share = config["batch_size"] // world
                x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, y)
            loss.backward()
            sync()
            t1 = time.perf_counter()
            optimizer.step()
            sync()
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            record["train_time_s"] += time.perf_counter() - t0
            record["optimizer_time_s"] += t2 - t1
            record["steps_done"] = step
            if world > 1:  # the global batch's loss, as a single process sees it
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
                loss /= world
            loss_value = loss.item()
            record["train_loss"].append(loss_value)
            bar.update()
            if not math.isfinite(loss_value):
                record["status"] = "diverged"
                break
            if step % config["eval_every"] == 0 or step == steps:
                log_eval(step)
                bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{record['val_loss'][-1]:.3f}")
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{record['val_loss'][-1]:.3f}")
        record["optimizer_state_bytes"] = state_bytes(optimizer)
    except Exception as exc:  # noqa: BLE001 -- one failing optimizer must not lose the others' results
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        print(f"\n[{name} lr={lr:g} seed={seed}] failed: {record['error']}", file=sys.stderr)
    finally:
        bar.close()
    if record["val_loss"] and not math.isfinite(record["val_loss"][-1]):
        record["status"] = "diverged"
    record["optimizer_share"] = record["optimizer_time_s"] / record["train_time_s"] if record["train_time_s"] else 0.0
    record["run_time_s"] = time.perf_counter() - run_start
    if device.type == "cuda":
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_memory_kind"] = "torch.cuda.max_memory_allocated (this run)"
    else:
        # ru_maxrss is in KiB on Linux and only grows: it is the process's peak up to this run.
        record["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        record["peak_memory_kind"] = "process peak RSS so far (ru_maxrss)"
    return record


# ------------------------------------------------------------------------------------- plumbing
def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import soap_kernels

        env["soap_kernels"] = soap_kernels.__version__
        if hasattr(soap_kernels, "backend_info"):
            env["soap_backend_info"] = str(soap_kernels.backend_info())
    except Exception as exc:  # noqa: BLE001
        env["soap_kernels"] = f"not importable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _lapack_threads(option: int | None) -> int:
    """The LAPACK thread count for SOAP on the CPU; 0 (the default) lets soap_kernels choose.

    soap_kernels.lapack chooses by timing between one thread and the batch split over the cores at
    one thread per matrix: the same bits either way, so the same seed gives the same SOAP run in
    every process (multi-threaded LAPACK, which rounds differently, is only a candidate under
    SOAP_LAPACK_MULTITHREAD=1). A count N > 0 runs every call at N threads, unsplit.
    """
    if option is not None:
        return max(0, option)
    return int(os.environ.get(LAPACK_THREADS_VARIABLE) or 0)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: str) -> torch.device:
    """``--ddp``: join the process group torchrun describes; returns this rank's device."""
    if "RANK" not in os.environ:
        raise SystemExit("--ddp: run under torchrun, e.g. torchrun --nproc_per_node=2 python/train_lm.py --ddp")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; returns what it wrote to ``results.json`` (every rank, under ``--ddp``)."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = init_distributed(args.device) if args.ddp else torch.device(args.device)
    saved_lapack_threads = os.environ.get(LAPACK_THREADS_VARIABLE)
    try:
        lapack_threads = _lapack_threads(args.lapack_threads)
        if lapack_threads:
            os.environ[LAPACK_THREADS_VARIABLE] = str(lapack_threads)
        else:
            os.environ.pop(LAPACK_THREADS_VARIABLE, None)
        return _main(args, device, argv)
    finally:
        # main() is also a library call (tests): leave the environment as it was.
        if saved_lapack_threads is None:
            os.environ.pop(LAPACK_THREADS_VARIABLE, None)
        else:
            os.environ[LAPACK_THREADS_VARIABLE] = saved_lapack_threads
        if args.ddp:
            torch.distributed.destroy_process_group()


def _main(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> dict:
    config = resolve_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        config["device"] = str(device)
    leader = _rank() == 0  # prints and writes; under --ddp every rank computes the same summary
    out = args.out or Path("runs") / f"lm-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if leader:
        out.mkdir(parents=True, exist_ok=True)

    corpus = CharCorpus(load_text(args.corpus), args.val_fraction)
    corpus.check_fits(config["ctx"], config["batch_size"])
    val_batches = corpus.val_batches(config["eval_batches"], config["batch_size"], config["ctx"])
    n_params = GPT(
        GPTConfig(corpus.vocab_size, config["ctx"], config["d_model"], config["n_layers"], config["n_heads"])
    ).num_params()
    config.update(
        vocab_size=corpus.vocab_size, n_params=n_params,
        train_chars=len(corpus.train), val_chars=len(corpus.val),
        epochs=config["token_budget"] / len(corpus.train),
        val_tokens_per_eval=config["eval_batches"] * config["tokens_per_step"],
    )  # fmt: skip
    ranks = f" x {config['world_size']} ranks (ddp)" if config["ddp"] else ""
    if leader:
        print(
            f"{args.preset}: {n_params:,} parameters, vocab {corpus.vocab_size}, "
            f"{config['steps']} steps x {config['batch_size']} x {config['ctx']} = {config['token_budget']:,} tokens "
            f"({config['epochs']:.2f} epochs of {len(corpus.train):,} training chars), device {device}{ranks}",
            file=sys.stderr,
        )

    env = environment(device)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    runs: list[dict] = []
    started = time.perf_counter()

    def write_results(complete: bool) -> tuple[dict, dict]:
        # Rewritten after every run, so an interrupted grid keeps the runs it finished.
        summary = summarize(runs, config["optimizers"])
        results = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "complete": complete,
            "config": config,
            "environment": env,
            "total_time_s": time.perf_counter() - started,
            "summary": summary,
            "table": format_table(summary),
            "runs": runs,
        }
        results = _json_safe(results)
        if leader:
            (out / "results.json").write_text(json.dumps(results, indent=1))
        return results, summary

    for name in config["optimizers"]:
        for lr in config["lr_grid"][name]:
            for seed in config["seeds"]:
                run = train_run(name, lr, seed, corpus, val_batches, config, leader and not args.no_progress)
                runs.append(run)
                final = f"{run['val_loss'][-1]:.4f}" if run["val_loss"] else "-"
                if leader:
                    print(
                        f"[{len(runs)}] {name} lr={lr:g} seed={seed}: {run['status']}, val loss {final}, "
                        f"train {run['train_time_s']:.1f} s (optimizer.step {run['optimizer_share']:.1%})",
                        file=sys.stderr,
                    )
                write_results(complete=False)
    results, summary = write_results(complete=True)
    total_s = results["total_time_s"]
    if not leader:
        return results
    plot_curves(
        summary, out / "loss_curves.png",
        title=f"{args.preset}: {n_params:,} params, {config['token_budget']:,} tokens, "
        f"batch {config['batch_size']}x{config['ctx']}, {device}, mean over seeds {config['seeds']}",
    )  # fmt: skip
    print(results["table"])
    print(f"total {total_s:.1f} s; wrote {out / 'results.json'} and {out / 'loss_curves.png'}")
    return results


if __name__ == "__main__":
    main()
