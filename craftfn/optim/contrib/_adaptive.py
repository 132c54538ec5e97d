"""Adaptive rules from optax.contrib: ACProp, AdEMAMix, simplified AdEMAMix, ADOPT, MADGRAD.

Same formulas and operation order as optax (leaf by leaf, ``torch.where`` for optax's
``jnp.where``), so trajectories equal optax's to float32 rounding.

Example:
    >>> import torch
    >>> from craftfn.optim import contrib
    >>> tx = contrib.ademamix(1e-3)
    >>> state = tx.init({"w": torch.zeros(3)})
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.adaptive import ScaleByAdamState
from craftfn.optim.base import GradientTransformation, Params, ScalarOrSchedule, Updates, chain, check_hyperparameter
from craftfn.optim.rules import ScaleByBeliefState, _hp, bias_corrected, moment, moment_sq
from craftfn.optim.transforms import (
    MaskOrFn,
    _check_betas,
    _check_state,
    _count_like,
    _need_params,
    add_decayed_weights,
    scale_by_learning_rate,
)

__all__ = [
    "ScaleByAdemamixState",
    "ScaleBySimplifiedAdEMAMixState",
    "MadgradState",
    "scale_by_acprop",
    "acprop",
    "scale_by_ademamix",
    "ademamix",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
    "scale_by_adopt",
    "adopt",
    "scale_by_madgrad",
    "madgrad",
]


def scale_by_acprop(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16) -> GradientTransformation:
    """ACProp (Zhuang et al., 2021): AdaBelief's second moment, taken one step late (asynchronous).

    The update is ``g / (sqrt(nu_hat_prev) + eps)`` (``nu_hat = 1`` at the first step), with
    ``nu`` the EMA of ``(g - mu_prev)^2`` plus ``eps_root``.

    Example:
        >>> tx = scale_by_acprop()
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'ScaleByBeliefState'
    """
    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)

    def init_fn(params: Params) -> ScaleByBeliefState:
        return ScaleByBeliefState(_count_like(params), tree.zeros_like(params), tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByBeliefState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByBeliefState]:
        del params, extra
        _check_state("scale_by_acprop", state, ScaleByBeliefState)
        mu = tree.map(lambda g, m: moment(g, m, b1), updates, state.mu)
        nu = tree.map(lambda g, m, v: moment_sq(g - m, v, b2) + _hp(eps_root, v), updates, state.mu, state.nu)
        initial = state.count == 0
        t = torch.where(initial, state.count + 1, state.count)

        def step(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            v_hat = torch.where(initial.to(v.device), torch.ones_like(v), bias_corrected(v, b2, t))
            return g / (torch.sqrt(v_hat) + _hp(eps, v))

        return tree.map(step, updates, state.nu), ScaleByBeliefState(state.count + 1, mu, nu)

    return GradientTransformation(init_fn, update_fn)


def acprop(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16, weight_decay: float = 0.0, mask: MaskOrFn = None
) -> GradientTransformation:
    """ACProp: ``chain(scale_by_acprop(...), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``.

    Example:
        >>> len(acprop(1e-3).init({"w": torch.zeros(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_acprop(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


class ScaleByAdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix`: counts, the fast and slow EMAs, the second moment."""

    count: torch.Tensor
    count_m2: torch.Tensor
    m1: Updates
    m2: Updates
    nu: Updates


def _at(x: Any, count: torch.Tensor) -> Any:
    return x(count) if callable(x) else x


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """AdEMAMix (Pagliardini et al., 2024): Adam plus a slow EMA ``m2`` (decay ``b3``) weighted by ``alpha``:
    update ``(m1_hat + alpha m2) / (sqrt(nu_hat + eps_root) + eps)``. ``b3`` and ``alpha`` may be schedules.

    Example:
        >>> tx = scale_by_ademamix()
        >>> sorted(tx.init({"w": torch.zeros(1)})._fields)
        ['count', 'count_m2', 'm1', 'm2', 'nu']
    """
    _check_betas(b1=b1, b2=b2)
    if not callable(b3):
        _check_betas(b3=b3)
    check_hyperparameter("alpha", alpha)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)

    def init_fn(params: Params) -> ScaleByAdemamixState:
        z = lambda: tree.zeros_like(params, dtype=mu_dtype)  # noqa: E731
        count = _count_like(params)
        return ScaleByAdemamixState(count, count.clone(), z(), z(), z())

    def update_fn(updates: Updates, state: ScaleByAdemamixState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdemamixState]:
        del params, extra
        _check_state("scale_by_ademamix", state, ScaleByAdemamixState)
        c_b3, c_alpha = _at(b3, state.count_m2), _at(alpha, state.count_m2)
        m1 = tree.map(lambda g, m: moment(g, m, b1), updates, state.m1)
        m2 = tree.map(lambda g, m: moment(g, m, c_b3), updates, state.m2)
        nu = tree.map(lambda g, v: moment_sq(g, v, b2), updates, state.nu)
        count = state.count + 1
        out = tree.map(
            lambda a, b, v: (bias_corrected(a, b1, count) + _hp(c_alpha, b) * b) / (torch.sqrt(bias_corrected(v, b2, count) + _hp(eps_root, v)) + _hp(eps, v)),
            m1, m2, nu,
        )
        return out, ScaleByAdemamixState(count, state.count_m2 + 1, m1, m2, nu)

    return GradientTransformation(init_fn, update_fn)


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """AdEMAMix: ``chain(scale_by_ademamix(...), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``.

    Example:
        >>> len(ademamix(1e-3).init({"w": torch.zeros(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_ademamix(b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
    """State of :func:`scale_by_simplified_ademamix`: count ``t``, accumulated momentum ``m``, second moment ``n``."""

    t: torch.Tensor
    m: Updates
    n: Updates


def scale_by_simplified_ademamix(b1: float = 0.99, b2: float = 0.95, alpha: ScalarOrSchedule = 0.0, eps: float = 1e-8, eps_root: float = 0.0) -> GradientTransformation:
    """Simplified AdEMAMix (Morwani et al., 2024): ``m = b1 m + g`` (no ``1 - b1``), update
    ``(m + alpha g) / (sqrt(n_hat + eps_root) + eps)`` with ``n`` Adam's second moment.

    Example:
        >>> tx = scale_by_simplified_ademamix()
        >>> sorted(tx.init({"w": torch.zeros(1)})._fields)
        ['m', 'n', 't']
    """
    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("alpha", alpha, low=None)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)

    def init_fn(params: Params) -> ScaleBySimplifiedAdEMAMixState:
        return ScaleBySimplifiedAdEMAMixState(_count_like(params), tree.zeros_like(params), tree.zeros_like(params))

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("scale_by_simplified_ademamix", state, ScaleBySimplifiedAdEMAMixState)
        c_alpha = _at(alpha, state.t)
        m = tree.map(lambda g, x: g + _hp(b1, x) * x, updates, state.m)
        # optax: lerp(b2, g * g, n) = g^2 + b2 (n - g^2)
        n = tree.map(lambda g, x: g * g + _hp(b2, x) * (x - g * g), updates, state.n)
        t = state.t + 1
        out = tree.map(
            lambda g, mm, nn: (mm + _hp(c_alpha, g) * g) / (torch.sqrt(bias_corrected(nn, b2, t) + _hp(eps_root, nn)) + _hp(eps, nn)), updates, m, n
        )
        return out, ScaleBySimplifiedAdEMAMixState(t, m, n)

    return GradientTransformation(init_fn, update_fn)


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """Simplified AdEMAMix: ``chain(scale_by_simplified_ademamix(...), add_decayed_weights(...), scale_by_learning_rate(lr))``.

    Example:
        >>> len(simplified_ademamix(1e-3).init({"w": torch.zeros(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_simplified_ademamix(b1=b1, b2=b2, alpha=alpha, eps=eps, eps_root=eps_root),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


def _quarter_power(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float32) ** 0.25


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[torch.Tensor], torch.Tensor] = _quarter_power,
) -> GradientTransformation:
    """ADOPT (Taniguchi et al., 2024): normalise by the *previous* second moment, then take momentum.

    ``u = clip(g / max(sqrt(nu_prev), eps), clip_value_fn(count))``; ``mu = b1 mu + (1 - b1) u``
    (``mu = u``, ``nu = g^2`` at the first step); the update is ``mu`` (Nesterov: one more EMA step).

    Example:
        >>> tx = scale_by_adopt()
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'ScaleByAdamState'
    """
    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(_count_like(params), tree.zeros_like(params, dtype=mu_dtype), tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByAdamState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdamState]:
        del params, extra
        _check_state("scale_by_adopt", state, ScaleByAdamState)
        started = state.count > 0

        def beta(b: Any, first: float, like: torch.Tensor) -> torch.Tensor:
            return torch.where(started.to(like.device), torch.as_tensor(b, dtype=like.dtype, device=like.device), torch.full((), first, dtype=like.dtype, device=like.device))

        nu = tree.map(lambda g, v: moment_sq(g, v, beta(b2, 0.0, v)), updates, state.nu)
        clip_value = clip_value_fn(state.count) if use_clipping else None

        def normalised(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            u = g / torch.clamp(torch.sqrt(v), min=eps)
            if clip_value is None:
                return u
            c = clip_value.to(device=u.device, dtype=u.dtype)
            return torch.clamp(u, min=-c, max=c)

        mu_updates = tree.map(normalised, updates, state.nu)
        mu = tree.map(lambda u, m: moment(u, m, beta(b1, 1.0, m)), mu_updates, state.mu)
        out = tree.map(lambda u, m: moment(u, m, beta(b1, 1.0, m)), mu_updates, mu) if nesterov else mu
        return out, ScaleByAdamState(state.count + 1, mu, nu)

    return GradientTransformation(init_fn, update_fn)


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[torch.Tensor], torch.Tensor] = _quarter_power,
) -> GradientTransformation:
    """ADOPT: ``chain(scale_by_adopt(...), scale_by_learning_rate(lr))``.

    Example:
        >>> len(adopt(1e-3).init({"w": torch.zeros(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_adopt(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, nesterov=nesterov, use_clipping=use_clipping, clip_value_fn=clip_value_fn),
        scale_by_learning_rate(learning_rate),
    )


class MadgradState(NamedTuple):
    """State of :func:`scale_by_madgrad`: count, weighted sums of squared gradients and of gradients, start ``x0``."""

    count: torch.Tensor
    grad_sum_sq: Updates
    s: Updates
    x0: Params


def scale_by_madgrad(learning_rate: ScalarOrSchedule, momentum: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """MADGRAD (Defazio & Jelassi, 2021): dual averaging with a cube-root adaptive scaling.

    With ``lam = (lr + eps) sqrt(k + 1)``: ``G += lam g^2``, ``s += lam g``, ``z = x0 - s / (cbrt(G) + eps)``;
    the parameters move to ``(1 - momentum) z + momentum x``. Needs ``params``.

    Example:
        >>> tx = scale_by_madgrad(1e-2)
        >>> sorted(tx.init({"w": torch.zeros(1)})._fields)
        ['count', 'grad_sum_sq', 's', 'x0']
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("momentum", momentum, low=0.0, high=1.0)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> MadgradState:
        return MadgradState(_count_like(params), tree.zeros_like(params), tree.zeros_like(params), tree.clone(tree.detach(params)))

    def update_fn(updates: Updates, state: MadgradState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, MadgradState]:
        del extra
        _check_state("scale_by_madgrad", state, MadgradState)
        _need_params("scale_by_madgrad", params)
        lr = _at(learning_rate, state.count)
        lam = (lr + eps) * torch.sqrt(state.count.to(torch.float32) + 1)
        g_sq = tree.map(lambda a, g: a + (lam.to(g.dtype) * (g * g)), state.grad_sum_sq, updates)
        s = tree.map(lambda a, g: a + lam.to(g.dtype) * g, state.s, updates)
        z = tree.map(lambda x0, ss, gs: x0 - ss / (torch.pow(gs, 1.0 / 3.0) + eps), state.x0, s, g_sq)
        out = tree.map(lambda zz, x: ((1 - momentum) * zz + momentum * x) - x, z, params)
        return out, MadgradState(state.count + 1, g_sq, s, state.x0)

    return GradientTransformation(init_fn, update_fn)


def madgrad(learning_rate: ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 0.0, eps: float = 1e-6) -> GradientTransformation:
    """MADGRAD: ``chain(add_decayed_weights(weight_decay), scale_by_madgrad(lr, momentum, eps))``.

    Example:
        >>> len(madgrad(1e-2).init({"w": torch.zeros(1)}))
        2
    """
    return chain(add_decayed_weights(weight_decay), scale_by_madgrad(learning_rate=learning_rate, momentum=momentum, eps=eps))



