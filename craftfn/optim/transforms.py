"""Primitive gradient transformations (optax's ``transform`` module for craftfn).

Every primitive works on whole leaf lists with multi-tensor ``torch._foreach_*``
kernels, grouped by (device, dtype); none loops over leaves doing small ops.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.trace(decay=0.9)
    >>> s = tx.init({"w": torch.zeros(1)})
    >>> u, s = tx.update({"w": torch.ones(1)}, s)
    >>> u
    {'w': tensor([1.])}
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    check_hyperparameter,
    check_updates_match,
)

__all__ = [
    "ScaleState",
    "ScaleByScheduleState",
    "TraceState",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "trace",
    "foreach_groups",
]


def foreach_groups(fn: Callable[..., list[torch.Tensor] | None], *lists: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Call ``fn(*tensor_lists)`` once per (device, dtype) group of ``lists[0]``.

    Returns the results scattered back into the original order, or ``None`` when
    ``fn`` works in place and returns nothing.

    Example:
        >>> foreach_groups(torch._foreach_add, [torch.ones(1)], [torch.ones(1)])
        [tensor([2.])]
    """
    if not lists or not lists[0]:
        return [] if lists else None
    out: list[Any] = [None] * len(lists[0])
    returned = False
    groups = tree.group_by_device_dtype(*lists)
    for group in groups:
        group = group if isinstance(group, tuple) else (group,)
        result = fn(*[g.tensors for g in group])
        if result is not None:
            returned = True
            for i, t in zip(group[0].indices, result):
                out[i] = t
    return out if returned else None


def _leaves_matching(updates: Updates, other: Any, name: str) -> tuple[list[torch.Tensor], Any, list[torch.Tensor]]:
    u_leaves, treedef = tree.flatten(updates)
    try:
        o_leaves = treedef.flatten_up_to(other)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: updates do not match the tree of the optimizer state ({e})") from None
    return u_leaves, treedef, o_leaves


class ScaleState(NamedTuple):
    """State of :func:`scale` (none)."""


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiply updates by a fixed ``step_size``.

    Example:
        >>> tx = optim.scale(-0.5)
        >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]
        {'w': tensor([-0.5000])}
    """
    if callable(step_size):
        raise TypeError("scale: step_size must be a number or 0-d tensor; use scale_by_schedule for a schedule")

    def init_fn(params: Params) -> ScaleState:
        del params
        return ScaleState()

    def update_fn(updates: Updates, state: ScaleState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleState]:
        del params, extra
        return tree.scale(step_size, updates), state

    return GradientTransformation(init_fn, update_fn)


class ScaleByScheduleState(NamedTuple):
    """Holds the number of updates seen so far (the schedule's input)."""

    count: torch.Tensor


def _count_like(params: Params) -> torch.Tensor:
    leaves_ = tree.leaves(params)
    return torch.zeros((), dtype=torch.int64, device=leaves_[0].device if leaves_ else None)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)``, where count is the number of updates so far.

    The count is a 0-d tensor, so a compiled step sees the same graph every step.

    Example:
        >>> tx = optim.scale_by_schedule(lambda n: -0.1 * (n + 1))
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> tx.update({"w": torch.ones(1)}, s)[0]
        {'w': tensor([-0.1000])}
    """
    if not callable(step_size_fn):
        raise TypeError(f"scale_by_schedule: step_size_fn must be callable, got {step_size_fn!r}")

    def init_fn(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=_count_like(params))

    def update_fn(updates: Updates, state: ScaleByScheduleState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByScheduleState]:
        del params, extra
        if not isinstance(state, ScaleByScheduleState):
            raise ValueError(f"scale_by_schedule: expected a ScaleByScheduleState from init, got {type(state).__name__}")
        factor = step_size_fn(state.count)
        return tree.scale(factor, updates), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Scale by ``-learning_rate`` (a float, a 0-d tensor, or a schedule of the update count).

    Example:
        >>> tx = optim.scale_by_learning_rate(0.1)
        >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]
        {'w': tensor([-0.1000])}
    """
    check_hyperparameter("learning_rate", learning_rate)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


class TraceState(NamedTuple):
    """Momentum buffer of :func:`trace`."""

    trace: Params


def trace(decay: float, nesterov: bool = False, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t`` with Nesterov).

    Matches ``torch.optim.SGD``'s momentum buffer with ``dampening=0``.

    Example:
        >>> tx = optim.trace(decay=0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u
        {'w': tensor([1.5000])}
    """
    check_hyperparameter("decay", decay, low=0.0)

    def init_fn(params: Params) -> TraceState:
        return TraceState(trace=tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(updates: Updates, state: TraceState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, TraceState]:
        del params, extra
        if not isinstance(state, TraceState):
            raise ValueError(f"trace: expected a TraceState from init, got {type(state).__name__}")
        g, treedef, t = _leaves_matching(updates, state.trace, "trace")
        t = [x.to(y.dtype) if x.dtype != y.dtype else x for x, y in zip(t, g)] if accumulator_dtype is None else t
        g_acc = [x.to(y.dtype) for x, y in zip(g, t)]
        new_t = foreach_groups(lambda tt, gg: torch._foreach_add(gg, torch._foreach_mul(tt, decay)), t, g_acc)
        if nesterov:
            out = foreach_groups(lambda tt, gg: torch._foreach_add(gg, torch._foreach_mul(tt, decay)), new_t, g_acc)
        else:
            out = new_t
        out = [o.to(x.dtype) for o, x in zip(out, g)]
        return tree.unflatten(treedef, out), TraceState(trace=tree.unflatten(treedef, new_t))

    return GradientTransformation(init_fn, update_fn)


_ = (EmptyState, OptState, check_updates_match)  # re-exported building blocks used by sibling modules
