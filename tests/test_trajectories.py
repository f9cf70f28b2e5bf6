"""Today's trajectories against recordings of earlier versions (tests/trajectories.py).

``trajectories_542cb77.pt``: main before the redesign of issue 13, recorded on torch 2.13.0+cpu on
a 2-core AMD EPYC VM. ``trajectories_fbf1f84_GenuineIntel-AVX512.pt``: recorded on torch
2.13.0+cpu on a 2-core Intel Xeon VM (ATen dispatching AVX512) at fbf1f84, whose torch and
reference runs had the same bits there as 320f556's (the recording of 542cb77 is not bitwise
comparable on that machine: MKL and ATen pick other kernels on it).
``trajectories_89f40f9_AuthenticAMD-AVX2.pt``: recorded on a 2-core AMD EPYC Zen 3 VM (ATen AVX2,
numpy's OpenBLAS on its "Haswell" kernels) at 89f40f9; its reference and torch runs are
bit-identical to 542cb77's recording (mixed-model up to its step 56), its Triton runs are not: the
interpreter's ``tl.dot`` is numpy's matmul, whose bits follow the kernels OpenBLAS picks for the
CPU, so recordings from this one on name them (``blas``) and Triton bits are compared only where
they match. On a 2-core AMD EPYC Zen 5 VM (ATen AVX512, numpy's OpenBLAS on "Haswell" kernels, as
the environment's ``OPENBLAS_CORETYPE`` asks) every run of every backend, Triton included, was
bit-identical to that Zen 3 recording: on AMD the bits followed numpy's kernels, not ATen's
capability, so an AMD recording is chosen by the kernels numpy runs on here (and with numpy on
its own "SkylakeX" choice there, every Triton run was 542cb77's bits). MKL and ATen pick their kernels
by CPU, so the bits of a run are only comparable on the kind of CPU a recording was made on:
bit-identity is asserted against the recording of this machine's kind (same torch, CPU vendor and,
where recorded, ATen's CPU capability); on any other machine the comparisons with a recording
are skipped (across CPUs even the tolerance cannot hold: where a factor's statistics are
rank-deficient, as for tall, wide and prime shapes in their first steps, LAPACK's eigh may return
any basis of the null space, and Adam in that basis is not invariant to the choice, so two
correct runs differed by 2-7 % there), and the LAPACK split is checked against a one-thread run
in the same process instead. See docs/DESIGN.md §7 for the cases that changed on purpose and why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TOLERANCE, rel_err
from trajectories import CASES, STEPS, TRITON_CASES, backends_here, numpy_blas_core, trajectory

from soap_kernels import lapack

DATA = Path(__file__).parent / "data"
# (file, CPU vendor, ATen CPU capability or None for any, numpy's OpenBLAS kernels the Triton runs
# were made with, or None where unknown). Of those whose vendor and capability fit this machine:
# the first whose kernels are numpy's here, else the first with unknown kernels (its Triton bits
# are asserted as on the machine it was made on), else the first (Triton bits not compared).
# 542cb77's file names no kernels; "SkylakeX" is inferred: on the Zen 5 VM with numpy forced off
# the machine's OPENBLAS_CORETYPE=Haswell onto its own choice, SkylakeX, every Triton replay was
# bit-identical to that file (and with Haswell none was).
RECORDINGS = [
    ("trajectories_89f40f9_AuthenticAMD-AVX2.pt", "AuthenticAMD", None, "Haswell"),
    ("trajectories_542cb77.pt", "AuthenticAMD", None, "SkylakeX"),
    ("trajectories_fbf1f84_GenuineIntel-AVX512.pt", "GenuineIntel", "AVX512", None),
]
RECORDED_BLAS = {name: blas for name, _, _, blas in RECORDINGS}
SAME_TORCH = torch.__version__ == "2.13.0+cpu"
RECORDED_THREADS = 2


def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo ("AuthenticAMD", "GenuineIntel"), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def matching_recording(vendor: str, capability: str, blas: str) -> str | None:
    """The recording made on this kind of machine (CPU ``vendor``, ATen ``capability``, numpy's
    OpenBLAS kernels ``blas``) with this torch, or None."""
    fits = [(name, want_blas) for name, want_vendor, want_capability, want_blas in RECORDINGS
            if vendor == want_vendor and want_capability in (None, capability)]
    for wanted in (blas, None):
        for name, want_blas in fits:
            if want_blas == wanted:
                return name
    return fits[0][0] if fits else None


BLAS_HERE = numpy_blas_core()  # the kernels numpy's OpenBLAS runs on here (the interpreter's tl.dot)
MATCHING = (matching_recording(cpu_vendor(), torch.backends.cpu.get_cpu_capability(), BLAS_HERE)
            if SAME_TORCH else None)
NO_RECORDING = (f"no trajectory recording of this kind of machine (torch {torch.__version__}, CPU "
                f"{cpu_vendor() or 'unknown'}, {torch.backends.cpu.get_cpu_capability()}); record one with "
                "`python tests/trajectories.py record tests/data/trajectories_<commit>_<vendor>-<capability>.pt` "
                "and add it to RECORDINGS")


def _recorded():
    return None if MATCHING is None else torch.load(DATA / MATCHING, weights_only=False)


needs_recording = pytest.mark.skipif(MATCHING is None, reason=NO_RECORDING)


def _lapack_way(monkeypatch, way: str) -> None:
    """Every batched LAPACK call run one way: ``"1"`` (its matrices in turn at one thread) or
    ``"split"`` (its matrices split over the cores, each single-threaded); single matrices at one
    thread."""
    monkeypatch.delenv("SOAP_LAPACK_THREADS", raising=False)
    monkeypatch.delenv("SOAP_LAPACK_MULTITHREAD", raising=False)
    monkeypatch.setattr(lapack, "_candidates", lambda full, batch: (way,) if batch > 1 and full > 1 else ("1",))


@pytest.fixture(autouse=True)
def one_lapack_thread(monkeypatch):
    """Every matrix factored at one thread, as the recording's runs took it."""
    _lapack_way(monkeypatch, "1")
    # The recording ran at the 2-core machine's default of two intra-op threads; the GEMMs' bits
    # depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recorded():
    return _recorded()


