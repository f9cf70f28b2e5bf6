"""Shared benchmark harness: parameter sets shaped like real models, timing, FLOP floors, metadata,
result files.

Every ``bench_*.py`` script uses it the same way: pick the parameter sets (:data:`PRESETS` or a
custom ``--shapes`` list), group them into the engine's buckets (:func:`buckets`), time each
backend of one op on each bucket (:func:`time_fn`), add the in-run ceilings (:func:`matmul_rate`,
:func:`memory_bandwidth`) and ratios (:func:`add_op_figures`), print a table and write JSON + CSV
(+ a PNG through ``plot.py``) under ``benchmarks/results/`` (or ``--out-dir``).

Benchmarks measure and report; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soap_kernels import ops
from soap_kernels._info import cpu_model
from soap_kernels.reference import make_layout

RESULTS = Path(__file__).resolve().parent / "results"
MAX_PRECOND_DIM = 10000

# name -> (d_model, layers, vocab, context)
PRESETS = {
    "cpu": (256, 6, 16384, 256),
    "gpt2-small": (768, 12, 50257, 1024),
    "gpt2-medium": (1024, 24, 50257, 1024),
    "tiny": (64, 2, 1000, 64),
}

SOAP_BACKENDS = ("reference", "torch", "triton")


# ------------------------------------------------------------------------------------ shapes
def gpt_shapes(d_model: int, layers: int, vocab: int, context: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model (tied embedding/head, nn.Linear [out, in] layout)."""
    shapes: list[tuple[int, ...]] = [(vocab, d_model), (context, d_model)]
    for _ in range(layers):
        shapes += [(d_model,), (d_model,)]  # ln_1
        shapes += [(3 * d_model, d_model), (3 * d_model,)]  # attn qkv
        shapes += [(d_model, d_model), (d_model,)]  # attn proj
        shapes += [(d_model,), (d_model,)]  # ln_2
        shapes += [(4 * d_model, d_model), (4 * d_model,)]  # mlp fc
        shapes += [(d_model, 4 * d_model), (d_model,)]  # mlp proj
    shapes += [(d_model,), (d_model,)]  # ln_f
    return shapes


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"768x2304,768,50257x768"`` -> shapes; ``"12*768x768"`` repeats a shape 12 times."""
    shapes: list[tuple[int, ...]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        count = 1
        if "*" in item:
            head, item = item.split("*", 1)
            count = int(head)
        shapes += [tuple(int(d) for d in item.split("x"))] * count
    return shapes


def parameter_sets(preset: str | None, shapes: str | None) -> list[tuple[str, list[tuple[int, ...]]]]:
    """``[(label, shapes)]``: the custom ``--shapes`` list, or each preset of a comma list."""
    if shapes:
        return [("custom", parse_shapes(shapes))]
    out = []
    for name in (preset or "cpu").split(","):
        name = name.strip()
        if name not in PRESETS:
            raise SystemExit(f"unknown parameter set {name!r}; choose from {', '.join(sorted(PRESETS))} or pass --shapes")
        out.append((name, gpt_shapes(*PRESETS[name])))
    return out


@dataclass
class BucketSpec:
    """One engine bucket: ``count`` parameters of one working layout (``shape`` as the user sees it)."""

    shape: tuple[int, ...]
    work_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]
    count: int
    layout: object = field(repr=False, default=None)

    @property
    def is_matrix(self) -> bool:
        return len(self.work_shape) == 2 and any(self.preconditioned)

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.work_shape)

    @property
    def label(self) -> str:
        sides = {(True, True): "", (True, False): " left", (False, True): " right"}.get(self.preconditioned, "")
        dims = "x".join(str(d) for d in self.work_shape)
        return f"{self.count}x[{dims}]{sides}"


def buckets(shapes: Sequence[Sequence[int]], max_precond_dim: int = MAX_PRECOND_DIM,
            precondition_1d: bool = False) -> list[BucketSpec]:
    """The engine's buckets for one param group (same key: working layout), in first-seen order."""
    found: dict[object, BucketSpec] = {}
    for s in shapes:
        layout = make_layout(tuple(s), max_precond_dim=max_precond_dim, merge_dims=False,
                             precondition_1d=precondition_1d, channels_last=False)
        if layout in found:
            found[layout].count += 1
        else:
            found[layout] = BucketSpec(tuple(s), tuple(layout.work_shape), tuple(layout.preconditioned), 1, layout)
    return list(found.values())


