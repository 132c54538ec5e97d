"""Data parallelism over ``torch.distributed``, launched by ``torchrun``.

One process per device (or per CPU socket); ``torchrun`` starts them and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init` joins the process group from that environment (gloo on CPU, NCCL on
GPU) and is a no-op in a single process, so the same script runs either way.

Data parallelism is a transformation of the gradient path, as JAX's ``pmean``:
:func:`data_parallel` wraps an optimizer so that its ``update`` first averages the
gradients over all ranks (bucketed all-reduces over flat buffers), and
:func:`make_data_parallel_step` builds the step that also averages the metrics and
gives each rank its own dropout stream. With ``shard_optimizer_state=True``
(ZeRO-1) each rank keeps only its 1/N slice of the optimizer state: gradients are
reduce-scattered, the rule runs on the slice, and the updates are all-gathered.

Each rank trains on its shard of the global batch (:func:`shard_batch`), so a
batch is a pure function of (seed, step, rank), and a run over N ranks computes
the same update as one process over the whole global batch.

Example (runs as one process here; under ``torchrun`` the same code is data parallel):
    >>> import torch
    >>> from craftfn import TrainState, distributed, optim
    >>> distributed.init()  # False: a single process, nothing to join
    False
    >>> tx = distributed.data_parallel(optim.sgd(0.1, momentum=0.9))
    >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=tx, seed=0)
    >>> def loss_fn(state, params, batch, rng):
    ...     return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
    >>> step = distributed.make_data_parallel_step(loss_fn)
    >>> global_batch = {"x": torch.ones(8, 3), "y": torch.zeros(8, 1)}
    >>> state, metrics = step(state, distributed.shard_batch(global_batch))
    >>> sorted(metrics)
    ['grad_norm', 'loss']

Faults: every collective goes through one guard; when another rank dies (its
sockets close) or hangs past ``timeout`` the survivors raise
:class:`DistributedError`, which names the operation, the rank and the likely cause,
instead of hanging.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from craftfn import random, tree
from craftfn.optim.base import GradientTransformation, OptState, Params, Updates
from craftfn.state import TrainState, _mark_donated, check_live
from craftfn.step import LossFn, make_train_step

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_BUCKET_MB",
    "DistributedError",
    "DataParallelState",
    "init",
    "shutdown",
    "set_timeout",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "shard_batch",
    "rank_key",
    "all_reduce_mean",
    "average_metrics",
    "broadcast_tree",
    "broadcast_state",
    "broadcast_object",
    "data_parallel",
    "make_data_parallel_step",
    "gather_state",
    "shard_state",
    "opt_state_bytes",
    "save_checkpoint",
    "restore_checkpoint",
    "CheckpointCoordinator",
]

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_BUCKET_MB = 25.0
# Environment override of the default timeout, for launches that cannot pass init(timeout=...).
TIMEOUT_ENV = "CRAFTFN_DIST_TIMEOUT_S"
# Separates the per-rank key stream from the per-step keys derived from the same root.
_RANK_KEY_TAG = 0x5EED0A4B

_TIMEOUT_S: list[float] = [DEFAULT_TIMEOUT_S]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


# --------------------------------------------------------------------------- process group


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; launch with torchrun (it sets {name})")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _timeout_seconds(timeout: Union[float, int, datetime.timedelta, None]) -> float:
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or math.isinf(timeout):
        raise ValueError(f"timeout must be a positive, finite number of seconds or a timedelta, got {timeout!r}")
    return float(timeout)


def init(backend: Optional[str] = None, timeout: Union[float, datetime.timedelta, None] = None) -> bool:
    """Join the process group described by the ``torchrun`` environment; a no-op for one process.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default NCCL when CUDA is
            available, else gloo. With NCCL the process binds to ``cuda:LOCAL_RANK``.
        timeout: seconds (or a ``timedelta``) that joining and every collective may
            wait for the other ranks before failing with :class:`DistributedError`.
            Default: ``$CRAFTFN_DIST_TIMEOUT_S`` or 300 s. A rank that *dies* is
            noticed at once (its sockets close); the timeout bounds a rank that hangs.

    Returns:
        ``True`` when a process group is active (joined now or before), ``False`` when
        ``WORLD_SIZE`` is unset or 1.

    Example:
        >>> distributed.init()
        False
    """
    seconds = _timeout_seconds(timeout)
    if dist.is_available() and dist.is_initialized():
        return True
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun, which sets them")
    rank_ = _env_int("RANK")
    if not 0 <= rank_ < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank_}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'mpi', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    _TIMEOUT_S[0] = seconds
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            backend=backend, rank=rank_, world_size=world, timeout=datetime.timedelta(seconds=seconds)
        )
    except Exception as e:  # the store raises several types (DistNetworkError, RuntimeError, TimeoutError)
        raise DistributedError(
            f"rank {rank_} of {world}: could not join the process group at {where} within {seconds:g} s "
            f"(are all {world} ranks started, and is MASTER_ADDR reachable?): {e}"
        ) from e
    return True


def set_timeout(timeout: Union[float, datetime.timedelta]) -> None:
    """Change how long collectives wait for the other ranks (e.g. generous for joining, tight afterwards).

    Every rank should call it at the same point. A no-op without a process group.

    Args:
        timeout: seconds or a ``timedelta``, positive and finite.

    Example:
        >>> distributed.set_timeout(60)
    """
    seconds = _timeout_seconds(timeout)
    if not is_initialized():
        return
    from torch.distributed import distributed_c10d

    setter = getattr(distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # pragma: no cover - present in the torch versions craftfn supports
        raise NotImplementedError("this torch cannot change a process group's timeout; pass it to distributed.init(timeout=...)")
    setter(datetime.timedelta(seconds=seconds))
    _TIMEOUT_S[0] = seconds


def shutdown() -> None:
    """Leave the process group (safe to call when none is active).

    Example:
        >>> distributed.shutdown()
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether a process group is active.

    Example:
        >>> distributed.is_initialized()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the group (0 without a group).

    Example:
        >>> distributed.rank()
        0
    """
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a group).

    Example:
        >>> distributed.world_size()
        1
    """
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """The rank within this node (``$LOCAL_RANK``, 0 when unset): which local device to use.

    Example:
        >>> distributed.local_rank()
        0
    """
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0, the rank that logs and writes files.

    Example:
        >>> distributed.is_main()
        True
    """
    return rank() == 0


_this_rank = rank  # for functions whose ``rank`` argument shadows it


def _guard(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one collective, turning a backend failure into a :class:`DistributedError` that says why."""
    start = time.monotonic()
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError/DistNetworkError/gloo errors all derive from it
        if isinstance(e, DistributedError):
            raise
        waited = time.monotonic() - start
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed after {waited:.1f} s. Another rank most likely "
            f"died (its connection closed or reset) or stopped responding for longer than the timeout "
            f"({_TIMEOUT_S[0]:g} s; set it with distributed.init(timeout=...) or ${TIMEOUT_ENV}). "
            f"Check the other ranks' logs. Backend error: {str(e).strip()[:500]}"
        ) from e


