"""SOAP on ``torch.distributed``: DDP and FSDP2 work sharding (docs/DESIGN.md §5).

:class:`ShardedSOAP` is :class:`~soap_kernels.SOAP` (same arguments, same math, same state layout)
that splits the optimizer work over the ranks of a process group: SOAP holding a :class:`Sharded`
placement (:mod:`soap_kernels.placement`), which owns everything below; the optimizer's own code
is the single-process code.

**Ownership.** The parameters form the engine's buckets (one per param group and equal working
layout, dtype and device, exactly as a single process forms them). Each bucket goes whole to one
rank, so its batched GEMMs and refreshes are the ones a single process runs, and a rank keeps state
only for the buckets it owns. Buckets are assigned greedily, most expensive first, to the least
loaded rank (ties: lower bucket index, lower rank), with the cost from the lean FLOP model of
:mod:`soap_kernels.ops` (per row: the step's GEMMs ``FLOPS.step`` + the elementwise Adam work +
the refresh ``FLOPS.refresh`` spread over ``precondition_frequency`` steps). Every rank computes
the same assignment from the same inputs; nothing is communicated to agree on it.

**Parameters of two kinds.**

* Replicated parameters (plain tensors, as under DDP): the owner updates them, then one
  ``broadcast`` per owner of one flat byte buffer (every parameter it updated) reaches every rank;
  the broadcasts run while the owners refresh their eigenbases.
* Sharded parameters (DTensors sharded on dim 0 over a 1-D mesh, as ``fully_shard`` makes them):
  a parameter whose math is not elementwise (any preconditioned dim, ``normalize_grads``, or
  ``second_moment="adafactor"``) is gathered whole — its shards and its gradient's shards, one
  ``all_to_all`` for all of them — to its owner, updated there with the full SOAP math, and its
  new shards go back with a second ``all_to_all``. No shard is preconditioned on its own (that
  would be another algorithm). An elementwise parameter (plain Adam: 1-D without
  ``precondition_1d``, or every dim above ``max_precond_dim``) is updated shard by shard where it
  lies, with state for the local shard only; elementwise math gives the same numbers.
  An owner keeps a full-size copy of each whole matrix it owns and of its gradient between steps
  (the matrices are re-gathered every step, so a parameter changed outside the optimizer is seen).

**Communication dtype.** Values travel in their own dtype, so fp32/bf16/fp16 parameters arrive
bit for bit and replicas stay identical. ``comm_dtype`` narrower than a parameter's dtype (e.g.
``torch.bfloat16`` for fp32 parameters) sends that parameter's *update* ``p_new − p_old`` (and, on
the sharded path, its gradient) in ``comm_dtype`` instead; every rank, the owner included, applies
the rounded update, so replicas still agree, but the trajectory departs from a single process's.

**One decision everywhere.** SOAP's non-finite check (``nonfinite="raise"``/``"skip"``) reduces
each rank's flag with an ``all_reduce`` (MAX) in :meth:`Sharded.any_nonfinite`, so a NaN on
one rank makes every rank raise, or skip, the same step. Then one small ``all_reduce`` (float64)
carries the loss (loss-driven schedules see the mean over ranks) and which parameters have a
gradient on every rank (only those are stepped, so every rank knows which parameters are
initialised and updated without asking). Drift-driven schedules get the drift of each factor from
its owner (an ``all_reduce`` of a vector that is zero elsewhere, so the sum is exact). The schedule
then sees the same numbers on every rank.

**Checkpoints.** ``state_dict()`` is collective: it gathers the full state in the reference's
layout (shards concatenated, CPU tensors) to *every* rank, so a checkpoint is independent of the
world size and loads into plain :class:`~soap_kernels.SOAP` too. ``load_state_dict`` takes such a
full state dict on every rank and keeps only what this rank owns. With
``torch.distributed.checkpoint``: ``dcp.save`` writes each replicated tensor once; save and load
through :func:`string_keys` (DCP turns integer keys into strings), or use DCP's
``get_optimizer_state_dict``/``set_optimizer_state_dict``, which key by parameter name but keep
only ``state`` and ``param_groups`` (the optimizer-wide update count and a schedule's progress
are then not restored; the per-parameter refresh rule of ``schedule=None`` needs neither). Those
helpers fill an empty optimizer with a zero-gradient step at zero learning rate: it only
initialises (SOAP's first step never updates) and ``load_state_dict`` replaces all of it. Ranks
hold placeholders ``{"owner": rank}`` in ``optimizer.state`` for parameters another rank owns, so
``optimizer.state`` is non-empty on every rank as soon as any rank has state, and that step never
runs on some ranks only. ``optimizer.state[p]`` of a shard-by-shard parameter shows the local
shard's state.

Replicas are identical by construction (one computation, then a copy). Bit-for-bit equality with a
single-process :class:`~soap_kernels.SOAP` run also needs the same kernels on both sides: the same
thread count and LAPACK choice (``SOAP_LAPACK_THREADS``), since MKL's results can depend on them.

Without an initialised process group (or with a world of one) :class:`ShardedSOAP` is
:class:`~soap_kernels.SOAP`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .engine import NOT_PRECONDITIONED, Bucket, bucket_key
from .layout import Layout
from .optimizer import SOAP
from .placement import Factor, Placement, StepTraffic, soap_states, to_reference_layout

__all__ = ["ShardedSOAP", "Sharded", "bucket_cost", "assign_owners", "string_keys", "ELEMENTWISE_FLOPS"]

# Elementwise work per element and step that the GEMM model leaves out: the two moment updates,
# the square root, the division and the parameter update (about a dozen flops). It keeps
# un-preconditioned buckets from looking free to the balancer.
ELEMENTWISE_FLOPS = 12

REPLICATED, GATHERED, LOCAL = "replicated", "gathered", "local"


def bucket_cost(layout: Layout, rows: int, precondition_frequency: int) -> float:
    """FLOPs per step of a bucket of ``rows`` parameters: GEMMs + elementwise + amortised refresh."""
    numel = math.prod(layout.work_shape)
    per_row = (
        ops.FLOPS.step(layout.work_shape, layout.preconditioned)
        + ELEMENTWISE_FLOPS * numel
        + ops.FLOPS.refresh(layout.work_shape, layout.preconditioned) / max(1, precondition_frequency)
    )
    return float(rows * per_row)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: most expensive bucket first, onto the least
    loaded rank. Ties go to the lower bucket index and the lower rank, so every rank computes the
    same answer."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[b] = rank
        load[rank] += costs[b]
    return owners


def _exact_in(wire: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether every value of ``dtype`` is a value of ``wire``."""
    return wire == dtype or wire == torch.float64 or (wire == torch.float32 and dtype in (torch.bfloat16, torch.float16))


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _chunk_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard under ``Shard(0)`` (``torch.chunk``: ceil-sized, the tail short or empty)."""
    size = -(-rows // world) if rows else 0
    return [max(0, min(size, rows - k * size)) for k in range(world)]


@dataclass
class _Entry:
    """One user parameter: where it stands in the sharding plan."""

    index: int  # position in (group, parameter) order
    group: int
    param: Tensor  # the user's parameter (a plain tensor or a DTensor)
    layout: Layout  # the preconditioner's layout of the whole parameter
    kind: str  # REPLICATED, GATHERED or LOCAL
    owner: int = -1  # the rank that updates it (-1: every rank its own shard)
    engine_param: Tensor | None = None  # what this rank's engine updates (None: nothing here)
    grad_buffer: Tensor | None = None  # GATHERED, on the owner: the gathered gradient
    shard_rows: list[int] = field(default_factory=list)  # sharded kinds: rows per rank

    @property
    def row_offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.shard_rows:
            out.append(acc)
            acc += n
        return out


class _Packer:
    """Tensors of mixed dtypes laid out in one byte buffer, each at an 8-byte aligned offset."""

    def __init__(self) -> None:
        self.items: list[tuple[int, torch.dtype, tuple[int, ...]]] = []
        self.nbytes = 0

    def add(self, dtype: torch.dtype, shape: Sequence[int]) -> int:
        offset = self.nbytes
        size = math.prod(shape) * dtype.itemsize
        self.items.append((offset, dtype, tuple(shape)))
        self.nbytes += -(-size // 8) * 8
        return len(self.items) - 1

    def view(self, buffer: Tensor, item: int) -> Tensor:
        offset, dtype, shape = self.items[item]
        size = math.prod(shape) * dtype.itemsize
        return buffer[offset:offset + size].view(dtype).view(shape)


class Sharded(Placement):
    """The placement of :class:`ShardedSOAP` (the module docstring has the design): bucket
    ownership over the ranks of ``group``, the gathers and scatters around the engine, and the
    collective decisions (which parameters are stepped, the loss, non-finite gradients, drift,
    the full state of a checkpoint)."""

    def __init__(self, process_group: Any, comm_dtype: torch.dtype) -> None:
        self.comm_dtype = comm_dtype
        self._process_group = process_group
        self._group: Any = None
        self._entries: list[_Entry] = []
        self._initialized: set[int] = set()  # indices of the parameters with state on some rank
        self._costs: list[tuple[int, float]] = []  # (owner, cost) per bucket of the plan
        self._built: tuple | None = None  # the plan signature the buckets were built for
        self._stale = False
        # Bytes this rank sent and received, and collectives it joined, since construction.
        self.comm_stats = {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}

    def bind(self, opt: SOAP) -> None:
        super().bind(opt)
        self._group = self._resolve_group(self._process_group)

    # ---------------------------------------------------------------------------- the group
    def _resolve_group(self, process_group: Any) -> Any:
        meshes = {id(p.device_mesh): p.device_mesh for g in self.opt.param_groups for p in g["params"] if _is_dtensor(p)}
        for mesh in meshes.values():
            if mesh.ndim != 1:
                raise ValueError(
                    f"ShardedSOAP supports DTensor parameters on a 1-D device mesh (FSDP2 fully_shard); got a {mesh.ndim}-D mesh"
                )
        for g in self.opt.param_groups:
            for p in g["params"]:
                if _is_dtensor(p):
                    placement = p.placements[0]
                    if not (placement.is_shard() and placement.dim == 0):
                        raise ValueError(
                            f"ShardedSOAP supports DTensor parameters sharded on dim 0 (Shard(0)), got {p.placements}"
                        )
        if not dist.is_available() or not dist.is_initialized():
            if meshes:
                raise ValueError("DTensor parameters need an initialised torch.distributed process group")
            return None
        if process_group is None and meshes:
            process_group = next(iter(meshes.values())).get_group()
        group = process_group if process_group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        for mesh in meshes.values():
            if dist.get_process_group_ranks(mesh.get_group()) != ranks:
                raise ValueError(
                    "the DTensor parameters' device mesh must span the optimizer's process group, in the same rank order"
                )
        return group

    @property
    def world_size(self) -> int:
        return 1 if self._group is None else dist.get_world_size(self._group)

    @property
    def rank(self) -> int:
        return 0 if self._group is None else dist.get_rank(self._group)

    def _comm_device(self) -> torch.device:
        for g in self.opt.param_groups:
            for p in g["params"]:
                return _local(p).device
        return torch.device("cpu")

    def ownership(self) -> dict[str, Any]:
        """The plan: per parameter (group, parameter order) its kind and owner, and the FLOP load
        the balancer put on each rank."""
        load = [0.0] * self.world_size
        for owner, cost in self._costs:
            load[owner] += cost
        return {
            "kinds": [e.kind for e in self._entries],
            "owners": [e.owner for e in self._entries],
            "load_flops": load,
        }

    # ---------------------------------------------------------------------------- the plan
    def _plan_signature(self) -> tuple:
        """What the plan depends on, the same on every rank (DTensors: global shape)."""
        return (
            self.opt._group_signature(),
            tuple(g["normalize_grads"] for g in self.opt.param_groups),
            tuple((tuple(p.shape), p.dtype, _local(p).device.type) for g in self.opt.param_groups for p in g["params"]),
        )

    def reset(self) -> None:
        self._built = None

    def invalidate(self) -> None:
        self._stale = True

    def built(self) -> bool:
        return self._built is not None

    def has_state(self) -> bool:
        return bool(self._initialized) if self._built is not None else bool(soap_states(self.opt.state))

    def ensure(self) -> None:
        signature = self._plan_signature()
        if self._built is not None and not self._stale and signature == self._built:
            return
        if self._built is None:  # first step, a loaded checkpoint, a copy: opt.state holds full states
            states = soap_states(self.opt.state)
        else:  # groups or parameters changed on every rank: ownership may move, go through the full state
            states = self._gather_full_state()
        self._build(states)
        self._built, self._stale = signature, False
        self.publish_live_state()

    def _build(self, states: dict[Tensor, dict]) -> None:
        world, rank = self.world_size, self.rank
        engine = self.opt._engine
        entries: list[_Entry] = []
        elementwise_moments = self.opt.second_moment == "adam"  # Adafactor's factored moment is not
        for gi, group in enumerate(self.opt.param_groups):
            for p in group["params"]:
                layout = self.opt.layout_of(p, group)
                if not _is_dtensor(p):
                    kind = REPLICATED
                elif layout.any_preconditioned or group["normalize_grads"] or not elementwise_moments:
                    kind = GATHERED
                else:
                    kind = LOCAL
                entry = _Entry(len(entries), gi, p, layout, kind)
                if kind != REPLICATED:
                    entry.shard_rows = _chunk_rows(p.shape[0], world)
                    local_rows = p.to_local().shape[0] if p.dim() else 0
                    if local_rows != entry.shard_rows[rank]:
                        raise ValueError(
                            f"parameter {entry.index}: local shard has {local_rows} rows, "
                            f"torch.chunk sharding gives {entry.shard_rows[rank]}"
                        )
                entries.append(entry)

        # Buckets of the whole parameters, formed as the single-process engine forms them.
        plan: list[tuple[int, Layout, list[_Entry]]] = []
        for gi in range(len(self.opt.param_groups)):
            by_key: dict[tuple, list[_Entry]] = {}
            for e in entries:
                if e.group == gi and e.kind != LOCAL:
                    by_key.setdefault(bucket_key(_local(e.param), e.layout), []).append(e)
            plan.extend((gi, key[0], members) for key, members in by_key.items())
        costs = [bucket_cost(layout, len(members), self.opt.param_groups[gi]["precondition_frequency"])
                 for gi, layout, members in plan]
        owners = assign_owners(costs, world)
        self._costs = list(zip(owners, costs))

        engine.clear()

        def add_bucket(gi: int, layout: Layout, members: list[_Entry], local: bool) -> None:
            imported = {e.engine_param: _shard_state(states[e.param], e, rank, layout) if local else states[e.param]
                        for e in members if states.get(e.param)}
            engine.add_bucket(gi, [e.engine_param for e in members], layout, imported, self._failure_hook(members))

        for (gi, layout, members), owner in zip(plan, owners):
            for e in members:
                e.owner = owner
            if owner != rank:
                continue
            for e in members:
                if e.kind == REPLICATED:
                    e.engine_param = e.param
                else:  # a whole-matrix proxy: the gathered parameter and gradient live here
                    e.engine_param = torch.empty(e.param.shape, dtype=e.param.dtype, device=_local(e.param).device)
                    e.grad_buffer = torch.empty_like(e.engine_param)
            add_bucket(gi, layout, members, local=False)
        for gi in range(len(self.opt.param_groups)):
            by_key = {}
            for e in entries:
                if e.group == gi and e.kind == LOCAL:
                    shard = e.param.to_local()
                    e.engine_param = torch.empty_like(shard, memory_format=torch.contiguous_format)
                    layout = Layout(shard.shape, shard.shape, False, (False,) * shard.dim())
                    by_key.setdefault(bucket_key(e.engine_param, layout), []).append(e)
            for (layout, _, _), members in by_key.items():
                add_bucket(gi, layout, members, local=True)

        self._entries = entries
        self._initialized = {e.index for e in entries if states.get(e.param)}

    def _failure_hook(self, members: list[_Entry]) -> Callable[[Tensor, int, str], None] | None:
        """The engine's failure reports name the user's parameter, not this rank's proxy of it."""
        hook = self.opt._engine.on_failure
        if hook is None:
            return None
        user = {id(e.engine_param): e.param for e in members}
        return lambda p, dim, what: hook(user.get(id(p), p), dim, what)

    def publish_live_state(self) -> None:
        """``state[p]``: live views of what this rank holds; ``{"owner": rank}`` where another rank
        holds the state of an initialised parameter (entries that are not a parameter's stay)."""
        for p in [k for k in self.opt.state if isinstance(k, Tensor)]:
            del self.opt.state[p]
        for e in self._entries:
            if e.index not in self._initialized:
                continue
            live = None if e.engine_param is None else self.opt._engine.live_state(e.engine_param)
            self.opt.state[e.param] = live if live is not None else {"owner": e.owner}

    # ---------------------------------------------------------------------------- collectives
    def _count(self, sent: int, received: int) -> None:
        self.comm_stats["bytes_sent"] += int(sent)
        self.comm_stats["bytes_received"] += int(received)
        self.comm_stats["collectives"] += 1

    def all_reduce_sum(self, vector: Tensor) -> Tensor:
        if self._group is None:
            return vector
        device = self._comm_device()
        buf = vector.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group)
        nbytes = buf.numel() * buf.element_size()
        self._count(nbytes, nbytes)
        return buf.cpu()

    def _agree(self, loss_value: float | None) -> tuple[set[int], float | None]:
        """One all_reduce: the mean loss and the parameters that have a gradient on every rank
        (the only ones stepped)."""
        has_grad = [e.param.grad is not None for e in self._entries]
        if self._group is None:
            return {i for i, h in enumerate(has_grad) if h}, loss_value
        vector = torch.zeros(1 + len(self._entries), dtype=torch.float64)
        if loss_value is not None:
            vector[0] = loss_value
        vector[1:] = torch.tensor([0.0 if h else 1.0 for h in has_grad], dtype=torch.float64)
        vector = self.all_reduce_sum(vector)
        missing = vector[1:].tolist()
        stepping = {i for i, (h, m) in enumerate(zip(has_grad, missing)) if h and m == 0.0}
        loss = None if loss_value is None else float(vector[0]) / self.world_size
        return stepping, loss

    def local_nonfinite_flag(self) -> Tensor:
        """As :meth:`Local.local_nonfinite_flag`, on the local shards of DTensor gradients (a shard
        may be empty). On the CPU one ``aminmax`` per gradient: measured here, 0.6 ms for the
        1.1 M gradients of the benchmark set against 3.9 ms for ``_foreach_norm(inf)`` (both find
        NaN and ±inf and cannot overflow)."""
        by_kind: dict[tuple, list[Tensor]] = {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                grad = None if p.grad is None else _local(p.grad)
                if grad is not None and grad.numel() > 0:
                    by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        flags = [
            (torch.stack([torch.stack(torch.aminmax(g)) for g in grads]) if device.type == "cpu"
             else torch.stack(torch._foreach_norm(grads, math.inf))).isfinite().all().logical_not()
            for (device, _), grads in by_kind.items()
        ]
        if not flags:
            return torch.zeros((), device=self._comm_device())
        device = flags[0].device
        return torch.stack([f.to(device) for f in flags]).any().float()

    def any_nonfinite(self, local_flag: Tensor) -> bool:
        """Whether any rank has a non-finite gradient (all_reduce MAX of the local flags), so that
        every rank skips, or raises, together."""
        if self._group is None:
            return bool(local_flag.item())
        flag = local_flag.detach().float().reshape(1).to(self._comm_device()).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self._count(4, 4)
        return bool(flag.item())

    # ---------------------------------------------------------------------------- the step
    def begin_step(self, loss: float | None) -> StepTraffic:
        """Agree on the stepped parameters and the loss, gather the sharded ones to their owners
        and point the engine's parameters at this step's gradients."""
        stepping, loss = self._agree(loss)
        updating = {i for i in stepping if i in self._initialized}
        self._gather_to_owners(stepping, updating)
        before = self._snapshot_lossy(updating)
        hidden = self._set_engine_grads(stepping)
        return _ShardedTraffic(self, loss, stepping, updating, before, hidden)

    def _set_engine_grads(self, stepping: set[int]) -> list[tuple[Tensor, Tensor | None]]:
        """Point the engine's parameters at the gradients of this step; a replicated parameter
        whose gradient is missing on another rank is hidden (returned, restored after)."""
        hidden = []
        for e in self._entries:
            ep = e.engine_param
            if ep is None:
                continue
            if e.kind == REPLICATED:
                if e.index not in stepping and ep.grad is not None:
                    hidden.append((ep, ep.grad))
                    ep.grad = None
            elif e.index not in stepping:
                ep.grad = None
            elif e.kind == GATHERED:
                ep.grad = e.grad_buffer
            else:
                grad = e.param.grad.to_local()
                ep.grad = grad if grad.dtype == ep.dtype and grad.shape == ep.shape else grad.to(ep.dtype).reshape(ep.shape)
        return hidden

    def _wire_dtype(self, dtype: torch.dtype) -> tuple[torch.dtype, bool]:
        """(dtype an update of a ``dtype`` parameter travels in, whether it travels as the value)."""
        if _exact_in(self.comm_dtype, dtype):
            return dtype, True
        return self.comm_dtype, False

    def _snapshot_lossy(self, updating: set[int]) -> dict[int, Tensor]:
        """Owned parameters whose update travels rounded: their values before the step."""
        out = {}
        for e in self._entries:
            if e.index in updating and e.engine_param is not None and e.kind != LOCAL and self.world_size > 1:
                if not self._wire_dtype(e.param.dtype)[1]:
                    out[e.index] = e.engine_param.detach().float().clone()
        return out

    def _gather_to_owners(self, stepping: set[int], updating: set[int]) -> None:
        """Sharded parameters: every shard of a whole-matrix parameter and of its gradient to the
        owner (one all_to_all); elementwise ones into their local proxies."""
        world, rank = self.world_size, self.rank
        for e in self._entries:
            if e.kind == LOCAL and e.index in updating:
                e.engine_param.copy_(e.param.to_local())
        gathered = [e for e in self._entries if e.kind == GATHERED and e.index in stepping]
        if not gathered:
            return
        for e in gathered:
            if e.param.grad.dtype != e.param.dtype:
                raise ValueError(
                    f"parameter {e.index}: gradient dtype {e.param.grad.dtype} differs from the parameter's {e.param.dtype}"
                )

        def layout_from(source: int) -> list[tuple[_Packer, list[tuple[_Entry, int | None, int]]]]:
            """What ``source`` sends to each owner: per owner a packer and (entry, param item, grad item)."""
            out = []
            for owner in range(world):
                packer, items = _Packer(), []
                for e in gathered:
                    if e.owner != owner:
                        continue
                    shape = (e.shard_rows[source], *e.param.shape[1:])
                    p_item = packer.add(e.param.dtype, shape) if e.index in updating else None
                    g_item = packer.add(self._grad_wire(e.param.dtype), shape)
                    items.append((e, p_item, g_item))
                out.append((packer, items))
            return out

        mine = layout_from(rank)
        send = torch.empty(sum(pk.nbytes for pk, _ in mine), dtype=torch.uint8, device=self._comm_device())
        offset = 0
        for packer, items in mine:
            chunk = send[offset:offset + packer.nbytes]
            for e, p_item, g_item in items:
                if p_item is not None:
                    packer.view(chunk, p_item).copy_(e.param.to_local())
                packer.view(chunk, g_item).copy_(e.param.grad.to_local())
            offset += packer.nbytes
        incoming = [layout_from(source)[rank] for source in range(world)]
        recv = torch.empty(sum(pk.nbytes for pk, _ in incoming), dtype=torch.uint8, device=send.device)
        self._all_to_all(recv, send, [pk.nbytes for pk, _ in incoming], [pk.nbytes for pk, _ in mine])
        offset = 0
        for source, (packer, items) in enumerate(incoming):
            chunk = recv[offset:offset + packer.nbytes]
            for e, p_item, g_item in items:
                start, rows = e.row_offsets[source], e.shard_rows[source]
                if p_item is not None:
                    e.engine_param[start:start + rows].copy_(packer.view(chunk, p_item))
                e.grad_buffer[start:start + rows].copy_(packer.view(chunk, g_item))
            offset += packer.nbytes

    def _grad_wire(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if _exact_in(self.comm_dtype, dtype) else self.comm_dtype

    def _all_to_all(self, recv: Tensor, send: Tensor, recv_splits: list[int], send_splits: list[int],
                    async_op: bool = False) -> Any:
        rank = self.rank
        self._count(sum(send_splits) - send_splits[rank], sum(recv_splits) - recv_splits[rank])
        return dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self._group, async_op=async_op)

    def _send_from_owners(self, updating: set[int], before: dict[int, Tensor]) -> Callable[[], None]:
        """Start sending every updated parameter from its owner (async); returns the function that
        waits and writes the received values."""
        world = self.world_size
        for e in self._entries:
            if e.kind == LOCAL and e.index in updating:
                e.param.to_local().copy_(e.engine_param)
        if world == 1:
            for e in self._entries:  # a single rank still owns proxies of DTensor parameters
                if e.kind == GATHERED and e.index in updating:
                    e.param.to_local().copy_(e.engine_param)
            return lambda: None
        finishers = [self._start_broadcasts(updating, before), self._start_scatter(updating, before)]

        def finish() -> None:
            for f in finishers:
                f()
        return finish

    def _update_payload(self, e: _Entry, before: dict[int, Tensor], rows: slice | None = None) -> Tensor:
        new = e.engine_param if rows is None else e.engine_param[rows]
        if e.index not in before:
            return new
        old = before[e.index] if rows is None else before[e.index][rows]
        return new.float() - old

    def _apply_received(self, target: Tensor, payload: Tensor, as_value: bool) -> None:
        if as_value:
            target.copy_(payload)
        else:
            target.copy_(target.float().add_(payload.float()))

    def _start_broadcasts(self, updating: set[int], before: dict[int, Tensor]) -> Callable[[], None]:
        """Replicated parameters: one broadcast per owner of one flat buffer of everything it
        updated (async). Measured with gloo on this machine, per-owner broadcasts of 2.4 MB took
        about half the time of one padded ``all_gather`` of the same payload."""
        world, rank = self.world_size, self.rank
        device = self._comm_device()
        pending = []
        for owner in range(world):
            packer, items = _Packer(), []
            for e in self._entries:
                if e.kind == REPLICATED and e.owner == owner and e.index in updating:
                    wire, as_value = self._wire_dtype(e.param.dtype)
                    items.append((e, packer.add(wire, e.param.shape), as_value))
            if not items:
                continue
            buffer = torch.empty(packer.nbytes, dtype=torch.uint8, device=device)
            if owner == rank:
                for e, item, _ in items:
                    packer.view(buffer, item).copy_(self._update_payload(e, before))
                self._count(packer.nbytes, 0)
            else:
                self._count(0, packer.nbytes)
            src = owner if self._group is dist.group.WORLD else dist.get_global_rank(self._group, owner)
            work = dist.broadcast(buffer, src=src, group=self._group, async_op=True)
            pending.append((owner, packer, items, buffer, work))

        def finish() -> None:
            for owner, packer, items, buffer, work in pending:
                work.wait()
                for e, item, as_value in items:
                    payload = packer.view(buffer, item)
                    if as_value:
                        if owner != rank:  # the owner's parameter already holds the value
                            e.param.copy_(payload)
                    else:  # every rank, the owner too, adds the same rounded update to the same old value
                        old = before[e.index] if owner == rank else e.param.float()
                        e.param.copy_(old + payload.float())
        return finish

    def _start_scatter(self, updating: set[int], before: dict[int, Tensor]) -> Callable[[], None]:
        world, rank = self.world_size, self.rank
        gathered = [e for e in self._entries if e.kind == GATHERED and e.index in updating]
        if not gathered:
            return lambda: None

        def layout_to(dest: int) -> list[tuple[_Packer, list[tuple[_Entry, int, bool]]]]:
            """What each owner sends to ``dest``: per owner a packer and (entry, item, as value)."""
            out = []
            for owner in range(world):
                packer, items = _Packer(), []
                for e in gathered:
                    if e.owner == owner:
                        wire, as_value = self._wire_dtype(e.param.dtype)
                        items.append((e, packer.add(wire, (e.shard_rows[dest], *e.param.shape[1:])), as_value))
                out.append((packer, items))
            return out

        outgoing = [layout_to(dest)[rank] for dest in range(world)]
        device = self._comm_device()
        send = torch.empty(sum(pk.nbytes for pk, _ in outgoing), dtype=torch.uint8, device=device)
        offset = 0
        for dest, (packer, items) in enumerate(outgoing):
            chunk = send[offset:offset + packer.nbytes]
            for e, item, _ in items:
                start = e.row_offsets[dest]
                packer.view(chunk, item).copy_(self._update_payload(e, before, slice(start, start + e.shard_rows[dest])))
            offset += packer.nbytes
        incoming = layout_to(rank)
        recv = torch.empty(sum(pk.nbytes for pk, _ in incoming), dtype=torch.uint8, device=device)
        work = self._all_to_all(recv, send, [pk.nbytes for pk, _ in incoming], [pk.nbytes for pk, _ in outgoing],
                                async_op=True)

        def finish() -> None:
            work.wait()
            offset = 0
            for packer, items in incoming:
                chunk = recv[offset:offset + packer.nbytes]
                for e, item, as_value in items:
                    self._apply_received(e.param.to_local(), packer.view(chunk, item), as_value)
                offset += packer.nbytes
        return finish

    # ---------------------------------------------------------------------------- refreshes
    def factors(self) -> list[Factor]:
        """Every rank's factors in (group, parameter, dim) order; the bucket and row where this
        rank holds them (the drift of a factor comes from its owner)."""
        where = self.opt._engine.where
        out: list[Factor] = []
        for e in self._entries:
            bucket, row = where[e.engine_param] if e.engine_param is not None else (None, -1)
            out.extend((e.layout, dim, bucket, row) for dim, pre in enumerate(e.layout.preconditioned) if pre)
        return out

    # ---------------------------------------------------------------------------- checkpoints
    def factor_owners(self) -> list[int]:
        return [e.owner for e in self._entries for pre in e.layout.preconditioned if pre]

    def full_state(self) -> dict[Tensor, dict]:
        if self._built is None:  # never stepped nor loaded: no state anywhere
            return {}
        return self._gather_full_state()

    def _gather_full_state(self) -> dict[Tensor, dict]:
        """The full reference-layout state of every initialised parameter, on every rank (CPU)."""
        local: dict[int, dict] = {}
        for e in self._entries:
            if e.engine_param is None:
                continue
            bucket, row = self.opt._engine.where[e.engine_param]
            if bucket.initialized[row]:
                local[e.index] = _to_cpu(to_reference_layout(bucket.row_state(row)))
        if self._group is None:
            pieces = [local]
        else:
            pieces = [None] * self.world_size
            dist.all_gather_object(pieces, local, group=self._group)
            self.comm_stats["collectives"] += 1
        out: dict[Tensor, dict] = {}
        for e in self._entries:
            if e.kind == LOCAL:
                shards = [piece[e.index] for piece in pieces if e.index in piece]
                if shards:
                    out[e.param] = _merge_shards(shards, e.layout)
            else:
                for piece in pieces:
                    if e.index in piece:
                        out[e.param] = piece[e.index]
                        break
        return out


class _ShardedTraffic(StepTraffic):
    """One step of :class:`Sharded`: the gradients hidden for the engine, the values before a
    lossy send, and which parameters were stepped and updated (the same sets on every rank)."""

    def __init__(self, placement: Sharded, loss: float | None, stepping: set[int], updating: set[int],
                 before: dict[int, Tensor], hidden: list[tuple[Tensor, Tensor | None]]) -> None:
        super().__init__(loss)
        self.placement, self.stepping, self.updating, self.before, self.hidden = placement, stepping, updating, before, hidden
        self.newly: set[int] = set()

    def engine_done(self) -> None:
        for p, grad in self.hidden:
            p.grad = grad
        for e in self.placement._entries:
            if e.kind != REPLICATED and e.engine_param is not None:
                e.engine_param.grad = None

    def send_updates(self) -> Callable[[], None]:
        place = self.placement
        self.newly = self.stepping - place._initialized
        place._initialized |= self.stepping
        return place._send_from_owners(self.updating, self.before)

    def any_update(self, updated: list[tuple[Bucket, list[int]]]) -> bool:
        return bool(self.updating)  # on some rank: the schedule advances on every rank

    def publish(self, opt: SOAP, initialized: list[Tensor]) -> None:
        if self.newly:
            self.placement.publish_live_state()


class ShardedSOAP(SOAP):
    """SOAP with its work split over the ranks of a process group (DDP and FSDP2); see the module
    docstring for the design.

    Args: every argument of :class:`~soap_kernels.SOAP`, and (keyword-only)
        process_group: the group to shard over; ``None`` means the device mesh's group for DTensor
            parameters, else the default group. Without an initialised process group the optimizer
            runs alone.
        comm_dtype: wire dtype for updates and gradients. Parameters whose dtype it holds exactly
            (the default fp32 holds fp32, bf16 and fp16) travel as values, bit for bit; for the
            others the update travels rounded to ``comm_dtype`` and every rank applies it.

    ``step`` and ``state_dict`` are collective: every rank calls them (``load_state_dict`` too,
    with the same full state dict, though it does not communicate).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *args: Any,
        process_group: Any = None,
        comm_dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        if not isinstance(comm_dtype, torch.dtype) or not comm_dtype.is_floating_point:
            raise ValueError(f"comm_dtype must be a floating-point torch.dtype, got {comm_dtype!r}")
        super().__init__(params, *args, **kwargs)
        if self._engine is None:
            raise ValueError("ShardedSOAP needs the batched engine: use backend='auto', 'torch' or 'triton', not 'reference'")
        self._placement = Sharded(process_group, comm_dtype)
        self._placement.bind(self)

    @property
    def comm_dtype(self) -> torch.dtype:
        return self._placement.comm_dtype

    @property
    def comm_stats(self) -> dict[str, int]:
        """Bytes this rank sent and received, and collectives it joined, since construction."""
        return self._placement.comm_stats

    @property
    def world_size(self) -> int:
        return self._placement.world_size

    @property
    def rank(self) -> int:
        return self._placement.rank

    def ownership(self) -> dict[str, Any]:
        """The plan: per parameter (group, parameter order) its kind and owner, and the FLOP load
        the balancer put on each rank."""
        return self._placement.ownership()


def string_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with its parameter indices as strings, for a raw
    ``torch.distributed.checkpoint`` round trip.

    DCP turns every dict key into a string, so loading into a template with integer indices adds
    string-keyed copies next to them (pytorch/pytorch#153842). With string indices in both the saved
    dict and the template, ``dcp.load`` fills the template, and ``load_state_dict`` takes it as is
    (indices only have to match those in ``param_groups``). DCP's ``get_optimizer_state_dict`` uses
    parameter names instead and needs none of this.
    """
    out = dict(state_dict)
    out["state"] = {str(k): v for k, v in state_dict["state"].items()}
    out["param_groups"] = [{**g, "params": [str(i) for i in g["params"]]} for g in state_dict["param_groups"]]
    return out


def _to_cpu(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, list):
            out[k] = [x.detach().cpu() if isinstance(x, Tensor) else x for x in v]
        else:
            out[k] = v
    return out


def _merge_shards(shards: list[dict], layout: Layout) -> dict:
    """One elementwise parameter's state from its shards' states (rank order)."""
    factors = len(layout.preconditioned)
    return {
        "step": shards[0]["step"],
        "exp_avg": torch.cat([s["exp_avg"] for s in shards]),
        "exp_avg_sq": torch.cat([s["exp_avg_sq"] for s in shards]),
        "Q": [NOT_PRECONDITIONED] * factors,
        "GG": [NOT_PRECONDITIONED] * factors,
        "GG_eigenbasis": [NOT_PRECONDITIONED] * factors,
        "Q_refreshes": [0] * factors,
    }


def _shard_state(state: dict, e: _Entry, rank: int, layout: Layout) -> dict:
    """The local shard's part of a whole elementwise parameter's state."""
    start, rows = e.row_offsets[rank], e.shard_rows[rank]
    factors = len(layout.preconditioned)
    return {
        "step": state["step"],
        "exp_avg": state["exp_avg"][start:start + rows],
        "exp_avg_sq": state["exp_avg_sq"][start:start + rows],
        "Q": [NOT_PRECONDITIONED] * factors,
        "GG": [NOT_PRECONDITIONED] * factors,
    }
