"""Learning-rate-free rules from optax.contrib: COCOB, DoG, DoWG, Prodigy, D-Adaptation AdamW,
Mechanic, MoMo and MoMo-Adam.

Each estimates its own step size from distances travelled, gradient norms or loss values.
Same formulas and operation order as optax; scalars that optax keeps in the parameters' dtype
are 0-d tensors of that dtype here, and every data-dependent choice is a ``torch.where``.

Example:
    >>> import torch
    >>> from craftfn.optim import contrib
    >>> tx = contrib.prodigy()
    >>> state = tx.init({"w": torch.zeros(3)})
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
    chain,
    check_hyperparameter,
    identity,
)
from craftfn.optim.rules import _tree_sq_norm, _tree_vdot
from craftfn.optim.sharding import refuse_sharded
from craftfn.optim.transforms import (
    MaskOrFn,
    _check_state,
    _count_like,
    _need_params,
    add_decayed_weights,
    scale_by_learning_rate,
)

__all__ = [
    "COCOBState",
    "DoGState",
    "DoWGState",
    "ProdigyState",
    "DAdaptAdamWState",
    "MechanicState",
    "MomoState",
    "MomoAdamState",
    "scale_by_cocob",
    "cocob",
    "scale_by_dog",
    "dog",
    "scale_by_dowg",
    "dowg",
    "prodigy",
    "dadapt_adamw",
    "mechanize",
    "momo",
    "momo_adam",
]


def _lowest_dtype(params: Params) -> torch.dtype:
    leaves_ = [x for x in tree.leaves(params) if x.is_floating_point()]
    return min((x.dtype for x in leaves_), key=lambda d: torch.finfo(d).bits) if leaves_ else torch.float32


def _scalar(value: Any, params: Params) -> torch.Tensor:
    return torch.as_tensor(value, dtype=_lowest_dtype(params), device=_count_like(params).device).clone()


def _at(x: Any, count: torch.Tensor) -> Any:
    return x(count) if callable(x) else x


def _norm(t: Updates) -> torch.Tensor:
    return torch.sqrt(_tree_sq_norm(t))


# ----------------------------------------------------------------------------- COCOB


class COCOBState(NamedTuple):
    """State of :func:`scale_by_cocob` (optax's fields)."""

    init_particles: Params
    cumulative_gradients: Updates
    scale: Updates
    subgradients: Updates
    reward: Updates


def scale_by_cocob(alpha: float = 100.0, eps: float = 1e-8) -> GradientTransformation:
    """COCOB-Backprop (Orabona & Tommasi, 2017): coin-betting, no learning rate. Needs ``params``.

    Example:
        >>> tx = scale_by_cocob()
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'COCOBState'
    """
    check_hyperparameter("alpha", alpha, low=0.0, low_inclusive=False)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> COCOBState:
        zeros = tree.zeros_like(params)
        return COCOBState(tree.clone(tree.detach(params)), zeros, tree.full_like(params, eps), tree.zeros_like(params), tree.zeros_like(params))

    def update_fn(updates: Updates, state: COCOBState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, COCOBState]:
        del extra
        _check_state("scale_by_cocob", state, COCOBState)
        _need_params("scale_by_cocob", params)
        scale = tree.map(lambda big_l, c: torch.maximum(big_l, torch.abs(c)), state.scale, updates)
        sub = tree.map(lambda big_g, c: big_g + torch.abs(c), state.subgradients, updates)
        reward = tree.map(lambda r, c, p, p0: torch.clamp(r - c * (p - p0), min=0), state.reward, updates, params, state.init_particles)
        cum = tree.map(lambda big_c, c: big_c - c, state.cumulative_gradients, updates)
        out = tree.map(
            lambda p, p0, big_c, big_l, big_g, r: -p + (p0 + big_c / (big_l * torch.maximum(big_g + big_l, alpha * big_l)) * (big_l + r)),
            params, state.init_particles, cum, scale, sub, reward,
        )
        return out, COCOBState(state.init_particles, cum, scale, sub, reward)

    return GradientTransformation(init_fn, update_fn)


def cocob(learning_rate: ScalarOrSchedule = 1.0, alpha: float = 100.0, eps: float = 1e-8, weight_decay: float = 0.0, mask: MaskOrFn = None) -> GradientTransformation:
    """COCOB: ``chain(add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr, flip_sign=False), scale_by_cocob(alpha, eps))``.

    Example:
        >>> len(cocob().init({"w": torch.zeros(1)}))
        3
    """
    return chain(
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_cocob(alpha=alpha, eps=eps),
    )


# ----------------------------------------------------------------------------- DoG, DoWG


class DoGState(NamedTuple):
    """State of :func:`scale_by_dog`."""

    is_init_step: torch.Tensor
    init_params: Params
    max_dist: torch.Tensor
    sum_sq_norm_grads: torch.Tensor


def scale_by_dog(init_step: tuple[str, float], eps: float = 1e-8) -> GradientTransformation:
    """DoG (Ivgi et al., 2023): step ``max_dist / sqrt(sum ||g||^2 + eps)``, with ``max_dist`` the largest
    distance from the start so far, seeded by ``init_step``: ``("distance", r)``, ``("heuristic", c)``
    (``r = c (1 + ||x0||)``) or ``("learning_rate", lr)`` (first step). Needs ``params``.

    Example:
        >>> tx = scale_by_dog(("heuristic", 1e-6))
        >>> tx.init({"w": torch.zeros(1)}).max_dist
        tensor(1.0000e-06)
    """
    kind, value = init_step
    if kind not in ("distance", "learning_rate", "heuristic"):
        raise ValueError(f"scale_by_dog: init_step[0] must be 'distance', 'learning_rate' or 'heuristic', got {kind!r}")
    check_hyperparameter("init_step[1]", value)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> DoGState:
        refuse_sharded("scale_by_dog (DoG)", "its step size uses norms over all parameters")
        if kind == "distance":
            r = _scalar(value, params)
        elif kind == "heuristic":
            r = (value * (1 + _norm(params))).to(_lowest_dtype(params))
        else:
            r = _scalar(0.0, params)
        device = r.device
        return DoGState(torch.ones((), dtype=torch.bool, device=device), tree.clone(tree.detach(params)), r, _scalar(0.0, params))

    def update_fn(updates: Updates, state: DoGState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, DoGState]:
        refuse_sharded("scale_by_dog (DoG)", "its step size uses norms over all parameters")
        del extra
        _check_state("scale_by_dog", state, DoGState)
        _need_params("scale_by_dog", params)
        dist = _norm(tree.map(lambda a, b: a - b, state.init_params, params))
        max_dist = torch.maximum(state.max_dist, dist.to(state.max_dist.dtype))
        sum_sq = state.sum_sq_norm_grads + _tree_sq_norm(updates).to(state.max_dist.dtype)
        lr = max_dist / torch.sqrt(sum_sq + eps)
        if kind == "learning_rate":
            lr = torch.where(state.is_init_step, torch.as_tensor(value, dtype=lr.dtype, device=lr.device), lr)
        out = tree.map(lambda u: u * lr.to(u.dtype), updates)
        return out, DoGState(torch.zeros_like(state.is_init_step), state.init_params, max_dist, sum_sq)

    return GradientTransformation(init_fn, update_fn)


def dog(
    learning_rate: ScalarOrSchedule = 1.0, init_step: tuple[str, float] = ("heuristic", 1e-6), eps: float = 1e-8, weight_decay: Optional[float] = None, mask: MaskOrFn = None
) -> GradientTransformation:
    """DoG: ``chain(add_decayed_weights(weight_decay, mask) or identity(), scale_by_dog(init_step, eps), scale_by_learning_rate(lr))``.

    Example:
        >>> len(dog().init({"w": torch.zeros(1)}))
        3
    """
    return chain(
        add_decayed_weights(weight_decay, mask=mask) if weight_decay is not None else identity(),
        scale_by_dog(init_step, eps=eps),
        scale_by_learning_rate(learning_rate),
    )


class DoWGState(NamedTuple):
    """State of :func:`scale_by_dowg`."""

    init_params: Params
    weighted_sq_norm_grads: torch.Tensor
    estim_sq_dist: torch.Tensor


def scale_by_dowg(init_estim_sq_dist: Optional[float] = None, eps: float = 1e-4) -> GradientTransformation:
    """DoWG (Khaled et al., 2023): distance-over-weighted-gradients step
    ``r^2 / sqrt(sum r_k^2 ||g_k||^2) `` with ``r^2`` the largest squared distance so far. Needs ``params``.

    Example:
        >>> tx = scale_by_dowg()
        >>> tx.init({"w": torch.zeros(1)}).estim_sq_dist
        tensor(1.0000e-04)
    """
    check_hyperparameter("eps", eps)
    if init_estim_sq_dist is not None:
        check_hyperparameter("init_estim_sq_dist", init_estim_sq_dist)

    def init_fn(params: Params) -> DoWGState:
        refuse_sharded("scale_by_dowg (DoWG)", "its step size uses norms over all parameters")
        start = eps if init_estim_sq_dist is None else init_estim_sq_dist
        return DoWGState(tree.clone(tree.detach(params)), _scalar(0.0, params), _scalar(start, params))

    def update_fn(updates: Updates, state: DoWGState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, DoWGState]:
        refuse_sharded("scale_by_dowg (DoWG)", "its step size uses norms over all parameters")
        del extra
        _check_state("scale_by_dowg", state, DoWGState)
        _need_params("scale_by_dowg", params)
        dt = state.estim_sq_dist.dtype
        curr = _tree_sq_norm(tree.map(lambda a, b: a - b, state.init_params, params)).to(dt)
        estim = torch.maximum(state.estim_sq_dist, curr)
        weighted = estim * _tree_sq_norm(updates).to(dt) + state.weighted_sq_norm_grads
        lr = estim / (torch.sqrt(weighted) + eps)
        return tree.map(lambda u: u * lr.to(u.dtype), updates), DoWGState(state.init_params, weighted, estim)

    return GradientTransformation(init_fn, update_fn)


def dowg(
    learning_rate: ScalarOrSchedule = 1.0, init_estim_sq_dist: Optional[float] = None, eps: float = 1e-4, weight_decay: Optional[float] = None, mask: MaskOrFn = None
) -> GradientTransformation:
    """DoWG: ``chain(add_decayed_weights or identity(), scale_by_dowg(...), scale_by_learning_rate(lr))``.

    Example:
        >>> len(dowg().init({"w": torch.zeros(1)}))
        3
    """
    return chain(
        add_decayed_weights(weight_decay, mask=mask) if weight_decay is not None else identity(),
        scale_by_dowg(init_estim_sq_dist=init_estim_sq_dist, eps=eps),
        scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------- Prodigy, D-Adaptation


class ProdigyState(NamedTuple):
    """State of :func:`prodigy` (optax's fields)."""

    exp_avg: Updates
    exp_avg_sq: Updates
    grad_sum: Updates
    params0: Params
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor
    count: torch.Tensor


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: Optional[float] = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
) -> GradientTransformation:
    """Prodigy (Mishchenko & Defazio, 2023): Adam whose step size ``d`` is estimated from the
    correlation of gradients with the distance travelled. Needs ``params``.

    Example:
        >>> tx = prodigy()
        >>> tx.init({"w": torch.zeros(1)}).estim_lr
        tensor(1.0000e-06)
    """
    check_hyperparameter("learning_rate", learning_rate)
    beta1, beta2 = betas
    check_hyperparameter("betas[0]", beta1, low=0.0, high=1.0)
    check_hyperparameter("betas[1]", beta2, low=0.0, high=1.0)
    check_hyperparameter("eps", eps)
    check_hyperparameter("estim_lr0", estim_lr0, low=0.0, low_inclusive=False)
    check_hyperparameter("estim_lr_coef", estim_lr_coef)
    check_hyperparameter("weight_decay", weight_decay)
    b3 = beta2**0.5 if beta3 is None else beta3

    def init_fn(params: Params) -> ProdigyState:
        refuse_sharded("prodigy", "its distance estimate is a dot product over all parameters")
        z = tree.zeros_like
        return ProdigyState(z(params), z(params), z(params), tree.clone(tree.detach(params)), _scalar(estim_lr0, params), _scalar(0.0, params), _count_like(params))

    def update_fn(updates: Updates, state: ProdigyState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ProdigyState]:
        refuse_sharded("prodigy", "its distance estimate is a dot product over all parameters")
        del extra
        _check_state("prodigy", state, ProdigyState)
        _need_params("prodigy", params)
        count_inc = state.count + 1
        sched = _at(learning_rate, state.count)
        d = state.estim_lr
        t = count_inc.to(torch.float32)
        bc = ((1 - beta2**t) ** 0.5) / (1 - beta1**t)
        dlr = (d * sched * bc).to(d.dtype)
        dg = tree.map(lambda g: d.to(g.dtype) * g, updates)
        numerator_acum = _tree_vdot(updates, tree.map(lambda p0, p: p0 - p, state.params0, params))
        exp_avg = tree.map(lambda ea, x: beta1 * ea + (1 - beta1) * x, state.exp_avg, dg)
        exp_avg_sq = tree.map(lambda eas, x: beta2 * eas + (1 - beta2) * x * x, state.exp_avg_sq, dg)
        lead = d if safeguard_warmup else dlr
        grad_sum = tree.map(lambda sk, x: b3 * sk + lead.to(x.dtype) * x / estim_lr0, state.grad_sum, dg)
        numerator = b3 * state.numerator_weighted + (d / estim_lr0) * dlr * numerator_acum.to(d.dtype)
        denominator = sum(torch.sum(torch.abs(x)) for x in tree.leaves(grad_sum))
        estim = torch.maximum(d, (estim_lr_coef * numerator / denominator).to(d.dtype))
        out = tree.map(
            lambda ea, eas, p: -weight_decay * dlr.to(p.dtype) * p - dlr.to(p.dtype) * ea / (torch.sqrt(eas) + d.to(p.dtype) * eps),
            exp_avg, exp_avg_sq, params,
        )
        return out, ProdigyState(exp_avg, exp_avg_sq, grad_sum, state.params0, estim, numerator.to(d.dtype), count_inc)

    return GradientTransformation(init_fn, update_fn)


class DAdaptAdamWState(NamedTuple):
    """State of :func:`dadapt_adamw` (optax's fields)."""

    exp_avg: Updates
    exp_avg_sq: Updates
    grad_sum: Updates
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor
    count: torch.Tensor


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, estim_lr0: float = 1e-6, weight_decay: float = 0.0
) -> GradientTransformation:
    """D-Adaptation AdamW (Defazio & Mishchenko, 2023): AdamW with an estimated step size. Needs ``params``.

    Example:
        >>> tx = dadapt_adamw()
        >>> tx.init({"w": torch.zeros(1)}).estim_lr
        tensor(1.0000e-06)
    """
    check_hyperparameter("learning_rate", learning_rate)
    beta1, beta2 = betas
    check_hyperparameter("betas[0]", beta1, low=0.0, high=1.0)
    check_hyperparameter("betas[1]", beta2, low=0.0, high=1.0)
    check_hyperparameter("eps", eps)
    check_hyperparameter("estim_lr0", estim_lr0)
    check_hyperparameter("weight_decay", weight_decay)
    sb2 = beta2**0.5

    def init_fn(params: Params) -> DAdaptAdamWState:
        refuse_sharded("dadapt_adamw (D-Adaptation)", "its distance estimate is a dot product over all parameters")
        z = tree.zeros_like
        return DAdaptAdamWState(z(params), z(params), z(params), _scalar(estim_lr0, params), _scalar(0.0, params), _count_like(params))

    def update_fn(updates: Updates, state: DAdaptAdamWState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, DAdaptAdamWState]:
        refuse_sharded("dadapt_adamw (D-Adaptation)", "its distance estimate is a dot product over all parameters")
        del extra
        _check_state("dadapt_adamw", state, DAdaptAdamWState)
        _need_params("dadapt_adamw", params)
        sched = _at(learning_rate, state.count)
        count_inc = state.count + 1
        t = count_inc.to(torch.float32)
        bc = ((1 - beta2**t) ** 0.5) / (1 - beta1**t)
        dlr = (state.estim_lr * sched * bc).to(state.numerator_weighted.dtype)
        s_weighted = tree.map(lambda sk, eas: sk / (torch.sqrt(eas) + eps), state.grad_sum, state.exp_avg_sq)
        numerator_acum = _tree_vdot(updates, s_weighted)
        exp_avg = tree.map(lambda ea, g: beta1 * ea + (1 - beta1) * dlr.to(g.dtype) * g, state.exp_avg, updates)
        exp_avg_sq = tree.map(lambda eas, g: beta2 * eas + (1 - beta2) * g * g, state.exp_avg_sq, updates)
        grad_sum = tree.map(lambda sk, g: sb2 * sk + (1 - sb2) * dlr.to(g.dtype) * g, state.grad_sum, updates)
        grad_sum_l1 = sum(torch.sum(torch.abs(x)) for x in tree.leaves(grad_sum))
        numerator = sb2 * state.numerator_weighted + (1 - sb2) * dlr * numerator_acum.to(dlr.dtype)
        estim = torch.maximum(state.estim_lr, (numerator / ((1 - sb2) * grad_sum_l1)).to(state.estim_lr.dtype))
        out = tree.map(lambda ea, eas, p: -weight_decay * dlr.to(p.dtype) * p - ea / (torch.sqrt(eas) + eps), exp_avg, exp_avg_sq, params)
        return out, DAdaptAdamWState(exp_avg, exp_avg_sq, grad_sum, estim, numerator.to(dlr.dtype), count_inc)

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- Mechanic