def barrier(what: str = "barrier") -> None:
    """Wait until every rank reaches this point (no-op without a group).

    Args:
        what: a label for the error message if a rank never arrives.

    Example:
        >>> distributed.barrier()
    """
    if world_size() > 1:
        _guard(what, dist.barrier)


# --------------------------------------------------------------------------- data and keys


def _check_rank_world(rank_: Optional[int], world: Optional[int]) -> tuple[int, int]:
    n = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"world must be a positive int, got {n!r}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n:
        raise ValueError(f"rank must be an int in [0, {n}), got {r!r}")
    return r, n


def shard_batch(batch: Any, rank: Optional[int] = None, world: Optional[int] = None) -> Any:
    """This rank's rows of a global batch: rows ``[rank*b, (rank+1)*b)`` of every leaf, ``b = rows / world``.

    Every rank builds the same global batch from (seed, step) and keeps its shard, so
    the data a rank sees is a pure function of (seed, step, rank) and resuming replays it.

    Args:
        batch: a pytree whose tensor leaves share a leading (batch) dimension.
        rank: the shard to take (default: this process's rank).
        world: the number of shards (default: the world size).

    Returns:
        The same pytree with each tensor leaf sliced (views, no copy).

    Example:
        >>> distributed.shard_batch({"x": torch.arange(4)}, rank=1, world=2)
        {'x': tensor([2, 3])}
    """
    r, n = _check_rank_world(rank, world)

    def take(name: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() == 0:
            raise ValueError(f"shard_batch: batch leaf {name or '<batch>'!r} is 0-d; leaves need a leading batch dimension")
        rows = int(x.shape[0])
        if rows % n:
            raise ValueError(
                f"shard_batch: batch leaf {name or '<batch>'!r} has {rows} rows, not divisible by world={n}; "
                f"use a global batch size that is a multiple of {n}"
            )
        b = rows // n
        return x[r * b : (r + 1) * b]

    return tree.map_with_path(take, batch)


def rank_key(key: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
    """The key stream of one rank: ``fold_in(fold_in(key, tag), rank)``.

    Use it where ranks must draw *different* numbers (dropout on different rows);
    keep the plain key where they must agree (initialisation, data order).

    Example:
        >>> k = random.key(0)
        >>> bool((distributed.rank_key(k, 0) != distributed.rank_key(k, 1)).any())
        True
    """
    r = _this_rank() if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"rank must be a non-negative int, got {r!r}")
    return random.fold_in(random.fold_in(key, _RANK_KEY_TAG), r)


# --------------------------------------------------------------------------- collectives on pytrees


def _wire_device(device: torch.device) -> torch.device:
    """Where a tensor on ``device`` travels: NCCL moves only CUDA tensors, so CPU values (step, key) go via the GPU."""
    if device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Split consecutive tensors into buckets of at most ``bucket_bytes`` (a bigger tensor is its own bucket)."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        out.append(current)
    return out


def _flat(tensors: list[torch.Tensor], dtype: torch.dtype, pad: int = 0) -> torch.Tensor:
    parts = [t.reshape(-1).to(dtype) for t in tensors]
    if pad:
        parts.append(torch.zeros(pad, dtype=dtype, device=parts[0].device if parts else None))
    # A fresh buffer: the inputs are never written, so the step stays pure.
    return torch.cat(parts) if len(parts) != 1 else parts[0].clone()


def _all_reduce_mean_leaves(leaves: list[torch.Tensor], bucket_bytes: int) -> list[torch.Tensor]:
    n = world_size()
    if n == 1 or not leaves:
        return list(leaves)
    out: list[Any] = [None] * len(leaves)
    pending = []
    for group in tree.group_by_device_dtype(leaves):
        for idx in _buckets(group.tensors, bucket_bytes):
            ts = [group.tensors[j] for j in idx]
            flat = _flat(ts, group.dtype)
            # Launch every bucket before waiting on any, so the backend pipelines them.
            work = _guard("all_reduce of gradients", dist.all_reduce, flat, async_op=True)
            pending.append((work, flat, [group.indices[j] for j in idx], ts))
    for work, flat, indices, ts in pending:
        _guard("all_reduce of gradients", work.wait)
        flat.div_(n)  # gloo has no AVG; summing then dividing by a power of two is exact
        offset = 0
        for i, t in zip(indices, ts):
            out[i] = flat[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
    return out


def all_reduce_mean(x: Any, bucket_mb: float = DEFAULT_BUCKET_MB) -> Any:
    """The mean of a pytree of tensors over all ranks (JAX's ``pmean``); pure, bucketed.

    Leaves are packed per (device, dtype) into flat buffers of about ``bucket_mb`` MiB,
    one all-reduce per buffer, all in flight together. Without a group it returns ``x``.

    Example:
        >>> distributed.all_reduce_mean({"g": torch.ones(2)})
        {'g': tensor([1., 1.])}
    """
    bucket_bytes = _bucket_bytes(bucket_mb)
    leaves, treedef = tree.flatten(x)
    return tree.unflatten(treedef, _all_reduce_mean_leaves(leaves, bucket_bytes))


def average_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Average the floating 0-d tensors of a metrics dict over ranks (one small all-reduce).

    Other entries are returned as they are. Equal shard sizes make the average of
    per-rank means the mean over the global batch.

    Example:
        >>> distributed.average_metrics({"loss": torch.tensor(2.0)})
        {'loss': tensor(2.)}
    """
    out = dict(metrics)
    if world_size() == 1:
        return out
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()]
    if not keys:
        return out
    device = _wire_device(metrics[keys[0]].device)
    vec = torch.stack([metrics[k].detach().to(device=device, dtype=torch.float64) for k in keys])
    _guard("all_reduce of metrics", dist.all_reduce, vec)
    vec = vec / world_size()
    for k, v in zip(keys, vec.unbind()):
        out[k] = v.to(device=metrics[k].device, dtype=metrics[k].dtype)
    return out


def broadcast_tree(x: Any, src: int = 0) -> Any:
    """Every rank gets ``src``'s values of a pytree (other ranks pass a same-shaped template).

    Example:
        >>> distributed.broadcast_tree({"w": torch.ones(2)})
        {'w': tensor([1., 1.])}
    """
    n = world_size()
    if n == 1:
        return x
    _check_rank_world(src, n)
    leaves, treedef = tree.flatten(x)
    out = list(leaves)
    idx = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    tensors = [leaves[i] for i in idx]
    for group in tree.group_by_device_dtype(tensors) if tensors else []:
        # gloo has no bool reduction type; bytes travel the same.
        wire = torch.uint8 if group.dtype == torch.bool else group.dtype
        flat = _flat([t.view(wire) if wire != t.dtype else t for t in group.tensors], wire)
        flat = flat.to(_wire_device(group.device))
        _guard(f"broadcast from rank {src}", dist.broadcast, flat, src)
        flat = flat.to(group.device)
        offset = 0
        for j, t in zip(group.indices, group.tensors):
            piece = flat[offset : offset + t.numel()].view(t.shape)
            out[idx[j]] = piece.view(group.dtype) if wire != group.dtype else piece
            offset += t.numel()
    return tree.unflatten(treedef, out)


def broadcast_state(state: TrainState, src: int = 0) -> TrainState:
    """Make every rank start from ``src``'s step, params, buffers, key (and unsharded optimizer state).

    Call once after building the state, so ranks agree even if their initialisation differed.

    Example:
        >>> s = distributed.broadcast_state(TrainState.create(model=torch.nn.Linear(2, 1), tx=None))
    """
    check_live(state)
    sharded = _config_or_none(state.tx) is not None and _config_or_none(state.tx).sharded
    fields = ("step", "params", "buffers", "rng") + (() if sharded else ("opt_state",))
    values = broadcast_tree({f: getattr(state, f) for f in fields}, src)
    return state.replace(**values)


# --------------------------------------------------------------------------- data-parallel optimizer


class DataParallelState(NamedTuple):
    """Optimizer state of :func:`data_parallel`.

    ``inner``: the wrapped rule's state (with ``shard_optimizer_state=True``, of this
    rank's slice only: every parameter-shaped entry is a 1-D piece). ``grad_norm``: the
    L2 norm of the rank-averaged gradient of the last update (reported as the step's
    ``grad_norm`` metric).
    """

    inner: OptState
    grad_norm: torch.Tensor


class _Config(NamedTuple):
    inner: GradientTransformation
    sharded: bool
    bucket_bytes: int


def _config_or_none(tx: Any) -> Optional[_Config]:
    update = getattr(tx, "update", None)
    return getattr(update, "craftfn_data_parallel", None)


def _config_of(tx: Any, argname: str = "state.tx") -> _Config:
    cfg = _config_or_none(tx)
    if cfg is None:
        raise TypeError(
            f"{argname} must be a data-parallel optimizer: wrap it, e.g. "
            f"TrainState.create(..., tx=distributed.data_parallel(optim.adamw(...))); got {type(tx).__name__}"
        )
    return cfg


def _bucket_bytes(bucket_mb: Any) -> int:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be a positive number of MiB, got {bucket_mb!r}")
    return max(1, int(bucket_mb * 2**20))


def _norm_init(params: Params) -> torch.Tensor:
    leaves = tree.leaves(params)
    return torch.zeros((), dtype=torch.float32, device=leaves[0].device if leaves else None)


def _check_dp_state(state: Any) -> None:
    if not isinstance(state, DataParallelState):
        raise ValueError(
            f"data_parallel: expected a DataParallelState from init, got {type(state).__name__}; "
            "create the state with the wrapped optimizer (TrainState.create(..., tx=distributed.data_parallel(tx)))"
        )


def data_parallel(
    tx: GradientTransformation,
    *,
    shard_optimizer_state: bool = False,
    bucket_mb: float = DEFAULT_BUCKET_MB,
) -> GradientTransformation:
    """Wrap an optimizer so each update first averages the gradients over all ranks.

    The averaging sits in the gradient path (like JAX's ``pmean`` before
    ``optax.update``), so every rule in ``tx`` (clipping included) sees the global
    gradient. Gradient accumulation in the step happens before it: one reduction per step.

    Args:
        tx: the optimizer to run on the averaged gradients.
        shard_optimizer_state: ZeRO-1. Each rank keeps only its contiguous 1/N slice of
            the flattened optimizer state; gradients are reduce-scattered (all-reduced
            on gloo, whose reduce-scatter is slower than its all-reduce), ``tx`` runs on
            the slice, and the updates are all-gathered. ``tx`` sees 1-D pieces of the
            parameters, named as the parameters, so elementwise rules (sgd, momentum,
            adam, adamw, weight-decay masks by name) are exact, and so is
            ``clip_by_global_norm`` (it sums over the slices through ``extra["shard_sum"]``);
            rules that couple elements otherwise (LAMB/LARS trust ratios, factored
            moments, masks that look at shapes, ``apply_if_finite``) see only the slice.
        bucket_mb: size of the flat buffers gradients are packed into per all-reduce
            (plain data parallel; ZeRO-1 reduce-scatters one flat buffer per dtype).

    Returns:
        A ``GradientTransformation`` whose state is a :class:`DataParallelState`.

    Example:
        >>> tx = distributed.data_parallel(optim.sgd(0.1), shard_optimizer_state=True)
        >>> s = tx.init({"w": torch.ones(3)})
        >>> type(s).__name__
        'DataParallelState'
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"data_parallel: tx must be a craftfn.optim.GradientTransformation, got {type(tx).__name__}")
    if _config_or_none(tx) is not None:
        raise ValueError("data_parallel: tx is already data-parallel; wrap the plain optimizer once")
    if not isinstance(shard_optimizer_state, bool):
        raise TypeError(f"shard_optimizer_state must be a bool, got {shard_optimizer_state!r}")
    bucket_bytes = _bucket_bytes(bucket_mb)
    if shard_optimizer_state:
        return _sharded(tx, bucket_bytes)

    def reduce(updates: Updates) -> Updates:
        leaves, treedef = tree.flatten(updates)
        return tree.unflatten(treedef, _all_reduce_mean_leaves(leaves, bucket_bytes))

    def init_fn(params: Params) -> DataParallelState:
        return DataParallelState(inner=tx.init(params), grad_norm=_norm_init(params))

    def update_fn(
        updates: Updates, state: DataParallelState, params: Optional[Params] = None, **extra: Any
    ) -> tuple[Updates, DataParallelState]:
        _check_dp_state(state)
        grads = reduce(updates)
        norm = tree.global_norm(grads)
        updates, inner = tx.update(grads, state.inner, params, **extra)
        return updates, DataParallelState(inner, norm)

    donated_fn = None
    if tx.donated_update is not None:

        def donated_fn(
            updates: Updates, state: DataParallelState, params: Params, **extra: Any
        ) -> tuple[Params, DataParallelState]:
            _check_dp_state(state)
            grads = reduce(updates)
            norm = tree.global_norm(grads)
            params, inner = tx.donated_update(grads, state.inner, params, **extra)
            return params, DataParallelState(inner, norm)

    update_fn.craftfn_data_parallel = _Config(tx, False, bucket_bytes)  # type: ignore[attr-defined]
    return GradientTransformation(init_fn, update_fn, donated_fn)


class _Group(NamedTuple):
    """Where the leaves of one (device, dtype) group lie in its flat buffer, and this rank's slice of it."""

    device: torch.device
    dtype: torch.dtype
    indices: list[int]  # positions in the params' leaf list
    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]  # start of each leaf in the flat buffer
    shard: int  # elements per rank (the buffer is padded to shard * world)
    pieces: list[tuple[int, int]]  # this rank's [lo, hi) of each flattened leaf (lo == hi: none)


