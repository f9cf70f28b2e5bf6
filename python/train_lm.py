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
engine), and the peers (other SOAP implementations, built by ``python/lm/peers.py`` with the
``soap`` run's hyperparameters: betas, shampoo_beta, eps, weight decay, precondition_frequency,
max_precond_dim, merge_dims): ``heavyball_soap``, ``pytorch_optimizer_soap`` (install both with
``pip install --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0``) and ``upstream_soap`` (the
authors' soap.py, ``--upstream-soap PATH``). A peer named in ``--optimizers`` that cannot be built
stops the program before any training, with the reason and the install command; the name
``peers`` stands for every peer that can be built here (the others are skipped with that message).
A peer's LR grid is ``soap``'s unless ``--lr-grid NAME=...`` gives its own. Writes
``results.json`` and ``loss_curves.png`` into ``--out``.

    python python/train_lm.py --optimizers adamw,soap,peers --upstream-soap ~/SOAP/soap.py
    python python/train_lm.py --optimizers soap,shampoo --schedule Staggered:10

``--schedule NAME[:ARGS]``: a refresh schedule of ``soap_kernels.schedules`` for the soap and
shampoo runs (``Staggered:10``, ``Doubling:start=1,clip=8``, ``Budgeted:2,by=flops``); the peers
keep refreshing every ``--precondition-frequency`` steps.

Checkpoints: ``--checkpoint-every N`` writes ``<out>/checkpoint.pt`` every N steps of a run and
after each run (atomically: a crash leaves the previous checkpoint whole). It holds the finished
runs' records and, for the run in progress, the model, the optimizer's ``state_dict()``, the LR
scheduler, the data position, the RNG states and the record so far. ``--resume DIR`` continues the
invocation whose ``--out`` was DIR, given the same options: finished runs are kept, the
interrupted run goes on from its last checkpoint, and its loss curve is bit for bit the one an
uninterrupted run gives (on the CPU, soap_kernels' default LAPACK choice between one thread and
the batch split gives the same bits either way; ``--lapack-threads N`` with N > 1 does not).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import datetime
import inspect
import json
import math
import os
import platform
import resource
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the lm package next to this file
sys.path.append(str(HERE.parent))  # soap_kernels from this checkout when it is not installed

from lm import GPT, PRESETS, CharCorpus, GPTConfig, load_text, peers, warmup_cosine  # noqa: E402
from lm import checkpoint as ckpt  # noqa: E402
from lm.data import DEFAULT_CORPUS  # noqa: E402
from lm.report import format_table, plot_curves, summarize  # noqa: E402

OPTIMIZERS = ("adamw", "soap", "shampoo")  # the default comparison
ALL_OPTIMIZERS = OPTIMIZERS + peers.PEERS
PEERS_ALIAS = "peers"  # in --optimizers: every peer that can be built here
CHECKPOINT = "checkpoint.pt"  # in --out
# config keys a resumed invocation may change (everything else must match the checkpoint's)
RESUMABLE_CHANGES = {"checkpoint_every"}
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
    if not sep or name not in ALL_OPTIMIZERS or not lrs or min(lrs) <= 0:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=LR[,LR...] with NAME in {ALL_OPTIMIZERS} and LR > 0")
    return name, lrs


def schedule_classes() -> dict[str, type]:
    """The refresh schedules of ``soap_kernels.schedules`` by class name (the base class left out)."""
    from soap_kernels import schedules

    return {name: getattr(schedules, name) for name in schedules.__all__ if name != "RefreshSchedule"}


def _call_signature(cls: type) -> str:
    """``Staggered(every=10, blocks=None, together=1)``: the constructor's arguments and defaults, no annotations."""
    parts = []
    for param in inspect.signature(cls).parameters.values():
        default = "" if param.default is inspect.Parameter.empty else f"={param.default!r}"
        parts.append(f"{param.name}{default}")
    return f"{cls.__name__}({', '.join(parts)})"


def _split_arguments(text: str) -> list[str]:
    """Split at the commas outside brackets, so ``blocks=[2,2],every=4`` is two arguments."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _literal(text: str):
    """A Python literal (``10``, ``0.5``, ``None``, ``[2, 2]``), else the text itself (``flops``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_schedule(text: str):
    """``--schedule NAME[:ARGS]`` -> a new schedule object; ARGS are the constructor's, comma-separated,
    positional (``Staggered:10``) or ``key=value`` (``Doubling:start=2,clip=16``), values as Python
    literals or bare words. The name is matched without regard to case."""
    name, _, arguments = text.partition(":")
    try:
        classes = schedule_classes()
    except Exception as exc:  # noqa: BLE001 -- whatever stops the import, say it at parse time
        raise argparse.ArgumentTypeError(f"--schedule needs soap_kernels.schedules ({type(exc).__name__}: {exc})") from None
    by_lower = {key.lower(): cls for key, cls in classes.items()}
    cls = by_lower.get(name.strip().lower())
    if cls is None:
        raise argparse.ArgumentTypeError(f"unknown schedule {name.strip()!r}; choose from {', '.join(classes)}")
    args, kwargs = [], {}
    for item in _split_arguments(arguments):
        key, eq, value = item.partition("=")
        if eq and key.strip().isidentifier():
            kwargs[key.strip()] = _literal(value.strip())
        elif kwargs:
            raise argparse.ArgumentTypeError(f"{text!r}: positional argument {item!r} after key=value ones")
        else:
            args.append(_literal(item))
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}; the constructor is {_call_signature(cls)}") from None


def _schedule_option(text: str) -> str:
    parse_schedule(text)  # the error, if any, at parse time; every run builds its own object
    return text


def _schedule_help() -> str:
    try:
        choices = ", ".join(_call_signature(cls) for cls in schedule_classes().values())
    except Exception as exc:  # noqa: BLE001 -- the AdamW path runs without soap_kernels
        choices = f"the classes of soap_kernels.schedules (not importable here: {exc})"
    return (
        "refresh schedule for the soap and shampoo runs, NAME[:ARGS] with the constructor's arguments, "
        "positional or key=value, comma-separated (e.g. Staggered:10, Doubling:start=1,clip=8, "
        f"Budgeted:2,by=flops); one of {choices}. Default: every --precondition-frequency updates. "
        "The peers always refresh every --precondition-frequency steps"
    )


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
    p = argparse.ArgumentParser(prog="train_lm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help=f"model and budget ({presets})")
    p.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS),
        help=f"comma list from {', '.join(ALL_OPTIMIZERS)}, or '{PEERS_ALIAS}' for every peer that can be built "
        f"here (default: %(default)s). A peer named here that cannot be built is an error, before any training",
    )  # fmt: skip
    p.add_argument(
        "--lr-grid",
        nargs="+",
        type=parse_lr_item,
        default=[],
        metavar="NAME=LR[,LR...]",
        help="per-optimizer learning rates to try, e.g. adamw=1e-3,3e-3 soap=3e-3,1e-2 "
        "(an optimizer left out uses the preset's tuned LR; a peer left out uses soap's grid)",
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
    p.add_argument(
        "--shampoo-beta",
        type=float,
        default=-1.0,
        help="EMA factor of the Shampoo statistics (soap, shampoo, peers); negative: beta2",
    )
    p.add_argument(
        "--precondition-frequency",
        type=int,
        default=10,
        help="eigenbasis refresh every this many updates (soap, shampoo without --schedule, peers)",
    )
    p.add_argument("--max-precond-dim", type=int, default=10000, help="dims above this are not preconditioned")
    p.add_argument("--merge-dims", action="store_true", help="merge dims while their product <= --max-precond-dim")
    p.add_argument("--schedule", type=_schedule_option, metavar="NAME[:ARGS]", help=_schedule_help())
    p.add_argument("--soap-backend", default="auto", help="soap_kernels backend for soap and shampoo")
    p.add_argument("--keep-refresh-scratch", action="store_true",
                   help="SOAP(keep_refresh_scratch=True) for soap and shampoo: the refresh temporaries kept between "
                        "steps (a faster refresh step on the CPU for ~13 B/param more memory; the same bits)")
    p.add_argument(
        "--upstream-soap",
        type=Path,
        metavar="PATH",
        help="the authors' soap.py (github.com/nikhilvyas/SOAP), for the upstream_soap peer",
    )
    p.add_argument(
        "--heavyball-compile", action="store_true",
        help="let HeavyBall torch.compile its inner functions (its default; heavyball.utils.compile_mode). Off by "
        "default: every optimizer here runs eagerly, and on a CPU the compile takes minutes inside the timed steps",
    )  # fmt: skip
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
    p.add_argument("--out", type=Path, help="output folder (default runs/lm-<timestamp>; with --resume, its DIR)")
    p.add_argument(
        "--checkpoint-every", type=int, metavar="N",
        help=f"write <out>/{CHECKPOINT} every N steps of a run and after each run (atomically), for --resume. "
        "Default: off (with --resume: the resumed invocation's N)",
    )  # fmt: skip
    p.add_argument(
        "--resume", type=Path, metavar="DIR",
        help=f"continue the invocation that wrote DIR/{CHECKPOINT}, with the same options as then: its finished "
        "runs are kept, the interrupted run continues from its checkpoint (bit for bit), results go to DIR",
    )  # fmt: skip
    # Tests only: stop (as if killed) after this many optimizer steps of this invocation.
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
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
    upstream = str(args.upstream_soap) if args.upstream_soap else None
    optimizers, available, skipped = resolve_optimizers(args.optimizers, upstream)
    grid = dict(args.lr_grid)
    soap_grid = grid.get("soap", [preset.lr["soap"]])

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
        "shampoo_beta": args.shampoo_beta,
        "precondition_frequency": args.precondition_frequency,
        "max_precond_dim": args.max_precond_dim,
        "merge_dims": args.merge_dims,
        "schedule": args.schedule,
        "soap_backend": args.soap_backend,
        "keep_refresh_scratch": args.keep_refresh_scratch,
        "optimizers": optimizers,
        "lr_grid": {name: grid.get(name, [preset.lr[name]] if name in preset.lr else soap_grid) for name in optimizers},
        "peers": available,
        "skipped_peers": skipped,
        "upstream_soap": upstream,
        "heavyball_compile": args.heavyball_compile,
        "seeds": [int(s) for s in args.seeds.split(",") if s.strip()],
        "corpus": str(args.corpus),
        "val_fraction": args.val_fraction,
        "device": args.device,
        "bf16": args.bf16,
        "threads": args.threads,
        "lapack_threads": _lapack_threads(args.lapack_threads),
        "ddp": args.ddp,
        "world_size": _world_size(),
        "checkpoint_every": args.checkpoint_every or 0,
    }
    for key in ("ctx", "batch_size", "eval_every", "eval_batches", "precondition_frequency", "max_precond_dim"):
        if config[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if config["checkpoint_every"] < 0:
        raise SystemExit(f"--checkpoint-every must be >= 0, got {config['checkpoint_every']}")
    if config["batch_size"] % config["world_size"]:
        raise SystemExit(f"--batch-size {config['batch_size']} must be a multiple of the {config['world_size']} ranks")
    config["tokens_per_step"] = config["batch_size"] * config["ctx"]
    config["token_budget"] = config["tokens_per_step"] * steps
    return config


def resolve_optimizers(text: str, upstream_path: str | None) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """``--optimizers`` -> (the optimizers in order, {peer: what was found}, {skipped peer: why}).

    A peer named explicitly that cannot be built raises SystemExit with the reason (and the install
    command); ``peers`` expands to the peers that can be built, and the others are skipped.
    """
    names: list[str] = []
    for name in (item.strip() for item in text.split(",")):
        if name == PEERS_ALIAS:
            names.extend(n for n in peers.PEERS if n not in names)
        elif name and name not in names:
            names.append(name)
    unknown = [name for name in names if name not in ALL_OPTIMIZERS]
    if unknown or not names:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {', '.join(ALL_OPTIMIZERS)} or {PEERS_ALIAS!r}")
    explicit = {item.strip() for item in text.split(",")}
    available, skipped = {}, {}
    for name in [n for n in names if n in peers.PEERS]:
        ok, why = peers.peer_available(name, upstream_path)
        if ok:
            available[name] = why
        elif name in explicit:
            raise SystemExit(f"--optimizers {name}: {why}")
        else:
            skipped[name] = why
            names.remove(name)
            print(f"skipping {name}: {why}", file=sys.stderr)
    if not names:
        raise SystemExit(f"--optimizers {text}: none of them can be built here ({'; '.join(skipped.values())})")
    return names, available, skipped


# ----------------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, param_groups: list[dict], lr: float, config: dict) -> torch.optim.Optimizer:
    betas = tuple(config["betas"])
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=config["eps"], fused=True)
    shared = {  # soap's hyperparameters, for our SOAP and for every peer
        "lr": lr, "betas": betas, "shampoo_beta": config["shampoo_beta"], "eps": config["eps"],
        "weight_decay": config["weight_decay"], "precondition_frequency": config["precondition_frequency"],
        "max_precond_dim": config["max_precond_dim"], "merge_dims": config["merge_dims"],
    }  # fmt: skip
    if name in peers.PEERS:  # each group's own weight_decay wins over the argument, as in SOAP
        return peers.make_peer(name, param_groups, upstream_path=config["upstream_soap"], **shared)
    # Imported here so that the AdamW path runs without soap_kernels (or before SOAP exists).
    from soap_kernels import SOAP

    second_moment = {"soap": "adam", "shampoo": "adafactor"}[name]
    if config.get("ddp"):  # the same arguments; each rank updates the buckets it owns
        from soap_kernels.distributed import ShardedSOAP as optimizer_class
    else:
        optimizer_class = SOAP
    schedule = parse_schedule(config["schedule"]) if config["schedule"] else None  # a fresh one per run
    return optimizer_class(param_groups, **shared, backend=config["soap_backend"], second_moment=second_moment,
                           schedule=schedule, keep_refresh_scratch=bool(config.get("keep_refresh_scratch", False)))


