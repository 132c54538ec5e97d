"""More ``scale_by_*`` primitives: optax's rules beyond the Adam and RMSProp families.

AdaBelief, Yogi, Adan, NovoGrad, SM3, Rprop, the optimistic gradient, the Polyak step size,
L-BFGS's preconditioner, layer-wise DoG, and the per-leaf norm scalings. Each follows optax's
formula and operation order (``(1 - b) g + b m`` for a moment, ``m / (1 - b^t)`` for a bias
correction), so trajectories equal optax's to float32 rounding. States are NamedTuples named as
in optax. Counts are 0-d int64 tensors; choices that optax makes with ``jnp.where`` are
``torch.where`` here, so no rule reads a value back to the host and each traces under
``torch.compile(fullgraph=True)``.

These rules work leaf by leaf (``tree.map``); the hot-path rules (Adam, SGD, RMSProp ...) in
:mod:`craftfn.optim.adaptive` and :mod:`craftfn.optim.transforms` use multi-tensor kernels.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.chain(optim.scale_by_yogi(), optim.scale_by_learning_rate(1e-2))
    >>> state = tx.init({"w": torch.zeros(3)})
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import EmptyState, GradientTransformation, Params, Updates, check_hyperparameter
from craftfn.optim.sharding import refuse_sharded
from craftfn.optim.transforms import _check_betas, _check_state, _count_like, _need_params, _scalar_dtype

__all__ = [
    "ScaleByBeliefState",
    "ScaleByAdanState",
    "ScaleByNovogradState",
    "ScaleBySM3State",
    "ScaleByRpropState",
    "ScaleByOptimisticGradientState",
    "ScaleByLBFGSState",
    "ScaleByDistanceOverGradientsState",
    "scale_by_belief",
    "scale_by_yogi",
    "scale_by_adan",
    "scale_by_novograd",
    "scale_by_sm3",
    "scale_by_rprop",
    "scale_by_optimistic_gradient",
    "scale_by_polyak",
    "scale_by_lbfgs",
    "scale_by_distance_over_gradients",
    "scale_by_param_block_norm",
    "normalize_by_update_norm",
    "moment",
    "moment_sq",
    "bias_corrected",
]


# ----------------------------------------------------------------------------- optax-order helpers


def _hp(x: Any, like: torch.Tensor) -> Any:
    """A hyperparameter next to a leaf: 0-d tensors take the leaf's dtype and device."""
    return x.to(device=like.device, dtype=like.dtype) if isinstance(x, torch.Tensor) else x


def moment(g: torch.Tensor, m: torch.Tensor, decay: Any) -> torch.Tensor:
    """``(1 - decay) g + decay m`` in optax's order (``optax.tree.update_moment``, order 1).

    Example:
        >>> moment(torch.tensor([1.0]), torch.tensor([0.0]), 0.9)
        tensor([0.1000])
    """
    d = _hp(decay, m)
    return (1 - d) * g.to(m.dtype) + d * m


def moment_sq(g: torch.Tensor, v: torch.Tensor, decay: Any) -> torch.Tensor:
    """``(1 - decay) g^2 + decay v`` (``optax.tree.update_moment_per_elem_norm``, order 2).

    Example:
        >>> moment_sq(torch.tensor([2.0]), torch.tensor([0.0]), 0.5)
        tensor([2.])
    """
    d = _hp(decay, v)
    g = g.to(v.dtype)
    return (1 - d) * (g * g) + d * v


def _bias(decay: Any, count: torch.Tensor) -> torch.Tensor:
    t = count.to(_scalar_dtype(count))
    return 1 - torch.pow(torch.as_tensor(decay, dtype=t.dtype, device=t.device), t)


def bias_corrected(x: torch.Tensor, decay: Any, count: torch.Tensor) -> torch.Tensor:
    """``x / (1 - decay^count)`` (``optax.tree.bias_correction``); ``count`` a 0-d tensor.

    Example:
        >>> bias_corrected(torch.tensor([0.1]), 0.9, torch.tensor(1))
        tensor([1.])
    """
    return x / _bias(decay, count).to(device=x.device, dtype=x.dtype)


