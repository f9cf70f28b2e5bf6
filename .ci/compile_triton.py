#!/usr/bin/env python
"""Compile every Triton kernel of ``soap_kernels.triton`` ahead of time for sm_90, on a CPU.

CI machines have no GPU, so the kernels run there only under Triton's interpreter, which skips
the whole compiler (layouts, MMA lowering, shared-memory planning, ptxas). This script runs that
compiler for Hopper (``GPUTarget("cuda", 90, 32)``, Triton's bundled ptxas), for every variant the
package's launchers can ask for, and checks each result holds PTX and an sm_90 cubin. Nothing is
launched; no CUDA driver is needed.

Kernels: every ``@triton.jit`` function (and ``triton.autotune`` / ``triton.heuristics`` wrapper,
unwrapped through ``.fn``) defined in a module of ``soap_kernels/triton``. Those called from other
kernels (device functions: ``mma_tile``, ``tile_ids``, ``to_storage``, ``round_mantissa``) are
compiled inside their callers; the others are launch entry points, and each must be reached.

Variants are not a hand-written list. The package's own launchers (``rotate_in_adam``,
``rotate_back_update``, ``update_statistics``, ``adam_step``, ``refresh_factor``, ...; see
``drivers()``) are called on small CPU tensors with Triton's launch intercepted: each launch is
bound by Triton's own binder for the sm_90 backend (``JITFunction._pack_args``), which gives
exactly the signature, constexprs, specialisation attributes and options a GPU would compile, and
it is compiled the way ``JITFunction`` compiles it
(``triton.compile(ASTSource(fn, signature, constexprs, attrs), target, options)``). So whatever
the launchers compute is taken from the code: ``tl_precision(p)`` (``input_precision`` and the
bf16 cast) for each ``p`` of ``_common.PRECISIONS``, every ``GemmConfig`` of
``_common.GPU_CONFIGS`` that ``pick_config`` times (square-tile filter included), ``PARAM_DTYPE`` /
``GRAD_DTYPE`` through ``tl_dtype``, the bf16 intermediate of the bf16 mode, adam's ``BLOCK`` and
``num_warps``, ``GROUP_M``, gather and upper-triangular switches. A new config, precision or dtype
in those tables is compiled without touching this file; a new kernel needs its launcher added to
``drivers()`` (until then this script fails, naming the kernel).

How the trace reaches every choice:

- ``pick_config`` launches every candidate config while timing (through ``triton.testing.do_bench``,
  replaced here by one call), then the winner, e.g. with a parameter pointer table that the timing
  launches do not use. The launchers are run once per candidate position, each time letting that
  position win, so the final launch is seen with every config.
- ``triton.autotune`` (none in the package today): every entry of ``.configs``, unpruned.
- The launcher inputs varied: rotation precision over ``PRECISIONS``; preconditioned sides (both,
  left only, right only, none: ``ROTATE=False``); parameter and gradient dtypes over
  ``_common._TL_DTYPES``; parameters as one strided tensor and as a list (``PARAM_TABLE``);
  refresh axis 1 and 2.
- Shapes: besides constexprs, Triton specialises each integer argument as ``== 1`` (then a
  constexpr), ``% 16 == 0`` (a divisibility attribute) or neither, and each pointer on 16-byte
  alignment. ``SHAPES`` has one bucket whose sizes are all multiples of 16 (typical weights), one
  of prime sizes, and one with a size-1 dimension, so the sizes and the strides derived from
  them take each class they can take (a contiguous tensor's last stride is always 1). Not every
  mix of classes across arguments is traced (they only add or drop an alignment hint or fold a
  1); pointers are those of fresh torch allocations and the launchers' own views, all 16-byte
  aligned.
- What is compiled by default: the trace gives about 1600 variants (``--list``), ~17 min on 2
  cores; all compile (``--all``). CI compiles a pairwise cover instead (``pairwise_cover``, ~150
  variants, ~1.5 min): per kernel, every pair of values of two axes that occurs together in a
  traced variant occurs together in a compiled one. The axes are each constexpr and each
  argument's type and specialisation class, with a GemmConfig (``BLOCK_*``, ``GROUP_*``, warps,
  stages) one axis and the precision pair (``PRECISION``, ``CAST_BF16``) another
  (``AXIS_GROUPS``). So every config of ``GPU_CONFIGS`` is compiled with every precision mode,
  every dtype, every specialisation class of every argument; what is left out are triples and
  beyond (e.g. one config x bf16 params x pointer table x prime sizes), which only recombine
  code paths that each compiled: the epilogue's dtype and table switches, the alignment hints.
- Only GPU paths: the interpreter-only branches (``EMULATE_TENSOR_CORES``) are never compiled for a
  GPU, and the script refuses to run with ``TRITON_INTERPRET`` set (it re-executes itself without).

Usage::

    python .ci/compile_triton.py                 # the pairwise cover, 2 processes (CI)
    python .ci/compile_triton.py --all           # every traced variant
    python .ci/compile_triton.py --jobs 4 --json report.json
    python .ci/compile_triton.py --list          # enumerate only, no compile
    python .ci/compile_triton.py --sample        # one variant per entry kernel
    python .ci/compile_triton.py --kernel bmm_kernel

Compiles go to a fresh Triton cache (``--cache-dir`` to keep and reuse one). Exit status 1 when a
variant fails to compile, a launcher fails under the trace, or a kernel is never reached; the
failures are listed at the end.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Under the interpreter triton.jit builds interpreter objects and nothing can be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import ast  # noqa: E402
import fnmatch  # noqa: E402
import importlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PACKAGE = "soap_kernels.triton"
PACKAGE_DIR = ROOT / "soap_kernels" / "triton"

ARCH = 90
# Hopper's largest dynamic shared memory per block (227 KiB); a variant above it compiles but
# cannot launch, which pick_config's timing would skip (reported, not a failure).
SHARED_LIMIT = 232448

# (B, m, n) buckets; see the module docstring for why these three.
SHAPES = ((2, 64, 48), (3, 37, 23), (2, 1, 40))

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    module: str  # e.g. "soap_kernels.triton.rotate"
    name: str  # the attribute holding it (the JIT function's own name)
    jit: Any  # the triton JITFunction
    wrapper: str  # "jit", or the wrapper chain, e.g. "autotune(12 configs)"
    calls: set[str] = field(default_factory=set)  # names called from its body
    entry: bool = True  # False: a device function, called from other kernels

    @property
    def qualname(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.name}"


def _unwrap(obj: Any) -> tuple[Any, str] | None:
    """``(JITFunction, how it is wrapped)`` for a triton kernel object, else ``None``."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    layers = []
    while isinstance(obj, (Autotuner, Heuristics)):
        layers.append(f"autotune({len(obj.configs)} configs)" if isinstance(obj, Autotuner) else "heuristics")
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        return None
    return obj, " > ".join(layers) or "jit"