@pytest.mark.parametrize("machine, expected", [
    # The CI of a Zen 5 VM was red (8 Triton replays against 542cb77's bits) until an AMD
    # recording was chosen by numpy's kernels instead of ATen's capability.
    (("AuthenticAMD", "AVX512", "Haswell"), "trajectories_89f40f9_AuthenticAMD-AVX2.pt"),  # Zen 5 VM
    (("AuthenticAMD", "AVX2", "Haswell"), "trajectories_89f40f9_AuthenticAMD-AVX2.pt"),  # Zen 3 VM
    (("AuthenticAMD", "AVX512", "SkylakeX"), "trajectories_542cb77.pt"),  # as before on Zen 4
    (("AuthenticAMD", "AVX512", "Zen"), "trajectories_89f40f9_AuthenticAMD-AVX2.pt"),  # bits: tolerance only
    (("GenuineIntel", "AVX512", "SkylakeX"), "trajectories_fbf1f84_GenuineIntel-AVX512.pt"),
    (("GenuineIntel", "AVX2", "Haswell"), None),
])
def test_recording_chosen_by_machine(machine, expected):
    assert matching_recording(*machine) == expected


@pytest.mark.parametrize("name, blas", [(r[0], r[3]) for r in RECORDINGS])
def test_recordings_table_names_the_files_kernels(name, blas):
    """Where a file records its kernels, the table's are the same (the twin of the file's field)."""
    recorded = torch.load(DATA / name, weights_only=False).get("blas")
    assert recorded in (None, blas)