def factor_sizes(shapes: Sequence[Sequence[int]], max_precond_dim: int = MAX_PRECOND_DIM) -> list[tuple[int, int]]:
    """``[(d, rows)]``: each eigenbasis size and how many factors of that size one refresh step
    refreshes (the engine batches them per bucket; this merges buckets of equal ``d``)."""
    sizes: dict[int, int] = {}
    for b in buckets(shapes, max_precond_dim):
        for d, pre in zip(b.work_shape, b.preconditioned):
            if pre:
                sizes[d] = sizes.get(d, 0) + b.count
    return sorted(sizes.items())


# ------------------------------------------------------------------------------------ FLOP model
def lean_flops(shapes, max_precond_dim: int = MAX_PRECOND_DIM, precondition_1d: bool = False) -> int:
    """docs/DESIGN.md §2's per-step FLOPs of the lean engine (6·m·n·(m+n) for a two-sided m×n matrix)."""
    total = 0
    for s in shapes:
        layout = make_layout(s, max_precond_dim=max_precond_dim, merge_dims=False,
                             precondition_1d=precondition_1d, channels_last=False)
        total += ops.FLOPS.step(layout.work_shape, layout.preconditioned)
    return total


def reference_flops(shapes, max_precond_dim: int = MAX_PRECOND_DIM) -> int:
    """The reference rotates exp_avg back and forth every step as well: 10·m·n·(m+n)."""
    return lean_flops(shapes, max_precond_dim) * 10 // 6


def refresh_flops(shapes, max_precond_dim: int = MAX_PRECOND_DIM) -> int:
    """FLOPs of one refresh of every factor (``ops.FLOPS.refresh``: QR + two d³ GEMMs + re-expression)."""
    total = 0
    for s in shapes:
        layout = make_layout(s, max_precond_dim=max_precond_dim, merge_dims=False, precondition_1d=False,
                             channels_last=False)
        total += ops.FLOPS.refresh(layout.work_shape, layout.preconditioned)
    return total


def rotation_flops(bucket: BucketSpec) -> int:
    """One two-sided (or one-sided) rotation of a matrix bucket: ``2·B·m·n·(m+n)``."""
    m, n = bucket.work_shape
    left, right = bucket.preconditioned
    return 2 * bucket.count * m * n * ((m if left else 0) + (n if right else 0))


# ------------------------------------------------------------------------------------ backends
def native_status() -> tuple[bool, str]:
    """Whether ``soap_kernels._native`` (the compiled extension) loaded; never raises."""
    try:
        from soap_kernels import _native
    except Exception as exc:  # the module itself is being written, or a broken install
        return False, f"soap_kernels._native is not importable ({type(exc).__name__}: {exc})"
    if not _native.available():
        return False, str(_native.load_error())
    return True, "loaded"


def backend_available(name: str) -> tuple[bool, str]:
    """``soap_kernels``' own answer to whether backend ``name`` can run here."""
    from soap_kernels.select import backend_available as available

    return available(name)


def soap_backends(device: torch.device, wanted: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The SOAP backends that can run on ``device`` (in :data:`SOAP_BACKENDS` order) and why the
    others cannot. Triton counts only on CUDA: its CPU interpreter is for tests, its timings mean
    nothing."""
    run, skipped = [], {}
    for name in wanted or SOAP_BACKENDS:
        ok, why = backend_available(name)
        if ok and name == "triton" and device.type != "cuda":
            ok, why = False, "the Triton interpreter on CPU is for tests; its timings mean nothing"
        if ok:
            run.append(name)
        else:
            skipped[name] = why
    return run, skipped


# ------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device) -> Callable[[], float]:
    """Start a timer; calling the result returns elapsed seconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return stop
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


_flush_buffer: dict[torch.device, torch.Tensor] = {}


def flush_cache(device: torch.device) -> None:
    """Evict the GPU's L2 (write 256 MB) so a timed call does not find its inputs cached."""
    if device.type != "cuda":
        return
    buf = _flush_buffer.get(device)
    if buf is None:
        buf = _flush_buffer[device] = torch.empty(64 * 2**20, dtype=torch.int32, device=device)
    buf.zero_()


def time_fn(fn: Callable[[int], object], device: torch.device, *, budget_s: float = 2.0, warmup: int = 2,
            min_reps: int = 5, max_reps: int = 200, setup: Callable[[int], object] | None = None) -> list[float]:
    """Seconds per call of ``fn(i)``; ``i`` counts calls, so ``fn`` can rotate over input sets.

    CPU: ``time.perf_counter`` around each call after ``warmup`` calls; the repetitions fill about
    ``budget_s`` (at least ``min_reps``). GPU: ``triton.testing.do_bench`` (it flushes L2 before
    each call) when there is no ``setup``, else CUDA events around each call after a flush.
    ``setup(i)`` runs before call ``i``, untimed (e.g. restoring inputs an op overwrites).
    """
    counter = itertools.count()
    if device.type == "cuda" and setup is None:
        try:
            import triton.testing

            def call() -> None:
                fn(next(counter))

            ms = triton.testing.do_bench(call, warmup=max(25, int(budget_s * 100)), rep=max(100, int(budget_s * 500)),
                                         return_mode="all")
            return [t / 1e3 for t in ms]
        except (ImportError, TypeError):  # no triton, or a do_bench without return_mode="all"
            pass
    for _ in range(warmup):
        i = next(counter)
        if setup is not None:
            setup(i)
        fn(i)
    sync(device)
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or spent < budget_s):
        i = next(counter)
        if setup is not None:
            setup(i)
        flush_cache(device)
        sync(device)
        t = timer(device)
        fn(i)
        samples.append(t())
        spent += samples[-1]
    return samples