def _called_names(src: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def kernel_modules() -> list[str]:
    """The modules of soap_kernels/triton whose source mentions a Triton decorator.

    Modules without one (``__init__``, the kernel table) are not imported: they import nothing
    this check needs.
    """
    mods = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        text = path.read_text()
        if any(word in text for word in ("triton.jit", "triton.autotune", "triton.heuristics", "@jit")):
            mods.append(f"{PACKAGE}.{path.stem}")
    return mods


def discover() -> dict[str, Kernel]:
    """Every Triton kernel defined (not merely imported) in the kernel modules, by qualname."""
    kernels: dict[str, Kernel] = {}
    for mod_name in kernel_modules():
        module = importlib.import_module(mod_name)
        for attr, obj in vars(module).items():
            found = _unwrap(obj)
            if found is None:
                continue
            jit, how = found
            if jit.fn.__module__ != mod_name:
                continue
            k = Kernel(mod_name, attr, jit, how, _called_names(jit.src))
            kernels[k.qualname] = k
    by_name = {k.jit.fn.__name__: k for k in kernels.values()}
    for k in kernels.values():
        for callee in k.calls & set(by_name):
            if by_name[callee] is not k:
                by_name[callee].entry = False
    return kernels


def reachable(kernels: dict[str, Kernel], roots: set[str]) -> set[str]:
    """Qualnames reachable by calls from the kernels ``roots``."""
    by_name = {k.jit.fn.__name__: q for q, k in kernels.items()}
    seen, todo = set(), list(roots)
    while todo:
        q = todo.pop()
        if q in seen:
            continue
        seen.add(q)
        todo.extend(by_name[c] for c in kernels[q].calls if c in by_name)
    return seen


# --------------------------------------------------------------------------------------------
# Trace: run the launchers with every launch bound for sm_90 instead of executed
# --------------------------------------------------------------------------------------------


@dataclass
class Variant:
    kernel: str  # qualname
    module: str
    attr: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    label: str
    origin: str  # the first launcher call that asked for it
    features: dict[str, str]  # axis -> value, for the pairwise cover (see _features)

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))  # fmt: skip


