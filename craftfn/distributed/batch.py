"""Each rank's rows of the global batch, and each rank's own key stream."""

from __future__ import annotations

from typing import Any, Optional

import torch

from craftfn import random, tree
from craftfn.distributed.process import _check_rank_world, _this_rank

# Separates the per-rank key stream from the per-step keys derived from the same root.
_RANK_KEY_TAG = 0x5EED0A4B


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
