"""``train_lm.py``'s checkpoint file: written atomically, read back with the RNG states it holds.

A checkpoint is one ``torch.save`` file. It is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the previous checkpoint with ``os.replace`` (atomic on POSIX
and Windows), and the folder is fsynced so that the rename itself survives a power loss. A crash
at any point leaves either the previous checkpoint or the new one, never a torn file; a stray
temporary file (``.<name>.*.tmp``) from a killed writer is ignored by the reader.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1  # version of the checkpoint's layout; a different one is refused


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is always the old or the new file, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, as a plain open() would have made it
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable; some platforms (Windows) cannot open a folder, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path) -> dict:
    """The checkpoint at ``path`` (on the CPU); ``ValueError`` when it is not one of this format."""
    # weights_only: the file holds tensors, numbers, strings and containers only (the RNG states
    # are stored as such by rng_state), so the safe unpickler reads it.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a train_lm checkpoint of format {FORMAT} (found {found!r})")
    return payload


def rng_state() -> dict:
    """Every global RNG a run may draw from: torch (CPU and each CUDA device), Python, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