# Constexprs and options picked together as one value (a GemmConfig; tl_precision's pair): a
# pair of values of such a group is one real configuration, so a group is one axis of the cover.
AXIS_GROUPS = {
    "tile": ("BLOCK*", "GROUP*", "num_warps", "num_stages", "num_ctas", "maxnreg"),
    "precision": ("*PRECISION*", "CAST_*", "*TF32*"),
}


def _features(jit: Any, signature: dict[str, str], constexprs: dict, attrs: dict, options: Any) -> dict[str, str]:
    """The axes of a variant: each constexpr (or group of them), each argument's type and
    specialisation class (``=1`` folded, 16-divisible / 16-byte aligned, or neither)."""
    values: dict[str, str] = {}
    for i, (name, ty) in enumerate(signature.items()):
        if jit.params[i].is_constexpr:
            values[name] = repr(constexprs[(i,)])
        elif ty == "constexpr":
            values[name] = f"={constexprs[(i,)]!r}"
        elif attrs.get((i,)):
            values[name] = f"{ty} /16"
        else:
            values[name] = ty
    for name in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
        values[name] = repr(getattr(options, name, None))
    features: dict[str, str] = {}
    grouped: dict[str, list[str]] = {}
    for name, value in values.items():
        group = next((g for g, pats in AXIS_GROUPS.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)), None)
        if group is None:
            features[name] = value
        else:
            grouped.setdefault(group, []).append(f"{name}={value}")
    for group, items in grouped.items():
        features[group] = " ".join(sorted(items))
    return features


def pairwise_cover(variants: list[Variant]) -> list[Variant]:
    """A subset of ``variants`` in which, per kernel, every pair of axis values that occurs
    together in some traced variant occurs together in a chosen one (greedy set cover; ties go
    to the earliest traced). So every tile config meets every precision mode, every dtype,
    every specialisation class of every argument, and so on; triples are not all compiled."""
    by_kernel: dict[str, list[Variant]] = {}
    for v in variants:
        by_kernel.setdefault(v.kernel, []).append(v)
    chosen: list[Variant] = []
    for vs in by_kernel.values():
        pairs = [set(itertools.combinations(sorted(v.features.items()), 2)) | {(f,) for f in v.features.items()}
                 for v in vs]  # fmt: skip
        uncovered = set().union(*pairs)
        picked = []
        while uncovered:
            best = max(range(len(vs)), key=lambda i: len(pairs[i] & uncovered))
            picked.append(best)
            uncovered -= pairs[best]
        chosen.extend(vs[i] for i in sorted(picked))
    return chosen


