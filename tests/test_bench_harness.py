"""benchmarks/harness.py's stamp on every result: the git revision, ``+dirty`` when the measured
sources are not the committed ones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_revision_marks_changed_sources_dirty(tmp_path, monkeypatch):
    """Run from a repository's benchmarks/ folder (where the harness runs git): a change to a
    tracked source under soap_kernels/ (or benchmarks/) stamps ``+dirty``; an untracked file, a
    change elsewhere or to a markdown file among the sources does not."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import harness

    repo = tmp_path / "repo"
    for folder in ("soap_kernels", "benchmarks", "docs"):
        (repo / folder).mkdir(parents=True)
        (repo / folder / "a.txt").write_text("one\n")
    (repo / "benchmarks" / "NOTES.md").write_text("one\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    here = repo / "benchmarks"
    rev = harness.git_revision(here)
    assert rev != "unknown" and not rev.endswith("+dirty")
    (repo / "docs" / "a.txt").write_text("two\n")
    (repo / "soap_kernels" / "new.txt").write_text("untracked\n")
    (repo / "benchmarks" / "NOTES.md").write_text("two\n")
    assert harness.git_revision(here) == rev
    (repo / "soap_kernels" / "a.txt").write_text("two\n")
    assert harness.git_revision(here) == rev + "+dirty"
    _git(repo, "checkout", "--", "soap_kernels")
    (repo / "benchmarks" / "a.txt").write_text("two\n")
    assert harness.git_revision(here) == rev + "+dirty"
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert harness.git_revision(outside) == "unknown"
