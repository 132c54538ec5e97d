"""Running an update rule on shards of the parameters, and the rules that cannot be run that way.

With a sharded optimizer (``craftfn.distributed``: ZeRO-1 shards the optimizer state, ZeRO-3
the parameters too) each rank runs the rule on its own shard of every parameter. Elementwise
rules (sgd, momentum, adam, adamw, lion, ...) give exactly what one process gives. Rules that
look at whole tensors do not: a trust ratio, a factored moment, a mask decided by a parameter's
shape would see a shard. The sharding code runs every ``init`` and ``update`` inside
:func:`sharded`, which tells such rules what they need:

- ``shard_sum(x)``: the sum of ``x`` over all ranks' shards (one all-reduce), so a norm over a
  whole tensor is ``sqrt(shard_sum(sum of squares of my shard))``;
- ``whole``: each parameter's whole shape and dtype (a ``meta`` tensor, by dotted name), so a
  mask such as ``lambda name, p: p.ndim >= 2`` decides as in one process.

A rule that cannot be made exact calls :func:`refuse_sharded` first thing, which raises
:class:`ShardingError` naming the rule when it runs on shards (and does nothing otherwise).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> optim.current_sharding() is None  # one process, whole tensors
    True
    >>> info = optim.Sharding("ZeRO-3", {"w": torch.empty(4, 2, device="meta")}, shard_sum=lambda x: 2 * x)
    >>> with optim.sharded(info):
    ...     optim.refuse_sharded("my_rule", "it normalizes each whole matrix")
    Traceback (most recent call last):
    ...
    craftfn.optim.sharding.ShardingError: my_rule cannot run under ZeRO-3: it normalizes each whole matrix. ...
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import torch

__all__ = ["Sharding", "ShardingError", "sharded", "current_sharding", "refuse_sharded", "whole_leaves"]


class ShardingError(ValueError):
    """An update rule that needs whole tensors was asked to run on shards (ZeRO-1/ZeRO-3)."""


class Sharding(NamedTuple):
    """What a rule running on shards may ask for (see the module docstring).

    ``mode``: ``"ZeRO-1"`` or ``"ZeRO-3"`` (for messages). ``whole``: dotted parameter name ->
    a ``meta`` tensor with the whole parameter's shape and dtype. ``shard_sum``: sums a tensor
    over all ranks (a collective: every rank calls it alike).
    """

    mode: str
    whole: Mapping[str, torch.Tensor]
    shard_sum: Callable[[torch.Tensor], torch.Tensor]


_LOCAL = threading.local()


def current_sharding() -> Optional[Sharding]:
    """The :class:`Sharding` of the rule call in progress, or ``None`` on whole tensors.

    Example:
        >>> optim.current_sharding() is None
        True
    """
    return getattr(_LOCAL, "sharding", None)


@contextlib.contextmanager
def sharded(sharding: Sharding) -> Iterator[Sharding]:
    """Run the enclosed ``init``/``update`` calls as calls on shards (used by ``craftfn.distributed``).

    Example:
        >>> with optim.sharded(optim.Sharding("ZeRO-1", {}, shard_sum=lambda x: x)) as s:
        ...     optim.current_sharding() is s
        True
    """
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharded: expected an optim.Sharding, got {type(sharding).__name__}")
    previous = current_sharding()
    _LOCAL.sharding = sharding
    try:
        yield sharding
    finally:
        _LOCAL.sharding = previous


def refuse_sharded(rule: str, why: str) -> None:
    """Raise :class:`ShardingError` naming ``rule`` when it runs on shards; do nothing otherwise.

    Call it at the top of the ``update`` (and ``init``) of a rule that needs whole tensors.

    Example:
        >>> optim.refuse_sharded("scale_by_factored_rms", "its moments are row and column means")  # whole tensors: fine
    """
    s = current_sharding()
    if s is not None:
        raise ShardingError(
            f"{rule} cannot run under {s.mode}: {why}. Each rank holds only a shard of every parameter, so the "
            f"result would differ from one process. Use an elementwise rule (sgd, adam, adamw, lion, ...; clipping "
            f"by global norm and LAMB/LARS trust ratios are exact), or train without sharding the optimizer state."
        )


def whole_leaves(names: list[str], leaves: list[Any]) -> list[Any]:
    """The leaves as a rule should see them to decide by shape: whole-parameter ``meta`` tensors when sharded.

    Leaves whose name is not a parameter's (or any leaf without sharding) are returned as they are.

    Example:
        >>> optim.whole_leaves(["w"], [torch.ones(2)])
        [tensor([1., 1.])]
    """
    s = current_sharding()
    if s is None:
        return list(leaves)
    return [s.whole.get(name, leaf) for name, leaf in zip(names, leaves)]