def _label(jit: Any, signature: dict[str, str], constexprs: dict, attrs: dict, options: Any) -> str:
    names = jit.arg_names
    parts = []
    ones = []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if jit.params[path[0]].is_constexpr:
            parts.append(f"{name}={value}")
        else:
            ones.append(name)  # an integer argument equal to 1, folded in by Triton
    ptrs = [f"{n}:{t[1:]}" for n, t in signature.items() if t.startswith("*") and t != "*fp32"]
    ints = [p for p, t in enumerate(signature.values()) if t in ("i32", "i64")]
    div16 = sum(1 for p in ints if attrs.get((p,)))
    parts.append(f"warps={options.num_warps} stages={options.num_stages}")
    if ptrs:
        parts.append("ptr " + ",".join(ptrs))
    if ones:
        parts.append("=1: " + ",".join(ones))
    parts.append(f"int%16: {div16}/{len(ints)}")
    return " ".join(parts)


class Tracer:
    """Records the variants the launchers ask for; see the module docstring."""

    def __init__(self, kernels: dict[str, Kernel]) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.kernels = kernels
        self.by_jit = {id(k.jit): k for k in kernels.values()}
        self.backend = make_backend(GPUTarget("cuda", ARCH, 32))
        self.variants: dict[str, Variant] = {}
        self.errors: list[str] = []
        self.origin = ""
        self.winner = 0  # which candidate position of a pick_config wins (see fake_do_bench)
        self.position = 0
        self.most_candidates = 0
        self.picks = 0
        self.timed = 0
        self._binders: dict[int, Callable] = {}
        self._seen: set[tuple[int, str]] = set()

    # Replaces JITFunction.run: bind for sm_90, record, launch nothing.
    def launch(self, jit: Any, args: tuple, kwargs: dict) -> None:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        try:
            kwargs = dict(kwargs)
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            kwargs.setdefault("debug", jit.debug or knobs.runtime.debug)
            binder = self._binders.get(id(jit))
            if binder is None:
                binder = self._binders[id(jit)] = create_function_from_signature(jit.signature, jit.params, self.backend)
            bound, specialization, options = binder(*args, **kwargs)
            seen = (id(jit), str(specialization) + str(options))  # JITFunction.run's cache key
            if seen in self._seen:
                return
            self._seen.add(seen)
            options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, specialization, options)
            k = self.by_jit.get(id(jit))
            if k is None:
                raise RuntimeError(f"launched {jit.fn.__module__}.{jit.fn.__name__}, which discover() did not find")
            v = Variant(k.qualname, k.module, k.name, signature, constexprs, attrs, dict(options.__dict__),
                        _label(jit, signature, constexprs, attrs, options), self.origin,
                        _features(jit, signature, constexprs, attrs, options))  # fmt: skip
            self.variants.setdefault(v.key(), v)
        except Exception:
            # Also raised inside pick_config's timing, which swallows exceptions: keep it here.
            self.errors.append(f"trace: {self.origin}: binding a launch failed:\n{traceback.format_exc()}")
            raise

    def fake_do_bench(self, fn: Callable[[], Any], *args: Any, **kwargs: Any) -> float:
        position = self.position
        self.position += 1
        self.timed += 1
        self.most_candidates = max(self.most_candidates, self.position)
        fn()
        return 0.5 if position == self.winner else 1.0

    @contextmanager
    def patched(self) -> Iterator[None]:
        """JITFunction/Autotuner launches recorded, pick_config timed by position, CPU tensors accepted."""
        import triton.testing
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        from soap_kernels.triton import _common

        tracer = self

        def jit_run(jit, *args, grid, warmup, **kwargs):
            tracer.launch(jit, args, kwargs)

        def autotune_run(tuner, *args, **kwargs):
            for config in tuner.configs:  # every config, unpruned
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())

        original_pick = _common.pick_config

        def pick_config(*args, **kwargs):
            tracer.picks += 1
            tracer.position = 0
            _common._picked.clear()
            return original_pick(*args, **kwargs)

        saved = [
            (JITFunction, "run", JITFunction.run),
            (Autotuner, "run", Autotuner.run),
            (triton.testing, "do_bench", triton.testing.do_bench),
            (_common, "check_device", _common.check_device),
        ]
        for mod_name in kernel_modules():
            module = importlib.import_module(mod_name)
            if getattr(module, "pick_config", None) is original_pick:
                saved.append((module, "pick_config", original_pick))
        try:
            JITFunction.run = jit_run
            Autotuner.run = autotune_run
            triton.testing.do_bench = self.fake_do_bench
            _common.check_device = lambda t, name: None  # the launchers' checks, CPU tensors allowed
            for obj, name, _ in saved[4:]:
                setattr(obj, name, pick_config)
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    def run(self, drivers: list[tuple[str, Callable[[], None]]]) -> None:
        with self.patched():
            rounds = 1
            winner = 0
            while winner < rounds:
                self.winner = winner
                for origin, call in drivers:
                    self.origin = origin
                    try:
                        call()
                    except Exception:
                        if winner == 0:
                            self.errors.append(f"trace: {origin} raised:\n{traceback.format_exc()}")
                rounds = max(rounds, self.most_candidates)
                winner += 1
        if self.picks and not self.timed:
            self.errors.append(
                "trace: pick_config was called but never timed through triton.testing.do_bench, so only "
                "its first config was seen; update Tracer.patched to the new tuning mechanism"
            )


