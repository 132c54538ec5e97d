"""Reduce the step size when the loss plateaus, after optax.contrib's ``reduce_on_plateau``.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.chain(optim.sgd(0.1), optim.contrib.reduce_on_plateau(patience=5))
    >>> state = tx.init({"w": torch.zeros(2)})
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import GradientTransformation, Params, Updates, check_hyperparameter
from craftfn.optim.contrib._parameter_free import _lowest_dtype, _need_value
from craftfn.optim.transforms import _check_state, _count_like

__all__ = ["ReduceLROnPlateauState", "reduce_on_plateau"]


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau` (optax's fields)."""

    scale: torch.Tensor
    best_value: torch.Tensor
    plateau_count: torch.Tensor
    cooldown_count: torch.Tensor
    count: torch.Tensor
    avg_value: torch.Tensor


def reduce_on_plateau(
    factor: float = 0.1, patience: int = 10, rtol: float = 1e-4, atol: float = 0.0, cooldown: int = 0, accumulation_size: int = 1, min_scale: float = 0.0
) -> GradientTransformation:
    """Multiply the updates by a scale that drops by ``factor`` once the loss (``value=``, averaged over
    ``accumulation_size`` calls) has not improved by ``rtol``/``atol`` for ``patience`` evaluations.

    Example:
        >>> tx = reduce_on_plateau(patience=1, factor=0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> _, s = tx.update({"w": torch.ones(1)}, s, value=torch.tensor(1.0))
        >>> u, s = tx.update({"w": torch.ones(1)}, s, value=torch.tensor(1.0))
        >>> u
        {'w': tensor([0.5000])}
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"reduce_on_plateau: factor must be in (0, 1), got {factor}")
    check_hyperparameter("rtol", rtol, high=1.0, high_inclusive=True)
    check_hyperparameter("atol", atol)
    check_hyperparameter("min_scale", min_scale)
    if rtol < 0.0 or atol < 0.0:
        raise ValueError(f"reduce_on_plateau: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("reduce_on_plateau: at least one of rtol and atol must be positive")
    if rtol > 1.0:
        raise ValueError(f"reduce_on_plateau: rtol must be <= 1, got {rtol}")

    def init_fn(params: Params) -> ReduceLROnPlateauState:
        count = _count_like(params)
        low = _lowest_dtype(params)
        leaves_ = [x for x in tree.leaves(params) if x.is_floating_point()]
        high = max((x.dtype for x in leaves_), key=lambda d: torch.finfo(d).bits) if leaves_ else torch.float32
        full = lambda v, dt: torch.full((), v, dtype=dt, device=count.device)  # noqa: E731
        return ReduceLROnPlateauState(full(1.0, low), full(float("inf"), high), count.clone(), count.clone(), count.clone(), full(0.0, high))

    def update_fn(updates: Updates, state: ReduceLROnPlateauState, params: Optional[Params] = None, *, value: Any = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("reduce_on_plateau", state, ReduceLROnPlateauState)
        _need_value("reduce_on_plateau", value)
        new_count = state.count + 1
        avg = ((state.count * state.avg_value + torch.as_tensor(value, device=state.avg_value.device).to(state.avg_value.dtype)) / new_count).to(state.avg_value.dtype)
        # The scale update of optax's lax.cond, computed always and kept where the window is full.
        improved = avg < (1 - rtol) * state.best_value - atol
        best = torch.where(improved, avg.to(state.best_value.dtype), state.best_value)
        plateau = torch.where(improved, torch.zeros_like(state.plateau_count), state.plateau_count + 1)
        in_cooldown = state.cooldown_count > 0
        hit = plateau == patience
        scale_nc = torch.clamp(torch.where(hit, state.scale * factor, state.scale), min=min_scale)
        new_plateau = torch.where(in_cooldown, torch.zeros_like(plateau), torch.where(hit, torch.zeros_like(plateau), plateau))
        new_scale = torch.where(in_cooldown, state.scale, scale_nc.to(state.scale.dtype))
        new_cooldown = torch.where(in_cooldown, state.cooldown_count - 1, torch.where(hit, torch.full_like(plateau, cooldown), torch.zeros_like(plateau)))
        full = new_count == accumulation_size
        zero = torch.zeros_like(new_count)
        new_state = ReduceLROnPlateauState(
            scale=torch.where(full, new_scale, state.scale),
            best_value=torch.where(full, best, state.best_value),
            plateau_count=torch.where(full, new_plateau, state.plateau_count),
            cooldown_count=torch.where(full, new_cooldown, state.cooldown_count),
            count=torch.where(full, zero, new_count),
            avg_value=torch.where(full, torch.zeros_like(avg), avg),
        )
        return tree.map(lambda g: new_state.scale.to(g.dtype) * g, updates), new_state

    return GradientTransformation(init_fn, update_fn)