def quantiles(xs: Sequence[float]) -> dict[str, float]:
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]

    return {"median": statistics.median(xs), "p20": q(0.2), "p80": q(0.8), "worst": xs[-1], "best": xs[0],
            "mean": statistics.fmean(xs)}


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """``median_s, p20_s, p80_s, worst_s, best_s, mean_s, reps`` of per-call seconds."""
    q = quantiles(samples)
    out = {f"{k}_s": v for k, v in q.items()}
    out["reps"] = len(samples)
    return out


def input_sets(bytes_per_set: int, device: torch.device, most: int = 4) -> int:
    """How many copies of an op's inputs to rotate over so that consecutive calls do not find them
    in the last-level cache (CPU). On a GPU the harness flushes L2 instead: one set."""
    if device.type == "cuda":
        return 1
    return max(1, min(most, math.ceil(2 * llc_bytes() / max(1, bytes_per_set))))


def llc_bytes() -> int:
    """Size of the CPU's last-level cache (from sysfs; 32 MB when unknown)."""
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 32 * 2**20


# ------------------------------------------------------------------------------------ ceilings
def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 1024, reps: int = 20) -> float:
    """Best measured FLOP/s of an n×n×n matmul: the ceiling a step's GEMMs are held against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 3):
        t = timer(device)
        torch.matmul(a, b)
        best = min(best, t())
    return 2 * n**3 / best


def memory_bandwidth(device: torch.device, megabytes: int = 256, reps: int = 10) -> float:
    """Best measured bytes/s of a large fp32 copy (bytes read + written): the ceiling of the
    memory-bound ops (moment updates, plain Adam)."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 2):
        t = timer(device)
        dst.copy_(src)
        best = min(best, t())
    return 2 * n * 4 / best


# ------------------------------------------------------------------------------------ metadata
def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd or Path(__file__).parent,
                              check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# The sources a measured figure depends on, as top-level pathspecs (":/…"): plain relative paths
# would be taken from benchmarks/, where git runs, and never match (every result until 2026-12-04
# was stamped clean). Markdown (benchmarks/NOTES.md, READMEs) is written while a run is read and
# changes no figure.
SOURCE_PATHSPECS = (":/soap_kernels", ":/csrc", ":/benchmarks", ":/python", ":(top,exclude,glob)**/*.md")


def git_revision(cwd: Path | None = None) -> str:
    """``HEAD``'s short hash, ``+dirty`` when tracked sources differ from it; ``unknown`` outside git."""
    rev = _git("rev-parse", "--short", "HEAD", cwd=cwd)
    if not rev:
        return "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHSPECS, cwd=cwd))
    return rev + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """Device, versions, date, git revision and machine load: stored with every result."""
    import soap_kernels

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()}, {os.cpu_count()} cores)"
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "soap_kernels": soap_kernels.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": name,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "native_extension": native_status()[1],
        # Thread knobs that change CPU timings a lot on a shared machine (see benchmarks/NOTES.md).
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
                                           "SOAP_LAPACK_THREADS", "TRITON_INTERPRET") if k in os.environ},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# ------------------------------------------------------------------------------------ CLI
