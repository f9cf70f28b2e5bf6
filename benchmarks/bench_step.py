"""Time one whole optimizer step: AdamW (fused and foreach), SOAP on every backend that can run
here, and optionally the paper authors' soap.py, in one run on the same parameters and gradients.

Reports per optimizer the median step and p20/p80, the medians of the steps between refreshes and
of the refresh steps, the step amortized over whole refresh cycles (refresh steps included), the
worst step, ratios measured in the same run (× AdamW(fused=True), speed-up over the reference),
achieved TFLOP/s against docs/DESIGN.md §2's lean FLOP model, the share of the fp32 matmul rate measured in
the same run, the lean-FLOP floor, and optimizer-state bytes per parameter.

    python benchmarks/bench_step.py                          # CPU set (d 256, 6 layers, vocab 16384)
    python benchmarks/bench_step.py --preset gpt2-small,gpt2-medium --device cuda
    python benchmarks/bench_step.py --shapes 4*1024x1024,1024 --optimizers adamw,torch
    python benchmarks/bench_step.py --upstream ~/src/SOAP/soap.py     # + the authors' SOAP class

``--optimizers`` (default ``auto``: everything that can run here): ``adamw`` (fused=True),
``adamw-foreach``, ``reference``, ``torch``, ``triton`` (``triton-tf32``, ``triton-bf16``: rotation
GEMM precision), ``auto`` (SOAP's own choice), ``upstream`` (needs ``--upstream``); a SOAP backend's
name with ``+keep`` (``auto+keep``) is that backend with ``keep_refresh_scratch=True``.
``--peers`` adds the other SOAP implementations, built only through ``python/lm/peers.py``:
HeavyBall's ``SOAP`` (``heavyball_soap``, timed as a user gets it: with its default ``compile``
mode, which on the CPU means TorchInductor generates C++/OpenMP kernels during the first steps —
that time is in ``warmup_s``, not in the timed steps), pytorch_optimizer's ``SOAP``
(``pytorch_optimizer_soap``) and, with ``--upstream-soap PATH``, the authors' soap.py
(``upstream_soap``), next to ours (``auto`` unless ``--optimizers`` says otherwise) and
``AdamW(fused=True)``, with the same hyperparameters (lr, betas, shampoo_beta, eps, weight decay,
f, max_precond_dim, merge_dims, precondition_1d). Absent peers are skipped with the install line
(``pip install --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0``, the ``peers`` extra).

On the CPU every optimizer is built and warmed first, then timed in interleaved rounds (one whole
refresh cycle each, the order rotating per round), so load that comes and goes on a shared machine
falls on all of them alike (``--order sequential``, the default on CUDA, times one after the other
and holds one optimizer's memory at a time). Memory per optimizer: persistent state bytes
(``SOAP.memory_info()``, ``peers.state_bytes``, AdamW's state) and the engine's workspace kept
between steps, per parameter.

    python benchmarks/bench_step.py --peers --upstream-soap ~/src/SOAP/soap.py --optimizers adamw,auto

Writes ``step_<set>_<device>.json/.csv/.png`` under benchmarks/results/ (or ``--out-dir``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import soap_kernels  # noqa: E402
from soap_kernels import SOAP, lapack  # noqa: E402

ADAMW = ("adamw", "adamw-foreach")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def state_bytes(opt: torch.optim.Optimizer, name: str = "", peers=None) -> tuple[int, int]:
    """(persistent optimizer state, reusable workspace kept between steps) in bytes: SOAP through
    its public ``memory_info()``, the peers through ``peers.state_bytes``, anything else (AdamW, a
    legacy ``--upstream`` class) by its ``state`` tensors, each storage counted once."""
    if isinstance(opt, SOAP):
        info = opt.memory_info()
        return int(info["state_bytes"]), int(info.get("workspace_bytes", 0))
    if peers is not None and name in PEERS:
        return int(peers.state_bytes(opt)), 0
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for v in state.values():
            items = v if isinstance(v, (list, tuple)) else [v]
            for t in items:
                if isinstance(t, torch.Tensor) and t.numel():
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()), 0


PEERS = ("heavyball_soap", "pytorch_optimizer_soap", "upstream_soap")
PEER_INSTALL = "pip install --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0  (the `peers` extra of pyproject.toml)"


def load_peers() -> tuple[object | None, str]:
    """``python/lm/peers.py`` of this checkout (the only way the peers are built), or the reason
    it cannot be imported."""
    root = Path(__file__).resolve().parents[1] / "python"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from lm import peers
    except Exception as exc:  # not written yet, or a broken install
        return None, f"python/lm/peers.py is not importable ({type(exc).__name__}: {exc})"
    return peers, ""


def hyper(args) -> dict:
    """The hyperparameters every SOAP row (ours, the peers) is built with."""
    return {"lr": 1e-3, "betas": (0.95, 0.95), "shampoo_beta": args.shampoo_beta, "eps": 1e-8,
            "weight_decay": 0.01, "precondition_frequency": args.frequency, "max_precond_dim": args.max_precond_dim,
            "merge_dims": args.merge_dims, "precondition_1d": args.precondition_1d}


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


def make_optimizer(name: str, params, args, upstream: type | None = None, peers=None):
    h = hyper(args)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                                 fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                                 foreach=True)
    if name in PEERS:
        if peers is None:
            raise ValueError(f"{name}: python/lm/peers.py is not importable")
        return peers.make_peer(name, params, upstream_path=args.upstream_soap, **h)
    if name == "upstream":
        if upstream is None:
            raise ValueError("the 'upstream' optimizer needs --upstream PATH/TO/soap.py")
        return upstream(params, **_upstream_kwargs(upstream, args.frequency))
    if name.endswith("+keep"):  # SOAP(keep_refresh_scratch=True) on that backend
        return SOAP(params, backend=name[: -len("+keep")], keep_refresh_scratch=True, **h)
    if name.startswith("triton-"):
        return SOAP(params, backend="triton", rotation_precision=name.split("-", 1)[1], **h)
    return SOAP(params, backend=name, **h)


def is_soap(name: str) -> bool:
    return name not in ADAMW


def optimizer_list(spec: str, device: torch.device, upstream: type | None, args=None,
                   peers=None) -> tuple[list[str], dict[str, str]]:
    """``auto``: AdamW (fused, foreach), every SOAP backend that can run here, upstream if given;
    with ``--peers`` (``auto``): AdamW(fused), ours (``auto``) and every peer that can run here."""
    with_peers = args is not None and getattr(args, "peers", False)
    skipped: dict[str, str] = {}
    if spec != "auto":
        names = [s.strip() for s in spec.split(",") if s.strip()]
    elif with_peers:
        names = ["adamw", "auto"]
    else:
        names = list(ADAMW)
        backends, skipped = harness.soap_backends(device)
        names += backends
        if upstream is not None:
            names.append("upstream")
    if with_peers:
        names += [p for p in PEERS if p not in names]
    kept = []
    for name in names:
        if name not in PEERS:
            kept.append(name)
            continue
        if peers is None:
            skipped[name] = f"{load_peers()[1]}"
            continue
        if name == "upstream_soap" and not args.upstream_soap:
            skipped[name] = "no --upstream-soap PATH (the authors' soap.py is never bundled)"
            continue
        ok, why = peers.peer_available(name, upstream_path=args.upstream_soap)
        if ok:
            kept.append(name)
        else:
            skipped[name] = f"{why}; install: {PEER_INSTALL}" if name != "upstream_soap" else why
    return kept, skipped


def refresh_steps(times: list[float], f: int) -> tuple[list[int], int | None]:
    """Which timed steps were refreshes: in each round (``f`` consecutive steps, one refresh
    cycle) the slowest. Returns their indices and the most common position in the round.

    Per round, not one position for the whole run: a peer's cadence may move (HeavyBall counts
    ``1/f`` in floats and refreshed at positions 8, 18, 28 and then 39, 49, 59 of one run), and
    one fixed position then took three plain steps for refreshes (its "refresh step" median came
    out 704 ms against ~1200 ms for the real ones)."""
    if f < 2 or len(times) < f:
        return [], None
    at = [k + max(range(f), key=lambda p: times[k + p]) for k in range(0, len(times) - f + 1, f)]
    positions = [i % f for i in at]
    return at, max(set(positions), key=positions.count)


class Run:
    """One optimizer on its own copy of the parameters and gradients (the same values for all)."""

    def __init__(self, name: str, shapes, args, device: torch.device, dtype: torch.dtype, upstream, peers):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.name, self.device, self.dtype = name, device, dtype
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device=device, dtype=dtype))
                       for s in shapes]
        # Gradient sets used in turn, so no step sees exactly the gradient of the previous one.
        self.grad_sets = [[torch.randn(s, generator=gen).mul_(1e-2).to(device=device, dtype=dtype) for s in shapes]
                          for _ in range(args.grad_sets)]
        self.opt = make_optimizer(name, self.params, args, upstream, peers)
        self.calls = 0
        self.times: list[float] = []
        self.warmup_s = 0.0
        self.before = 0

    def step(self) -> None:
        for p, g in zip(self.params, self.grad_sets[self.calls % len(self.grad_sets)]):
            p.grad = g
        self.opt.step()
        self.calls += 1

    def warm(self, f: int) -> None:
        """The initialising step plus one refresh cycle, ending with a refresh, so the timed window
        holds whole cycles (call c >= 1 is update c, a refresh when c % f == 0: the constant
        schedule, here and in the peers). Compilation (HeavyBall) and LAPACK calibration happen
        here, untimed; their wall time is kept as ``warmup_s``."""
        t0 = time.perf_counter()
        for _ in range(f + 1):
            self.step()
        harness.sync(self.device)
        self.warmup_s = time.perf_counter() - t0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)

    def cycle(self, f: int) -> None:
        for _ in range(f):
            t = harness.timer(self.device)
            self.step()
            self.times.append(t())

    def row(self, args, peers) -> dict:
        f = args.frequency
        times = self.times
        first = args.frequency + 1  # call index of the first timed step
        expected = (-first) % f  # the position in each cycle of the constant schedule's refresh
        refresh_at, refresh_phase = refresh_steps(times, f) if is_soap(self.name) else ([], None)
        steady = [t for i, t in enumerate(times) if i not in refresh_at]
        refresh = [times[i] for i in refresh_at]
        q = harness.quantiles(times)
        between = statistics.median(steady)
        refresh_median = statistics.median(refresh) if refresh else None
        # Amortized over whole cycles from per-kind medians: one load spike on a shared machine then
        # moves it by a little, not by spike/steps (the plain mean is kept as mean_s).
        amortized = ((f - 1) * between + refresh_median) / f if refresh else between
        n_params = sum(p.numel() for p in self.params)
        state, workspace = state_bytes(self.opt, self.name, peers)
        row = {
            "optimizer": self.name,
            "param_dtype": next(k for k, v in DTYPES.items() if v == self.dtype),
            "steps_timed": len(times),
            "median_s": q["median"],
            "p20_s": q["p20"],
            "p80_s": q["p80"],
            "worst_s": q["worst"],
            "between_refresh_s": between,
            "refresh_step_s": refresh_median,
            "amortized_s": amortized,
            "mean_s": q["mean"],
            "warmup_s": self.warmup_s,
            "state_bytes": state,
            "state_bytes_per_param": state / n_params,
            "workspace_bytes": workspace,
            "workspace_bytes_per_param": workspace / n_params,
            "total_bytes_per_param": (state + workspace) / n_params,
            "refresh_phase": refresh_phase,
            "expected_refresh_phase": expected if is_soap(self.name) else None,
            "refresh_steps": refresh_at,
            "times_s": times,
        }
        if isinstance(self.opt, SOAP):
            row["buckets"] = [{k: (str(v) if k in ("dtype", "device") else v) for k, v in b.items()}
                              for b in self.opt.buckets_info()]
            row["kernel_choices"] = self.opt.kernel_choices()
        if self.device.type == "cuda":
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated(self.device) - self.before
        return row


def _error_row(name: str, dtype_name: str, exc: BaseException) -> dict:
    print(f"    FAILED {name}: {type(exc).__name__}: {exc}")
    return {"optimizer": name, "param_dtype": dtype_name, "error": f"{type(exc).__name__}: {exc}"[:500]}


def _free(device: torch.device) -> None:
    gc.collect()  # the last optimizer's state goes before the next one is built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench(name: str, shapes, args, device: torch.device, dtype: torch.dtype, upstream: type | None,
          peers=None) -> dict:
    """One optimizer alone: warm-up, then ``--cycles`` whole cycles timed step by step."""
    run = Run(name, shapes, args, device, dtype, upstream, peers)
    run.warm(args.frequency)
    for _ in range(args.cycles):
        run.cycle(args.frequency)
    return run.row(args, peers)


def bench_interleaved(names: list[str], shapes, args, device: torch.device, dtype_name: str, upstream,
                      peers) -> list[dict]:
    """Every optimizer built and warmed first, then ``--cycles`` rounds of one whole cycle each, the
    order rotating per round; one failing optimizer becomes an error row, the others go on."""
    dtype = DTYPES[dtype_name]
    runs: dict[str, Run] = {}
    errors: dict[str, dict] = {}
    for name in names:
        print(f"  building and warming {name} ({dtype_name}) ...", flush=True)
        try:
            run = Run(name, shapes, args, device, dtype, upstream, peers)
            run.warm(args.frequency)
            runs[name] = run
            print(f"    warm-up {run.warmup_s:.1f} s", flush=True)
        except Exception as exc:  # one optimizer failing (OOM, a backend bug) must not lose the rest
            errors[name] = _error_row(name, dtype_name, exc)
            _free(device)
    for r in range(args.cycles):
        live = [n for n in names if n in runs]
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        print(f"  round {r + 1}/{args.cycles}: {', '.join(order)}", flush=True)
        for name in order:
            try:
                runs[name].cycle(args.frequency)
            except Exception as exc:
                errors[name] = _error_row(name, dtype_name, exc)
                del runs[name]
                _free(device)
    rows = []
    for name in names:
        if name in runs:
            rows.append(runs[name].row(args, peers))
        elif name in errors:
            rows.append(errors[name])
    return rows


COLUMNS = [
    ("optimizer", "optimizer", "<22", 1),
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
    ("x_fastest_peer", "x peer", "7.2f", 1),
    ("state_bytes_per_param", "B/param", "8.1f", 1),
    ("workspace_bytes_per_param", "work B/p", "8.1f", 1),
    ("warmup_s", "warm-up s", "9.1f", 1),
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
        peer_rows = [x for x in same.values() if x["optimizer"] in (*PEERS, "upstream")]
        fastest = min(peer_rows, key=lambda x: x["amortized_s"]) if peer_rows else None
        r["fastest_peer"] = fastest["optimizer"] if fastest else None
        r["x_fastest_peer"] = r["amortized_s"] / fastest["amortized_s"] if fastest else None


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per SOAP row that is not a peer: its speed-up over the fastest peer, same run."""
    out = []
    for r in rows:
        if r.get("x_fastest_peer") and r["optimizer"] not in (*PEERS, "upstream") and is_soap(r["optimizer"]):
            out.append(f"  {r['optimizer']} ({r['param_dtype']}): amortized {r['amortized_s'] * 1e3:.1f} ms, "
                       f"{1 / r['x_fastest_peer']:.2f}x faster than the fastest peer ({r['fastest_peer']}); "
                       f"{(r['x_adamw'] or float('nan')):.1f}x AdamW(fused); "
                       f"{r['total_bytes_per_param']:.1f} B/param (state + workspace)")
    return out


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
    parser.add_argument("--peers", action="store_true",
                        help="add HeavyBall's and pytorch_optimizer's SOAP (and upstream_soap with --upstream-soap), "
                             "built through python/lm/peers.py")
    parser.add_argument("--upstream-soap", default=None, help="path to the authors' soap.py for the upstream_soap peer")
    parser.add_argument("--max-precond-dim", type=int, default=harness.MAX_PRECOND_DIM,
                        help=f"max_precond_dim of every SOAP row (default {harness.MAX_PRECOND_DIM})")
    parser.add_argument("--shampoo-beta", type=float, default=-1.0, help="shampoo_beta of every SOAP row (default -1: beta2)")
    parser.add_argument("--merge-dims", action="store_true", help="merge_dims=True for every SOAP row (default off)")
    parser.add_argument("--precondition-1d", action="store_true", help="precondition_1d=True for every SOAP row")
    parser.add_argument("--order", choices=("interleaved", "sequential"), default=None,
                        help="interleaved rounds (default on CPU) or one optimizer after the other (default on CUDA)")
    parser.add_argument("--out", default=None, help="JSON file name (default step_<set>_<device>.json)")
    args = parser.parse_args(argv)
    device = harness.setup_device(args)
    sets = harness.parameter_sets(args.preset, args.shapes)
    upstream = load_upstream(args.upstream) if args.upstream else None
    peers, peers_why = load_peers() if args.peers or any(p in args.optimizers for p in PEERS) else (None, "")
    names, skipped = optimizer_list(args.optimizers, device, upstream, args, peers)
    dtypes = (args.param_dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    order = args.order or ("sequential" if device.type == "cuda" else "interleaved")
    rate = harness.matmul_rate(device)
    env = harness.environment(device)
    print(f"soap_kernels {soap_kernels.__version__}  torch {torch.__version__}  device {env['device']}  "
          f"threads {torch.get_num_threads()}  load {env['load_average']}  order {order}")
    for name, why in skipped.items():
        print(f"  skipping {'peer' if name in PEERS else 'backend'} {name}: {why}")
    payloads = []
    for label, shapes in sets:
        flops = harness.lean_flops(shapes, args.max_precond_dim, args.precondition_1d)
        floor = flops / rate
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"\nparameter set {label}: {len(shapes)} tensors, {n / 1e6:.2f} M params; lean FLOPs/step "
              f"{flops / 1e9:.2f} G; fp32 matmul {rate / 1e9:.1f} GFLOP/s; floor {floor * 1e3:.1f} ms")
        env_before = harness.environment(device)
        rows = []
        for dtype_name in dtypes:
            if order == "interleaved":
                rows += bench_interleaved(names, shapes, args, device, dtype_name, upstream, peers)
                _free(device)
                continue
            for name in names:
                print(f"  timing {name} ({dtype_name}) ...", flush=True)
                try:
                    rows.append(bench(name, shapes, args, device, DTYPES[dtype_name], upstream, peers))
                except Exception as exc:  # one optimizer failing (OOM, a backend bug) must not lose the rest
                    rows.append(_error_row(name, dtype_name, exc))
                _free(device)
        add_figures(rows, flops, rate, floor)
        harness.print_table(rows, COLUMNS)
        for line in summary_lines(rows):
            print(line)
        env = harness.environment(device)  # the load average at the end of this set
        payload = {
            "benchmark": "step",
            "parameter_set": label,
            "shapes": shapes,
            "params": n,
            "precondition_frequency": args.frequency,
            "hyperparameters": {k: v for k, v in hyper(args).items()},
            "order": order,
            "lean_flops_per_step": flops,
            "reference_flops_per_step": harness.reference_flops(shapes, args.max_precond_dim),
            "refresh_flops_per_refresh": harness.refresh_flops(shapes, args.max_precond_dim),
            "matmul_rate_flops": rate,
            "floor_s": floor,
            "skipped": skipped,
            "peers_module": None if peers is None else str(getattr(peers, "__file__", peers)),
            "peers_problem": peers_why or None,
            "peer_versions": peer_versions(),
            "upstream": str(Path(args.upstream).expanduser()) if args.upstream else None,
            "upstream_soap": str(Path(args.upstream_soap).expanduser()) if args.upstream_soap else None,
            "load_average_before": env_before.get("load_average"),
            "lapack_choices": lapack.choice_stats(),
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


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peers' packages (None when absent)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("heavyball", "pytorch_optimizer"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    main()