class MechanicState(NamedTuple):
    """State of :func:`mechanize` (optax's fields)."""

    base_optimizer_state: OptState
    count: torch.Tensor
    r: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    x0: Params


def mechanize(base_optimizer: GradientTransformation, weight_decay: float = 1e-2, eps: float = 1e-8, s_init: float = 1e-6, num_betas: int = 6) -> GradientTransformation:
    """Mechanic (Cutkosky et al., 2023): learn a scale for ``base_optimizer``'s updates online. Needs ``params``.

    Example:
        >>> tx = mechanize(optim.sgd(0.1))
        >>> tuple(tx.init({"w": torch.zeros(1)}).s.shape)
        (6,)
    """
    if not isinstance(base_optimizer, GradientTransformation):
        raise TypeError(f"mechanize: base_optimizer must be a GradientTransformation, got {type(base_optimizer).__name__}")
    check_hyperparameter("weight_decay", weight_decay)
    check_hyperparameter("eps", eps)
    check_hyperparameter("s_init", s_init)
    if isinstance(num_betas, bool) or not isinstance(num_betas, int) or num_betas < 1:
        raise ValueError(f"mechanize: num_betas must be an int >= 1, got {num_betas!r}")

    def init_fn(params: Params) -> MechanicState:
        refuse_sharded("mechanize (Mechanic)", "its scale uses norms and dot products over all parameters")
        dt, device = _lowest_dtype(params), _count_like(params).device
        zeros = torch.zeros(num_betas, dtype=dt, device=device)
        return MechanicState(
            base_optimizer.init(params), _count_like(params), zeros, zeros.clone(), zeros.clone(), torch.full((num_betas,), s_init, dtype=dt, device=device),
            tree.clone(tree.detach(params)),
        )

    def update_fn(updates: Updates, state: MechanicState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, MechanicState]:
        refuse_sharded("mechanize (Mechanic)", "its scale uses norms and dot products over all parameters")
        _check_state("mechanize", state, MechanicState)
        _need_params("mechanize", params)
        new_neg_updates, base_state = base_optimizer.update(updates, state.base_optimizer_state, params, **extra)
        first = state.count == 0
        x0 = tree.map(lambda p, x: torch.where(first.to(p.device), p, x), params, state.x0)
        s_sum = torch.sum(state.s)
        grad_norm, param_norm = _norm(updates), _norm(params)
        coef = weight_decay * s_sum * grad_norm / (param_norm + eps)
        wd_updates = tree.map(lambda g, p: g + coef.to(g.dtype) * p, updates, params)
        delta_prev = tree.map(lambda xt, x0i: (x0i - xt) / (s_sum.to(xt.dtype) + eps), params, x0)
        delta = tree.map(lambda a, u: a - u, delta_prev, new_neg_updates)
        h = _tree_vdot(wd_updates, delta_prev).to(state.m.dtype)
        clipped_h = torch.clamp(h * torch.ones_like(state.m), min=-state.m, max=state.m)
        betas = torch.tensor([1.0 - 0.1**i for i in range(1, num_betas + 1)], dtype=state.s.dtype, device=state.s.device)
        m = torch.maximum(betas * state.m, torch.abs(h) + eps)
        v = (betas**2) * state.v + h**2
        r = betas * state.r + clipped_h * state.s
        wealth = (s_init / num_betas) * m + torch.clamp(r, min=0.0)
        s = wealth / (torch.sqrt(v) + eps)
        total = torch.sum(s)
        out = tree.map(lambda x0i, d, p: (x0i - total.to(d.dtype) * d) - p, x0, delta, params)
        return out, MechanicState(base_state, state.count + 1, r, m, v, s, x0)

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- MoMo


