"""Schedule-free optimisation (Defazio et al., 2024): no learning-rate schedule needed.

The wrapper keeps a base sequence ``z`` (moved by the base optimizer) and an average
``x`` of it; gradients are taken at their interpolation ``y = b1 x + (1 - b1) z``,
which is what the parameters hold during training. Evaluate at ``x``:
:func:`schedule_free_eval_params` recovers it from the parameters and the state.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.schedule_free_adamw(learning_rate=1e-2)
    >>> params = {"w": torch.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
    >>> params = optim.apply_updates(params, updates)
    >>> eval_params = optim.schedule_free_eval_params(state, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import optree
import torch

from craftfn import schedules, tree
from craftfn.optim.adaptive import scale_by_rms
from craftfn.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
    chain,
    check_hyperparameter,
)
from craftfn.optim.transforms import (
    _cast_to,
    _check_state,
    _flatten_like,
    add_decayed_weights,
    foreach_groups,
    scale_by_learning_rate,
)

__all__ = ["ScheduleFreeState", "schedule_free", "schedule_free_adamw", "schedule_free_sgd", "schedule_free_eval_params"]


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free` (optax's fields); all scalars are 0-d tensors."""

    b1: torch.Tensor
    weight_sum: torch.Tensor
    step_count: torch.Tensor
    max_lr: torch.Tensor
    base_optimizer_state: OptState
    z: Params


def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
    state_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """Make ``base_optimizer`` schedule-free.

    Per step, with ``lr_t`` the learning rate and ``c_t = max_lr^p / sum_s max_lr^p``:
    ``z <- z + base_update(g(y))``, ``x <- (1 - c_t) x + c_t z``, ``y <- b1 x + (1 - b1) z``;
    the returned update moves the parameters from the old ``y`` to the new one. ``x`` is
    not stored: it is recomputed as ``(y - (1 - b1) z) / b1``.

    Args:
        base_optimizer: the rule moving ``z`` (e.g. Adam with ``b1=0`` and this learning rate).
        learning_rate: the same learning rate the base optimizer uses (for the averaging weights).
        b1: interpolation weight in ``(0, 1)``.
        weight_lr_power: exponent of the lr in the averaging weights.
        state_dtype: dtype of ``z`` (default: the parameters').

    Example:
        >>> tx = optim.schedule_free(optim.sgd(0.1), learning_rate=0.1)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> int(s.step_count)  # optax counts from 1
        1
    """
    if not isinstance(base_optimizer, GradientTransformation):
        raise TypeError(f"schedule_free: base_optimizer must be a GradientTransformation, got {type(base_optimizer).__name__}")
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("b1", b1, low=0.0, high=1.0, low_inclusive=False)
    check_hyperparameter("weight_lr_power", weight_lr_power)

    def init_fn(params: Params) -> ScheduleFreeState:
        leaves_ = tree.leaves(params)
        device = leaves_[0].device if leaves_ else None
        dtype = min((x.dtype for x in leaves_ if x.is_floating_point()), key=lambda d: torch.finfo(d).bits, default=torch.float32)
        scalars = dict(dtype=dtype, device=device)
        z = tree.map(lambda p: p.detach().clone() if state_dtype is None else p.detach().to(state_dtype, copy=True), params)
        return ScheduleFreeState(
            b1=torch.tensor(b1, **scalars),
            weight_sum=torch.zeros((), **scalars),
            # optax counts from 1 here (the schedule sees 1 at the first step).
            step_count=torch.ones((), dtype=torch.int64, device=device),
            max_lr=torch.zeros((), **scalars),
            base_optimizer_state=base_optimizer.init(params),
            z=z,
        )

    def update_fn(updates: Updates, state: ScheduleFreeState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScheduleFreeState]:
        _check_state("schedule_free", state, ScheduleFreeState)
        if params is None:
            raise ValueError("schedule_free: params must be given to update(updates, state, params)")
        lr = learning_rate(state.step_count) if callable(learning_rate) else learning_rate
        lr = torch.as_tensor(lr, device=state.max_lr.device).to(state.max_lr.dtype)
        max_lr = torch.maximum(state.max_lr, lr)
        weight = max_lr ** weight_lr_power
        total = state.weight_sum + weight
        ck = torch.where(
            torch.isnan(weight) | torch.isnan(total), torch.full_like(weight, float("nan")), torch.nan_to_num(weight / total, nan=0.0, posinf=float("inf"))
        )
        base_updates, base_state = base_optimizer.update(updates, state.base_optimizer_state, params, **extra)
        u, treedef, (p, z_old) = _flatten_like(base_updates, "schedule_free", params, state.z)
        z_new = foreach_groups(torch._foreach_add, z_old, _cast_to(u, z_old))

        def move(pp: list[torch.Tensor], zo: list[torch.Tensor], zn: list[torch.Tensor]) -> list[torch.Tensor]:
            # optax's order: x = (y - (1 - b1) z) / b1; x <- (1 - c) x + c z; y <- b1 x + (1 - b1) z.
            dev, dt = pp[0].device, pp[0].dtype
            c = ck.to(device=dev, dtype=dt)
            x = torch._foreach_sub(pp, torch._foreach_mul(zo, 1.0 - b1))
            torch._foreach_div_(x, b1)
            x = torch._foreach_add(torch._foreach_mul(x, 1.0 - c), torch._foreach_mul(zn, c))
            y = torch._foreach_add(torch._foreach_mul(x, b1), torch._foreach_mul(zn, 1.0 - b1))
            return torch._foreach_sub(y, pp)

        out = foreach_groups(move, p, _cast_to(z_old, p), _cast_to(z_new, p))
        new_state = ScheduleFreeState(
            b1=state.b1, weight_sum=total, step_count=state.step_count + 1, max_lr=max_lr, base_optimizer_state=base_state, z=tree.unflatten(treedef, z_new)
        )
        return tree.unflatten(treedef, out), new_state

    return GradientTransformation(init_fn, update_fn)


