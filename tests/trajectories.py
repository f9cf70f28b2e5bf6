"""Parameter trajectories of the lockstep configurations, recorded to compare two versions.

``python tests/trajectories.py record OUT.pt`` runs every configuration of the lockstep tests for
``STEPS`` steps (six refreshes at f = 10) on every backend that runs here and saves each
parameter after every step; ``tests/test_trajectories.py`` compares today's code with a recording
(``tests/data/trajectories_542cb77.pt``: main at commit 542cb77, before the redesign of issue 13).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

STEPS = 64

# (id, shapes, extra SOAP kwargs): the cases of test_engine.py plus groups, dtypes and modes.
CASES = [
    ("square", [(16, 16)], {}),
    ("tall", [(24, 10)], {}),
    ("wide", [(10, 24)], {}),
    ("prime", [(13, 7)], {}),
    ("size-one", [(1, 9), (9, 1)], {}),
    ("above-max-dim", [(40, 8), (8, 40)], {"max_precond_dim": 32}),
    ("1d", [(11,)], {}),
    ("1d-preconditioned", [(11,)], {"precondition_1d": True}),
    ("1d-above-max", [(40,)], {"precondition_1d": True, "max_precond_dim": 32}),
    ("0d", [()], {}),
    ("0d-merge", [()], {"merge_dims": True}),
    ("3d", [(6, 5, 3)], {}),
    ("conv", [(6, 4, 3, 3)], {}),
    ("conv-merge", [(6, 4, 3, 3)], {"merge_dims": True, "max_precond_dim": 16}),
    ("conv-merge-channels-last", [(6, 3, 3, 4)], {"merge_dims": True, "max_precond_dim": 16,
                                                  "data_format": "channels_last"}),
    ("bucket-of-four", [(8, 12)] * 4, {}),
    ("normalize-grads", [(12, 9), (7,)], {"normalize_grads": True}),
    ("no-bias-correction", [(12, 9)], {"correct_bias": False}),
    ("no-weight-decay", [(12, 9)], {"weight_decay": 0.0}),
    ("shampoo-beta", [(12, 9)], {"shampoo_beta": 0.9}),
    ("mixed-model", [(16, 8), (8,), (8, 16), (16, 8), ()], {"precondition_frequency": 7}),
    ("adafactor", [(12, 9), (6, 4, 3), (7,)], {"second_moment": "adafactor", "precondition_1d": True}),
    ("bf16", [(12, 8), (8,)], {"dtype": torch.bfloat16}),
    ("fp16", [(12, 8), (8,)], {"dtype": torch.float16}),
]
# The Triton interpreter is slow: the matrix-shaped cases only.
TRITON_CASES = {"square", "tall", "prime", "size-one", "above-max-dim", "1d", "bucket-of-four", "normalize-grads",
                "mixed-model", "bf16"}


def trajectory(shapes, kwargs: dict, backend: str, steps: int = STEPS) -> list[list[torch.Tensor]]:
    from soap_kernels import SOAP

    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    opt = SOAP(params, backend=backend, lr=3e-2, precondition_frequency=kwargs.pop("precondition_frequency", 10),
               **kwargs)
    grads = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads).to(dtype)
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def backends_here() -> list[str]:
    from soap_kernels import backend_info

    info = backend_info()["backends"]
    return [b for b in ("reference", "torch", "triton") if info.get(b, {}).get("available")]


def numpy_blas_core() -> str:
    """The kernel set numpy's OpenBLAS picked for this CPU ("Haswell", "SkylakeX", ...), or "" where
    it cannot be read. The Triton interpreter's ``tl.dot`` is numpy's matmul, so the Triton runs'
    bits depend on it (on one AMD VM the torch runs matched a recording and the Triton runs did not)."""
    import ctypes
    import glob

    import numpy

    libs = os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "libscipy_openblas*")
    for lib in glob.glob(libs):
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename"):
            try:
                get = getattr(ctypes.CDLL(lib), symbol)
            except (OSError, AttributeError):
                continue
            get.restype = ctypes.c_char_p
            return get().decode()
    return ""


def record(path: str) -> None:
    """Every case on every backend here, as tests/test_trajectories.py replays them: every batched
    LAPACK call at one thread (matrix by matrix), two intra-op threads."""
    from soap_kernels import lapack

    lapack._candidates = lambda full, batch: ("1",)
    torch.set_num_threads(2)
    runs = {}
    for backend in backends_here():
        for name, shapes, kwargs in CASES:
            if backend == "triton" and name not in TRITON_CASES:
                continue
            runs[(backend, name)] = trajectory(shapes, kwargs, backend)
            print(backend, name, flush=True)
    import numpy

    torch.save({"steps": STEPS, "torch": torch.__version__, "numpy": numpy.__version__, "blas": numpy_blas_core(),
                "runs": runs}, path)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "record":
        sys.exit("usage: python tests/trajectories.py record OUT.pt")
    record(sys.argv[2])
