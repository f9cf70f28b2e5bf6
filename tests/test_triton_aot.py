"""The ahead-of-time sm_90 compile check of the Triton kernels (``.ci/compile_triton.py``).

The script runs in a subprocess without ``TRITON_INTERPRET``: this suite runs under the
interpreter, where ``triton.jit`` builds interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "compile_triton.py"
KERNEL_DIR = ROOT / "soap_kernels" / "triton"
TRITON_DECORATORS = {"triton.jit", "jit", "triton.autotune", "autotune", "triton.heuristics", "heuristics"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run_script(tmp_path: Path, *args: str) -> dict:
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    assert proc.returncode == 0, f"compile_triton.py {' '.join(args)} exited {proc.returncode}"
    return json.loads(report.read_text())


def _decorated_kernels() -> set[str]:
    """``stem.name`` of every function in soap_kernels/triton/*.py with a Triton decorator (by AST)."""
    found = set()
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                names = {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list}
                if names & TRITON_DECORATORS:
                    found.add(f"{path.stem}.{node.name}")
    return found


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_script(tmp_path_factory.mktemp("aot_list"), "--list", "--quiet")


def test_enumeration_finds_every_kernel(listing: dict) -> None:
    scanned = _decorated_kernels()
    assert scanned, "the scan found no Triton kernels at all"
    assert set(listing["kernels"]) == scanned
    assert listing["failures"] == []
    launched = {v["kernel"] for v in listing["variants"]}
    entries = {q for q, k in listing["kernels"].items() if k["entry"]}
    assert entries <= launched, f"entry kernels with no variant: {sorted(entries - launched)}"
    # Device functions are compiled inside their callers; each has one among the kernels.
    called = set().union(*(k["calls"] for k in listing["kernels"].values()))
    for q, k in listing["kernels"].items():
        if not k["entry"]:
            assert k["name"] in called, q


def test_cover_has_every_tile_config_with_every_precision_mode(listing: dict) -> None:
    # The twin of the script's selection rule: every GemmConfig meets every precision mode of
    # tl_precision in every GEMM kernel that takes a precision (the square ones in the Gram kernel).
    from soap_kernels.triton import _common

    modes = {(repr(p), repr(c)) for p, c in map(_common.tl_precision, _common.PRECISIONS)}
    tiles = {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) for c in _common.GPU_CONFIGS}
    seen: dict[str, set] = {}
    for v in listing["variants"]:
        cx = v["constexprs"]
        if "BLOCK_K" not in cx:
            continue
        tile = (int(cx["BLOCK_M"]), int(cx["BLOCK_N"]), int(cx["BLOCK_K"]), v["num_warps"], v["num_stages"])
        mode = (cx["PRECISION"], cx["CAST_BF16"]) if "PRECISION" in cx else None
        seen.setdefault(v["kernel"], set()).add((tile, mode))
    assert set(seen) >= {"_common.bmm_kernel", "rotate._rotate_adam_kernel", "rotate._rotate_update_kernel",
                         "statistics._gram_update_kernel"}  # fmt: skip
    for kernel, pairs in seen.items():
        if kernel == "statistics._gram_update_kernel":
            assert pairs == {(t, None) for t in tiles if t[0] == t[1]}, kernel
        else:
            assert pairs == {(t, m) for t in tiles for m in modes}, kernel


def test_sample_compiles_to_sm90_cubin(tmp_path: Path) -> None:
    report = _run_script(tmp_path, "--sample")
    assert report["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    entries = {q for q, k in report["kernels"].items() if k["entry"]}
    assert {v["kernel"] for v in report["variants"]} == entries
    for v in report["variants"]:
        r = v["result"]
        assert r["ok"], f"{v['kernel']} [{v['label']}]: {r['error']}"
        assert {"ptx", "cubin"} <= set(r["asm"]) and r["cubin_bytes"] > 0, v["kernel"]