def _layout(params: Params, rank_: int, world: int) -> tuple[list[str], list[_Group]]:
    leaves = tree.leaves(params)
    names = tree.paths(params)
    for name, x in zip(names, leaves):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"data_parallel: parameter {name!r} must be a tensor, got {type(x).__name__}")
    groups = []
    for g in tree.group_by_device_dtype(leaves) if leaves else []:
        numels = [t.numel() for t in g.tensors]
        offsets = [0, *itertools.accumulate(numels)][:-1]
        shard = -(-sum(numels) // world)
        lo_r, hi_r = rank_ * shard, (rank_ + 1) * shard
        pieces = []
        for o, m in zip(offsets, numels):
            lo, hi = min(max(lo_r - o, 0), m), min(max(hi_r - o, 0), m)
            pieces.append((lo, hi) if hi > lo else (0, 0))
        groups.append(
            _Group(g.device, g.dtype, g.indices, [names[i] for i in g.indices], [t.shape for t in g.tensors], offsets, shard, pieces)
        )
    return names, groups


def _is_params_dict(names: frozenset[str]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, dict) and len(x) == len(names) and x.keys() == names


def _slice_params_dict(full: Mapping[str, torch.Tensor], groups: list[_Group]) -> dict[str, torch.Tensor]:
    """This rank's 1-D pieces of a parameter-shaped dict (copies)."""
    out = {}
    for g in groups:
        for name, (lo, hi) in zip(g.names, g.pieces):
            out[name] = full[name].reshape(-1)[lo:hi].clone()
    return out


def _gather_params_dict(
    pieces: Mapping[str, torch.Tensor], groups: list[_Group], dst: Optional[int]
) -> Optional[dict[str, torch.Tensor]]:
    """Reassemble a parameter-shaped dict from every rank's pieces (on ``dst``, or everywhere if None)."""
    n, r = world_size(), rank()
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        parts = [pieces[name] for name in g.names]
        dtypes = {p.dtype for p in parts}
        if len(dtypes) != 1:
            raise TypeError(f"gather_state: optimizer-state pieces of one parameter group differ in dtype: {sorted(map(str, dtypes))}")
        dtype = parts[0].dtype
        mine = _flat(parts, dtype, pad=g.shard - sum(p.numel() for p in parts))
        if n == 1:
            full = mine
        elif dst is None:
            full = mine.new_empty(g.shard * n)
            _guard("all_gather of optimizer state", dist.all_gather_single, full, mine)
        else:
            bufs = [mine.new_empty(g.shard) for _ in range(n)] if r == dst else None
            _guard(f"gather of optimizer state to rank {dst}", dist.gather, mine, bufs, dst)
            if r != dst:
                continue
            full = torch.cat(bufs)
        for name, shape, o in zip(g.names, g.shapes, g.offsets):
            out[name] = full[o : o + math.prod(shape)].view(shape)
    return out if (dst is None or r == dst) else None


def _sharded(tx: GradientTransformation, bucket_bytes: int) -> GradientTransformation:
    cache: dict[Any, tuple[list[str], list[_Group]]] = {}

    def layout(params: Params) -> tuple[list[str], list[_Group]]:
        leaves, treedef = tree.flatten(params)
        key = (treedef, tuple((tuple(x.shape), x.dtype, x.device) for x in leaves), rank(), world_size())
        if key not in cache:
            cache.clear()  # one layout per run; do not grow without bound
            cache[key] = _layout(params, rank(), world_size())
        return cache[key]

    def init_fn(params: Params) -> DataParallelState:
        _, groups = layout(params)
        full = dict(zip(tree.paths(params), tree.leaves(params)))
        return DataParallelState(inner=tx.init(_slice_params_dict(full, groups)), grad_norm=_norm_init(params))

    def scatter_grads(updates: Updates, state: DataParallelState, params: Params) -> tuple[Any, ...]:
        """Reduce-scatter the gradients: this rank's averaged slice, as pieces named like the params.

        The slices are views into a fresh buffer, so sh.div_ below touches no caller tensor.
        """
        _check_dp_state(state)
        if params is None:
            raise ValueError("data_parallel(shard_optimizer_state=True): update needs params (apply_gradients passes them)")
        n = world_size()
        names, groups = layout(params)
        p_leaves, treedef = tree.flatten(params)
        g_leaves = treedef.flatten_up_to(updates)
        shards, pending = [], []
        for g in groups:
            flat = _flat([g_leaves[i] for i in g.indices], g.dtype, pad=g.shard * n - sum(map(math.prod, g.shapes)))
            if n == 1:
                shards.append(flat)
            elif dist.get_backend() == "gloo":
                # gloo's reduce-scatter is several times slower than its all-reduce on CPU (measured:
                # ~96 vs ~15-55 ms for 12 MB at 2 ranks), so reduce everything and keep the slice.
                pending.append(_guard("all_reduce of gradients", dist.all_reduce, flat, async_op=True))
                shards.append(flat[rank() * g.shard : (rank() + 1) * g.shard])
            else:
                shard = flat.new_empty(g.shard)
                pending.append(_guard("reduce_scatter of gradients", dist.reduce_scatter_single, shard, flat, async_op=True))
                shards.append(shard)
        for work in pending:
            _guard("reduce-scatter of gradients", work.wait)
        if n > 1:
            for sh in shards:
                sh.div_(n)
        g_pieces = {}
        for g, sh in zip(groups, shards):
            at = 0
            for name, (lo, hi) in zip(g.names, g.pieces):
                g_pieces[name] = sh[at : at + hi - lo]
                at += hi - lo
        _check_shard_sizes(state.inner, g_pieces, frozenset(names))
        # The global norm: squares summed on each slice (padding is zero), then over ranks.
        sq = torch.stack([torch.sum(sh.float() ** 2) for sh in shards]).sum() if shards else torch.zeros(())
        return groups, p_leaves, treedef, g_pieces, torch.sqrt(_shard_sum(sq))

    def gather(groups: list[_Group], mine: list[torch.Tensor]) -> list[torch.Tensor]:
        """All-gather every rank's flat slice: the whole flat buffer of each group."""
        if world_size() == 1:
            return mine
        fulls, pending = [], []
        for g, m in zip(groups, mine):
            full = m.new_empty(g.shard * world_size())
            pending.append(_guard("all_gather of updates", dist.all_gather_single, full, m, async_op=True))
            fulls.append(full)
        for work in pending:
            _guard("all_gather of updates", work.wait)
        return fulls

    def update_fn(
        updates: Updates, state: DataParallelState, params: Optional[Params] = None, **extra: Any
    ) -> tuple[Updates, DataParallelState]:
        groups, p_leaves, treedef, g_pieces, norm = scatter_grads(updates, state, params)
        p_pieces = {
            name: p_leaves[i].reshape(-1)[lo:hi] for g in groups for i, name, (lo, hi) in zip(g.indices, g.names, g.pieces)
        }
        # The rule on this rank's slice only; rules that need a sum over the whole gradient
        # (clip_by_global_norm) get it through extra["shard_sum"].
        u_pieces, inner = tx.update(g_pieces, state.inner, p_pieces, shard_sum=_shard_sum, **extra)
        # All-gather the updates; every rank adds them to its full parameters (apply_updates).
        mine = [
            _flat([u_pieces[name] for name in g.names], g.dtype, pad=g.shard - sum(hi - lo for lo, hi in g.pieces))
            for g in groups
        ]
        out: list[Any] = [None] * len(p_leaves)
        for g, full in zip(groups, gather(groups, mine)):
            for i, shape, o in zip(g.indices, g.shapes, g.offsets):
                out[i] = full[o : o + math.prod(shape)].view(shape)
        return tree.unflatten(treedef, out), DataParallelState(inner, norm)

    def donated_fn(updates: Updates, state: DataParallelState, params: Params, **extra: Any) -> tuple[Params, DataParallelState]:
        groups, p_leaves, treedef, g_pieces, norm = scatter_grads(updates, state, params)
        # A contiguous copy of this rank's parameter slice that the rule may update in place
        # (fused kernels); the whole parameters are then overwritten from the gathered slices.
        mine = [
            _flat([p_leaves[i].reshape(-1)[lo:hi] for i, (lo, hi) in zip(g.indices, g.pieces)], g.dtype,
                  pad=g.shard - sum(hi - lo for lo, hi in g.pieces))
            for g in groups
        ]
        p_pieces = {}
        for g, m in zip(groups, mine):
            at = 0
            for name, (lo, hi) in zip(g.names, g.pieces):
                p_pieces[name] = m[at : at + hi - lo]
                at += hi - lo
        if tx.donated_update is not None:
            new_pieces, inner = tx.donated_update(g_pieces, state.inner, p_pieces, shard_sum=_shard_sum, **extra)
            for name, piece in p_pieces.items():
                if new_pieces[name] is not piece and piece.numel():
                    piece.copy_(new_pieces[name])  # the rule returned fresh tensors
        else:
            u_pieces, inner = tx.update(g_pieces, state.inner, p_pieces, shard_sum=_shard_sum, **extra)
            names = [n for g in groups for n in g.names]
            torch._foreach_add_([p_pieces[n] for n in names], [u_pieces[n].to(p_pieces[n].dtype) for n in names])
        for g, full in zip(groups, gather(groups, mine)):
            dst = [p_leaves[i] for i in g.indices]
            src = [full[o : o + math.prod(shape)].view(shape) for shape, o in zip(g.shapes, g.offsets)]
            torch._foreach_copy_(dst, src)
        return params, DataParallelState(inner, norm)

    update_fn.craftfn_data_parallel = _Config(tx, True, bucket_bytes)  # type: ignore[attr-defined]
    update_fn.craftfn_layout = layout  # type: ignore[attr-defined]
    return GradientTransformation(init_fn, update_fn, donated_fn)


def _shard_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks' shards (an all-reduce; ``x`` itself is not modified)."""
    if world_size() == 1:
        return x
    total = x.detach().to(_wire_device(x.device), copy=True)
    _guard("all_reduce of a sum over optimizer shards", dist.all_reduce, total)
    return total.to(x.device)


def _check_shard_sizes(inner: Any, pieces: Mapping[str, torch.Tensor], names: frozenset[str]) -> None:
    """Fail clearly when a sharded state was made for another world size or rank (cheap: shapes only)."""
    is_pd = _is_params_dict(names)
    found: list[Any] = []
    tree.map(lambda x: found.append(x) if is_pd(x) else None, inner, is_leaf=is_pd)
    for sub in found[:1]:
        for name, p in pieces.items():
            x = sub[name]
            if isinstance(x, torch.Tensor) and x.numel() != p.numel():
                raise ValueError(
                    f"data_parallel(shard_optimizer_state=True): the optimizer state holds {x.numel()} elements of "
                    f"{name!r} but this rank (rank {rank()} of {world_size()}) owns {p.numel()}: the state was sharded "
                    "for another world size. Restore through distributed.restore_checkpoint or distributed.shard_state."
                )


def opt_state_bytes(opt_state: Any) -> int:
    """Bytes held by the tensors of an optimizer state on this rank (to measure ZeRO-1's saving).

    Example:
        >>> distributed.opt_state_bytes(optim.sgd(0.1, momentum=0.9).init({"w": torch.ones(4)}))
        16
    """
    return sum(x.numel() * x.element_size() for x in tree.leaves(opt_state) if isinstance(x, torch.Tensor))


# --------------------------------------------------------------------------- the step


def make_data_parallel_step(
    loss_fn: LossFn, *, shard_global_batch: bool = False, **step_options: Any
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, torch.Tensor]]]:
    """The data-parallel training step: ``step(state, local_batch) -> (state, metrics)``.

    It is :func:`craftfn.make_train_step` with three differences: ``state.tx`` must be
    wrapped by :func:`data_parallel` (which averages the gradients); each rank runs its
    forward under its own key (:func:`rank_key`, so dropout differs across ranks while
    the state's key stays the same everywhere); and the metrics are averaged over
    ranks, with ``grad_norm`` the norm of the averaged gradient. Without a process
    group it computes exactly what ``make_train_step`` does.

    Args:
        loss_fn: as in :func:`craftfn.make_train_step`.
        shard_global_batch: the step takes the *global* batch (the same on every rank)
            and keeps this rank's rows itself (:func:`shard_batch`); by default it takes
            the rank's shard.
        step_options: ``accum_steps``, ``donate``, ``policy``, ``remat`` as in
            :func:`craftfn.make_train_step`. ``compile`` is not supported (the collectives are
            not traced; compile the model), nor is ``loss_scale`` (fp16) yet.

    Returns:
        The step; give it this rank's shard of the global batch (:func:`shard_batch`),
        or the global batch with ``shard_global_batch=True``.

    Example:
        >>> step = distributed.make_data_parallel_step(lambda s, p, b, rng: s.apply(p, b["x"]).pow(2).mean(), accum_steps=2)
        >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=distributed.data_parallel(optim.adamw(1e-3)))
        >>> state, metrics = step(state, distributed.shard_batch({"x": torch.ones(8, 3)}))
        >>> int(state.step)
        1
    """
    if step_options.get("compile"):
        raise ValueError(
            "make_data_parallel_step: compile= is not supported (the gradient collectives run eagerly); "
            "compile the model inside loss_fn instead"
        )
    if step_options.get("loss_scale") not in (None, False):
        raise ValueError(
            "make_data_parallel_step: loss_scale= is not supported yet: the step checks its gradients for "
            "inf/NaN before the optimizer averages them, so ranks could disagree on skipping a step; "
            "train in bf16 (policy='bf16', no loss scaling) or in one process"
        )
    if not isinstance(shard_global_batch, bool):
        raise TypeError(f"shard_global_batch must be a bool, got {shard_global_batch!r}")
    inner = make_train_step(loss_fn, **step_options)
    donate = bool(step_options.get("donate", False))

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        check_live(state)
        _config_of(state.tx)
        key = state.rng
        local = state.replace(rng=rank_key(key)) if world_size() > 1 else state
        new_state, metrics = inner(local, shard_batch(batch) if shard_global_batch else batch)
        if donate:
            _mark_donated(state)
        metrics = average_metrics(metrics)
        metrics["grad_norm"] = new_state.opt_state.grad_norm
        return new_state.replace(rng=key), metrics

    step.accum_steps = inner.accum_steps  # type: ignore[attr-defined]
    step.donate = donate  # type: ignore[attr-defined]
    return step


