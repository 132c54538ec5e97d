"""Clipping and constraining transformations (optax's ``clipping`` and ``constrain`` modules).

All of them are stateless except :func:`zero_nans`, which records where it found NaNs.
Global quantities (norms) stay 0-d tensors: no update reads a value to the host.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.clip_by_global_norm(1.0)
    >>> tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, tx.init(None))[0]
    {'a': tensor([0.6000]), 'b': tensor([0.8000])}
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import GradientTransformation, Params, Updates, check_hyperparameter
from craftfn.optim.transforms import _cast_to, _check_state, _flatten_like, _leaf_rms, _need_params, foreach_groups

__all__ = [
    "ClipState",
    "ClipByGlobalNormState",
    "ClipByBlockRMSState",
    "AdaptiveGradClipState",
    "ZeroNansState",
    "CentralizeState",
    "NonNegativeParamsState",
    "clip",
    "clip_by_global_norm",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "unitwise_norm",
    "zero_nans",
    "centralize",
    "keep_params_nonnegative",
]


class ClipState(NamedTuple):
    """State of :func:`clip` (none)."""


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every update element into ``[-max_delta, max_delta]``.

    Example:
        >>> tx = optim.clip(1.0)
        >>> tx.update({"w": torch.tensor([-3.0, 0.5, 2.0])}, tx.init(None))[0]
        {'w': tensor([-1.0000,  0.5000,  1.0000])}
    """
    check_hyperparameter("max_delta", max_delta)

    def init_fn(params: Params) -> ClipState:
        del params
        return ClipState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("clip", state, ClipState)
        u, treedef = tree.flatten(updates)

        def clamp(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            out = torch._foreach_clamp_max(xs, max_delta)
            torch._foreach_clamp_min_(out, -max_delta)
            return out

        return tree.unflatten(treedef, foreach_groups(clamp, u)), state

    return GradientTransformation(init_fn, update_fn)


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm` (none)."""


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates together so that their global L2 norm is at most ``max_norm``.

    ``u / (||u|| / max_norm)`` when ``||u|| >= max_norm``, else ``u`` (optax's rule; the
    division by one divisor, rather than optax's ``u / ||u|| * max_norm``, is what torch's fused
    Adam kernel applies as its gradient scale, so every path gives the same numbers).

    In a donated ``chain(clip_by_global_norm(c), adamw(...))`` the clip costs one pass over the
    gradients (their norm): the divisor goes into the fused AdamW kernel (``grad_divisor``, see
    :class:`~craftfn.optim.GradientTransformation`) instead of a pass that scales them.

    Args:
        max_norm: ``> 0``.

    Example:
        >>> tx = optim.clip_by_global_norm(10.0)
        >>> tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))[0]
        {'w': tensor([3., 4.])}
    """
    check_hyperparameter("max_norm", max_norm, low=0.0, low_inclusive=False)

    def init_fn(params: Params) -> ClipByGlobalNormState:
        del params
        return ClipByGlobalNormState()

    def divisor_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[torch.Tensor, Any]:
        """``max(||u|| / max_norm, 1)``, a 0-d tensor: dividing every leaf by it is the clip."""
        del params
        _check_state("clip_by_global_norm", state, ClipByGlobalNormState)
        # With a sharded optimizer (distributed.data_parallel(shard_optimizer_state=True)) the
        # updates are this rank's slice; extra["shard_sum"] adds a value over all slices, so the
        # norm is that of the whole gradient.
        shard_sum = extra.get("shard_sum")
        g_norm = tree.global_norm(updates) if shard_sum is None else torch.sqrt(shard_sum(tree.sum_of_squares(updates)))
        return torch.clamp(g_norm / max_norm, min=1.0), state

    def clip(updates: Updates, state: Any, extra: dict[str, Any], inplace: bool) -> tuple[Updates, Any]:
        u, treedef = tree.flatten(updates)
        if not u:
            _check_state("clip_by_global_norm", state, ClipByGlobalNormState)
            return updates, state
        divisor, state = divisor_fn(updates, state, **extra)
        div = torch._foreach_div_ if inplace else torch._foreach_div
        out = foreach_groups(lambda xs: div(xs, divisor.to(device=xs[0].device, dtype=xs[0].dtype)), u)
        return (updates if inplace else tree.unflatten(treedef, out)), state

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params
        return clip(updates, state, extra, inplace=False)

    def inplace_update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        # Donated gradients are scaled where they lie: no second gradient-sized buffer.
        del params
        return clip(updates, state, extra, inplace=True)

    return GradientTransformation(init_fn, update_fn, inplace_update=inplace_update_fn, grad_divisor=divisor_fn)


class ClipByBlockRMSState(NamedTuple):
    """State of :func:`clip_by_block_rms` (none)."""


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    """Scale each leaf so its root mean square is at most ``threshold``: ``u / max(1, rms(u) / threshold)``.

    Example:
        >>> tx = optim.clip_by_block_rms(1.0)
        >>> tx.update({"w": torch.tensor([2.0, -2.0])}, tx.init(None))[0]
        {'w': tensor([ 1., -1.])}
    """
    check_hyperparameter("threshold", threshold, low=0.0, low_inclusive=False)

    def init_fn(params: Params) -> ClipByBlockRMSState:
        del params
        return ClipByBlockRMSState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("clip_by_block_rms", state, ClipByBlockRMSState)
        u, treedef = tree.flatten(updates)
        factors = [(1.0 / torch.clamp(r / threshold, min=1.0)).to(x.dtype) for r, x in zip(_leaf_rms(u), u)]
        return tree.unflatten(treedef, foreach_groups(torch._foreach_mul, u, factors)), state

    return GradientTransformation(init_fn, update_fn)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit, broadcastable to ``x``.

    Vectors and scalars are one unit. For ``ndim >= 2`` the unit is a slice along dim 0
    (torch's layout: ``Linear.weight`` is ``(out, in)``, ``Conv2d.weight`` is ``(out, in, kh, kw)``),
    so the norm runs over all the other dims. (optax uses JAX's ``(in, out)`` layout.)

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5.],
                [1.]])
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x).reshape([1] * x.ndim)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


class AdaptiveGradClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip` (none)."""


def adaptive_grad_clip(clipping: float = 0.01, eps: float = 1e-3) -> GradientTransformation:
    """Adaptive gradient clipping (Brock et al., 2021): clip each unit's gradient norm to
    ``clipping * max(||p_unit||, eps)``.

    Units are rows along dim 0 (see :func:`unitwise_norm`). The norms are per leaf and
    per unit, so this rule reduces one leaf at a time.

    Example:
        >>> tx = optim.adaptive_grad_clip(0.1, eps=1e-3)
        >>> p = {"w": torch.tensor([[3.0, 4.0]])}
        >>> tx.update({"w": torch.tensor([[3.0, 4.0]])}, tx.init(p), p)[0]
        {'w': tensor([[0.3000, 0.4000]])}
    """
    check_hyperparameter("clipping", clipping, low=0.0, low_inclusive=False)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> AdaptiveGradClipState:
        del params
        return AdaptiveGradClipState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("adaptive_grad_clip", state, AdaptiveGradClipState)
        _need_params("adaptive_grad_clip", params)
        u, treedef, (p,) = _flatten_like(updates, "adaptive_grad_clip", params)
        out = []
        for g, w in zip(u, p):
            g_norm = unitwise_norm(g)
            max_norm = torch.clamp(unitwise_norm(w.to(g.dtype)), min=eps) * clipping
            clipped = g * (max_norm / torch.clamp(g_norm, min=1e-6))
            out.append(torch.where(g_norm < max_norm, g, clipped))
        return tree.unflatten(treedef, out), state

    return GradientTransformation(init_fn, update_fn)


class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`: per leaf, a 0-d bool tensor telling whether the last update had a NaN."""

    found_nan: Any


def zero_nans() -> GradientTransformation:
    """Replace NaNs in the updates by 0, recording per leaf whether any were found.

    Example:
        >>> tx = optim.zero_nans()
        >>> u, s = tx.update({"w": torch.tensor([1.0, float("nan")])}, tx.init({"w": torch.zeros(2)}))
        >>> u, s.found_nan
        ({'w': tensor([1., 0.])}, {'w': tensor(True)})
    """

    def init_fn(params: Params) -> ZeroNansState:
        return ZeroNansState(found_nan=tree.map(lambda x: torch.zeros((), dtype=torch.bool, device=x.device), params))

    def update_fn(updates: Updates, state: ZeroNansState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ZeroNansState]:
        del params, extra
        _check_state("zero_nans", state, ZeroNansState)
        u, treedef, _ = _flatten_like(updates, "zero_nans", state.found_nan)
        # No multi-tensor isnan exists; one where() per leaf.
        nans = [torch.isnan(x) for x in u]
        out = [torch.where(m, torch.zeros((), dtype=x.dtype, device=x.device), x) for m, x in zip(nans, u)]
        found = [m.any() for m in nans]
        return tree.unflatten(treedef, out), ZeroNansState(found_nan=tree.unflatten(treedef, found))

    return GradientTransformation(init_fn, update_fn)


class CentralizeState(NamedTuple):
    """State of :func:`centralize` (none)."""


def centralize() -> GradientTransformation:
    """Gradient centralization (Yong et al., 2020): subtract from every leaf with ``ndim > 1``
    its mean over all dims but the first (vectors are left unchanged).

    Example:
        >>> tx = optim.centralize()
        >>> tx.update({"w": torch.tensor([[1.0, 3.0]])}, tx.init(None))[0]
        {'w': tensor([[-1.,  1.]])}
    """

    def init_fn(params: Params) -> CentralizeState:
        del params
        return CentralizeState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("centralize", state, CentralizeState)
        u, treedef = tree.flatten(updates)
        out = [x - x.mean(dim=tuple(range(1, x.ndim)), keepdim=True) if x.ndim > 1 else x for x in u]
        return tree.unflatten(treedef, out), state

    return GradientTransformation(init_fn, update_fn)


class NonNegativeParamsState(NamedTuple):
    """State of :func:`keep_params_nonnegative` (none)."""


def keep_params_nonnegative() -> GradientTransformation:
    """Change updates so that ``params + updates >= 0``: ``max(u, -p)`` elementwise.

    Use it last in a chain, after the learning rate.

    Example:
        >>> tx = optim.keep_params_nonnegative()
        >>> p = {"w": torch.tensor([1.0, 1.0])}
        >>> tx.update({"w": torch.tensor([-2.0, 0.5])}, tx.init(p), p)[0]
        {'w': tensor([-1.0000,  0.5000])}
    """

    def init_fn(params: Params) -> NonNegativeParamsState:
        del params
        return NonNegativeParamsState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("keep_params_nonnegative", state, NonNegativeParamsState)
        _need_params("keep_params_nonnegative", params)
        u, treedef, (p,) = _flatten_like(updates, "keep_params_nonnegative", params)
        out = foreach_groups(lambda a, b: torch._foreach_maximum(a, torch._foreach_neg(b)), u, _cast_to(p, u))
        return tree.unflatten(treedef, out), state

    return GradientTransformation(init_fn, update_fn)