def optimizer_state_bytes(name: str, optimizer: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes: ``peers.state_bytes`` (the tensors in ``optimizer.state``) for a peer,
    :func:`state_bytes` (every tensor reachable from the optimizer) for ours and AdamW."""
    return peers.state_bytes(optimizer) if name in peers.PEERS else state_bytes(optimizer)


@contextlib.contextmanager
def heavyball_compile(enabled: bool):
    """HeavyBall compiles its inner functions itself (``heavyball.utils.compile_mode``, TorchInductor
    "max-autotune-no-cudagraphs") even with ``compile_step=False``; ``None`` there runs them eagerly.
    Restored on exit: ``main`` is also a library call."""
    try:
        import heavyball.utils as heavyball_utils
    except ImportError:
        yield
        return
    saved = heavyball_utils.compile_mode
    if not enabled:
        heavyball_utils.compile_mode = None
    try:
        yield
    finally:
        heavyball_utils.compile_mode = saved


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


class StopRequested(BaseException):
    """``--stop-after-steps`` (tests): ends the invocation as a kill would, past ``except Exception``."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or resumed from: stops the invocation (it is not the run's failure)."""


def _global_loss(loss: torch.Tensor, world: int) -> torch.Tensor:
    """The global batch's loss, as a single process sees it (the mean over the ranks' shares)."""
    loss = loss.detach()
    if world > 1:
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return loss


def train_run(
    name: str,
    lr: float,
    seed: int,
    corpus: CharCorpus,
    val_batches: list,
    config: dict,
    progress: bool,
    *,
    resume: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict:
    """One training run; returns its record (status "ok", "diverged" or "failed").

    ``save_state(state)`` is called every ``config["checkpoint_every"]`` steps (before the last)
    with the run's state: the model, optimizer and LR-scheduler state dicts, the data generator's
    and the global RNGs' states, the step and the record so far. ``resume``, such a state, makes
    the run continue from it. ``after_step()`` is called after every step (and its checkpoint).
    """
    device = torch.device(config["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps, bf16 = config["steps"], config["bf16"]
    ours = name in ("soap", "shampoo")
    record: dict = {
        "optimizer": name, "lr": lr, "seed": seed, "status": "ok", "error": None,
        "schedule": config["schedule"] if ours else None,
        "train_loss": [], "eval_steps": [], "val_loss": [], "train_time_at_eval_s": [],
        "steps_done": 0, "train_time_s": 0.0, "optimizer_time_s": 0.0, "optimizer_share": 0.0,
        "eval_time_s": 0.0, "run_time_s": 0.0, "peak_memory_bytes": 0, "optimizer_state_bytes": 0,
        "resumed_at_steps": [],
    }  # fmt: skip
    start = 0
    if resume is not None:
        record = copy.deepcopy(resume["record"])
        start = resume["step"]
        record["resumed_at_steps"].append(start)
    run_start = time.perf_counter() - record["run_time_s"]
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

    def state(step: int) -> dict:
        record["run_time_s"] = time.perf_counter() - run_start
        return {
            "key": [name, lr, seed], "step": step, "record": copy.deepcopy(record),
            "model": module.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "data": data_generator.get_state(), "rng": ckpt.rng_state(),
        }  # fmt: skip

    bar = tqdm(total=steps, initial=start, desc=f"{name} lr={lr:g} seed={seed}", disable=not progress, leave=True)
    try:
        optimizer = make_optimizer(name, module.param_groups(config["weight_decay"]), lr, config)
        scheduler = LambdaLR(optimizer, warmup_cosine(config["warmup_steps"], steps, config["min_lr_ratio"]))
        # A loss-driven refresh schedule (LossThreshold) gets each step's loss.
        needs_loss = bool(getattr(getattr(optimizer, "schedule", None), "needs_loss", False))
        if resume is None:
            log_eval(0)
        else:
            try:
                module.load_state_dict(resume["model"])
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
                data_generator.set_state(resume["data"])
                ckpt.set_rng_state(resume["rng"])
            except Exception as exc:  # noqa: BLE001 -- any mismatch: this checkpoint cannot continue this run
                raise CheckpointError(f"cannot resume {name} lr={lr:g} seed={seed} at step {start}: "
                                      f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        every = config["checkpoint_every"]
        for step in range(start + 1, steps + 1):
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
            global_loss = _global_loss(loss, world) if needs_loss else None
            sync()
            t1 = time.perf_counter()
            if needs_loss:
                optimizer.step(loss=global_loss)
            else:
                optimizer.step()
            sync()
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            record["train_time_s"] += time.perf_counter() - t0
            record["optimizer_time_s"] += t2 - t1
            record["steps_done"] = step
            loss_value = (global_loss if needs_loss else _global_loss(loss, world)).item()
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
            if save_state is not None and every and step % every == 0 and step < steps:
                save_state(state(step))  # the finished run is saved by the caller, with its result
            if after_step is not None:
                after_step()
        record["optimizer_state_bytes"] = optimizer_state_bytes(name, optimizer)
    except CheckpointError:
        raise
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
    saved_threads = torch.get_num_threads()
    try:
        lapack_threads = _lapack_threads(args.lapack_threads)
        if lapack_threads:
            os.environ[LAPACK_THREADS_VARIABLE] = str(lapack_threads)
        else:
            os.environ.pop(LAPACK_THREADS_VARIABLE, None)
        return _main(args, device, argv)
    finally:
        # main() is also a library call (tests): leave the environment and torch's threads as they were.
        torch.set_num_threads(saved_threads)
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
    saved = _read_checkpoint(args) if args.resume else None
    if saved is not None:
        out = args.resume
        if args.checkpoint_every is None:
            config["checkpoint_every"] = saved["config"]["checkpoint_every"]
    else:
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
    plan = [(name, lr, seed) for name in config["optimizers"] for lr in config["lr_grid"][name] for seed in config["seeds"]]
    runs: list[dict] = []
    current = None  # the interrupted run's state
    if saved is not None:
        runs, current = _check_resumable(saved, config, plan, args.resume)
    ranks = f" x {config['world_size']} ranks (ddp)" if config["ddp"] else ""
    if leader:
        print(
            f"{args.preset}: {n_params:,} parameters, vocab {corpus.vocab_size}, "
            f"{config['steps']} steps x {config['batch_size']} x {config['ctx']} = {config['token_budget']:,} tokens "
            f"({config['epochs']:.2f} epochs of {len(corpus.train):,} training chars), device {device}{ranks}",
            file=sys.stderr,
        )
        if saved is not None:
            if current:
                name, lr, seed = current["key"]
                where = f"; {name} lr={lr:g} seed={seed} continues from step {current['step']}"
            else:
                where = ""
            print(f"resuming {out}: {len(runs)} of {len(plan)} runs done{where}", file=sys.stderr)

    env = environment(device)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    commands = [*(saved["commands"] if saved else []), command]
    started = time.perf_counter() - (saved["total_time_s"] if saved else 0.0)

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
        if len(commands) > 1:
            results["earlier_commands"] = commands[:-1]  # this invocation resumed those
        results = _json_safe(results)
        if leader:
            (out / "results.json").write_text(json.dumps(results, indent=1))
        return results, summary

    def write_checkpoint(run_state: dict | None) -> None:
        # Every rank builds the state (ShardedSOAP's state_dict() is collective); rank 0 writes it.
        if not leader:
            return
        payload = {
            "format": ckpt.FORMAT, "config": config, "commands": commands,
            "total_time_s": time.perf_counter() - started, "runs": runs, "current": run_state,
        }  # fmt: skip
        try:
            ckpt.atomic_save(payload, out / CHECKPOINT)
        except Exception as exc:
            raise CheckpointError(f"cannot write {out / CHECKPOINT}: {type(exc).__name__}: {exc}") from exc

    steps_taken = 0

    def after_step() -> None:
        nonlocal steps_taken
        steps_taken += 1
        if args.stop_after_steps and steps_taken >= args.stop_after_steps:
            raise StopRequested

    checkpointing = config["checkpoint_every"] > 0
    compile_mode = (
        heavyball_compile(config["heavyball_compile"]) if "heavyball_soap" in config["optimizers"] else contextlib.nullcontext()
    )
    try:
        with compile_mode:
            for name, lr, seed in plan[len(runs) :]:
                run = train_run(
                    name, lr, seed, corpus, val_batches, config, leader and not args.no_progress,
                    resume=current, save_state=write_checkpoint if checkpointing else None, after_step=after_step,
                )  # fmt: skip
                current = None
                runs.append(run)
                final = f"{run['val_loss'][-1]:.4f}" if run["val_loss"] else "-"
                if leader:
                    print(
                        f"[{len(runs)}] {name} lr={lr:g} seed={seed}: {run['status']}, val loss {final}, "
                        f"train {run['train_time_s']:.1f} s (optimizer.step {run['optimizer_share']:.1%})",
                        file=sys.stderr,
                    )
                write_results(complete=False)
                if checkpointing:
                    write_checkpoint(None)
    except StopRequested:
        raise SystemExit(f"stopped after {steps_taken} steps (--stop-after-steps); continue with --resume {out}") from None
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


def _read_checkpoint(args: argparse.Namespace) -> dict:
    """``--resume DIR``: DIR's checkpoint, or SystemExit saying why there is none to resume from."""
    if args.out is not None and args.out.resolve() != args.resume.resolve():
        raise SystemExit(f"--resume {args.resume} writes its results to {args.resume}; drop --out {args.out}")
    path = args.resume / CHECKPOINT
    if not path.is_file():
        raise SystemExit(f"--resume {args.resume}: no {CHECKPOINT} there (was it run with --checkpoint-every N?)")
    try:
        return ckpt.load(path)
    except Exception as exc:  # noqa: BLE001 -- unreadable for whatever reason: say which file and why
        raise SystemExit(f"--resume {args.resume}: cannot read {path} ({type(exc).__name__}: {exc})") from None


def _check_resumable(saved: dict, config: dict, plan: list[tuple], where: Path) -> tuple[list[dict], dict | None]:
    """The finished runs and the interrupted run's state of ``saved``, once it is certain that they
    belong to this configuration; SystemExit naming what differs otherwise."""
    before = {k: v for k, v in saved["config"].items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ:
        details = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in differ)
        raise SystemExit(f"--resume {where}: the options differ from the checkpointed invocation's ({details})")
    runs = list(saved["runs"])
    done = [(r["optimizer"], r["lr"], r["seed"]) for r in runs]
    current = saved["current"]
    if done != plan[: len(done)] or (current is not None and tuple(current["key"]) != plan[len(done)]):
        raise SystemExit(f"--resume {where}: the checkpoint's runs do not follow this invocation's plan")
    return runs, current


if __name__ == "__main__":
    main()