# --------------------------------------------------------------------------- checkpoints


def gather_state(state: TrainState, dst: Optional[int] = 0) -> Optional[TrainState]:
    """The single-process form of a data-parallel state: ``tx`` unwrapped, optimizer state whole.

    A collective: every rank calls it. The result is what one process running the
    plain optimizer would hold, so it can be saved and restored with any world size
    (or none). With a sharded state the slices are gathered to ``dst`` (the others get
    ``None``), or to every rank when ``dst`` is ``None``.

    Example:
        >>> s = TrainState.create(model=torch.nn.Linear(2, 1), tx=distributed.data_parallel(optim.sgd(0.1)))
        >>> type(distributed.gather_state(s).opt_state).__name__
        'tuple'
    """
    check_live(state)
    cfg = _config_of(state.tx)
    opt_state = state.opt_state
    _check_dp_state(opt_state)
    if dst is not None:
        _check_rank_world(dst, None)
    if not cfg.sharded:
        if dst is not None and rank() != dst:
            return None
        return state.replace(tx=cfg.inner, opt_state=opt_state.inner)
    names, groups = state.tx.update.craftfn_layout(state.params)
    treedef = tree.structure(state.params)
    is_pd = _is_params_dict(frozenset(names))

    def whole(pieces: Any) -> Any:
        full = _gather_params_dict(pieces, groups, dst)
        # Back to the parameters' own structure: what tx.init(params) makes in one process.
        return None if full is None else tree.unflatten(treedef, [full[n] for n in names])

    inner = tree.map(lambda x: whole(x) if is_pd(x) else x, opt_state.inner, is_leaf=is_pd)
    if dst is not None and rank() != dst:
        return None
    return state.replace(tx=cfg.inner, opt_state=inner)


