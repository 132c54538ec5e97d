"""The gradient-transformation protocol (optax's), and the combinators every rule builds on.

A :class:`GradientTransformation` is a pair of pure functions::

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

Updates are *added* to the parameters (so ``sgd`` scales by ``-learning_rate``),
exactly as in optax.

A transformation may also carry ``donated_update(grads, opt_state, params, **extra)
-> (params, opt_state)``: the same step, allowed to reuse (overwrite) the buffers
of its three inputs. ``TrainState.apply_gradients(..., donate=True)`` takes it when
present; that is how aliases such as ``adamw`` reach fused in-place kernels while
``update`` stays pure. Without it, a donated step falls back to ``update`` plus an
in-place add into the parameters.

Two optional fields let a donated chain fold a global gradient scaling into the rule's own
pass over the gradients (``chain(clip_by_global_norm(1.0), adamw(...))``: one norm pass, then
the fused Adam kernel divides by the clip factor as it reads each gradient, instead of a
separate scaling pass): ``grad_divisor`` on the scaling transformation, ``fused_divide`` on
the rule that takes the divisor (see :class:`GradientTransformation`).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> params = {"w": torch.ones(2)}
    >>> tx = optim.sgd(0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
    >>> optim.apply_updates(params, updates)
    {'w': tensor([0.9000, 0.9000])}
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import torch

from craftfn import tree
from craftfn.tree import PyTree

__all__ = [
    "OptState",
    "Params",
    "Updates",
    "Schedule",
    "ScalarOrSchedule",
    "GradientTransformation",
    "TransformInitFn",
    "TransformUpdateFn",
    "DonatedUpdateFn",
    "GradDivisorFn",
    "EmptyState",
    "identity",
    "chain",
    "apply_updates",
    "apply_updates_",
    "check_updates_match",
    "check_hyperparameter",
]

OptState = Any
Params = PyTree
Updates = PyTree
Schedule = Callable[[Union[int, torch.Tensor]], Union[float, torch.Tensor]]
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(self, updates: Updates, state: OptState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, OptState]: ...


class DonatedUpdateFn(Protocol):
    def __call__(self, updates: Updates, state: OptState, params: Params, **extra: Any) -> tuple[Params, OptState]: ...


class GradDivisorFn(Protocol):
    def __call__(self, updates: Updates, state: OptState, params: Optional[Params] = None, **extra: Any) -> tuple[torch.Tensor, OptState]: ...


class GradientTransformation(NamedTuple):
    """An update rule: ``init(params) -> state`` and ``update(updates, state, params=None, **extra)``.

    ``donated_update`` is optional (see the module docstring). ``inplace_update`` is
    optional too: the same contract as ``update``, but it may overwrite the buffers of
    ``updates`` (never ``state`` or ``params``) instead of allocating new ones; a chain's
    donated path uses it for the transformations before the last (for instance
    ``clip_by_global_norm`` scales the donated gradients in place). Extra keyword
    arguments given to ``update`` (for example ``value=loss``) are passed to every
    transformation in a chain; transformations ignore the ones they do not use.

    ``grad_divisor`` (optional) belongs to a transformation whose ``update`` divides every leaf
    by one 0-d tensor computed from the updates (``clip_by_global_norm``):
    ``grad_divisor(updates, state, params, **extra) -> (divisor, new_state)`` computes that
    divisor without touching the updates. ``fused_divide=True`` declares that
    ``donated_update`` accepts a keyword ``grad_divisor=`` (a 0-d tensor) and divides the
    gradients by it itself, as part of its own pass. A chain whose last transformation has
    ``fused_divide`` and whose one before last has ``grad_divisor`` passes the divisor along
    instead of scaling the gradients in a pass of their own.

    Example:
        >>> tx = optim.GradientTransformation(lambda p: optim.EmptyState(), lambda u, s, p=None, **kw: (u, s))
        >>> tx.init({"w": torch.ones(1)})
        EmptyState()
    """

    init: TransformInitFn
    update: TransformUpdateFn
    donated_update: Optional[DonatedUpdateFn] = None
    inplace_update: Optional[TransformUpdateFn] = None
    grad_divisor: Optional[GradDivisorFn] = None
    fused_divide: bool = False


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def identity() -> GradientTransformation:
    """The transformation that leaves updates unchanged.

    Example:
        >>> tx = optim.identity()
        >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]
        {'w': tensor([1.])}
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: EmptyState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, EmptyState]:
        del params, extra
        return updates, state

    return GradientTransformation(init_fn, update_fn)