# --------------------------------------------------------------------------------------------
# The launcher calls (every public launcher of soap_kernels.triton)
# --------------------------------------------------------------------------------------------


def drivers() -> list[tuple[str, Callable[[], None]]]:
    """``(description, call)`` for every launcher call of the trace.

    Each call makes fresh inputs: the trace runs the list once per pick_config candidate
    position, and launches are not executed, so outputs hold garbage.
    """
    import torch

    from soap_kernels.triton import _common, adam, refresh, rotate, statistics

    torch.set_num_threads(1)  # tiny host ops (refresh's fp64 QR); threads only contend with the compiles
    dtypes = list(_common._TL_DTYPES)  # every dtype tl_dtype accepts for parameters and gradients
    gen = torch.Generator().manual_seed(0)
    out: list[tuple[str, Callable[[], None]]] = []

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def orthogonal(b: int, d: int) -> torch.Tensor:  # a stand-in: nothing is executed, only layouts matter
        return randn(b, d, d)

    def per_shape(b: int, m: int, n: int) -> None:
        shape = f"[{b},{m},{n}]"
        q_left, q_right = orthogonal(b, m), orthogonal(b, n)
        sides = {"both": [q_left, q_right], "left": [q_left, None], "right": [None, q_right], "none": [None, None]}

        def rotate_in_adam(qs, precision):
            rotate.rotate_in_adam(randn(b, m, n), qs, torch.zeros(b, m, n), torch.zeros(b, m, n), 0.9, 0.95, 1e-8,
                                  precision=precision)  # fmt: skip

        def rotate_in(qs, precision):
            rotate.rotate_in(randn(b, m, n), qs, precision)

        def rotate_back(qs, precision):
            rotate.rotate_back(randn(b, m, n), qs, precision)

        def rotate_back_update(qs, precision, dtype, as_list):
            params = [randn(m, n, dtype=dtype) for _ in range(b)] if as_list else randn(b, m, n, dtype=dtype)
            rotate.rotate_back_update(randn(b, m, n), qs, params, torch.full((b,), 1e-3), 0.99, precision=precision)

        def update_statistics():
            statistics.update_statistics([randn(b, m, m), randn(b, n, n)], randn(b, m, n), 0.95)

        def gram():
            statistics.gram(randn(b, m, n))

        def adam_step(p_dtype, g_dtype):  # a matrix and a vector, as a group's biases come
            adam.adam_step([randn(m, n, dtype=p_dtype), randn(n, dtype=p_dtype)],
                           [randn(m, n, dtype=g_dtype), randn(n, dtype=g_dtype)],
                           [torch.zeros(m, n), torch.zeros(n)], [torch.zeros(m, n), torch.zeros(n)],
                           [1e-3, 1e-3], 0.9, 0.95, 1e-8, 0.99)  # fmt: skip

        def perm(d):
            return torch.stack([torch.randperm(d, generator=gen) for _ in range(b)])

        def refresh_factor(d):
            x = randn(b, d, 2 * d)
            refresh.refresh_factor(x @ x.mT, orthogonal(b, d))

        def reexpress_exp_avg(axis, d):
            refresh.reexpress_exp_avg(randn(b, m, n), perm(d), orthogonal(b, d), axis)

        def permute_along(axis, d, dtype):
            refresh.permute_along(randn(b, m, n, dtype=dtype), perm(d), axis)

        def refresh_moments_(axis, d):
            refresh.refresh_moments_(randn(b, m, n), randn(b, m, n).abs(), perm(d), orthogonal(b, d), axis)

        for precision in _common.PRECISIONS:
            for side, qs in sides.items():
                tag = f"{shape} precision={precision} qs={side}"
                out.append((f"rotate_in_adam {tag}", partial(rotate_in_adam, qs, precision)))
                out.append((f"rotate_in {tag}", partial(rotate_in, qs, precision)))
                out.append((f"rotate_back {tag}", partial(rotate_back, qs, precision)))
                for dtype in dtypes:
                    for as_list in (False, True):
                        out.append((f"rotate_back_update {tag} params={dtype} {'list' if as_list else 'tensor'}",
                                    partial(rotate_back_update, qs, precision, dtype, as_list)))  # fmt: skip
        out.append((f"update_statistics {shape}", update_statistics))
        out.append((f"statistics.gram {shape}", gram))
        for p_dtype in dtypes:
            for g_dtype in dtypes:
                out.append((f"adam_step {shape} params={p_dtype} grads={g_dtype}", partial(adam_step, p_dtype, g_dtype)))
        for axis, d in ((1, m), (2, n)):
            out.append((f"refresh_factor {shape} d={d}", partial(refresh_factor, d)))
            out.append((f"reexpress_exp_avg {shape} axis={axis}", partial(reexpress_exp_avg, axis, d)))
            for dtype in dtypes:
                out.append((f"permute_along {shape} axis={axis} x={dtype}", partial(permute_along, axis, d, dtype)))
            out.append((f"refresh_moments_ {shape} axis={axis}", partial(refresh_moments_, axis, d)))

    for b, m, n in SHAPES:
        per_shape(b, m, n)
    return out