def shard_state(state: TrainState, tx: GradientTransformation) -> TrainState:
    """The inverse of :func:`gather_state`: put a single-process state under the data-parallel ``tx``.

    Args:
        state: a state whose ``tx`` is the plain optimizer (e.g. restored from a checkpoint).
        tx: the :func:`data_parallel` wrapper of that optimizer; with sharding, this rank
            keeps its slice of the optimizer state.

    Example:
        >>> tx = distributed.data_parallel(optim.sgd(0.1, momentum=0.9), shard_optimizer_state=True)
        >>> plain = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1, momentum=0.9))
        >>> type(distributed.shard_state(plain, tx).opt_state).__name__
        'DataParallelState'
    """
    check_live(state)
    cfg = _config_of(tx, "tx")
    inner = state.opt_state
    if isinstance(inner, DataParallelState):
        raise ValueError("shard_state: state is already data-parallel; pass the result of gather_state")
    if cfg.sharded:
        _, groups = tx.update.craftfn_layout(state.params)
        treedef = tree.structure(state.params)

        def is_param_shaped(x: Any) -> bool:
            return not isinstance(x, torch.Tensor) and tree.structure(x) == treedef

        def pieces(x: Any) -> dict[str, torch.Tensor]:
            return _slice_params_dict(dict(zip(tree.paths(x), tree.leaves(x))), groups)

        inner = tree.map(lambda x: pieces(x) if is_param_shaped(x) else x, inner, is_leaf=is_param_shaped)
    return state.replace(tx=tx, opt_state=DataParallelState(inner, _norm_init(state.params)))