def _nesterov_mu_hat(mu: torch.Tensor, g: torch.Tensor, b1: Any, count: torch.Tensor) -> torch.Tensor:
    """optax's Nesterov first moment: ``b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)``."""
    b = _hp(b1, mu)
    return b * bias_corrected(mu, b1, count + 1) + (1 - b) * bias_corrected(g.to(mu.dtype), b1, count)


def _leaf_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


def _safe_norm(x: torch.Tensor, min_norm: Any) -> torch.Tensor:
    """``max(||x||, min_norm)`` (``optax.safe_norm``)."""
    return torch.clamp(_leaf_norm(x), min=min_norm) if not isinstance(min_norm, torch.Tensor) else torch.maximum(_leaf_norm(x), _hp(min_norm, x))


def _tree_sq_norm(updates: Updates) -> torch.Tensor:
    leaves_ = tree.leaves(updates)
    if not leaves_:
        return torch.zeros(())
    return sum(torch.sum(x * x) for x in leaves_)


def _tree_vdot(a: Updates, b: Updates) -> torch.Tensor:
    la, treedef = tree.flatten(a)
    lb = treedef.flatten_up_to(b)
    return sum(torch.sum(x * y) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- AdaBelief, Yogi, Adan


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief`: count, first moment, and the second central moment ``nu``."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_belief(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16, *, nesterov: bool = False) -> GradientTransformation:
    """AdaBelief (Zhuang et al., 2020): Adam with the variance of the prediction error ``g - mu``.

    ``mu = b1 mu + (1 - b1) g``, ``nu = b2 nu + (1 - b2) (g - mu)^2 + eps_root``; the update is
    ``mu_hat / (sqrt(nu_hat) + eps)`` (Nesterov: optax's NAdam first moment).

    Example:
        >>> tx = optim.scale_by_belief()
        >>> s = tx.init({"w": torch.zeros(2)})
        >>> type(s).__name__
        'ScaleByBeliefState'
    """
    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)

    def init_fn(params: Params) -> ScaleByBeliefState:
        return ScaleByBeliefState(_count_like(params), tree.zeros_like(params), tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByBeliefState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByBeliefState]:
        del params, extra
        _check_state("scale_by_belief", state, ScaleByBeliefState)
        mu = tree.map(lambda g, m: moment(g, m, b1), updates, state.mu)
        nu = tree.map(lambda g, m, v: moment_sq(g - m, v, b2) + _hp(eps_root, v), updates, mu, state.nu)
        count = state.count + 1
        if nesterov:
            mu_hat = tree.map(lambda m, g: _nesterov_mu_hat(m, g, b1, count), mu, updates)
        else:
            mu_hat = tree.map(lambda m: bias_corrected(m, b1, count), mu)
        out = tree.map(lambda m, v: m / (torch.sqrt(bias_corrected(v, b2, count)) + _hp(eps, v)), mu_hat, nu)
        return out, ScaleByBeliefState(count, mu, nu)

    return GradientTransformation(init_fn, update_fn)


def scale_by_yogi(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3, eps_root: float = 0.0, initial_accumulator_value: float = 1e-6
) -> GradientTransformation:
    """Yogi (Zaheer et al., 2018): Adam whose second moment moves additively,
    ``nu = nu - (1 - b2) sign(nu - g^2) g^2``; update ``mu_hat / (sqrt(nu_hat + eps_root) + eps)``.

    Both moments start at ``initial_accumulator_value``; the state is a ``ScaleByAdamState``.

    Example:
        >>> tx = optim.scale_by_yogi()
        >>> tx.init({"w": torch.zeros(1)}).nu["w"][0]
        tensor(1.0000e-06)
    """
    from craftfn.optim.adaptive import ScaleByAdamState

    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)
    check_hyperparameter("initial_accumulator_value", initial_accumulator_value)

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(_count_like(params), tree.full_like(params, initial_accumulator_value), tree.full_like(params, initial_accumulator_value))

    def update_fn(updates: Updates, state: ScaleByAdamState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdamState]:
        del params, extra
        _check_state("scale_by_yogi", state, ScaleByAdamState)
        mu = tree.map(lambda g, m: moment(g, m, b1), updates, state.mu)

        def second(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            g2 = g.to(v.dtype) * g.to(v.dtype)
            return v - (1 - _hp(b2, v)) * torch.sign(v - g2) * g2

        nu = tree.map(second, updates, state.nu)
        count = state.count + 1
        out = tree.map(
            lambda m, v: bias_corrected(m, b1, count) / (torch.sqrt(bias_corrected(v, b2, count) + _hp(eps_root, v)) + _hp(eps, v)), mu, nu
        )
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init_fn, update_fn)


class ScaleByAdanState(NamedTuple):
    """State of :func:`scale_by_adan`: three moments, the last gradient, and the count ``t``."""

    m: Updates
    v: Updates
    n: Updates
    g: Updates
    t: torch.Tensor


def scale_by_adan(b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8, eps_root: float = 0.0) -> GradientTransformation:
    """Adan (Xie et al., 2022): Nesterov-style moments of the gradient and of its difference.

    With ``d = g - g_prev`` (0 at the first step): ``m = EMA_b1(g)``, ``v = EMA_b2(d)``,
    ``n = EMA_b3((g + (1 - b2) d)^2)``; update ``(m_hat + (1 - b2) v_hat) / (sqrt(n_hat + eps_root) + eps)``.

    Example:
        >>> tx = optim.scale_by_adan()
        >>> sorted(tx.init({"w": torch.zeros(1)})._fields)
        ['g', 'm', 'n', 't', 'v']
    """
    _check_betas(b1=b1, b2=b2, b3=b3)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)

    def init_fn(params: Params) -> ScaleByAdanState:
        z = tree.zeros_like
        return ScaleByAdanState(z(params), z(params), z(params), z(params), _count_like(params))

    def update_fn(updates: Updates, state: ScaleByAdanState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdanState]:
        del params, extra
        _check_state("scale_by_adan", state, ScaleByAdanState)
        first = state.t == 0
        diff = tree.map(lambda g, gp: torch.where(first.to(g.device), torch.zeros_like(g), g - gp.to(g.dtype)), updates, state.g)
        m = tree.map(lambda g, x: moment(g, x, b1), updates, state.m)
        v = tree.map(lambda d, x: moment(d, x, b2), diff, state.v)
        n = tree.map(lambda g, d, x: moment_sq(g + (1 - _hp(b2, g)) * d, x, b3), updates, diff, state.n)
        t = state.t + 1

        def direction(mm: torch.Tensor, vv: torch.Tensor, nn: torch.Tensor) -> torch.Tensor:
            u = bias_corrected(mm, b1, t) + (1 - _hp(b2, vv)) * bias_corrected(vv, b2, t)
            return u / (torch.sqrt(bias_corrected(nn, b3, t) + _hp(eps_root, nn)) + _hp(eps, nn))

        return tree.map(direction, m, v, n), ScaleByAdanState(m, v, n, updates, t)

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- NovoGrad, SM3


class ScaleByNovogradState(NamedTuple):
    """State of :func:`scale_by_novograd`: count, first moment, and one 0-d second moment per leaf."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_novograd(
    b1: float = 0.9, b2: float = 0.25, eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 0.0, mu_dtype: Optional[torch.dtype] = None
) -> GradientTransformation:
    """NovoGrad (Ginsburg et al., 2019): layer-wise second moments of the gradient norm.

    Per leaf: ``nu = ||g||^2`` at the first step, then ``nu = b2 nu + (1 - b2) ||g||^2``;
    ``mu = b1 mu + g / (sqrt(nu + eps_root) + eps) + weight_decay p`` (``b1 mu`` dropped at the
    first step); the update is ``mu``. Needs ``params``.

    Example:
        >>> tx = optim.scale_by_novograd()
        >>> tuple(tx.init({"w": torch.zeros(3)}).nu["w"].shape)
        ()
    """
    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)
    check_hyperparameter("weight_decay", weight_decay)

    def init_fn(params: Params) -> ScaleByNovogradState:
        refuse_sharded("scale_by_novograd (NovoGrad)", "its second moments are norms of whole parameters")
        return ScaleByNovogradState(
            _count_like(params), tree.zeros_like(params, dtype=mu_dtype), tree.map(lambda p: torch.zeros((), dtype=p.dtype, device=p.device), params)
        )

    def update_fn(updates: Updates, state: ScaleByNovogradState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByNovogradState]:
        refuse_sharded("scale_by_novograd (NovoGrad)", "its second moments are norms of whole parameters")
        del extra
        _check_state("scale_by_novograd", state, ScaleByNovogradState)
        _need_params("scale_by_novograd", params)
        first = state.count == 0

        def new_nu(g: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            sq = (_leaf_norm(g) ** 2).to(n.dtype)
            return torch.where(first.to(n.device), sq, moment(sq, n, b2))

        nu = tree.map(new_nu, updates, state.nu)

        def new_mu(g: torch.Tensor, p: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            add = g / (torch.sqrt(n + _hp(eps_root, n)) + _hp(eps, n)) + _hp(weight_decay, g) * p.to(g.dtype)
            return torch.where(first.to(m.device), add.to(m.dtype), (_hp(b1, m) * m + add).to(m.dtype))

        mu = tree.map(new_mu, updates, params, nu, state.mu)
        return tree.map(lambda m, g: m.to(g.dtype), mu, updates), ScaleByNovogradState(state.count + 1, mu, nu)

    return GradientTransformation(init_fn, update_fn)


class ScaleBySM3State(NamedTuple):
    """State of :func:`scale_by_sm3`: per leaf, one accumulator per axis (``mu``), and the momentum ``nu``."""

    mu: Updates
    nu: Updates


def _sm3_axes(p: torch.Tensor) -> list[torch.Tensor]:
    # One accumulator per axis; a 0-d leaf keeps one 0-d accumulator (optax has none and fails).
    if p.ndim == 0:
        return [torch.zeros((), dtype=p.dtype, device=p.device)]
    return [torch.zeros((p.shape[i],), dtype=p.dtype, device=p.device) for i in range(p.ndim)]


def scale_by_sm3(b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8) -> GradientTransformation:
    """SM3 (Anil et al., 2019): memory-efficient adaptive scaling with one accumulator per axis.

    A leaf's second-moment estimate is the minimum over its axes of the broadcast per-axis
    accumulators, plus ``g^2``; the update is the ``b1``-momentum of ``g / sqrt(acc + eps)``
    (0 where ``acc == 0``). Vectors and scalars keep a full accumulator.

    Example:
        >>> tx = optim.scale_by_sm3()
        >>> [tuple(a.shape) for a in tx.init({"w": torch.zeros(4, 3)}).mu["w"]]
        [(4,), (3,)]
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0, high_inclusive=True)
    check_hyperparameter("b2", b2, low=0.0, high=1.0, high_inclusive=True)
    check_hyperparameter("eps", eps)
    c0 = (1.0 - b2) if not (isinstance(b2, (int, float)) and b2 == 1.0) else 1.0

    def init_fn(params: Params) -> ScaleBySM3State:
        refuse_sharded("scale_by_sm3 (SM3)", "its accumulators are maxima along each axis of whole parameters")
        return ScaleBySM3State(tree.map(_sm3_axes, params), tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleBySM3State, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleBySM3State]:
        refuse_sharded("scale_by_sm3 (SM3)", "its accumulators are maxima along each axis of whole parameters")
        del params, extra
        _check_state("scale_by_sm3", state, ScaleBySM3State)
        g_leaves, treedef = tree.flatten(updates)
        mu_leaves = treedef.flatten_up_to(state.mu)
        new_mu, ups = [], []
        for g, accs in zip(g_leaves, mu_leaves):
            if g.ndim < 2:
                acc = c0 * g * g + _hp(b2, g) * accs[0]
                new_mu.append([acc])
            else:
                shaped = [a.reshape([1] * i + [g.shape[i]] + [1] * (g.ndim - i - 1)) for i, a in enumerate(accs)]
                least = shaped[0]
                for a in shaped[1:]:
                    least = torch.minimum(least, a)
                acc = c0 * g * g + _hp(b2, g) * least
                new_mu.append([torch.amax(acc, dim=[d for d in range(g.ndim) if d != i]) for i in range(g.ndim)])
            ups.append(g * torch.where(acc > 0, torch.rsqrt(acc + _hp(eps, acc)), torch.zeros_like(acc)))
        up = tree.unflatten(treedef, ups)
        nu = tree.map(lambda u, n: moment(u, n, b1), up, state.nu)
        return nu, ScaleBySM3State(tree.unflatten(treedef, new_mu), nu)

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- Rprop, optimistic, Polyak


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`: per-element step sizes and the previous signed steps."""

    step_sizes: Updates
    prev_updates: Updates


def scale_by_rprop(
    learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2, min_step_size: float = 1e-6, max_step_size: float = 50.0
) -> GradientTransformation:
    """Rprop (Riedmiller & Braun, 1993): per-element step sizes driven by sign agreement.

    Where ``g * g_prev > 0`` the step grows by ``eta_plus``, where ``< 0`` it shrinks by
    ``eta_minus`` (clipped to ``[min_step_size, max_step_size]``) and that element skips a
    step; the update is ``step * sign(g)`` (optax's form: it returns the previous step's
    signed update where the sign did not flip, so follow it with ``scale(-1)``).

    Example:
        >>> tx = optim.scale_by_rprop(0.1)
        >>> tx.init({"w": torch.zeros(1)}).step_sizes["w"][0]
        tensor(0.1000)
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("eta_minus", eta_minus)
    check_hyperparameter("eta_plus", eta_plus)
    check_hyperparameter("min_step_size", min_step_size)
    check_hyperparameter("max_step_size", max_step_size)

    def init_fn(params: Params) -> ScaleByRpropState:
        return ScaleByRpropState(tree.full_like(params, learning_rate), tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByRpropState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByRpropState]:
        del params, extra
        _check_state("scale_by_rprop", state, ScaleByRpropState)
        g_leaves, treedef = tree.flatten(updates)
        steps, prevs = treedef.flatten_up_to(state.step_sizes), treedef.flatten_up_to(state.prev_updates)
        new_steps, new_prev, out = [], [], []
        for g, step, prev in zip(g_leaves, steps, prevs):
            s = g * prev
            grown = step * torch.where(s > 0, torch.full_like(step, eta_plus), torch.full_like(step, eta_minus))
            step = torch.where(s == 0, step, torch.clamp(grown, min=min_step_size, max=max_step_size))
            upd = torch.where(s < 0, torch.zeros_like(g), step * torch.sign(g))
            out.append(torch.where(s < 0, torch.zeros_like(prev), prev))
            new_steps.append(step)
            new_prev.append(upd)
        unf = lambda xs: tree.unflatten(treedef, xs)  # noqa: E731
        return unf(out), ScaleByRpropState(unf(new_steps), unf(new_prev))

    return GradientTransformation(init_fn, update_fn)


class ScaleByOptimisticGradientState(NamedTuple):
    """State of :func:`scale_by_optimistic_gradient`: whether no step was taken yet, and the last gradient."""

    is_initial_step: torch.Tensor
    previous_gradient: Updates


def scale_by_optimistic_gradient(alpha: float = 1.0, beta: float = 1.0) -> GradientTransformation:
    """The optimistic gradient (Daskalakis et al., 2017): ``(alpha + beta) g - beta g_prev``
    (``g_prev = g`` at the first step).

    Example:
        >>> tx = optim.scale_by_optimistic_gradient()
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([1.])}
    """
    check_hyperparameter("alpha", alpha)
    check_hyperparameter("beta", beta)

    def init_fn(params: Params) -> ScaleByOptimisticGradientState:
        device = _count_like(params).device
        return ScaleByOptimisticGradientState(torch.ones((), dtype=torch.bool, device=device), tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByOptimisticGradientState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("scale_by_optimistic_gradient", state, ScaleByOptimisticGradientState)

        def f(g: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
            prev = torch.where(state.is_initial_step.to(g.device), g, prev.to(g.dtype))
            return (_hp(alpha, g) + _hp(beta, g)) * g - _hp(beta, g) * prev

        out = tree.map(f, updates, state.previous_gradient)
        new_prev = tree.map(lambda g, p: g.to(p.dtype), updates, state.previous_gradient)
        return out, ScaleByOptimisticGradientState(torch.zeros_like(state.is_initial_step), new_prev)

    return GradientTransformation(init_fn, update_fn)


def scale_by_polyak(f_min: float = 0.0, max_learning_rate: float = 1.0, eps: float = 0.0, variant: str = "sps") -> GradientTransformation:
    """The Polyak step size (Loizou et al., 2021): scale by ``min((f - f_min) / ||g||^2, max_learning_rate)``.

    ``update`` needs the loss as ``value=`` (``tx.update(grads, state, params, value=loss)``).
    ``variant="sps+"`` clamps ``f - f_min`` at 0. A zero gradient gives a zero step.

    Example:
        >>> tx = optim.scale_by_polyak()
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init(None), value=torch.tensor(2.0))[0]
        {'w': tensor([1.])}
    """
    check_hyperparameter("max_learning_rate", max_learning_rate)
    check_hyperparameter("eps", eps)
    check_hyperparameter("f_min", f_min, low=None)
    if variant not in ("sps", "sps+"):
        raise ValueError(f"scale_by_polyak: variant must be 'sps' or 'sps+', got {variant!r}")

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: EmptyState, params: Optional[Params] = None, *, value: Any = None, **extra: Any) -> tuple[Updates, EmptyState]:
        refuse_sharded("scale_by_polyak (Polyak SGD)", "its step size divides by the norm of all gradients")
        del params, extra
        if value is None:
            raise ValueError("scale_by_polyak: update needs the loss: tx.update(grads, state, params, value=loss)")
        sq = _tree_sq_norm(updates)
        gap = torch.as_tensor(value, device=sq.device).to(sq.dtype) - f_min
        if variant == "sps+":
            gap = torch.relu(gap)
        step = torch.where(
            sq + eps <= torch.finfo(torch.float64).eps, torch.zeros_like(sq), torch.clamp((gap / (sq + eps)), max=max_learning_rate)
        )
        return tree.map(lambda u: u * step.to(device=u.device, dtype=u.dtype), updates), state

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- L-BFGS


class ScaleByLBFGSState(NamedTuple):
    """State of :func:`scale_by_lbfgs`: the last params and updates and ``memory_size`` curvature pairs."""

    count: torch.Tensor
    params: Params
    updates: Updates
    diff_params_memory: Updates
    diff_updates_memory: Updates
    weights_memory: torch.Tensor


def scale_by_lbfgs(memory_size: int = 10, scale_init_precond: bool = True) -> GradientTransformation:
    """L-BFGS's two-loop recursion (Nocedal & Wright, 2006, algorithm 7.4): precondition the
    gradient by an inverse-Hessian estimate built from the last ``memory_size`` steps.

    Ring-buffer slots are chosen with tensor indices (``index_copy``/``index_select``), so the
    rule never reads the count on the host. Needs ``params``.

    Example:
        >>> tx = optim.scale_by_lbfgs(memory_size=3)
        >>> tuple(tx.init({"w": torch.zeros(2)}).diff_params_memory["w"].shape)
        (3, 2)
    """
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"scale_by_lbfgs: memory_size must be an int >= 1, got {memory_size!r}")

    def init_fn(params: Params) -> ScaleByLBFGSState:
        refuse_sharded("scale_by_lbfgs (L-BFGS)", "its curvature pairs are dot products over all parameters")
        stacked = tree.map(lambda p: torch.zeros((memory_size, *p.shape), dtype=p.dtype, device=p.device), params)
        count = _count_like(params)
        return ScaleByLBFGSState(
            count, tree.zeros_like(params), tree.zeros_like(params), stacked, tree.clone(stacked), torch.zeros(memory_size, device=count.device)
        )

    def update_fn(updates: Updates, state: ScaleByLBFGSState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByLBFGSState]:
        refuse_sharded("scale_by_lbfgs (L-BFGS)", "its curvature pairs are dot products over all parameters")
        del extra
        _check_state("scale_by_lbfgs", state, ScaleByLBFGSState)
        _need_params("scale_by_lbfgs", params)
        started = state.count > 0
        memory_idx = torch.remainder(state.count, memory_size)
        prev_idx = torch.remainder(state.count - 1, memory_size)
        dp = tree.map(lambda p, q: p - q, params, state.params)
        du = tree.map(lambda u, v: u - v, updates, state.updates)
        curv = _tree_vdot(du, dp)
        weight = torch.where(curv == 0.0, torch.zeros_like(curv), 1.0 / curv)
        dp = tree.map(lambda x: torch.where(started, x, torch.zeros_like(x)), dp)
        du = tree.map(lambda x: torch.where(started, x, torch.zeros_like(x)), du)
        weight = torch.where(started, weight, torch.zeros_like(weight))
        put = lambda mem, x: mem.index_copy(0, prev_idx.reshape(1), x.unsqueeze(0).to(mem.dtype))  # noqa: E731
        dp_mem = tree.map(put, state.diff_params_memory, dp)
        du_mem = tree.map(put, state.diff_updates_memory, du)
        w_mem = put(state.weights_memory, weight)
        if scale_init_precond:
            num, den = _tree_vdot(du, dp), _tree_sq_norm(du)
            identity_scale = torch.where(den > 0.0, num / den, torch.ones_like(den))
            capped = torch.clamp(1.0 / torch.sqrt(_tree_sq_norm(updates)), max=1.0)
            identity_scale = torch.where(started, identity_scale, capped.to(identity_scale.dtype))
        else:
            identity_scale = torch.ones(())
        order = torch.remainder(memory_idx + torch.arange(memory_size, device=memory_idx.device), memory_size)
        pick = lambda mem, j: mem.index_select(0, order[j].reshape(1)).squeeze(0)  # noqa: E731
        def slot(mem: Updates, j: int) -> Updates:
            return tree.map(lambda m: pick(m, j), mem)

        def add_scaled(vec: Updates, coef: torch.Tensor, direction: Updates) -> Updates:
            return tree.map(lambda v, d: (v + coef.to(v.dtype) * d).to(v.dtype), vec, direction)

        # The two-loop recursion over the ring buffer, oldest pair last in the first loop.
        vec, alphas = updates, [torch.zeros(())] * memory_size
        for j in reversed(range(memory_size)):
            alphas[j] = pick(w_mem, j) * _tree_vdot(slot(dp_mem, j), vec)
            vec = add_scaled(vec, -alphas[j], slot(du_mem, j))
        vec = tree.map(lambda v: v * identity_scale.to(device=v.device, dtype=v.dtype), vec)
        for j in range(memory_size):
            beta = pick(w_mem, j) * _tree_vdot(slot(du_mem, j), vec)
            vec = add_scaled(vec, alphas[j] - beta, slot(dp_mem, j))
        new_state = ScaleByLBFGSState(state.count + 1, tree.map(lambda p: p.detach(), params), updates, dp_mem, du_mem, w_mem)
        return vec, new_state

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- per-leaf norms


class ScaleByDistanceOverGradientsState(NamedTuple):
    """State of :func:`scale_by_distance_over_gradients`: per leaf, the largest distance moved,
    the running sum of squared gradients, and the starting parameters."""

    max_dist: Updates
    grad_sum_of_squares: Updates
    init_params: Params


def scale_by_distance_over_gradients(reps_rel: float = 1e-6, eps: float = 1e-8, param_dtype: torch.dtype = torch.float32, global_scale: float = 1.0) -> GradientTransformation:
    """Layer-wise DoG (Ivgi et al., 2023): per leaf, step ``global_scale * max_dist / sqrt(sum ||g||^2 + eps)``.

    Example:
        >>> tx = optim.scale_by_distance_over_gradients()
        >>> tuple(tx.init({"w": torch.ones(2)}).grad_sum_of_squares["w"].shape)
        (1,)
    """
    check_hyperparameter("reps_rel", reps_rel)
    check_hyperparameter("eps", eps)
    check_hyperparameter("global_scale", global_scale, low=None)

    def init_fn(params: Params) -> ScaleByDistanceOverGradientsState:
        refuse_sharded("scale_by_distance_over_gradients (layer-wise DoG)", "its step sizes are norms of whole parameters")
        return ScaleByDistanceOverGradientsState(
            tree.map(lambda x: reps_rel * (1 + _leaf_norm(x)), params),
            tree.map(lambda x: torch.zeros(1, device=x.device), params),
            tree.map(lambda x: x.detach().to(param_dtype, copy=True), params),
        )

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        refuse_sharded("scale_by_distance_over_gradients (layer-wise DoG)", "its step sizes are norms of whole parameters")
        del extra
        _check_state("scale_by_distance_over_gradients", state, ScaleByDistanceOverGradientsState)
        _need_params("scale_by_distance_over_gradients", params)
        max_dist = tree.map(lambda d, x, y: torch.maximum(d, _leaf_norm(x - y.to(x.dtype)).to(d.dtype)), state.max_dist, params, state.init_params)
        g_sos = tree.map(lambda s, g: s + torch.sum(g * g).to(s.dtype), state.grad_sum_of_squares, updates)
        out = tree.map(lambda g, d, s: (global_scale * (d / torch.sqrt(s + eps))).to(g.dtype) * g, updates, max_dist, g_sos)
        return out, ScaleByDistanceOverGradientsState(max_dist, g_sos, state.init_params)

    return GradientTransformation(init_fn, update_fn)


def scale_by_param_block_norm(min_scale: float = 1e-3) -> GradientTransformation:
    """Scale each leaf's update by ``max(||param||, min_scale)``.

    Example:
        >>> tx = optim.scale_by_param_block_norm()
        >>> tx.update({"w": torch.ones(2)}, tx.init(None), {"w": torch.tensor([3.0, 4.0])})[0]
        {'w': tensor([5., 5.])}
    """
    check_hyperparameter("min_scale", min_scale)

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        refuse_sharded("scale_by_param_block_norm", "it scales by the norm of each whole parameter")
        del extra
        _need_params("scale_by_param_block_norm", params)
        return tree.map(lambda u, p: u * _safe_norm(p, min_scale).to(u.dtype), updates, params), state

    return GradientTransformation(init_fn, update_fn)


def normalize_by_update_norm(scale_factor: float = 1.0, eps: float = 1e-6) -> GradientTransformation:
    """Divide the updates by ``(global_norm(updates) + eps) / scale_factor``.

    Example:
        >>> tx = optim.normalize_by_update_norm(eps=0.0)
        >>> tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, tx.init(None))[0]
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """
    check_hyperparameter("eps", eps)
    check_hyperparameter("scale_factor", scale_factor, low=None)

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        refuse_sharded("normalize_by_update_norm", "it divides by the norm of all updates")
        del params, extra
        g_norm = (torch.sqrt(_tree_sq_norm(updates)) + eps) / scale_factor
        return tree.map(lambda g: g / g_norm.to(g.dtype), updates), state

    return GradientTransformation(init_fn, update_fn)

