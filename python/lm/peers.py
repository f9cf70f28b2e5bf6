"""Other SOAP implementations ("peers"), built with the same hyperparameters as ``soap_kernels.SOAP``.

``heavyball_soap``: HeavyBall 3.2.1 ``heavyball.SOAP``; ``pytorch_optimizer_soap``: pytorch_optimizer
4.1.0 ``pytorch_optimizer.SOAP``; ``upstream_soap``: the authors' ``soap.py``
(github.com/nikhilvyas/SOAP), loaded from a path the user gives, never bundled. Install the first
two with ``pip install --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0`` (the ``peers`` extra).

What each peer's source says, and where the mapping cannot make it equal to the authors' SOAP
(which ``soap_kernels.SOAP`` reproduces):

* The authors' ``soap.py`` (the version with ``shampoo_beta=-1`` and ``precondition_frequency=10``
  defaults): the first step only initialises the factors and the eigenbasis (no parameter update);
  the Adam moments live in the rotated frame with bias correction folded into the step size,
  ``denominator = sqrt(v) + eps``; decoupled weight decay ``p -= lr * wd * p`` after the update; the
  factors are a plain EMA (``lerp`` from zero) with ``shampoo_beta``; eigh at the first step, one
  power-iteration + QR every ``precondition_frequency`` steps after it (counted from the second call).
* pytorch_optimizer 4.1.0: the same algorithm step for step (first step skipped, refresh at the same
  steps, ``shampoo_beta=None`` meaning beta2, ``correct_bias=True``, weight decay decoupled after
  the update). Differences are rounding only: it keeps ``exp_avg`` in the parameter frame and
  projects it every step (the authors keep it in the rotated frame and rotate it at a refresh,
  the same value for an orthogonal Q). Its argument is ``max_precondition_dim``; ``normalize_gradient``
  is left False.
* HeavyBall 3.2.1: defaults that change the semantics are overridden here: ``betas`` (0.9, 0.95),
  ``shampoo_beta`` 0.95, ``precondition_frequency`` 2, ``max_precond_dim`` 2048, ``merge_dims`` True
  (all set from our arguments); ``warmup_steps=0`` (its own LR warm-up, off: the training script's
  LambdaLR does the warm-up), ``caution=False``, ``mars=False``, ``palm=False`` (no beta2 schedule),
  ``use_precond_schedule=False`` (its default schedule would refresh with a decaying probability
  instead of every ``precondition_frequency`` steps), ``compile_step=False`` (no torch.compile, as the
  others), ``promote=False``, ``storage_dtype="float32"``, no gradient/update clipping,
  ``split=False``. ``multi_tensor=True`` (foreach over the group) is kept: it is a speed choice.
  What cannot be made equal: (1) HeavyBall bias-corrects every EMA by "debiasing" its beta
  (``beta_t = 1 - (1 - beta) / (1 - beta**t)``), including the Shampoo factors, so its factors are
  ``sum_t w_t G G^T`` with weights summing to 1 instead of the authors' ``(1 - beta**t)``-scaled
  EMA (the eigenbasis is the same at the first step, a slightly different weighting after), and
  its Adam denominator is ``sqrt(v_hat) + eps`` where the authors' is ``sqrt(v) + eps`` with the
  correction in the step size (eps acts ``1/sqrt(1 - beta2**t)`` times larger in the authors');
  (2) the refresh cadence is a cumulative float probability ``1/precondition_frequency`` per call
  (``int(sum) > int(previous sum)``), which with 0.1 first fires at call 11 like the authors' but
  can drift by one step over a long run from float rounding; (3) its LR is read from
  ``group["base_lr"]``, re-synced from ``group["lr"]`` each step with a one-time warning ("Learning
  rate changed between steps"), so an LR scheduler works with ``multi_tensor=True``.
* ``soap_kernels.SOAP``'s ``shampoo_beta < 0`` means ``betas[1]``, like the authors'; HeavyBall and
  pytorch_optimizer get the resolved value.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import torch

PEERS = ("heavyball_soap", "pytorch_optimizer_soap", "upstream_soap")
INSTALL = "pip install --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0"
_MODULES = {"heavyball_soap": "heavyball", "pytorch_optimizer_soap": "pytorch_optimizer"}
_VERSIONS = {"heavyball_soap": "3.2.1", "pytorch_optimizer_soap": "4.1.0"}


def _import(name: str):
    """The peer's package (``importlib.import_module``, so tests can simulate its absence)."""
    return importlib.import_module(_MODULES[name])


