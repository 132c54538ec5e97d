"""The optimizer state and configuration of a data-parallel optimizer (plain data parallel, ZeRO-1 and ZeRO-3)."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import GradientTransformation, OptState, Params


class DataParallelState(NamedTuple):
    """Optimizer state of :func:`data_parallel`.

    ``inner``: the wrapped rule's state (with ``shard_optimizer_state=True``, of this
    rank's slice only: every parameter-shaped entry is a 1-D piece; fully sharded, every
    parameter-shaped entry is a ``DTensor`` sharded like its parameter). ``grad_norm``: the
    L2 norm of the rank-averaged gradient of the last update (reported as the step's
    ``grad_norm`` metric).
    """

    inner: OptState
    grad_norm: torch.Tensor


class _Config(NamedTuple):
    inner: GradientTransformation
    sharded: bool  # ZeRO-1: the optimizer state is sliced (flat pieces)
    bucket_bytes: int
    fully_sharded: bool = False  # ZeRO-3: parameters, gradients and optimizer state are DTensors


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




def _norm_init(params: Params) -> torch.Tensor:
    leaves = tree.leaves(params)
    return torch.zeros((), dtype=torch.float32, device=leaves[0].device if leaves else None)


def _check_dp_state(state: Any) -> None:
    if not isinstance(state, DataParallelState):
        raise ValueError(
            f"data_parallel: expected a DataParallelState from init, got {type(state).__name__}; "
            "create the state with the wrapped optimizer (TrainState.create(..., tx=distributed.data_parallel(tx)))"
        )


def local_bytes(x: Any) -> int:
    """Bytes this rank holds for the tensors of a pytree; a ``DTensor`` counts only its local shard.

    Example:
        >>> distributed.local_bytes({"w": torch.ones(4), "step": torch.zeros((), dtype=torch.int64)})
        24
    """
    total = 0
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())  # not imported: no DTensors
    for leaf in tree.leaves(x):
        if isinstance(leaf, dtensor):
            leaf = leaf.to_local()
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
    return total


def opt_state_bytes(opt_state: Any) -> int:
    """Bytes held by the tensors of an optimizer state on this rank (to measure ZeRO-1/ZeRO-3's saving).

    Example:
        >>> distributed.opt_state_bytes(optim.sgd(0.1, momentum=0.9).init({"w": torch.ones(4)}))
        16
    """
    return local_bytes(opt_state)
