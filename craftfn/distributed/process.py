"""Joining the process group that ``torchrun`` describes, and the guard every collective goes through.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` joins from that environment and is a no-op in
a single process. :func:`_guard` turns a backend failure (a dead or hung rank) into a
:class:`DistributedError` that names the operation, the rank and the likely cause.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
# Environment override of the default timeout, for launches that cannot pass init(timeout=...).
TIMEOUT_ENV = "CRAFTFN_DIST_TIMEOUT_S"

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

def _check_rank_world(rank_: Optional[int], world: Optional[int]) -> tuple[int, int]:
    n = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"world must be a positive int, got {n!r}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n:
        raise ValueError(f"rank must be an int in [0, {n}), got {r!r}")
    return r, n