class MomoState(NamedTuple):
    """State of :func:`momo` (optax's fields)."""

    exp_avg: Updates
    barf: torch.Tensor
    gamma: torch.Tensor
    lb: torch.Tensor
    count: torch.Tensor


def _need_value(name: str, value: Any) -> None:
    if value is None:
        raise ValueError(f"{name}: update needs the loss: tx.update(grads, state, params, value=loss)")


def momo(
    learning_rate: ScalarOrSchedule = 1.0, beta: float = 0.9, lower_bound: float = 0.0, weight_decay: float = 0.0, adapt_lower_bound: bool = False
) -> GradientTransformation:
    """MoMo (Schaipp et al., 2023): momentum SGD with a Polyak-type step capped at ``learning_rate``.
    ``update`` needs ``params`` and the loss as ``value=``.

    Example:
        >>> tx = momo()
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'MomoState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("beta", beta, low=0.0, high=1.0)
    check_hyperparameter("lower_bound", lower_bound, low=None)
    check_hyperparameter("weight_decay", weight_decay)

    def init_fn(params: Params) -> MomoState:
        refuse_sharded("momo", "its step size uses norms and dot products over all parameters")
        return MomoState(tree.zeros_like(params), _scalar(0.0, params), _scalar(0.0, params), _scalar(lower_bound, params), _count_like(params))

    def update_fn(updates: Updates, state: MomoState, params: Optional[Params] = None, *, value: Any = None, **extra: Any) -> tuple[Updates, MomoState]:
        refuse_sharded("momo", "its step size uses norms and dot products over all parameters")
        del extra
        _check_state("momo", state, MomoState)
        _need_params("momo", params)
        _need_value("momo", value)
        dt = state.barf.dtype
        bt = torch.where(state.count == 0, torch.zeros((), dtype=dt, device=state.barf.device), torch.full((), beta, dtype=dt, device=state.barf.device))
        barf = bt * state.barf + (1 - bt) * torch.as_tensor(value, device=state.barf.device).to(dt)
        exp_avg = tree.map(lambda ea, g: bt.to(g.dtype) * ea + (1 - bt.to(g.dtype)) * g, state.exp_avg, updates)
        gamma = bt * state.gamma + (1 - bt) * _tree_vdot(updates, params).to(dt)
        ea_norm = _tree_sq_norm(exp_avg).to(dt)
        iprod = _tree_vdot(exp_avg, params).to(dt)
        alpha = _at(learning_rate, state.count)
        wd = 1 + alpha * weight_decay
        if adapt_lower_bound:
            cap = wd * (barf - gamma) + iprod
            this_lb = torch.where(cap < wd * state.lb, torch.clamp(cap / (2 * wd), min=lower_bound), state.lb)
        else:
            this_lb = state.lb
        t1 = torch.clamp(wd * (barf - this_lb - gamma) + iprod, min=0.0) / ea_norm
        t1 = torch.where(ea_norm <= torch.finfo(torch.float64).eps, torch.zeros_like(t1), t1)
        tau = torch.clamp(t1, max=alpha) if not isinstance(alpha, torch.Tensor) else torch.minimum(t1, alpha.to(t1.dtype))
        out = tree.map(lambda ea, p: -(alpha * weight_decay) / wd * p - tau.to(p.dtype) * ea, exp_avg, params)
        new_lb = torch.clamp((barf + iprod - gamma) - 0.5 * tau * ea_norm, min=lower_bound) if adapt_lower_bound else state.lb
        return out, MomoState(exp_avg, barf, gamma, new_lb, state.count + 1)

    return GradientTransformation(init_fn, update_fn)


class MomoAdamState(NamedTuple):
    """State of :func:`momo_adam` (optax's fields)."""

    exp_avg: Updates
    exp_avg_sq: Updates
    barf: torch.Tensor
    gamma: torch.Tensor
    lb: torch.Tensor
    count: torch.Tensor


def momo_adam(
    learning_rate: ScalarOrSchedule = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    lower_bound: float = 0.0,
    weight_decay: float = 0.0,
    adapt_lower_bound: bool = False,
) -> GradientTransformation:
    """MoMo-Adam (Schaipp et al., 2023): MoMo's step size on Adam's preconditioned momentum.
    ``update`` needs ``params`` and the loss as ``value=``.

    Example:
        >>> tx = momo_adam()
        >>> type(tx.init({"w": torch.zeros(1)})).__name__
        'MomoAdamState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("b1", b1, low=0.0, high=1.0)
    check_hyperparameter("b2", b2, low=0.0, high=1.0)
    check_hyperparameter("eps", eps)
    check_hyperparameter("lower_bound", lower_bound, low=None)
    check_hyperparameter("weight_decay", weight_decay)

    def init_fn(params: Params) -> MomoAdamState:
        refuse_sharded("momo_adam", "its step size uses norms and dot products over all parameters")
        z = tree.zeros_like
        return MomoAdamState(z(params), z(params), _scalar(0.0, params), _scalar(0.0, params), _scalar(lower_bound, params), _count_like(params))

    def update_fn(updates: Updates, state: MomoAdamState, params: Optional[Params] = None, *, value: Any = None, **extra: Any) -> tuple[Updates, MomoAdamState]:
        refuse_sharded("momo_adam", "its step size uses norms and dot products over all parameters")
        del extra
        _check_state("momo_adam", state, MomoAdamState)
        _need_params("momo_adam", params)
        _need_value("momo_adam", value)
        dt = state.barf.dtype
        count_inc = state.count + 1
        barf = b1 * state.barf + (1 - b1) * torch.as_tensor(value, device=state.barf.device).to(dt)
        exp_avg = tree.map(lambda ea, g: b1 * ea + (1 - b1) * g, state.exp_avg, updates)
        exp_avg_sq = tree.map(lambda eas, g: b2 * eas + (1 - b2) * g * g, state.exp_avg_sq, updates)
        t = count_inc.to(torch.float32)
        bc2 = (1 - b2**t).to(dt)
        precond = tree.map(lambda eas: eps + torch.sqrt(eas / bc2.to(eas.dtype)), exp_avg_sq)
        weighted = tree.map(lambda ea, pc: ea / pc, exp_avg, precond)
        ea_norm = _tree_vdot(exp_avg, weighted).to(dt)
        gamma = b1 * state.gamma + (1 - b1) * _tree_vdot(updates, params).to(dt)
        iprod = _tree_vdot(exp_avg, params).to(dt)
        alpha = _at(learning_rate, state.count)
        bc1 = (1 - b1**t).to(dt)
        wd = 1 + alpha * weight_decay
        if adapt_lower_bound:
            cap = wd * (barf - gamma) + iprod
            this_lb = torch.where(cap < wd * bc1 * state.lb, torch.clamp(cap / (2 * bc1 * wd), min=lower_bound), state.lb)
        else:
            this_lb = state.lb
        t1 = torch.clamp(wd * (barf - bc1 * this_lb - gamma) + iprod, min=0.0) / ea_norm
        t1 = torch.where(ea_norm <= torch.finfo(torch.float64).eps, torch.zeros_like(t1), t1)
        tau = torch.minimum(alpha / bc1, t1)
        out = tree.map(lambda ea, pc, p: -(alpha * weight_decay) / wd * p - tau.to(p.dtype) * ea / pc, exp_avg, precond, params)
        if adapt_lower_bound:
            new_lb = torch.clamp(((barf + iprod - gamma) - 0.5 * tau * ea_norm) / bc1, min=lower_bound)
        else:
            new_lb = state.lb
        return out, MomoAdamState(exp_avg, exp_avg_sq, barf, gamma, new_lb, count_inc)

    return GradientTransformation(init_fn, update_fn)