def add_common_args(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    parser.add_argument("--preset", default=default_preset,
                        help=f"parameter set(s), comma-separated: {', '.join(PRESETS)} (default {default_preset})")
    parser.add_argument("--shapes", help="custom shapes instead of a preset, e.g. 768x2304,12*768x768,768")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per (case, backend) (default 2)")
    parser.add_argument("--out-dir", default=None, help="where JSON/CSV/PNG go (default benchmarks/results)")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")


def setup_device(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.manual_seed(0)
    return device


def out_dir(args: argparse.Namespace | None = None) -> Path:
    path = Path(args.out_dir) if args is not None and getattr(args, "out_dir", None) else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def result_stem(bench: str, label: str, device: torch.device, tag: str = "") -> str:
    return f"{bench}_{label}_{device.type}{'_' + tag if tag else ''}"


# ------------------------------------------------------------------------------------ op rows
def op_row(op: str, case: str, backend: str, samples: Sequence[float], flops: int | None = None,
           bytes_moved: int | None = None, **extra) -> dict:
    row = {"op": op, "case": case, "backend": backend, **summarize(samples), "flops": flops, "bytes": bytes_moved}
    row.update(extra)
    return row


def error_row(op: str, case: str, backend: str, exc: BaseException) -> dict:
    return {"op": op, "case": case, "backend": backend, "error": f"{type(exc).__name__}: {exc}"[:500]}


def run_impls(op: str, case: str, impls: dict, device: torch.device, budget_s: float, *, flops: int | None = None,
              bytes_moved: int | None = None, min_reps: int = 5, **extra) -> list[dict]:
    """Time each implementation of one op on one case; a failing one becomes an error row.

    ``impls``: backend name -> ``fn(i)`` or ``(fn(i), setup(i))`` (see :func:`time_fn`).
    """
    rows = []
    for backend, impl in impls.items():
        fn, setup = impl if isinstance(impl, tuple) else (impl, None)
        try:
            samples = time_fn(fn, device, budget_s=budget_s, setup=setup, min_reps=min_reps)
        except Exception as exc:  # a backend bug or OOM must not lose the other rows
            rows.append(error_row(op, case, backend, exc))
            print(f"  {op:<22} {case:<24} {backend:<16} FAILED {rows[-1]['error'][:120]}", flush=True)
            continue
        rows.append(op_row(op, case, backend, samples, flops, bytes_moved, **extra))
        print(f"  {op:<22} {case:<24} {backend:<16} {rows[-1]['median_s'] * 1e3:10.3f} ms  ({len(samples)} reps)", flush=True)
    return rows


def add_op_figures(rows: list[dict], rate: float | None = None, bandwidth: float | None = None,
                   baselines: Sequence[str] = ("torch", "reference")) -> None:
    """Per row: TFLOP/s and % of the matmul ceiling (FLOP-bound ops), GB/s and % of the copy
    bandwidth (memory-bound ops), and ``x_<baseline>`` = baseline median / this median (speed-up,
    same op and case, same run)."""
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), {})[r["backend"]] = r
    for r in rows:
        if "median_s" not in r:
            continue
        t = r["median_s"]
        if r.get("flops"):
            r["tflops"] = r["flops"] / t / 1e12
            if rate:
                r["pct_matmul"] = 100 * r["flops"] / t / rate
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / t / 1e9
            if bandwidth:
                r["pct_bandwidth"] = 100 * r["bytes"] / t / bandwidth
        for base in baselines:
            other = by_case[(r["op"], r["case"])].get(base)
            if other is not None and "median_s" in other:
                r[f"x_{base}"] = other["median_s"] / t


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str, float]]) -> None:
    """``columns``: (key, header, format spec, scale). A spec ``"<N"`` is a left-aligned text column
    of width N; a numeric spec (``"10.3f"``) formats ``value·scale``; missing values print as '-'."""
    widths = [max(len(h), int(re.match(r"<?(\d+)", spec).group(1))) for _, h, spec, _ in columns]
    header = " ".join(h.ljust(w) if spec.startswith("<") else h.rjust(w) for (_, h, spec, _), w in zip(columns, widths))
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = []
        for (key, _, spec, scale), w in zip(columns, widths):
            v = r.get(key)
            if spec.startswith("<"):
                cells.append(("-" if v is None else str(v))[:w].ljust(w))
            elif v is None or isinstance(v, (str, bool)) or (isinstance(v, float) and math.isnan(v)):
                cells.append("-".rjust(w))
            else:
                cells.append(format(v * scale, spec).rjust(w))
        line = " ".join(cells)
        if r.get("error"):
            line += f"  ERROR {r['error'][:160]}"
        print(line, flush=True)