def peer_available(name: str, upstream_path: str | None = None) -> tuple[bool, str]:
    """``(True, description)`` when ``name`` can be built, else ``(False, why and how to fix it)``."""
    if name not in PEERS:
        return False, f"unknown peer {name!r}; choose from {PEERS}"
    if name == "upstream_soap":
        if not upstream_path:
            return False, ("upstream_soap needs --upstream-soap PATH: the authors' soap.py from "
                           "https://github.com/nikhilvyas/SOAP (not bundled)")
        if not Path(upstream_path).is_file():
            return False, f"upstream_soap: --upstream-soap {upstream_path}: no such file"
        try:
            load_upstream_soap(upstream_path)
        except Exception as exc:  # noqa: BLE001 -- any failure is "not available", with its reason
            return False, f"upstream_soap: cannot load a SOAP class from {upstream_path} ({type(exc).__name__}: {exc})"
        return True, f"authors' SOAP from {upstream_path}"
    try:
        module = _import(name)
    except ImportError as exc:
        return False, f"{name}: {_MODULES[name]} is not installed ({exc}); install it with: {INSTALL}"
    version = getattr(module, "__version__", None) or _distribution_version(_MODULES[name])
    note = "" if version in ("?", _VERSIONS[name]) else f" (tested with {_VERSIONS[name]})"
    return True, f"{_MODULES[name]} {version}{note}"


def _distribution_version(distribution: str) -> str:
    """The installed version of ``distribution`` from its metadata (HeavyBall has no ``__version__``), else ``?``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def load_upstream_soap(path: str) -> type:
    """The ``SOAP`` class defined in the file ``path`` (the authors' soap.py), imported under a private name."""
    path = str(Path(path).resolve())
    key = f"_upstream_soap_{abs(hash(path))}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    cls = getattr(module, "SOAP", None)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ImportError(f"{path} defines no SOAP optimizer class")
    return cls


def make_peer(
    name: str,
    params,
    *,
    lr: float,
    betas=(0.95, 0.95),
    shampoo_beta: float = -1,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    upstream_path: str | None = None,
) -> torch.optim.Optimizer:
    """The peer ``name`` with these hyperparameters (``soap_kernels.SOAP``'s names and meanings).

    ``params`` may be parameter groups; a group's own ``weight_decay`` wins over the argument, as in
    any torch optimizer. Raises ``ImportError`` (with the install command) when the peer is absent.
    """
    ok, why = peer_available(name, upstream_path)
    if not ok:
        raise ImportError(why)
    betas = tuple(float(b) for b in betas)
    resolved_shampoo_beta = betas[1] if shampoo_beta < 0 else float(shampoo_beta)
    if name == "upstream_soap":
        cls = load_upstream_soap(upstream_path)
        return cls(
            params, lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d,
        )  # fmt: skip
    module = _import(name)
    if name == "pytorch_optimizer_soap":
        return module.SOAP(
            params, lr=lr, betas=betas, shampoo_beta=resolved_shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precondition_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d,
            correct_bias=True, normalize_gradient=False,
        )  # fmt: skip
    # HeavyBall: every default that changes the algorithm is set explicitly (see the module docstring).
    return module.SOAP(
        params, lr=lr, betas=betas, shampoo_beta=resolved_shampoo_beta, eps=eps, weight_decay=weight_decay,
        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
        merge_dims=merge_dims, precondition_1d=precondition_1d,
        warmup_steps=0, caution=False, mars=False, palm=False, use_precond_schedule=False,
        compile_step=False, promote=False, storage_dtype="float32", split=False, multi_tensor=True,
        gradient_clipping=None, update_clipping=None, cautious_weight_decay=False,
    )  # fmt: skip


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of the tensors in ``opt.state`` (nested containers included).

    Works for any torch optimizer; storages shared by several entries count once, parameters
    (should an optimizer keep a reference in its state) are not counted.
    """
    parameters = {p.untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"]}
    storages: dict[int, int] = {}
    seen: set[int] = set()
    pending: list = list(opt.state.values())
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in parameters and storage.nbytes():
                storages[ptr] = storage.nbytes()
        elif isinstance(obj, dict):
            pending.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            pending.extend(obj)
    return sum(storages.values())