def _bcast_object(value: Any, what: str, src: int = 0) -> Any:
    box = [value]
    _guard(what, dist.broadcast_object_list, box, src)
    return box[0]


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Every rank gets ``src``'s (picklable) ``value``; for decisions all ranks must share.

    Example:
        >>> distributed.broadcast_object({"resume": True})
        {'resume': True}
    """
    if world_size() == 1:
        return value
    _check_rank_world(src, None)
    return _bcast_object(value, f"broadcast of an object from rank {src}", src)


def _on_main(what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main rank and give every rank its result, or raise its exception everywhere."""
    if world_size() == 1:
        return fn()
    outcome: Any = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:  # re-raised below, on every rank alike
            outcome = ("error", e)
    try:
        outcome = _bcast_object(outcome, f"broadcast of the main rank's {what}")
    except DistributedError:
        raise
    except Exception as e:  # the result or the exception could not be pickled
        outcome = ("error", DistributedError(f"the main rank's {what} could not be sent to the other ranks: {e}"))
    kind, value = outcome
    if kind == "error":
        raise value
    return value


def save_checkpoint(manager: Any, step: int, state: Any, *args: Any, **kwargs: Any) -> Any:
    """Save a data-parallel state through a checkpoint manager: ranks agree, the main rank writes.

    Every rank calls it. A data-parallel state is first brought to its single-process
    form (:func:`gather_state`), so the checkpoint restores with any number of ranks,
    or in a plain single-process run; any other state is taken as replicated and
    saved as it is. The ranks meet before the write and learn its outcome after it:
    an error in the write is raised on every rank.

    Args:
        manager: anything with ``save(step, state, ...)``, e.g.
            ``craftfn.training.CheckpointManager``; only the main rank's is used (others may pass None).
        step: the step number to save under.
        state: the state to save.
        args, kwargs: passed on to ``manager.save`` (metrics, extra, ...).

    Returns:
        What ``manager.save`` returned (on every rank).

    Example:
        >>> distributed.save_checkpoint(manager, int(state.step), state)  # doctest: +SKIP
    """
    plain = gather_state(state, dst=0) if _config_or_none(getattr(state, "tx", None)) is not None else state
    barrier("barrier before writing a checkpoint")
    return _on_main("checkpoint save", lambda: manager.save(step, plain, *args, **kwargs))


