"""``SOAP``: a ``torch.optim.Optimizer`` with the reference's keyword arguments and semantics.

The optimizer maps param groups to a backend: ``reference`` (the literal per-parameter statement of
docs/DESIGN.md §1, :mod:`soap_kernels.reference`) or the batched engine (:mod:`soap_kernels.engine`, whose
hot ops may run in Triton or native code). Whatever the backend, ``state_dict()`` holds per
parameter the reference's state (``step``, ``exp_avg``, ``exp_avg_sq``, ``GG``, ``Q``) in the
reference's frames, so a checkpoint saved with one backend loads into another.

Reliability: every check that can reject a step runs before anything is modified (hyperparameters,
gradient layout, a parameter resized or moved since its state was made, non-finite gradients), and
a factorisation that fails keeps the previous basis (see :mod:`soap_kernels.reference`).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import ops, reference, select
from .engine import NOT_PRECONDITIONED, BatchedEngine, Bucket
from .layout import Layout, make_layout
from .placement import Local, Placement, soap_states
from .schedules import RefreshSchedule
from .select import BACKENDS

__all__ = ["SOAP", "BACKENDS", "STATE_FORMAT"]

DATA_FORMATS = ("channels_first", "channels_last")
SECOND_MOMENTS = ("adam", "adafactor")
PRECISIONS = ("fp32", "tf32", "bf16")
NONFINITE = ("raise", "skip", "ignore")
# Version of the state_dict layout; a newer one is refused with a clear message. 2: the
# optimizer-wide progress (update count, skipped steps, schedule state) is also copied into param
# group 0 under "soap", so DCP's get/set_optimizer_state_dict (which keep only "state" and
# "param_groups") keep it; the top-level copy wins when both are there.
STATE_FORMAT = 2


def _check_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` for a hyperparameter SOAP cannot use (nothing is modified)."""
    prefix = f"{where}: " if where else ""

    def number(name: str) -> float:
        value = group[name]
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{prefix}Tensor {name} must be 1-element (a number or a one-element tensor), "
                                 f"got shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{prefix}{name} must be a finite real number, got {value!r}")
        return float(value)

    if number("lr") < 0.0:
        raise ValueError(f"{prefix}Invalid learning rate: {group['lr']} (must be >= 0)")
    if number("eps") < 0.0:
        raise ValueError(f"{prefix}Invalid eps: {group['eps']} (must be >= 0)")
    if number("weight_decay") < 0.0:
        raise ValueError(f"{prefix}Invalid weight_decay: {group['weight_decay']} (must be >= 0)")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{prefix}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{prefix}Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")
    shampoo_beta = number("shampoo_beta")
    if shampoo_beta >= 1.0:
        raise ValueError(f"{prefix}Invalid shampoo_beta: {shampoo_beta} (must be < 1; negative means betas[1])")
    for name in ("precondition_frequency", "max_precond_dim"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{prefix}Invalid {name}: {value!r} (must be an integer >= 1)")
    for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{prefix}{name} must be True or False, got {group[name]!r}")


def params_device(params: list) -> torch.device | None:
    """The parameters' device; ``None`` when there are none or they span several devices.
    Items may be tensors, ``(name, tensor)`` pairs (``named_parameters()``) or param groups."""
    found = None
    for item in params:
        tensors = (item.get("params") or []) if isinstance(item, dict) else [item]
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        for t in tensors:
            if isinstance(t, tuple) and len(t) == 2:
                t = t[1]
            if isinstance(t, Tensor):
                if found is not None and t.device != found:
                    return None
                found = t.device
    return found


class SOAP(torch.optim.Optimizer):
    """SOAP: Shampoo with Adam in the preconditioner's eigenbasis (Vyas et al., 2024).

    Args (the reference's names, defaults and meaning):
        params: parameters or param groups.
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)`` in the eigenbasis.
        shampoo_beta: EMA factor of the Shampoo statistics; negative means ``betas[1]``.
        eps: added to ``sqrt(exp_avg_sq)``.
        weight_decay: decoupled weight decay, applied to the parameter after the update.
        precondition_frequency: refresh the eigenbasis every this many updates.
        max_precond_dim: dims larger than this are not preconditioned.
        merge_dims: merge consecutive dims while their product stays ``<= max_precond_dim``.
        precondition_1d: precondition 1-D parameters too.
        normalize_grads: divide the update by its RMS.
        data_format: ``"channels_first"`` or ``"channels_last"`` (4-D tensors with ``merge_dims``).
        correct_bias: Adam's bias correction.

    Keyword-only:
        backend: ``"auto"`` (fastest available), ``"reference"``, ``"torch"``, ``"triton"``
            (:mod:`soap_kernels.select`).
        schedule: a :class:`~soap_kernels.schedules.RefreshSchedule`; ``None`` refreshes every
            ``precondition_frequency`` updates of each parameter, as the reference does.
        second_moment: ``"adam"`` (SOAP) or ``"adafactor"`` (Shampoo with exponent 1/2, by the
            paper's equivalence).
        rotation_precision: ``"fp32"`` (default), or ``"tf32"``/``"bf16"`` tensor-core rotation
            GEMMs (``backend="triton"``); statistics and refreshes stay fp32 or better.
        nonfinite: what a step does when a gradient holds a NaN or an inf (or has a squared norm
            beyond fp32's range, ``||g|| ≳ 1.8e19``, which would make the statistics inf/NaN for
            good). ``"raise"`` (default): a ``ValueError`` naming the parameter, nothing modified.
            ``"skip"``: the whole step is skipped for every parameter, as ``torch.amp.GradScaler``
            does, and counted in ``skipped_steps`` (also saved in ``state_dict()``). ``"ignore"``:
            no check (no host synchronisation, e.g. for CUDA-graph capture); a non-finite gradient
            then poisons the state, as in the reference. The check is one fused 2-norm reduction
            per (device, dtype) and one host read per step. ``"raise"`` is the default because it
            cannot get in AMP's way (``GradScaler.step`` unscales, finds the inf and does not call
            ``step()`` at all) and because, without a scaler, a NaN gradient is a bug to see at
            once rather than a stream of silently skipped steps. With ``"ignore"`` an overflowing
            gradient saturates the statistics (as AdamW's second moment would); parameters and
            bases stay finite, and the basis is then kept, with a warning.
        keep_refresh_scratch: ``False`` (default): the refresh's large CPU temporaries live for
            the refreshing step only (the memory between steps is the state and the step's
            workspace). ``True``: they are kept between steps and reused, so a refresh step does
            not take fresh pages from the OS for them (page faults cost 0.3–0.6 ms per MB on the
            VMs measured): on the bench set of benchmarks/NOTES.md 37 the refresh step −8 to −10 %,
            the amortized step −3 to −4.5 %, for about 13 B/param more between steps (``memory_info()``
            reports it as workspace). The bits are the same either way. CPU engine backends only:
            on CUDA PyTorch's caching allocator already reuses the memory; ``backend="reference"``
            allocates as the reference does.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        backend: str = "auto",
        schedule: RefreshSchedule | None = None,
        second_moment: str = "adam",
        rotation_precision: str = "fp32",
        nonfinite: str = "raise",
        keep_refresh_scratch: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, list) else betas,
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": precondition_frequency,
            "max_precond_dim": max_precond_dim,
            "merge_dims": merge_dims,
            "precondition_1d": precondition_1d,
            "normalize_grads": normalize_grads,
            "correct_bias": correct_bias,
        }
        _check_hyperparameters(defaults)
        if data_format not in DATA_FORMATS:
            raise ValueError(f"Unknown data_format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(f"Unknown second_moment {second_moment!r}; choose one of {', '.join(SECOND_MOMENTS)}")
        if rotation_precision not in PRECISIONS:
            raise ValueError(f"Unknown rotation_precision {rotation_precision!r}; choose one of {', '.join(PRECISIONS)}")
        if schedule is not None and not isinstance(schedule, RefreshSchedule):
            raise ValueError(f"schedule must be a soap_kernels.schedules.RefreshSchedule or None, got {schedule!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"Unknown nonfinite {nonfinite!r}; choose one of {', '.join(NONFINITE)}")
        if not isinstance(keep_refresh_scratch, bool):
            raise TypeError(f"keep_refresh_scratch must be a bool, got {type(keep_refresh_scratch).__name__}")
        if isinstance(params, Tensor) or not isinstance(params, Iterable) or isinstance(params, (str, bytes, dict)):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                            f"but got {torch.typename(params)}")
        params = [{**g, "params": list(g["params"])}
                  if isinstance(g, dict) and isinstance(g.get("params"), Iterable) and not isinstance(g["params"], Tensor)
                  else g for g in params]
        self.backend = select.resolve_backend(backend, params_device(params))
        if rotation_precision != "fp32" and self.backend != "triton":
            raise ValueError(f"rotation_precision={rotation_precision!r} needs backend='triton' "
                             f"(the {self.backend} backend rotates in fp32)")
        self.rotation_precision = rotation_precision
        self.data_format = data_format
        self.second_moment = second_moment
        self.schedule = schedule
        self.nonfinite = nonfinite
        self.keep_refresh_scratch = keep_refresh_scratch
        self.skipped_steps = 0  # steps skipped for a non-finite gradient (nonfinite="skip")
        self.factorization_failures = 0  # factorisations that failed twice (previous basis kept)
        self._warned: set[int] = set()  # ids of parameters already warned about
        self._updates = 0  # optimizer-wide update count: the schedule's t
        # backend="auto" that resolved to Triton measures, per bucket, whether Triton or the torch
        # table updates it faster (docs/DESIGN.md §3).
        self._engine_backend = "auto" if backend == "auto" and self.backend == "triton" else self.backend
        self._engine: BatchedEngine | None = None
        # Where the work runs and what it communicates (one process here; ShardedSOAP holds a
        # sharded placement): docs/DESIGN.md §5.
        self._placement: Placement = Local()
        self._placement.bind(self)
        self._new_engine()
        super().__init__(params, defaults)
        self._register_own_hooks()

    def _new_engine(self) -> None:
        """The batched engine is a cache of ``self.state`` (rebuilt from it whenever the groups,
        a checkpoint or an unpickled copy change what it holds)."""
        self._placement.reset()
        if self.backend == "reference":
            self._engine = None
            return
        self._engine = BatchedEngine(self.second_moment, self._engine_backend, self.rotation_precision)
        self._engine.on_failure = self._factorization_failed
        # The refresh temporaries kept between steps (keep_refresh_scratch=True): part of the
        # engine, so a copy or an unpickled optimizer starts with none.
        self._engine.kept_scratch = {} if getattr(self, "keep_refresh_scratch", False) else None

    def _register_own_hooks(self) -> None:
        """SOAP's conversion between its live state and the reference layout of a checkpoint runs
        in the base class's state-dict hooks (registered first: a user's hooks see the reference
        layout)."""
        self.register_state_dict_post_hook(SOAP._state_dict_post_hook)
        self.register_load_state_dict_pre_hook(SOAP._load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(SOAP._load_state_dict_post_hook)

    # ------------------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the engine (a cache of ``self.state``, rebuilt at the next step) and the
        hooks (dropped, as torch's optimizers drop them; SOAP's own are registered again)."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k != "_engine"}
        state["_warned"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "backend" in state:  # a deepcopy or an unpickled optimizer (not load_state_dict's call)
            self._new_engine()
            self._register_own_hooks()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base class's ``load_state_dict`` (SOAP's validation and conversion run in its
        hooks); anything but a dict is refused before the base class touches it."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"not an optimizer state_dict: expected a dict, got {type(state_dict).__name__}")
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"a param group has no 'params' (keys: {sorted(param_group)})")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        try:
            _check_hyperparameters(group, where)
            for pi, p in enumerate(group["params"]):
                if p.is_complex():
                    raise ValueError(f"{where}, parameter {pi}: SOAP does not support complex parameters; "
                                     "view them as real (torch.view_as_real)")
            problem = select.device_problem((p.device for p in group["params"]), self.backend)
            if problem:
                raise ValueError(f"{where}: {problem}")
        except ValueError:
            self.param_groups.pop()
            raise

    def layout_of(self, p: Tensor, group: dict[str, Any]) -> Layout:
        """How the preconditioner sees ``p`` under ``group``'s hyperparameters."""
        return make_layout(
            p.shape,
            max_precond_dim=group["max_precond_dim"],
            merge_dims_=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            channels_last=self.data_format == "channels_last",
        )

    def _group_signature(self) -> tuple:
        return tuple(
            (id(g), len(g["params"]), g["max_precond_dim"], g["merge_dims"], g["precondition_1d"])
            for g in self.param_groups
        )

    # ------------------------------------------------------------------------------ step
    def _check_before_step(self) -> None:
        """Every check that can reject a step, done before anything is modified.

        (One thing may change: buckets built for a parameter that has since been cast to another
        dtype, or resized/moved before it had any state, are marked for a rebuild, which keeps the
        state exactly.)"""
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f"param group {gi}")
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
                if not isinstance(grad, Tensor):
                    raise ValueError(f"{where}: .grad must be a tensor, got {type(grad).__name__}")
                if grad.is_sparse:
                    raise ValueError(f"{where}: SOAP does not support sparse gradients; use dense gradients "
                                     "(e.g. sparse=False in nn.Embedding)")
                if grad.is_complex():
                    raise ValueError(f"{where}: SOAP does not support complex gradients")
                if grad.shape != p.shape:
                    raise ValueError(f"{where}: gradient of shape {tuple(grad.shape)} does not match its parameter")
                if grad.device != p.device:
                    raise ValueError(f"{where}: gradient on {grad.device} but parameter on {p.device}")
                self._check_geometry(p, where)
                if self.backend == "triton":
                    problem = select.device_problem((p.device,), self.backend)
                    if problem:
                        raise ValueError(f"{where}: {problem}")

    def _check_geometry(self, p: Tensor, where: str) -> None:
        """A parameter resized or moved since its state was made cannot use that state."""
        if self._engine is None:
            state = self.state.get(p)
            if not state or not isinstance(state.get("exp_avg"), Tensor):
                return
            shape, device, has_state, dtype = tuple(state["exp_avg"].shape), state["exp_avg"].device, True, p.dtype
        else:
            hit = self._engine.where.get(p) if self._placement.built() else None
            if hit is None:
                return
            bucket, row = hit
            shape, device, has_state, dtype = bucket.layout.shape, bucket.exp_avg.device, bucket.initialized[row], bucket.dtype
        if tuple(p.shape) == shape and p.device == device:
            if p.dtype != dtype:
                self._placement.invalidate()  # cast since the buckets were built: rebuild them, state kept
            return
        if not has_state:
            self._placement.invalidate()  # no state to lose: its bucket is rebuilt for the new shape/device
            return
        if tuple(p.shape) != shape:
            raise ValueError(f"{where} had shape {shape} when its optimizer state was made (resized in place since?); "
                             "SOAP's statistics cannot follow a resize. Build a new optimizer for the resized model.")
        raise ValueError(f"{where} is on {p.device} but its optimizer state is on {device} (moved after the optimizer "
                         "was made). Move the model first, or move the state with "
                         "optimizer.load_state_dict(optimizer.state_dict()).")

    def _nonfinite_error(self) -> ValueError:
        advice = ("nothing was modified. SOAP(..., nonfinite='skip') skips such steps instead (as "
                  "torch.amp.GradScaler does); or find where the overflow starts.")
        overflowing = None
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None or grad.numel() == 0:
                    continue
                where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
                if not bool(torch.isfinite(grad).all()):
                    nans, infs = int(torch.isnan(grad).sum()), int(torch.isinf(grad).sum())
                    return ValueError(f"non-finite gradient for {where}: {nans} NaN and {infs} inf of {grad.numel()} "
                                      f"values; {advice}")
                if overflowing is None and not math.isfinite(float(grad.float().norm())):
                    overflowing = (f"gradient too large for {where}: its squared norm overflows float32 (max |g| = "
                                   f"{float(grad.abs().max()):.3g}) and would make SOAP's statistics inf/NaN; {advice}")
        return ValueError(overflowing or f"a non-finite gradient was found on another process; {advice}")

    def _factorization_failed(self, p: Tensor, dim: int, what: str) -> None:
        """A factorisation of ``p`` failed in fp32 and fp64 and its previous basis was kept: warn
        once per parameter (the count goes on in ``factorization_failures``)."""
        self.factorization_failures += 1
        if id(p) in self._warned:
            return
        self._warned.add(id(p))
        where = next((f"parameter {pi} of param group {gi}" for gi, g in enumerate(self.param_groups)
                      for pi, q in enumerate(g["params"]) if q is p), "a parameter")
        warnings.warn(f"SOAP: {what} for {where} (shape {tuple(p.shape)}), working dim {dim}. Warned once per "
                      "parameter; NaN/inf statistics (an overflowing gradient) are the usual cause.",
                      RuntimeWarning, stacklevel=2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimizer step. ``closure`` re-evaluates the model and returns the loss; ``loss``
        passes an already computed loss (used by loss-driven refresh schedules)."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        loss_value = None
        # A step before any parameter has state only initialises (DCP's get_optimizer_state_dict
        # fills an empty optimizer with one): the schedule is not asked, so no loss is needed.
        if self.schedule is not None and self.schedule.needs_loss and (loss is not None or self._placement.has_state()):
            if loss is None:
                raise ValueError(
                    f"{type(self.schedule).__name__} needs the loss: call step(closure) or step(loss=...)"
                )
            try:
                loss_value = float(loss)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"the loss must be a number or a one-element tensor, got {type(loss).__name__}") from err
        # Inside torch.compile the check (one host read) is not traced: a compiled step behaves as
        # nonfinite="ignore" (see the README's torch.compile notes).
        checking = self.nonfinite != "ignore" and not torch.compiler.is_compiling()
        if checking and self._placement.any_nonfinite(self._placement.local_nonfinite_flag()):
            if self.nonfinite == "raise":
                raise self._nonfinite_error()
            self.skipped_steps += 1
            return loss
        if self.backend == "reference":
            self._reference_step(loss_value)
        else:
            self._engine_step(loss_value)
        return loss

    def _reference_step(self, loss_value: float | None) -> None:
        updated: list[tuple[Tensor, dict, Layout]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self.layout_of(p, group)
                state = self.state[p]
                on_failure = self._reference_failure_hook(p)
                if "Q" not in state:
                    state.update(reference.init_state(p.grad, layout, group, self.second_moment, on_failure))
                    continue
                refresh = None if self.schedule is None else False
                reference.update_param(p, p.grad, state, layout, group, refresh, self.second_moment, on_failure)
                updated.append((p, state, layout))
        if self.schedule is None or not updated:
            return
        self._updates += 1
        factors = list(self._reference_factors())
        drift = cost = None
        if self.schedule.needs_drift:
            drift = torch.tensor([reference.drift(state, i) if "Q" in state else 0.0 for _, state, _, i in factors],
                                 dtype=torch.float64)
        if self.schedule.needs_drift or getattr(self.schedule, "needs_cost", False):
            cost = torch.tensor([_refresh_cost(layout, i) for _, _, layout, i in factors], dtype=torch.float64)
        extra = {}
        if getattr(self.schedule, "needs_batch", False):
            extra["batch"] = _batch_ids([(layout, i) for _, _, layout, i in factors])
        decision = self.schedule.decide(self._updates, loss=loss_value, drift=drift, cost=cost, **extra)
        chosen: dict[int, tuple[Tensor, dict, Layout, set[int]]] = {}
        updated_ids = {id(p) for p, _, _ in updated}
        for k, (p, state, layout, i) in enumerate(factors):
            if id(p) in updated_ids and _selected(decision, k):
                chosen.setdefault(id(p), (p, state, layout, set()))[3].add(i)
        for p, state, layout, dims in chosen.values():
            reference.refresh_param(state, layout, dims, self.second_moment, self._reference_failure_hook(p))

    def _reference_failure_hook(self, p: Tensor) -> reference.FailureHook:
        return lambda dim, what: self._factorization_failed(p, dim, what)

    def _reference_factors(self):
        """Every factor as (param, state, layout, working dim), in (group, parameter, dim) order,
        the same order as the engine's, whether or not the parameter has state yet."""
        for group in self.param_groups:
            for p in group["params"]:
                layout = self.layout_of(p, group)
                state = self.state.get(p, {})
                for i, pre in enumerate(layout.preconditioned):
                    if pre:
                        yield p, state, layout, i

    def _engine_step(self, loss_value: float | None) -> None:
        """The engine's step; the placement agrees on what is stepped and moves the data around it
        (nothing for one process)."""
        self._placement.ensure()
        traffic = self._placement.begin_step(loss_value)
        try:
            initialized, updated = self._engine.step(self.param_groups)
        finally:
            traffic.engine_done()
        finish = traffic.send_updates()  # overlaps the refresh
        if traffic.any_update(updated):
            # The refreshes of this step share their temporaries' pages (kept for the next
            # refreshing step with keep_refresh_scratch=True).
            with ops.refresh_scratch(self._engine.kept_scratch):
                if self.schedule is None:
                    if updated:
                        self._refresh_by_frequency(updated)
                else:
                    self._updates += 1
                    self._refresh_by_schedule(updated, traffic.loss)
        finish()
        traffic.publish(self, initialized)

    def _refresh_by_frequency(self, updated: list[tuple[Bucket, list[int]]]) -> None:
        for bucket, rows in updated:
            group = self.param_groups[self._group_index(bucket)]
            due = [r for r in rows if bucket.host_step[r] % group["precondition_frequency"] == 0]
            if due:
                bucket.refresh({dim: due for dim in bucket.factor_dims})

    def _group_index(self, bucket: Bucket) -> int:
        for gi, b in self._engine.buckets:
            if b is bucket:
                return gi
        raise KeyError("bucket not found")

    def _refresh_by_schedule(self, updated: list[tuple[Bucket, list[int]]], loss_value: float | None) -> None:
        """Ask the schedule which factors to refresh, with every factor's drift and cost in the
        placement's canonical order (the same on every process), and refresh those held here."""
        factors = self._placement.factors()
        drift = cost = None
        if self.schedule.needs_drift:
            per_bucket: dict[int, Tensor] = {}
            values = []
            for _, dim, bucket, row in factors:
                if bucket is None:  # held by another process, which sends it
                    values.append(0.0)
                    continue
                if id(bucket) not in per_bucket:
                    per_bucket[id(bucket)] = bucket.drift().cpu()
                values.append(float(per_bucket[id(bucket)][bucket.factor_dims.index(dim), row]))
            drift = self._placement.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        if self.schedule.needs_drift or getattr(self.schedule, "needs_cost", False):
            cost = torch.tensor([_refresh_cost(layout, dim) for layout, dim, _, _ in factors], dtype=torch.float64)
        extra = {}
        if getattr(self.schedule, "needs_owner", False):
            owners = self._placement.factor_owners()
            if any(owners):  # factors on more than one rank (one process: the protocol without it)
                extra["owner"] = torch.tensor(owners, dtype=torch.int64)
        if getattr(self.schedule, "needs_batch", False):
            extra["batch"] = _batch_ids([(layout, dim) for layout, dim, _, _ in factors])
        decision = self.schedule.decide(self._updates, loss=loss_value, drift=drift, cost=cost, **extra)
        if decision is False:
            return
        updated_rows = {id(b): set(rows) for b, rows in updated}
        plan: dict[int, tuple[Bucket, dict[int, list[int]]]] = {}
        for k, (_, dim, bucket, row) in enumerate(factors):
            if bucket is not None and row in updated_rows.get(id(bucket), ()) and _selected(decision, k):
                plan.setdefault(id(bucket), (bucket, {}))[1].setdefault(dim, []).append(row)
        for bucket, rows_per_dim in plan.values():
            bucket.refresh(rows_per_dim)

    # ------------------------------------------------------------------------------ checkpoints
    def kernel_choices(self) -> list[dict[str, Any]]:
        """Which ops update each bucket: one entry per bucket (param group, working shape, number of
        parameters, ``kernels`` = ``"torch"``/``"triton"``, and for ``backend="auto"`` the measured
        milliseconds of one update each way, ``None`` before a bucket's first full update). Empty
        for the reference backend."""
        if self._engine is None:
            return []
        return [
            {"group": gi, "work_shape": tuple(b.layout.work_shape), "count": len(b.params),
             "kernels": "measure" if b.pending_measure else b.kernels.name,
             "measured_ms": None if b.measured is None else dict(b.measured)}
            for gi, b in self._engine.buckets
        ]

    def buckets_info(self) -> list[dict[str, Any]]:
        """One entry per bucket of the batched engine (empty for ``backend="reference"``):
        ``group`` (param-group index), ``shape`` (the parameters' shape), ``work_shape``,
        ``preconditioned`` (per working dim), ``count`` (parameters stacked), ``dtype``, ``device``,
        ``kernels`` (``"torch"``/``"triton"``/``"measure"`` before auto's measurement),
        ``refreshes`` (factor refreshes so far) and ``state_bytes`` (the bucket's state tensors)."""
        if self._engine is None:
            return []
        self._placement.ensure()
        out = []
        for gi, b in self._engine.buckets:
            tensors = [b.exp_avg, b.exp_avg_sq, b.step, *[t for t in (*b.q, *b.stats) if t is not None]]
            out.append({
                "group": gi, "shape": tuple(b.layout.shape), "work_shape": tuple(b.layout.work_shape),
                "preconditioned": list(b.layout.preconditioned), "count": len(b.params), "dtype": b.dtype,
                "device": b.exp_avg.device, "kernels": "measure" if b.pending_measure else b.kernels.name,
                "refreshes": int(b.refresh_count.sum()),
                "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
            })
        return out

    def memory_info(self) -> dict[str, int]:
        """Bytes the optimizer holds: ``state_bytes`` (every state tensor, each storage counted
        once) and ``workspace_bytes`` (scratch buffers kept between steps)."""
        if self._engine is None:
            seen: dict[int, int] = {}
            for s in soap_states(self.state).values():
                for v in s.values():
                    for t in (v if isinstance(v, list) else [v]):
                        if isinstance(t, Tensor) and t.numel():
                            st = t.untyped_storage()
                            seen[st.data_ptr()] = st.nbytes()
            return {"state_bytes": sum(seen.values()), "workspace_bytes": 0}
        work = self._engine.workspace_pool.nbytes()
        work += sum(t.numel() * t.element_size() for t in (self._engine.kept_scratch or {}).values())
        return {"state_bytes": sum(b["state_bytes"] for b in self.buckets_info()), "workspace_bytes": work}

    def _progress(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "second_moment": self.second_moment,
            "data_format": self.data_format,
            "updates": self._updates,
            "skipped_steps": self.skipped_steps,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
        }

    @staticmethod
    def _state_dict_post_hook(self: SOAP, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict()``: per parameter the reference's state (``step``, ``exp_avg``,
        ``exp_avg_sq``, ``GG``, ``Q``; the engine adds its exact ``GG_eigenbasis`` and
        ``Q_refreshes``), whatever the backend; the optimizer-wide progress in param group 0."""
        states = self._placement.full_state()
        params = [p for g in self.param_groups for p in g["params"]]
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        packed = state_dict["state"]  # the base class's packing: other entries (a hook's) stay
        for i, p in zip(indices, params):
            if p in states:
                packed[i] = states[p]
        progress = self._progress()
        state_dict.update(progress)  # where format 1 kept it, and where people look
        # Where DCP's get/set_optimizer_state_dict keep it; in every group, so that groups
        # compare equal whichever of them a caller looks at.
        for group in state_dict["param_groups"]:
            group["soap"] = copy.deepcopy(progress)
        return state_dict

    @staticmethod
    def _load_state_dict_pre_hook(self: SOAP, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Validate a checkpoint of any backend before anything changes, and hand the base class
        a copy whose per-parameter states it passes through untouched (it would cast fp32 state
        to a bf16 parameter's dtype)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or not isinstance(state_dict["state"], dict):
            raise ValueError("not an optimizer state_dict: 'param_groups' must be a list and 'state' a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has {len(self.param_groups)}")
        progress = dict(saved_groups[0].get("soap") or {}) if saved_groups and isinstance(saved_groups[0], dict) else {}
        for key in ("format", "second_moment", "data_format", "updates", "skipped_steps", "schedule"):
            if key in state_dict:  # the top level (format 1, and what a user edits) wins
                progress[key] = state_dict[key]
        version = progress.get("format", STATE_FORMAT)
        if not isinstance(version, int) or version > STATE_FORMAT:
            raise ValueError(f"state_dict format {version!r} is newer than this soap_kernels (format {STATE_FORMAT}); "
                             "upgrade soap_kernels")
        saved_second = progress.get("second_moment", "adam")
        if saved_second != self.second_moment:
            raise ValueError(f"state_dict was saved with second_moment={saved_second!r}, "
                             f"this optimizer uses {self.second_moment!r}")
        counters = {}
        for name in ("updates", "skipped_steps"):
            value = progress.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"state_dict[{name!r}] must be a non-negative integer, got {value!r}")
            counters[name] = int(value)
        schedule_state = progress.get("schedule")
        if self.schedule is not None and schedule_state is not None:
            try:  # on a copy first: a schedule state that does not fit must not change anything
                copy.deepcopy(self.schedule).load_state_dict(schedule_state)
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                raise ValueError(f"state_dict['schedule'] does not fit {type(self.schedule).__name__}: {err!r}") from err
        groups_out = []
        params_by_index: dict[Any, tuple[Tensor, dict]] = {}
        for gi, (ours, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"state_dict param group {gi} must be a dict with a 'params' list")
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(f"param group {gi}: state_dict has {len(saved['params'])} parameters, "
                                 f"the optimizer has {len(ours['params'])}")
            group = {**ours, **{k: v for k, v in saved.items() if k not in ("params", "soap")}}
            group["params"] = ours["params"]
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            _check_hyperparameters(group, f"state_dict param group {gi}")
            out = {k: v for k, v in saved.items() if k != "soap"}
            if isinstance(out.get("betas"), list):
                out["betas"] = tuple(out["betas"])
            groups_out.append(out)
            for idx, p in zip(saved["params"], ours["params"]):
                if idx in params_by_index:
                    raise ValueError(f"state_dict lists parameter {idx!r} twice")
                params_by_index[idx] = (p, group)
        states_out: dict[Any, Any] = {}
        for idx, saved_state in state_dict["state"].items():
            if idx not in params_by_index and not isinstance(idx, numbers.Integral):
                states_out[idx] = saved_state  # not a parameter's (a hook's): the base class keeps it
                continue
            if idx not in params_by_index:
                raise ValueError(f"state_dict has state for parameter {idx}, which no param group lists")
            p, group = params_by_index[idx]
            states_out[idx] = _Validated(self._validated_state(p, group, saved_state, idx))
        self._loading_progress = (counters, schedule_state)
        return {**state_dict, "state": states_out, "param_groups": groups_out}

    @staticmethod
    def _load_state_dict_post_hook(self: SOAP) -> None:
        counters, schedule_state = self._loading_progress
        del self._loading_progress
        for p in list(self.state):
            if isinstance(self.state[p], _Validated):
                self.state[p] = self.state[p].state
        self._updates = counters["updates"]
        self.skipped_steps = counters["skipped_steps"]
        if self.schedule is not None and schedule_state is not None:
            self.schedule.load_state_dict(schedule_state)
        for group in self.param_groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        if self._engine is not None:
            self._new_engine()
            self._placement.ensure()

    def _validated_state(self, p: Tensor, group: dict, saved: Any, idx: Any) -> dict:
        where = f"state of parameter {idx} (shape {tuple(p.shape)})"
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: expected a dict, got {type(saved).__name__}")
        missing = {"step", "exp_avg", "exp_avg_sq", "Q"} - saved.keys()
        if missing or not ({"GG", "GG_eigenbasis"} & saved.keys()):
            raise ValueError(f"{where}: missing {sorted(missing or {'GG'})}; was it saved by SOAP?")
        layout = self.layout_of(p, group)
        step = saved["step"]
        step = int(step.item()) if isinstance(step, Tensor) and step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{where}: step must be a non-negative integer, got {saved['step']!r}")
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32

        def tensor(name: str, value: Any, shape: tuple) -> Tensor:
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: {name} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                                 "(a state_dict from another model?)")
            if not torch.isfinite(value).all():
                raise ValueError(f"{where}: {name} holds non-finite values")
            return value.detach().to(device=p.device, dtype=dtype).clone()  # strides kept: they decide the GEMMs' bits

        def factors(name: str, check_q: bool) -> list:
            listed = saved[name]
            if not isinstance(listed, (list, tuple)) or len(listed) != len(layout.preconditioned):
                raise ValueError(f"{where}: {name} must list {len(layout.preconditioned)} factors for working shape "
                                 f"{layout.work_shape}")
            out = []
            for i, (f, d, pre) in enumerate(zip(listed, layout.work_shape, layout.preconditioned)):
                if not pre:
                    if isinstance(f, Tensor) and f.numel() > 0 or (not isinstance(f, Tensor) and len(f) > 0):
                        raise ValueError(f"{where}: {name}[{i}] should be empty (dim {i} is not preconditioned)")
                    out.append(NOT_PRECONDITIONED)
                else:
                    out.append(tensor(f"{name}[{i}]", f, (d, d)))
                    if check_q:
                        _check_orthonormal(out[-1], f"{where}: Q[{i}]")
            return out

        out: dict[str, Any] = {"step": int(step)}
        out["exp_avg"] = tensor("exp_avg", saved["exp_avg"], p.shape)
        if self.second_moment == "adam":
            out["exp_avg_sq"] = tensor("exp_avg_sq", saved["exp_avg_sq"], p.shape)
        else:
            out["exp_avg_sq"] = tensor("exp_avg_sq", saved["exp_avg_sq"], (_adafactor_numel(layout),))
        out["Q"] = factors("Q", True)
        if "GG" in saved:
            out["GG"] = factors("GG", False)
        # The batched engine's exact rotated-frame statistics, when the checkpoint came from it.
        if "GG_eigenbasis" in saved and self._engine is not None:
            out["GG_eigenbasis"] = factors("GG_eigenbasis", False)
            counts = saved.get("Q_refreshes")
            if counts is not None:
                out["Q_refreshes"] = [int(c) for c in (counts.tolist() if isinstance(counts, Tensor) else counts)]
        elif "GG" not in out:
            out["GG"] = [NOT_PRECONDITIONED if len(q) == 0 else q @ b @ q.T
                         for q, b in zip(out["Q"], factors("GG_eigenbasis", False))]
        return out


class _Validated:
    """A validated per-parameter state on its way through ``Optimizer.load_state_dict`` (which
    passes objects it does not know through unchanged)."""

    __slots__ = ("state",)

    def __init__(self, state: dict) -> None:
        self.state = state


def _adafactor_numel(layout: Layout) -> int:
    work = layout.work_shape
    return (work[0] if work else 1) + (math.prod(work[1:]) if len(work) > 1 else 1)


def _check_orthonormal(q: Tensor, where: str) -> None:
    """A loaded eigenbasis must be orthonormal; probed with a few vectors (O(d²), not O(d³)), since
    every basis SOAP or soap.py writes is one to fp32 rounding and a corrupt one spoils every step."""
    probe = torch.randn(q.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(q.device)
    q64 = q.double()
    err = float((q64.T @ (q64 @ probe) - probe).abs().max() / probe.abs().max())
    if not err <= 1e-2:
        raise ValueError(f"{where} is not orthonormal (|QᵀQx − x| / |x| = {err:.2e}): a corrupted checkpoint?")


def _selected(decision: bool | Tensor, k: int) -> bool:
    if isinstance(decision, bool):
        return decision
    return bool(decision[k])


def _batch_ids(factors: list[tuple[Layout, int]]) -> Tensor:
    """Per factor, an id shared by the factors of one working shape, preconditioned dims and dim
    (numbered in order of first appearance): those the engine refreshes in one batched call when
    they are chosen at the same step (parameters of other groups or dtypes with the same shape sit
    in other buckets; the id is a proxy that is the same on every process and backend)."""
    ids: dict[tuple, int] = {}
    return torch.tensor([ids.setdefault((layout.work_shape, layout.preconditioned, dim), len(ids))
                         for layout, dim in factors], dtype=torch.int64)


def _refresh_cost(layout: Layout, dim: int) -> float:
    flags = [i == dim for i in range(len(layout.preconditioned))]
    return float(ops.FLOPS.refresh(layout.work_shape, flags))
