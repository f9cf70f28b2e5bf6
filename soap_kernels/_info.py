"""What each backend can run here, and what ``backend="auto"`` picks (``python -m soap_kernels``)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from . import __version__, lapack, select

# The hot ops of one SOAP step and who provides them.
OPS = {
    "rotate-in + Adam epilogue": {"torch": True, "triton": True},
    "rotate-back + parameter update": {"torch": True, "triton": True},
    "statistics update (rotated frame)": {"torch": True, "triton": True},
    "plain Adam (un-preconditioned)": {"torch": True, "triton": True},
    "refresh (sort, power step, QR)": {"torch": True, "triton": True},
}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_info(device: str | torch.device | None = None) -> dict:
    """A report of the backends, the native extension, and the choice ``auto`` makes on ``device``."""
    from . import _native

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {}
    for name in select.BACKENDS[1:]:
        ok, why = select.backend_available(name)
        backends[name] = {"available": ok, "detail": why}
    native = {"loaded": _native.available(), "detail": _native.load_error() or "loaded"}
    if _native.available():
        native["ops"] = [n for n in _native.__all__ if hasattr(torch.ops.soap_kernels, n)]
    return {
        "soap_kernels": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "auto": select.auto_backend(device),
        "backends": backends,
        "native_extension": native,
        "ops": OPS,
        "lapack_choices": {f"{op} {n}": way for (op, n), way in lapack.thread_choice().items()},
    }


def format_info(info: dict) -> str:
    lines = [
        f"soap_kernels {info['soap_kernels']}  torch {info['torch']}  python {info['python']}",
        f"device {info['device']}: backend='auto' picks {info['auto']!r}"
        + (" (per bucket: Triton or torch ops, whichever a timed first update finds faster)" if info["auto"] == "triton" else ""),
        "backends:",
    ]
    for name, b in info["backends"].items():
        lines.append(f"  {name:<10} {'yes' if b['available'] else 'no ':<4} {b['detail']}")
    native = info["native_extension"]
    lines.append(f"native extension soap_kernels._C: {'loaded' if native['loaded'] else 'not loaded'}"
                 + ("" if native["loaded"] else f" ({native['detail']})"))
    if native.get("ops"):
        lines.append("  ops: " + ", ".join(native["ops"]))
    lines.append("hot ops by backend:")
    for op, by in info["ops"].items():
        lines.append(f"  {op:<36} " + " ".join(k for k, v in by.items() if v))
    return "\n".join(lines)
