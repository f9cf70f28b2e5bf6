"""benchmarks/ab_step.py on the tiny set: every kind of variant runs and is reported, and a
``lapack@COMMIT`` variant is that commit's lapack.py, apart from the current one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from soap_kernels import lapack

ROOT = Path(__file__).resolve().parent.parent


def _in_git_checkout() -> bool:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _in_git_checkout(), reason="lapack@COMMIT variants read git history")


def test_ab_step_reports_every_variant(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_step

    names = ["current", "lapack@HEAD", "env:SOAP_LAPACK_SPLIT=0"]
    ab_step.main(["--preset", "tiny", "--rounds", "2", "--frequency", "2", "--variants", ",".join(names)])
    out = capsys.readouterr().out
    for n in names:
        assert any(line.strip().startswith(n + " ") and "amortized" in line for line in out.splitlines()), n


def test_a_lapack_variant_is_its_own_module_with_the_same_bits(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_step

    ab_step._add_lapack_variant("lapack@HEAD")
    (_, _, qr), (_, _, _) = ab_step.PATCHES["lapack@HEAD"]
    assert qr is not lapack.qr and qr.__globals__["_choosers"] is not lapack._choosers
    x = torch.randn(3, 20, 20, generator=torch.Generator().manual_seed(0))
    x = x @ x.mT
    mine, theirs = qr(x), lapack.qr(x)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