def _plain_template(template: Any) -> Any:
    cfg = _config_or_none(getattr(template, "tx", None))
    if cfg is None:
        return template
    if not cfg.sharded:
        return template.replace(tx=cfg.inner, opt_state=template.opt_state.inner)
    # The whole optimizer state is allocated once here, only to give the restore its shapes.
    return template.replace(tx=cfg.inner, opt_state=cfg.inner.init(template.params))


def restore_checkpoint(manager: Any, template: Any, *args: Any, **kwargs: Any) -> Any:
    """Restore a checkpoint written by :func:`save_checkpoint` (by any number of ranks) into ``template``.

    The main rank reads it (so only it needs the files) and broadcasts the state; with
    a sharded optimizer every rank then keeps its slice. Every rank calls it; an error
    on the main rank (e.g. ``FileNotFoundError``: nothing to restore) is raised on every rank.

    Args:
        manager: anything with ``restore(template, ...) -> state`` (main rank only; others may pass None).
        template: a state of the run (e.g. the freshly created one), data-parallel or not.
        args, kwargs: passed on to ``manager.restore`` (step, fallback, ...).

    Returns:
        The restored state, under ``template.tx``.

    Example:
        >>> state = distributed.restore_checkpoint(manager, state, step="latest")  # doctest: +SKIP
    """
    if isinstance(template, TrainState):
        check_live(template, "template")
    plain = _plain_template(template)
    box: dict[str, Any] = {}

    def read() -> None:
        box["state"] = manager.restore(plain, *args, **kwargs)

    _on_main("checkpoint restore", read)
    # Tensors travel by one broadcast per (device, dtype), not through pickle.
    restored = broadcast_tree(box["state"] if is_main() else plain, 0)
    if plain is template:
        return restored
    return shard_state(restored.replace(tx=plain.tx), template.tx)