OP_COLUMNS = [
    ("op", "op", "<24", 1),
    ("case", "case", "<22", 1),
    ("backend", "backend", "<18", 1),
    ("median_s", "median ms", "10.3f", 1e3),
    ("p20_s", "p20 ms", "9.3f", 1e3),
    ("p80_s", "p80 ms", "9.3f", 1e3),
    ("tflops", "TFLOP/s", "8.3f", 1),
    ("pct_matmul", "%matmul", "8.1f", 1),
    ("gbps", "GB/s", "7.1f", 1),
    ("pct_bandwidth", "%bw", "6.1f", 1),
    ("x_torch", "torch/this", "10.2f", 1),
    ("x_reference", "ref/this", "8.2f", 1),
]


# ------------------------------------------------------------------------------------ files
def write_json(name: str, payload: dict, directory: Path | None = None) -> Path:
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


CSV_ENV_KEYS = ("device", "date", "git_revision", "torch", "triton", "threads")


def write_csv(path: Path, rows: Sequence[dict], env: dict, extra: dict | None = None) -> Path:
    """One line per result row (scalars only; per-step time lists stay in the JSON), with the
    device, versions, date, revision and the 1-minute load average on every line."""
    flat = []
    for r in rows:
        line = {k: v for k, v in r.items() if not isinstance(v, (list, dict, tuple))}
        for k in CSV_ENV_KEYS:
            line[k] = env.get(k)
        line["load_1m"] = (env.get("load_average") or [None])[0]
        if extra:
            line.update(extra)
        flat.append(line)
    keys: list[str] = []
    for line in flat:
        keys += [k for k in line if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    return path


def write_results(stem: str, payload: dict, args: argparse.Namespace | None = None, plot: bool = True) -> list[Path]:
    """``<stem>.json`` (everything), ``<stem>.csv`` (the rows) and ``<stem>.png`` (plot.py)."""
    directory = out_dir(args)
    paths = [write_json(f"{stem}.json", payload, directory)]
    extra = {k: payload[k] for k in ("benchmark", "parameter_set") if k in payload}
    paths.append(write_csv(directory / f"{stem}.csv", payload.get("results", []), payload.get("environment", {}), extra))
    if plot and not (args is not None and getattr(args, "no_plot", False)):
        try:
            import plot as plotting

            paths.append(plotting.plot_payloads([payload], directory / f"{stem}.png"))
        except ImportError as exc:  # matplotlib missing: the numbers are what matters
            print(f"no plot ({exc})")
    for p in paths:
        print(f"wrote {p}")
    return paths


# ------------------------------------------------------------------------------------ op scripts
def select(impls: dict, args: argparse.Namespace) -> dict:
    """Keep the implementations named by ``--backends`` (all of them for ``auto``)."""
    spec = getattr(args, "backends", "auto") or "auto"
    if spec == "auto":
        return impls
    keep = {s.strip() for s in spec.split(",")}
    return {k: v for k, v in impls.items() if k in keep}


def op_main(bench: str, doc: str, cases: Callable, argv: Sequence[str] | None = None,
            extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
            baselines: Sequence[str] = ("torch", "reference"), columns: Sequence[tuple] = OP_COLUMNS) -> list[dict]:
    """The shared ``main`` of the per-op scripts.

    ``cases(label, shapes, args, device) -> (rows, info)`` times every case of one parameter set;
    ``info`` is merged into the JSON payload (e.g. what was skipped and why).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--backends", default="auto", help="comma list of implementations to time (default: all that run here)")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    sets = parameter_sets(args.preset, args.shapes)
    rate = matmul_rate(device)
    bandwidth = memory_bandwidth(device)
    env = environment(device)
    print(f"{bench}: device {env['device']}  torch {env['torch']}  threads {env['threads']}  load {env['load_average']}")
    print(f"in-run ceilings: fp32 matmul {rate / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    payloads = []
    for label, shapes in sets:
        print(f"\nparameter set {label}: {len(shapes)} tensors")
        rows, info = cases(label, shapes, args, device)
        add_op_figures(rows, rate, bandwidth, baselines)
        print()
        print_table(rows, columns)
        payload = {
            "benchmark": bench,
            "parameter_set": label,
            "shapes": shapes,
            "matmul_rate_flops": rate,
            "bandwidth_bytes_per_s": bandwidth,
            "environment": environment(device),
            **info,
            "results": rows,
        }
        write_results(result_stem(bench, label, device, args.tag), payload, args)
        payloads.append(payload)
    return payloads


def orthonormal(batch: int, d: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of random orthonormal ``[batch, d, d]`` fp32 matrices (stand-ins for eigenbases)."""
    from soap_kernels import lapack

    x = torch.randn(batch, d, d, generator=generator).to(device)
    q, _ = lapack.qr(x)  # CPU: at the thread count that measured fastest (docs/DESIGN.md §6)
    return q.contiguous()
