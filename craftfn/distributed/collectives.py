"""Collectives on pytrees: bucketed means, metric averages, broadcasts, and running a function on the main rank."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from craftfn import tree
from craftfn.distributed.process import DistributedError, _check_rank_world, _guard, is_main, world_size

DEFAULT_BUCKET_MB = 25.0

def _bucket_bytes(bucket_mb: Any) -> int:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be a positive number of MiB, got {bucket_mb!r}")
    return max(1, int(bucket_mb * 2**20))


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


def _shard_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks' shards (an all-reduce; ``x`` itself is not modified)."""
    if world_size() == 1:
        return x
    total = x.detach().to(_wire_device(x.device), copy=True)
    _guard("all_reduce of a sum over optimizer shards", dist.all_reduce, total)
    return total.to(x.device)


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