def _warmup(learning_rate: float, warmup_steps: Optional[int]) -> ScalarOrSchedule:
    """optax's ``warmup_constant_schedule(0, learning_rate, warmup_steps)``, or the constant."""
    if warmup_steps is None:
        return learning_rate
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be None or an int >= 1, got {warmup_steps!r}")
    return schedules.warmup_constant(0.0, learning_rate, warmup_steps)


def schedule_free_adamw(
    learning_rate: float = 0.0025,
    warmup_steps: Optional[int] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
    state_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """Schedule-free AdamW, as optax composes it: :func:`schedule_free` over
    ``chain(scale_by_rms(b2, eps, eps_in_sqrt=False, bias_correction=True), add_decayed_weights(weight_decay),
    scale_by_learning_rate(lr))`` (RMSProp with bias correction: Adam with ``b1 = 0``).

    Args:
        learning_rate: the peak learning rate (the default is optax's).
        warmup_steps: linear warmup from 0 over this many steps (recommended), or ``None``.
        b1: interpolation weight in ``(0, 1)`` (plays Adam's momentum role).
        b2, eps: the second-moment decay and epsilon.
        weight_decay: decoupled weight decay, applied at ``y``.
        weight_lr_power, state_dtype: see :func:`schedule_free`.

    Example:
        >>> tx = optim.schedule_free_adamw(1e-2, warmup_steps=10)
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'ScheduleFreeState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("b2", b2, high=1.0, high_inclusive=True)  # named here: scale_by_rms calls it decay
    lr = _warmup(learning_rate, warmup_steps)
    base = chain(
        scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(lr),
    )
    return schedule_free(base, lr, b1=b1, weight_lr_power=weight_lr_power, state_dtype=state_dtype)


def schedule_free_sgd(
    learning_rate: float = 1.0,
    warmup_steps: Optional[int] = None,
    b1: float = 0.9,
    weight_decay: Optional[float] = None,
    weight_lr_power: float = 2.0,
    state_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """Schedule-free SGD: :func:`schedule_free` over ``sgd(lr)`` (after ``add_decayed_weights(weight_decay)`` when given).

    Example:
        >>> tx = optim.schedule_free_sgd(0.1, warmup_steps=5)
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'ScheduleFreeState'
    """
    from craftfn.optim.aliases import sgd

    check_hyperparameter("learning_rate", learning_rate)
    lr = _warmup(learning_rate, warmup_steps)
    base = sgd(lr) if weight_decay is None else chain(add_decayed_weights(weight_decay), sgd(lr))
    return schedule_free(base, lr, b1=b1, weight_lr_power=weight_lr_power, state_dtype=state_dtype)


def schedule_free_eval_params(state_or_opt_state: Any, params: Params) -> Params:
    """The parameters to evaluate with: ``x = (y - (1 - b1) z) / b1``.

    Args:
        state_or_opt_state: a ``TrainState`` or an optimizer state that contains a
            :class:`ScheduleFreeState` somewhere (e.g. inside a chain).
        params: the training parameters ``y``.

    Returns:
        A new tree of parameters (the inputs are not modified).

    Raises:
        ValueError: no (or more than one) ``ScheduleFreeState`` in the state.

    Example:
        >>> tx = optim.schedule_free_adamw(1e-2)
        >>> p = {"w": torch.ones(2)}
        >>> optim.schedule_free_eval_params(tx.init(p), p)
        {'w': tensor([1., 1.])}
    """
    opt_state = getattr(state_or_opt_state, "opt_state", state_or_opt_state)
    found = [
        s for s in optree.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleFreeState), none_is_leaf=False, namespace=tree.NAMESPACE)
        if isinstance(s, ScheduleFreeState)
    ]
    if len(found) != 1:
        raise ValueError(f"schedule_free_eval_params: expected one ScheduleFreeState in the optimizer state, found {len(found)}")
    sf = found[0]
    y, treedef, (z,) = _flatten_like(params, "schedule_free_eval_params", sf.z)

    def eval_x(yy: list[torch.Tensor], zz: list[torch.Tensor]) -> list[torch.Tensor]:
        b = sf.b1.to(device=yy[0].device, dtype=yy[0].dtype)
        x = torch._foreach_sub(yy, torch._foreach_mul(zz, 1 - b))
        torch._foreach_div_(x, b)
        return x

    return tree.unflatten(treedef, foreach_groups(eval_x, y, _cast_to(z, y)))