CASE_IDS = [c[0] for c in CASES]
# Per recording, cases whose bits changed on purpose after it was made, from this step on (the
# tolerance still applies to every step; docs/DESIGN.md §7): mixed-model (f = 7) reaches its 8th
# refresh at step 56, where every basis used to re-orthonormalise at once and now each factor
# does at its phase (2a21fd9, after both of these recordings).
CHANGED_FROM_STEP = {
    "trajectories_542cb77.pt": {"mixed-model": 56},
    "trajectories_fbf1f84_GenuineIntel-AVX512.pt": {"mixed-model": 56},
}


def _replay(recorded, backend: str, name: str) -> tuple[float, bool, float]:
    """Case ``name`` run again on ``backend``: (max relative error against the recording,
    bit-identical, the dtype's parameter tolerance)."""
    shapes, kwargs = next((c[1], c[2]) for c in CASES if c[0] == name)
    old = recorded["runs"][(backend, name)]
    new = trajectory(shapes, kwargs, backend, steps=recorded["steps"])
    err = max(rel_err(a.float(), b.float()) for sa, sb in zip(new, old) for a, b in zip(sa, sb))
    kept = CHANGED_FROM_STEP.get(MATCHING, {}).get(name, len(old))
    same = all(torch.equal(a, b) for sa, sb in zip(new[:kept], old[:kept]) for a, b in zip(sa, sb))
    return err, same, TOLERANCE[kwargs.get("dtype", torch.float32)]["param"]


@needs_recording
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", CASE_IDS)
def test_trajectory_matches_main(recorded, backend, name):
    err, same, tol = _replay(recorded, backend, name)
    print(f"{backend} {name}: max rel error against {MATCHING} {err:.2e}, bit-identical: {same}")
    assert err <= tol
    assert same, "the redesign kept these bits; a change here must be explained in docs/DESIGN.md §7"


@pytest.mark.parametrize("name", CASE_IDS)
def test_split_lapack_keeps_the_bits(recorded, monkeypatch, name):
    """lapack.py's two ways give the same bits in a running optimizer: every batched QR split over
    the cores replays the one-thread recording exactly (once it did not: the split laid Q out
    row-major and the GEMMs reading it rounded differently, docs/DESIGN.md §7)."""
    _lapack_way(monkeypatch, "split")
    if MATCHING is not None:
        err, same, tol = _replay(recorded, "torch", name)
        assert err <= tol
        assert same
        return
    # No recording of this machine's kind: the split against the one-thread way, both run here.
    shapes, kwargs = next((c[1], c[2]) for c in CASES if c[0] == name)
    split = trajectory(shapes, kwargs, "torch", steps=STEPS)
    _lapack_way(monkeypatch, "1")
    one = trajectory(shapes, kwargs, "torch", steps=STEPS)
    assert all(torch.equal(a, b) for sa, sb in zip(split, one) for a, b in zip(sa, sb))


@needs_recording
@pytest.mark.skipif("triton" not in backends_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("name", sorted(TRITON_CASES))
def test_triton_trajectory_matches_main(recorded, name):
    if ("triton", name) not in recorded["runs"]:
        pytest.skip("not recorded")
    err, same, tol = _replay(recorded, "triton", name)
    print(f"triton {name}: max rel error against {MATCHING} {err:.2e}, bit-identical: {same}")
    assert err <= tol
    # The interpreter's tl.dot is numpy's matmul: its bits follow the kernels numpy's OpenBLAS
    # picked for the CPU, which a recording names from the AVX2 one on (RECORDINGS names 542cb77's,
    # inferred; the Intel one's are unknown and asserted as on the machine it was made on).
    blas = RECORDED_BLAS[MATCHING]
    if blas is not None and blas != BLAS_HERE:
        print(f"  bits not compared: recorded with numpy's OpenBLAS {blas!r} kernels, here {BLAS_HERE!r}")
        return
    assert same