# --------------------------------------------------------------------------------------------
# Compile (in worker processes)
# --------------------------------------------------------------------------------------------

_JIT_CACHE: dict[tuple[str, str], Any] = {}


def compile_variant(v: Variant) -> dict[str, Any]:
    """Compile one variant for sm_90: ``{"ok", "seconds", "shared", "cubin_bytes", "asm", "mma", "error"}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result: dict[str, Any] = {"ok": False, "seconds": 0.0, "shared": None, "cubin_bytes": 0, "asm": [], "mma": [],
                              "error": ""}  # fmt: skip
    jit = _JIT_CACHE.get((v.module, v.attr))
    if jit is None:  # outside the timing: the first one imports torch and the package
        jit = _JIT_CACHE[(v.module, v.attr)] = _unwrap(getattr(importlib.import_module(v.module), v.attr))[0]
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(jit, v.signature, v.constexprs, v.attrs),
                                  target=GPUTarget("cuda", ARCH, 32), options=v.options)  # fmt: skip
        ptx = compiled.asm.get("ptx", "")
        cubin = compiled.asm.get("cubin", b"")
        if f".target sm_{ARCH}" not in ptx:
            raise RuntimeError(f"no '.target sm_{ARCH}' line in the PTX (asm keys: {sorted(compiled.asm)})")
        if not isinstance(cubin, bytes) or cubin[:4] != b"\x7fELF":
            raise RuntimeError(f"no cubin (ELF) in the compiled kernel (asm keys: {sorted(compiled.asm)})")
        # The matrix instructions the dots became (wgmma / mma.sync and their types), for the report.
        mma = sorted(set(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)", ptx)))
        result.update(ok=True, shared=int(compiled.metadata.shared), cubin_bytes=len(cubin), asm=sorted(compiled.asm),
                      mma=mma)  # fmt: skip
    except Exception as exc:
        message = str(exc).strip()
        result["error"] = f"{type(exc).__name__}: {message}" if message else traceback.format_exc()
    result["seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def enumerate_all(kernel_filter: str | None = None) -> tuple[dict[str, Kernel], list[Variant], list[str]]:
    """``(kernels, variants, failures)``; failures: trace errors and kernels never reached."""
    kernels = discover()
    tracer = Tracer(kernels)
    tracer.run(drivers())
    failures = list(tracer.errors)
    variants = sorted(tracer.variants.values(), key=lambda v: v.kernel)  # stable: trace order within a kernel
    launched = {v.kernel for v in variants}
    for q, k in sorted(kernels.items()):
        if k.entry and q not in launched:
            failures.append(f"coverage: entry kernel {q} was never launched by the trace: add its launcher to drivers()")
    covered = reachable(kernels, launched)
    for q, k in sorted(kernels.items()):
        if not k.entry and q not in covered:
            failures.append(f"coverage: device function {q} is called by no launched kernel")
    if kernel_filter:
        variants = [v for v in variants if kernel_filter in (v.kernel, v.attr)]
    return kernels, variants, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    parser.add_argument("--list", action="store_true", help="enumerate kernels and variants, compile nothing")
    parser.add_argument("--all", action="store_true", help="compile every traced variant, not the pairwise cover")
    parser.add_argument("--sample", action="store_true", help="compile one variant per entry kernel")
    parser.add_argument("--kernel", help="only this kernel (qualname like rotate._rotate_adam_kernel, or name)")
    parser.add_argument("--json", type=Path, help="write the kernels, variants and results here")
    parser.add_argument("--cache-dir", type=Path, help="Triton cache to use and keep (default: a fresh temporary one)")
    parser.add_argument("--quiet", action="store_true", help="print only the per-kernel summary and failures")
    args = parser.parse_args(argv)

    try:
        from triton.backends import backends
    except Exception as exc:  # as .ci/compile_cuda.sh does without nvcc: nothing to check here
        print(f"compile_triton.py: triton is not importable ({type(exc).__name__}: {exc}); skipping the check")
        return 0
    if "nvidia" not in backends:
        print(f"compile_triton.py: this triton has no CUDA backend (only {sorted(backends)}); skipping the check")
        return 0

    temp_cache = None
    if args.cache_dir is None:
        temp_cache = tempfile.mkdtemp(prefix="soap-triton-aot-")
        os.environ["TRITON_CACHE_DIR"] = temp_cache
    else:
        os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir)
    try:
        return _main(args)
    finally:
        if temp_cache is not None:
            shutil.rmtree(temp_cache, ignore_errors=True)


def _main(args: argparse.Namespace) -> int:
    import torch
    import triton

    t0 = time.perf_counter()
    kernels, variants, failures = enumerate_all(args.kernel)
    traced = len(variants)
    if not args.all:
        variants = pairwise_cover(variants)
    trace_s = time.perf_counter() - t0
    if args.sample:
        first: dict[str, Variant] = {}
        for v in variants:
            first.setdefault(v.kernel, v)
        variants = list(first.values())
    entries = sorted(q for q, k in kernels.items() if k.entry)
    helpers = sorted(q for q, k in kernels.items() if not k.entry)
    print(f"compile_triton.py: triton {triton.__version__}, torch {torch.__version__}, target cuda sm_{ARCH}; "
          f"{len(kernels)} kernels ({len(entries)} entry points, device functions: {', '.join(helpers) or 'none'}); "
          f"{traced} variants traced, {len(variants)} to compile "
          f"({'all' if args.all else 'one per kernel' if args.sample else 'pairwise cover'}; trace {trace_s:.1f}s)")  # fmt: skip

    results: list[dict[str, Any]] = []
    compile_s = 0.0
    if not args.list and variants:
        t1 = time.perf_counter()
        results = [{}] * len(variants)
        # Costly GEMM variants first so the processes finish together; printed as they finish.
        order = sorted(range(len(variants)), key=lambda i: "BLOCK_K" not in variants[i].label)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch/LAPACK threads
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
            futures = {pool.submit(compile_variant, variants[i]): i for i in order}
            for future in as_completed(futures):
                i = futures[future]
                v = variants[i]
                try:
                    r = future.result()
                except Exception as exc:  # the worker died (e.g. a crash inside the compiler)
                    r = {"ok": False, "seconds": 0.0, "shared": None, "cubin_bytes": 0, "asm": [], "mma": [],
                         "error": f"compile process failed: {type(exc).__name__}: {exc}"}  # fmt: skip
                results[i] = r
                note = ""
                if r["ok"] and r["shared"] > SHARED_LIMIT:
                    note = f"  (shared {r['shared']} B > {SHARED_LIMIT} B: cannot launch on sm_{ARCH})"
                if not args.quiet or not r["ok"]:
                    status = "ok    " if r["ok"] else "FAILED"
                    print(f"  {status} {r['seconds']:6.2f}s  {v.kernel}  {v.label}{note}", flush=True)
                if not r["ok"]:
                    failures.append(f"compile: {v.kernel} [{v.label}] (first asked for by {v.origin}):\n    "
                                    + r["error"].replace("\n", "\n    "))  # fmt: skip
        compile_s = time.perf_counter() - t1
    elif args.list and not args.quiet:
        for v in variants:
            print(f"  {v.kernel}  {v.label}")

    print("\nsummary (kernel: variants compiled ok / total, compile seconds summed over processes)")
    for q in sorted(kernels):
        k = kernels[q]
        mine = [(v, r) for v, r in zip(variants, results or [None] * len(variants)) if v.kernel == q]
        if not k.entry:
            print(f"  {q:38s} device function (compiled inside its callers)")
            continue
        ok = sum(1 for _, r in mine if r and r["ok"])
        secs = sum(r["seconds"] for _, r in mine if r)
        shown = f"{ok}/{len(mine)} ok, {secs:6.1f}s" if results else f"{len(mine)} variants"
        print(f"  {q:38s} {k.wrapper:10s} {shown}")
    total_ok = sum(1 for r in results if r["ok"])
    print(f"total: {total_ok}/{len(results)} variants compiled for sm_{ARCH} in {compile_s:.1f}s wall "
          f"({args.jobs} processes), trace {trace_s:.1f}s")  # fmt: skip

    if args.json:
        report = {
            "triton": triton.__version__,
            "target": {"backend": "cuda", "arch": ARCH, "warp_size": 32},
            "kernels": {q: {"module": k.module, "name": k.name, "wrapper": k.wrapper, "entry": k.entry,
                            "calls": sorted(k.calls)} for q, k in kernels.items()},  # fmt: skip
            "variants": [
                {"kernel": v.kernel, "label": v.label, "origin": v.origin, "signature": v.signature,
                 "constexprs": {list(v.signature)[p[0]]: repr(val) for p, val in v.constexprs.items()},
                 "num_warps": v.options["num_warps"], "num_stages": v.options["num_stages"],
                 **({"result": results[i]} if results else {})}
                for i, v in enumerate(variants)
            ],  # fmt: skip
            "failures": failures,
            "trace_seconds": trace_s,
            "compile_seconds": compile_s,
        }
        args.json.write_text(json.dumps(report, indent=1, default=str))

    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for f in failures:
            print(f"- {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