class CheckpointCoordinator:
    """A checkpoint manager for data-parallel runs: every rank calls it, the main rank's manager does the I/O.

    It has the interface the :class:`~craftfn.training.Trainer` uses (``save``,
    ``restore``, ``latest_step``, ``metadata``, ``wait``, ``close``), so a Trainer on every
    rank drives it as it would a ``CheckpointManager``. Saves go through
    :func:`save_checkpoint`, restores through :func:`restore_checkpoint`; answers
    (latest step, metadata) and errors come from the main rank, so all ranks take the
    same decisions. Build the real manager on the main rank only: two managers on one
    directory would race (each cleans the other's temporary files).

    Args:
        manager: the main rank's manager (e.g. ``CheckpointManager(dir)``); ``None`` elsewhere.

    Example:
        >>> from craftfn.training import CheckpointManager
        >>> ckpt = distributed.CheckpointCoordinator(CheckpointManager(d) if distributed.is_main() else None)  # doctest: +SKIP
    """

    def __init__(self, manager: Any) -> None:
        if is_main() and manager is None:
            raise ValueError("CheckpointCoordinator: the main rank needs a manager (e.g. CheckpointManager(directory))")
        self.manager = manager if is_main() else None

    def save(self, step: int, state: Any, metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> Any:
        """Save (collective); see :func:`save_checkpoint`."""
        return save_checkpoint(self.manager, step, state, metrics=metrics, extra=extra)

    def restore(self, template: Any, step: Any = "latest", fallback: bool = False) -> Any:
        """Restore (collective); see :func:`restore_checkpoint`."""
        return restore_checkpoint(self.manager, template, step=step, fallback=fallback)

    def latest_step(self) -> Optional[int]:
        """The main rank's newest step (collective)."""
        return _on_main("latest checkpoint step", lambda: self.manager.latest_step())

    def all_steps(self) -> list[int]:
        """The main rank's steps (collective)."""
        return _on_main("list of checkpoint steps", lambda: self.manager.all_steps())

    def metadata(self, step: Any = "latest") -> dict[str, Any]:
        """The main rank's metadata of a step (collective)."""
        return _on_main("checkpoint metadata", lambda: self.manager.metadata(step))

    def wait(self) -> None:
        """Wait until the main rank's pending write is on disk (collective)."""
        _on_main("checkpoint write", lambda: self.manager.wait() if hasattr(self.manager, "wait") else None)

    def close(self) -> None:
        """Finish writes and close the main rank's manager (collective, except while an error unwinds)."""
        if sys.exc_info()[0] is not None:
            # Called from a `finally` during an error (maybe a dead rank): the other ranks may never
            # arrive, so close locally only.
            self._close_local()
            return
        _on_main("checkpoint close", self._close_local)

    def _close_local(self) -> None:
        if self.manager is not None and hasattr(self.manager, "close"):
            self.manager.close()

    def __enter__(self) -> CheckpointCoordinator:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self._close_local()
            return
        self.close()
