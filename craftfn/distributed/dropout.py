"""Dropout masks of the global batch: a data-parallel run that draws what one process draws.

Each rank trains on rows ``[r*b, (r+1)*b)`` of the global batch. Under
:func:`global_batch_masks` every Bernoulli draw of a tensor whose leading dimension is the
batch (``F.dropout``, ``nn.Dropout``, the dropout inside ``scaled_dot_product_attention``) is
made for the whole global batch (``world * b`` rows) from torch's generator, which every rank
seeded from the same step key, and the rank keeps its own rows. So the masks, and the whole
run, equal one process over the global batch, at the price of drawing ``world`` times the
random numbers. The default of the data-parallel step (``dropout="per_rank"``) draws only the
rank's rows, from a key of its own: cheaper, and a valid but different random draw.

The equality holds for activations whose leading dimension is the batch (row-major over it),
as in craftfn's GPT and most models.

Example:
    >>> import torch
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> whole = torch.nn.functional.dropout(torch.ones(4, 2), 0.5)
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> with global_batch_masks(rank=1, world=2):
    ...     mine = torch.nn.functional.dropout(torch.ones(2, 2), 0.5)
    >>> torch.equal(mine, whole[2:])
    True
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from craftfn.random import _rows_of_global_batch

__all__ = ["global_batch_masks"]

_aten = torch.ops.aten


class _GlobalBatchBernoulli(TorchDispatchMode):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.rank = rank
        self.world = world

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten.bernoulli_.float and kwargs.get("generator") is None and args[0].dim() > 0:
            x = args[0]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            rows = x.shape[0]
            whole = torch.empty((rows * self.world, *x.shape[1:]), dtype=x.dtype, device=x.device)
            whole.bernoulli_(p)
            x.copy_(whole[self.rank * rows : (self.rank + 1) * rows])
            return x
        return func(*args, **kwargs)


@contextlib.contextmanager
def global_batch_masks(rank: int, world: int) -> Iterator[None]:
    """Draw Bernoulli (dropout) masks for the global batch and keep rows ``[rank*b, (rank+1)*b)``.

    Args:
        rank: this rank's position in the global batch.
        world: the number of ranks (the global batch has ``world`` times the local rows).

    Example:
        >>> with global_batch_masks(rank=0, world=1):
        ...     pass
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    if world == 1:
        yield
        return
    # Keyed module randomness (craftfn.random.module_rng, as in the steps) takes this rank's block of
    # the global batch's counters; torch's unkeyed Bernoulli draws for the global batch and keeps the rows.
    with _rows_of_global_batch(rank, world), _GlobalBatchBernoulli(rank, world):
        yield
