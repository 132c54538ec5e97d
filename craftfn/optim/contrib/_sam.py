"""Sharpness-aware minimisation (Foret et al., 2021) as a transformation, after optax.contrib's ``sam``.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.contrib.sam(optim.sgd(0.1), optim.chain(optim.contrib.normalize(), optim.sgd(0.05)))
    >>> state = tx.init({"w": torch.zeros(2)})
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import GradientTransformation, OptState, Params, Updates
from craftfn.optim.rules import _tree_sq_norm
from craftfn.optim.sharding import refuse_sharded
from craftfn.optim.transforms import _check_state, _count_like, _need_params

__all__ = ["NormalizeState", "normalize", "SAMState", "sam"]


class NormalizeState(NamedTuple):
    """State of :func:`normalize` (none)."""


def normalize() -> GradientTransformation:
    """Divide the updates by their global L2 norm.

    Example:
        >>> tx = normalize()
        >>> tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, tx.init(None))[0]
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """

    def init_fn(params: Params) -> NormalizeState:
        del params
        return NormalizeState()

    def update_fn(updates: Updates, state: NormalizeState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, NormalizeState]:
        refuse_sharded("normalize (SAM)", "it divides by the norm of all updates")
        del params, extra
        g_norm = torch.sqrt(_tree_sq_norm(updates))
        return tree.map(lambda g: g / g_norm.to(g.dtype), updates), state

    return GradientTransformation(init_fn, update_fn)


class SAMState(NamedTuple):
    """State of :func:`sam`: steps since the last outer step, both rules' states, and the cached outer params."""

    steps_since_sync: torch.Tensor
    opt_state: OptState
    adv_state: OptState
    cache: Params


def sam(
    optimizer: GradientTransformation,
    adv_optimizer: GradientTransformation,
    sync_period: int = 2,
    reset_state: bool = True,
    opaque_mode: bool = False,
    batch_axis_name: Optional[str] = None,
) -> GradientTransformation:
    """SAM in optax's transparent mode: ``sync_period - 1`` adversarial (ascent) steps by
    ``adv_optimizer``, then one step of ``optimizer`` from the cached outer parameters, using the
    gradient at the perturbed point. Every call returns an update, so the training loop is a
    plain ``update``/``apply_updates`` loop. Needs ``params``.

    Args:
        optimizer: the outer rule.
        adv_optimizer: the adversarial rule, e.g. ``chain(normalize(), sgd(rho))``; its update
            is negated (an ascent step).
        sync_period: adversarial steps plus one outer step.
        reset_state: re-initialise ``adv_optimizer``'s state at each outer step.
        opaque_mode, batch_axis_name: optax's opaque mode (a ``grad_fn`` called inside the
            update) and ``pmap`` axis are not supported (``ValueError``).

    Example:
        >>> tx = sam(optim.sgd(0.1), optim.sgd(0.05))
        >>> int(tx.init({"w": torch.zeros(1)}).steps_since_sync)
        0
    """
    if not isinstance(optimizer, GradientTransformation) or not isinstance(adv_optimizer, GradientTransformation):
        raise TypeError("sam: optimizer and adv_optimizer must be GradientTransformations")
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise ValueError(f"sam: sync_period must be an int >= 1, got {sync_period!r}")
    if opaque_mode or batch_axis_name is not None:
        raise ValueError("sam: opaque_mode and batch_axis_name are not supported; use the transparent mode (the default)")

    def pick(cond: torch.Tensor, if_true: Any, if_false: Any) -> Any:
        # optax's cond * a + (1 - cond) * b, leaf by leaf (keeps each leaf's dtype).
        def one(a: Any, b: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            c = cond.to(device=a.device, dtype=a.dtype if a.is_floating_point() else torch.int64)
            out = c * a + (1 - c) * b
            return out.to(a.dtype)

        return tree.map(one, if_true, if_false)

    def init_fn(params: Params) -> SAMState:
        return SAMState(_count_like(params), optimizer.init(params), adv_optimizer.init(params), tree.clone(tree.detach(params)))

    def update_fn(updates: Updates, state: SAMState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, SAMState]:
        del extra
        _check_state("sam", state, SAMState)
        _need_params("sam", params)
        first = state.steps_since_sync == 0
        last = state.steps_since_sync == sync_period - 1
        adv_updates, adv_state = adv_optimizer.update(updates, state.adv_state, params)
        adv_updates = tree.map(lambda x: -x, adv_updates)
        opt_updates, opt_state = optimizer.update(updates, state.opt_state, state.cache)
        opt_updates = tree.map(lambda c, p, u: c - p + u, state.cache, params, opt_updates)
        cache = pick(first, params, state.cache)
        out = pick(last, opt_updates, adv_updates)
        adv_state = pick(last, adv_optimizer.init(params) if reset_state else state.adv_state, adv_state)
        opt_state = pick(last, opt_state, state.opt_state)
        return out, SAMState(torch.remainder(state.steps_since_sync + 1, sync_period), opt_state, adv_state, cache)

    return GradientTransformation(init_fn, update_fn)