def _state_error(name: str, expected: str, state: Any) -> ValueError:
    return ValueError(
        f"{name}: opt_state {type(state).__name__} is not a state made by this transformation's init "
        f"(expected {expected}); call tx.init(params) before tx.update(...)"
    )


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transformations left to right; the state is a tuple of their states.

    When the last transformation has a ``donated_update``, the chain has one too: the
    leading transformations run their ``inplace_update`` where they have one (the
    gradients are donated too, so they may be overwritten), else their pure ``update``,
    and the last one applies in place. When the one before last has a ``grad_divisor`` and
    the last has ``fused_divide`` (``clip_by_global_norm`` then ``adamw``), the divisor is
    handed to the last one's kernel instead of a pass of its own over the gradients.

    Example:
        >>> tx = optim.chain(optim.trace(decay=0.9), optim.scale_by_learning_rate(0.1))
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation, got {type(t).__name__}")

    def init_fn(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def _check(state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise _state_error("chain", f"a tuple of {len(transforms)} states", state)

    # A chain that starts with a rule taking per-example gradients (a leading batch axis, e.g. DP-SGD's
    # aggregation) gets updates shaped unlike params: the rule checks them itself.
    per_example = bool(transforms) and getattr(transforms[0], "takes_per_example_updates", False)

    def update_fn(updates: Updates, state: tuple, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, tuple]:
        _check(state)
        marked = False
        if params is not None and not per_example:
            check_updates_match(updates, params)
            marked = tree._trust(updates, params)  # the transformations need not check them again
        try:
            new_state = []
            for t, s in zip(transforms, state):
                updates, s = t.update(updates, s, params, **extra)
                new_state.append(s)
        finally:
            tree._untrust(marked)
        return updates, tuple(new_state)

    donated_fn = None
    if transforms and transforms[-1].donated_update is not None:
        last = transforms[-1]

        fold = len(transforms) >= 2 and transforms[-2].grad_divisor is not None and last.fused_divide

        def donated_fn(updates: Updates, state: tuple, params: Params, **extra: Any) -> tuple[Params, tuple]:
            _check(state)
            check_updates_match(updates, params)
            marked = tree._trust(updates, params)
            try:
                new_state = []
                leading = transforms[:-2] if fold else transforms[:-1]
                for t, s in zip(leading, state):
                    updates, s = (t.inplace_update or t.update)(updates, s, params, **extra)
                    new_state.append(s)
                if fold:
                    divisor, s = transforms[-2].grad_divisor(updates, state[-2], params, **extra)
                    new_state.append(s)
                    params, s = last.donated_update(updates, state[-1], params, grad_divisor=divisor, **extra)
                else:
                    params, s = last.donated_update(updates, state[-1], params, **extra)
                new_state.append(s)
            finally:
                tree._untrust(marked)
            return params, tuple(new_state)

    return GradientTransformation(init_fn, update_fn, donated_fn)


def check_updates_match(updates: Updates, params: Params, argname: str = "updates") -> None:
    """Raise ``ValueError`` unless ``updates`` fit ``params``: structure, shapes, dtype kinds, devices.

    The update rules' name for :func:`craftfn.tree.check_match` (one check, cached per tree
    signature, so a tree seen before costs a flatten and a lookup); every update path runs it
    before any kernel touches the parameters.

    Example:
        >>> optim.check_updates_match({"w": torch.ones(3)}, {"w": torch.ones(2)})
        Traceback (most recent call last):
        ...
        ValueError: updates do not match params: leaf 'w': updates shape (3,), params shape (2,)
    """
    tree.check_match(updates, params, name=argname, reference_name="params")


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leafwise, keeping each parameter's dtype (pure: new tensors).

    Example:
        >>> optim.apply_updates({"w": torch.ones(1)}, {"w": -torch.ones(1)})
        {'w': tensor([0.])}
    """
    tree.check_match(updates, params)
    p_leaves, treedef = tree.flatten(params)
    u_leaves = treedef.flatten_up_to(updates)
    out: list[Any] = [None] * len(p_leaves)
    for (gp, gu) in tree.group_by_device_dtype(p_leaves, u_leaves):
        us = [u.to(gp.dtype) for u in gu.tensors]
        for i, t in zip(gp.indices, torch._foreach_add(gp.tensors, us)):
            out[i] = t
    return tree.unflatten(treedef, out)


def apply_updates_(params: Params, updates: Updates) -> Params:
    """In-place ``params += updates`` (for donated states); returns ``params``.

    Example:
        >>> p = {"w": torch.ones(1)}
        >>> optim.apply_updates_(p, {"w": torch.ones(1)})["w"]
        tensor([2.])
    """
    tree.check_match(updates, params)
    p_leaves, treedef = tree.flatten(params)
    u_leaves = treedef.flatten_up_to(updates)
    for (gp, gu) in tree.group_by_device_dtype(p_leaves, u_leaves):
        torch._foreach_add_(gp.tensors, [u.to(gp.dtype) for u in gu.tensors])
    return params


def check_hyperparameter(name: str, value: Any, *, low: float | None = 0.0, high: float | None = None, low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    """Raise naming ``name`` when a numeric hyperparameter is not finite or outside its range.

    NaN and infinities are always rejected (``ValueError``); so is anything but a number, a
    tensor or a schedule (``TypeError``). Schedules (callables) and tensors are accepted as
    they are: a schedule's values depend on the step (:func:`craftfn.schedules.check_schedule`
    checks one over a run), and reading a tensor would sync (``inject_hyperparams`` rebuilds
    its rule with tensor hyperparameters on every update).

    Example:
        >>> optim.check_hyperparameter("eps", -1.0)
        Traceback (most recent call last):
        ...
        ValueError: eps must be >= 0.0, got -1.0
        >>> optim.check_hyperparameter("learning_rate", float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: learning_rate must be a finite number, got nan
    """
    if callable(value) or isinstance(value, torch.Tensor) or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, a 0-d tensor or a schedule, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")

