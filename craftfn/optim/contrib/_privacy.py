"""Differentially private aggregation (Abadi et al., 2016), after optax.contrib's ``dpsgd``.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.contrib.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1, seed=0)
    >>> state = tx.init({"w": torch.zeros(2)})
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch

from craftfn import random, tree
from craftfn.optim.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    chain,
    check_hyperparameter,
    identity,
)
from craftfn.optim.transforms import _check_state, scale_by_learning_rate, trace

__all__ = ["PerExampleGradientTransformation", "DifferentiallyPrivateAggregateState", "differentially_private_aggregate", "dpsgd", "per_example_global_norm_clip"]


def per_example_global_norm_clip(grads: list[torch.Tensor], l2_norm_clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip each example's gradient (axis 0 of every leaf) to global norm ``l2_norm_clip`` and sum over examples.

    Returns:
        ``(clipped sums, number of examples clipped)``.

    Example:
        >>> sums, n = per_example_global_norm_clip([torch.tensor([[0.0, 3.0, 4.0], [0.0, 0.0, 1.0]])], 1.0)
        >>> sums, n
        ([tensor([0.0000, 0.6000, 1.8000])], tensor(1))
    """
    if not grads or any(g.ndim < 1 for g in grads) or len({g.shape[0] for g in grads}) != 1:
        raise ValueError("per_example_global_norm_clip: every leaf needs the same leading batch axis (per-example gradients)")
    norms = torch.sqrt(sum(torch.sum((g * g).reshape(g.shape[0], -1), dim=1) for g in grads))
    multipliers = torch.nan_to_num(torch.clamp(l2_norm_clip / norms, max=1.0), nan=1.0)
    clipped = [torch.tensordot(multipliers.to(g.dtype), g, dims=1) for g in grads]
    return clipped, torch.sum(multipliers < 1.0)


class PerExampleGradientTransformation(GradientTransformation):
    """A transformation whose input updates carry a leading batch axis (per-example gradients);
    ``chain`` does not check them against the parameters' shapes."""

    takes_per_example_updates = True


class DifferentiallyPrivateAggregateState(NamedTuple):
    """State of :func:`differentially_private_aggregate`: the key of the next noise draw."""

    rng_key: torch.Tensor


def differentially_private_aggregate(
    l2_norm_clip: float, noise_multiplier: float, key: Union[int, torch.Tensor, None] = None, *, seed: Optional[int] = None
) -> GradientTransformation:
    """Clip per-example gradients to ``l2_norm_clip``, sum, add ``N(0, (l2_norm_clip * noise_multiplier)^2)``
    noise and divide by the batch size. ``updates`` carry a leading batch axis (per-example gradients,
    e.g. from ``torch.func.vmap(torch.func.grad(loss))``); the result does not.

    The noise is drawn from craftfn's keys (same law as optax's, other samples).

    Example:
        >>> tx = differentially_private_aggregate(1.0, 0.0, key=0)
        >>> tx.update({"w": torch.tensor([[3.0, 4.0], [0.0, 0.5]])}, tx.init(None))[0]
        {'w': tensor([0.3000, 0.6500])}
    """
    check_hyperparameter("l2_norm_clip", l2_norm_clip)
    check_hyperparameter("noise_multiplier", noise_multiplier)
    if key is not None and seed is not None:
        raise ValueError("differentially_private_aggregate: give key or seed, not both")
    key = seed if key is None else key
    key0 = random.key(0 if key is None else key) if not isinstance(key, torch.Tensor) else key
    noise_std = l2_norm_clip * noise_multiplier

    def init_fn(params: Params) -> DifferentiallyPrivateAggregateState:
        del params
        return DifferentiallyPrivateAggregateState(key0.clone())

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("differentially_private_aggregate", state, DifferentiallyPrivateAggregateState)
        leaves_, treedef = tree.flatten(updates)
        clipped, _ = per_example_global_norm_clip(leaves_, l2_norm_clip)
        keys = random.split(state.rng_key, len(leaves_) + 1)
        bsize = leaves_[0].shape[0]
        noised = [(g + noise_std * random.normal(keys[i + 1], tuple(g.shape), dtype=g.dtype, device=g.device)) / bsize for i, g in enumerate(clipped)]
        return tree.unflatten(treedef, noised), DifferentiallyPrivateAggregateState(keys[0])

    return PerExampleGradientTransformation(init_fn, update_fn)


def dpsgd(
    learning_rate: ScalarOrSchedule, l2_norm_clip: float, noise_multiplier: float, seed: int, momentum: Optional[float] = None, nesterov: bool = False
) -> GradientTransformation:
    """DP-SGD: ``chain(differentially_private_aggregate(...), trace(momentum, nesterov) or identity(), scale_by_learning_rate(lr))``.

    Example:
        >>> len(dpsgd(0.1, 1.0, 1.1, seed=0).init({"w": torch.zeros(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        differentially_private_aggregate(l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, seed=seed),
        trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity(),
        scale_by_learning_rate(learning_rate),
    )
