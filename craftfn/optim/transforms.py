"""Primitive gradient transformations (optax's ``transform`` module for craftfn).

Every primitive works on whole leaf lists with multi-tensor ``torch._foreach_*``
kernels, grouped by (device, dtype); none loops over leaves doing small ops
(the few rules that reduce each leaf along its own axes, such as the factored
second moment of Adafactor, say so). Step counts are 0-d int64 tensors on the
parameters' device and bias corrections are computed from them as tensors, so an
update never reads a value back to the host.

Names, arguments and states follow optax; where torch.optim has the same rule the
numerics follow torch (operation order included), so trajectories agree closely.

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

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from craftfn import random, tree
from craftfn.optim.base import (
    EmptyState,
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    check_hyperparameter,
)

__all__ = [
    "ScaleState",
    "ScaleByScheduleState",
    "TraceState",
    "EmaState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByNadamState",
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
    "ScaleByRssState",
    "ScaleByLionState",
    "ScaleByAdaDeltaState",
    "FactoredState",
    "AddNoiseState",
    "AddDecayedWeightsState",
    "ScaleByTrustRatioState",
    "ScaleBySignState",
    "ScaleByParamBlockRMSState",
    "MaskOrFn",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "trace",
    "ema",
    "scale_by_adam",
    "scale_by_amsgrad",
    "scale_by_nadam",
    "scale_by_adamax",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_rss",
    "scale_by_lion",
    "scale_by_adadelta",
    "scale_by_factored_rms",
    "scale_by_param_block_rms",
    "scale_by_trust_ratio",
    "scale_by_sign",
    "add_decayed_weights",
    "add_noise",
    "set_to_zero",
    "stateless",
    "foreach_groups",
    "foreach_map",
]

MaskOrFn = Union[None, bool, Any, Callable[[Params], Any]]


# ----------------------------------------------------------------------------- helpers


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
        # One list gives LeafGroups (NamedTuples themselves), several give tuples of them.
        group = (group,) if len(lists) == 1 else group
        result = fn(*[g.tensors for g in group])
        if result is not None:
            returned = True
            for i, t in zip(group[0].indices, result):
                out[i] = t
    return out if returned else None


def foreach_map(fn: Callable[..., tuple[list[torch.Tensor], ...]], *lists: list[torch.Tensor], num_outputs: int) -> tuple[list[torch.Tensor], ...]:
    """Like :func:`foreach_groups` for an ``fn`` that returns several lists (one per output).

    ``fn`` receives, per (device, dtype) group of ``lists[0]``, one tensor list per
    input, and returns a tuple of ``num_outputs`` lists; they are scattered back into
    the original leaf order.

    Example:
        >>> a, b = foreach_map(lambda x: (torch._foreach_neg(x), torch._foreach_abs(x)), [torch.ones(1)], num_outputs=2)
        >>> a, b
        ([tensor([-1.])], [tensor([1.])])
    """
    outs: tuple[list[Any], ...] = tuple([None] * len(lists[0]) for _ in range(num_outputs))
    if not lists[0]:
        return outs
    groups = tree.group_by_device_dtype(*lists)
    for group in groups:
        # One list gives LeafGroups (NamedTuples themselves), several give tuples of them.
        group = (group,) if len(lists) == 1 else group
        results = fn(*[g.tensors for g in group])
        for out, res in zip(outs, results):
            for i, t in zip(group[0].indices, res):
                out[i] = t
    return outs


def _flatten_like(updates: Updates, name: str, *others: Any) -> tuple[list[torch.Tensor], Any, list[list[Any]]]:
    """Flatten ``updates`` and the trees in ``others`` (state moments, params) leaf for leaf."""
    u_leaves, treedef = tree.flatten(updates)
    flat = []
    for other in others:
        try:
            flat.append(treedef.flatten_up_to(other))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{name}: updates do not have the tree structure of the optimizer state / params "
                f"(the state was made by init() for a different tree?): {e}"
            ) from None
    return u_leaves, treedef, flat


# Kept for sibling modules written against the first version of this file.
def _leaves_matching(updates: Updates, other: Any, name: str) -> tuple[list[torch.Tensor], Any, list[torch.Tensor]]:
    u, treedef, (o,) = _flatten_like(updates, name, other)
    return u, treedef, o


def _check_state(name: str, state: Any, cls: type) -> None:
    if not isinstance(state, cls):
        raise ValueError(
            f"{name}: opt_state must be the {cls.__name__} made by {name}(...).init(params), got "
            f"{type(state).__name__}; call tx.init(params) before tx.update(...)"
        )


def _need_params(name: str, params: Optional[Params]) -> None:
    if params is None:
        raise ValueError(f"{name}: params must be given to update(updates, state, params) (this rule reads the parameters)")


def _cast_to(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``xs[i]`` in the dtype of ``refs[i]`` (no copy where they already agree)."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x, r in zip(xs, refs)]


def _scalar(x: Any, like: list[torch.Tensor]) -> Any:
    """A hyperparameter ready to combine with a group: 0-d tensors (``inject_hyperparams``) take the
    group's device and dtype, so a 0-d low-precision leaf is not promoted; numbers pass through."""
    return x.to(device=like[0].device, dtype=like[0].dtype) if isinstance(x, torch.Tensor) else x


def _is_zero(x: Any) -> bool:
    """True for the number 0; a 0-d tensor (an injected hyperparameter) counts as nonzero, since
    reading it would sync: the rule then takes its general form, which is the same math."""
    return not isinstance(x, torch.Tensor) and x == 0


def _lerp(a: list[torch.Tensor], b: list[torch.Tensor], weight: Any) -> list[torch.Tensor]:
    """Fresh ``a + weight * (b - a)``; ``torch._foreach_lerp`` when ``weight`` is a number (torch's op)."""
    if not isinstance(weight, torch.Tensor):
        return torch._foreach_lerp(a, b, weight)
    out = torch._foreach_sub(b, a)
    torch._foreach_mul_(out, _scalar(weight, a))
    torch._foreach_add_(out, a)
    return out


def _add_scaled(a: list[torch.Tensor], b: list[torch.Tensor], alpha: Any) -> list[torch.Tensor]:
    """Fresh ``a + alpha * b`` (``alpha`` a number or a 0-d tensor)."""
    if not isinstance(alpha, torch.Tensor):
        return torch._foreach_add(a, b, alpha=alpha)
    return torch._foreach_add(a, torch._foreach_mul(b, _scalar(alpha, b)))


def _count_like(params: Params) -> torch.Tensor:
    leaves_ = tree.leaves(params)
    return torch.zeros((), dtype=torch.int64, device=leaves_[0].device if leaves_ else None)


def _scalar_dtype(count: torch.Tensor) -> torch.dtype:
    # Bias corrections such as 1 - 0.999**t lose ~5 digits in fp32 at t=1; compute them in fp64
    # (0-d tensors, free) except on backends without fp64.
    return torch.float32 if count.device.type == "mps" else torch.float64


def _bias_correction(decay: float | torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``1 - decay**count`` as a 0-d tensor (no host sync)."""
    t = count.to(_scalar_dtype(count))
    return 1 - torch.pow(torch.as_tensor(decay, dtype=t.dtype, device=t.device), t)


def _check_betas(**betas: Any) -> None:
    for name, value in betas.items():
        check_hyperparameter(name, value, low=0.0, high=1.0)


def _scale_tree(factor: float | torch.Tensor, updates: Updates) -> Updates:
    """``factor * updates``; a tensor factor is cast to each group's dtype (0-d bf16 leaves stay bf16)."""
    u, treedef = tree.flatten(updates)
    if not isinstance(factor, torch.Tensor):
        return tree.unflatten(treedef, foreach_groups(lambda xs: torch._foreach_mul(xs, factor), u))
    return tree.unflatten(treedef, foreach_groups(lambda xs: torch._foreach_mul(xs, factor.to(device=xs[0].device, dtype=xs[0].dtype)), u))


# ----------------------------------------------------------------------------- scaling


class ScaleState(NamedTuple):
    """State of :func:`scale` (none)."""


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiply updates by a fixed ``step_size`` (a number or a 0-d tensor).

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
        _check_state("scale", state, ScaleState)
        return _scale_tree(step_size, updates), state

    return GradientTransformation(init_fn, update_fn)


class ScaleByScheduleState(NamedTuple):
    """Holds the number of updates seen so far (the schedule's input)."""

    count: torch.Tensor


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
        _check_state("scale_by_schedule", state, ScaleByScheduleState)
        factor = step_size_fn(state.count)
        return _scale_tree(factor, updates), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Scale by ``-learning_rate`` (a float, a 0-d tensor, or a schedule of the update count).

    Args:
        learning_rate: the step size, ``>= 0``.
        flip_sign: multiply by ``-learning_rate`` (descent, the default) rather than ``+``.

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


# ----------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    """Momentum buffer of :func:`trace`."""

    trace: Params


def trace(decay: float, nesterov: bool = False, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t`` with Nesterov).

    Matches ``torch.optim.SGD``'s momentum buffer with ``dampening=0``.

    Args:
        decay: the momentum coefficient, ``>= 0``.
        nesterov: return ``g + decay * t`` (Nesterov momentum).
        accumulator_dtype: dtype of the buffer (default: the parameters').

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
        _check_state("trace", state, TraceState)
        g, treedef, (t,) = _flatten_like(updates, "trace", state.trace)
        g_acc = _cast_to(g, t)

        def step(tt: list[torch.Tensor], gg: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            # torch.optim.SGD: buf.mul_(momentum).add_(grad); nesterov: grad.add(buf, alpha=momentum)
            new_t = torch._foreach_mul(tt, _scalar(decay, tt))
            torch._foreach_add_(new_t, gg)
            out = _add_scaled(gg, new_t, decay) if nesterov else new_t
            return new_t, out

        new_t, out = foreach_map(step, t, g_acc, num_outputs=2)
        return tree.unflatten(treedef, _cast_to(out, g)), TraceState(trace=tree.unflatten(treedef, new_t))

    return GradientTransformation(init_fn, update_fn)


class EmaState(NamedTuple):
    """State of :func:`ema`: the update count and the running average."""

    count: torch.Tensor
    ema: Params


def ema(decay: float, debias: bool = True, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Exponential moving average of the updates: ``e = decay * e + (1 - decay) * g``.

    Args:
        decay: in ``[0, 1)``.
        debias: return ``e / (1 - decay**t)`` (the bias-corrected average) instead of ``e``.
        accumulator_dtype: dtype of the average (default: the parameters').

    Returns:
        A transformation whose update is the (debiased) average.

    Example:
        >>> tx = optim.ema(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> tx.update({"w": torch.ones(1)}, s)[0]
        {'w': tensor([1.])}
    """
    _check_betas(decay=decay)

    def init_fn(params: Params) -> EmaState:
        return EmaState(count=_count_like(params), ema=tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(updates: Updates, state: EmaState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, EmaState]:
        del params, extra
        _check_state("ema", state, EmaState)
        g, treedef, (e,) = _flatten_like(updates, "ema", state.ema)
        count = state.count + 1
        new_e = foreach_groups(lambda ee, gg: _lerp(ee, gg, 1.0 - decay), e, _cast_to(g, e))
        out = new_e
        if debias:
            bc = _bias_correction(decay, count)
            out = foreach_groups(lambda ee: torch._foreach_div(ee, bc.to(device=ee[0].device, dtype=ee[0].dtype)), new_e)
        return tree.unflatten(treedef, _cast_to(out, g)), EmaState(count=count, ema=tree.unflatten(treedef, new_e))

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- adam family


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: the update count and the first and second moments."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


def _ema_sq(v: list[torch.Tensor], g: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    # torch.optim.Adam: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    out = torch._foreach_mul(v, _scalar(decay, v))
    if isinstance(decay, torch.Tensor):  # addcmul's tensor `value` would be read to the host
        g2 = torch._foreach_mul(g, g)
        torch._foreach_mul_(g2, _scalar(1.0 - decay, g2))
        torch._foreach_add_(out, g2)
    else:
        torch._foreach_addcmul_(out, g, g, 1.0 - decay)
    return out


def _adam_denominator(v: list[torch.Tensor], bc2: torch.Tensor, eps: float, eps_root: float) -> list[torch.Tensor]:
    """``sqrt(v / bc2 + eps_root) + eps``, in torch.optim.Adam's operation order when eps_root == 0."""
    bc2 = bc2.to(device=v[0].device, dtype=v[0].dtype)
    if _is_zero(eps_root):
        d = torch._foreach_sqrt(v)
        torch._foreach_div_(d, torch.sqrt(bc2))
    else:
        d = torch._foreach_div(v, bc2)
        torch._foreach_add_(d, _scalar(eps_root, d))
        torch._foreach_sqrt_(d)
    torch._foreach_add_(d, _scalar(eps, d))
    return d


def _adam_direction(m: list[torch.Tensor], d: list[torch.Tensor], g: list[torch.Tensor], count: torch.Tensor, b1: float, nesterov: bool) -> list[torch.Tensor]:
    """``mu_hat / d``; with Nesterov ``(b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)) / d`` (optax)."""
    bc1 = _bias_correction(b1, count).to(device=m[0].device, dtype=m[0].dtype)
    if not nesterov:
        out = torch._foreach_div(m, d)
        torch._foreach_div_(out, bc1)
        return out
    bc1_next = _bias_correction(b1, count + 1).to(device=m[0].device, dtype=m[0].dtype)
    num = torch._foreach_mul(m, _scalar(b1 / bc1_next, m))
    torch._foreach_add_(num, torch._foreach_mul(g, _scalar((1.0 - b1) / bc1, g)))
    torch._foreach_div_(num, d)
    return num


def _check_adam_args(b1: Any, b2: Any, eps: Any, eps_root: Any) -> None:
    _check_betas(b1=b1, b2=b2)
    check_hyperparameter("eps", eps)
    check_hyperparameter("eps_root", eps_root)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rescale updates with Adam's moment estimates.

    ``mu = b1 mu + (1 - b1) g``, ``nu = b2 nu + (1 - b2) g^2``; the update is
    ``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` with ``mu_hat = mu / (1 - b1^t)``,
    ``nu_hat = nu / (1 - b2^t)``. With ``nesterov`` the first moment is replaced by
    ``b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)`` (optax's NAdam).

    Args:
        b1: first-moment decay in ``[0, 1)``.
        b2: second-moment decay in ``[0, 1)``.
        eps: added to the denominator outside the square root, ``>= 0``.
        eps_root: added inside the square root, ``>= 0``.
        mu_dtype: dtype of the first moment (default: the parameters').
        nesterov: use Nesterov momentum (NAdam).

    Returns:
        A transformation with state :class:`ScaleByAdamState`.

    Example:
        >>> tx = optim.scale_by_adam()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u
        {'w': tensor([1.])}
    """
    _check_adam_args(b1, b2, eps, eps_root)

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(count=_count_like(params), mu=tree.zeros_like(params, dtype=mu_dtype), nu=tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByAdamState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdamState]:
        del params, extra
        _check_state("scale_by_adam", state, ScaleByAdamState)
        g, treedef, (mu, nu) = _flatten_like(updates, "scale_by_adam", state.mu, state.nu)
        count = state.count + 1
        new_mu = foreach_groups(lambda m, gg: _lerp(m, gg, 1.0 - b1), mu, _cast_to(g, mu))
        g_nu = _cast_to(g, nu)
        new_nu = foreach_groups(lambda v, gg: _ema_sq(v, gg, b2), nu, g_nu)
        bc2 = _bias_correction(b2, count)
        out = foreach_groups(
            lambda v, m, gg: _adam_direction(m, _adam_denominator(v, bc2, eps, eps_root), gg, count, b1, nesterov),
            new_nu, _cast_to(new_mu, new_nu), g_nu,
        )
        new_state = ScaleByAdamState(count=count, mu=tree.unflatten(treedef, new_mu), nu=tree.unflatten(treedef, new_nu))
        return tree.unflatten(treedef, _cast_to(out, g)), new_state

    return GradientTransformation(init_fn, update_fn)


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`: count, moments and the running maximum of ``nu``."""

    count: torch.Tensor
    mu: Updates
    nu: Updates
    nu_max: Updates


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """AMSGrad: Adam with the running maximum of the second moment in the denominator.

    ``nu_max = max(nu_max, nu)``; update ``mu_hat / (sqrt(nu_max / (1 - b2^t) + eps_root) + eps)``.
    The maximum is taken over the raw ``nu`` and bias-corrected afterwards, as
    ``torch.optim.Adam(amsgrad=True)`` does (optax takes it over the bias-corrected
    ``nu_hat``; the two agree once ``b2^t`` is negligible).

    Args:
        b1, b2, eps, eps_root, mu_dtype: as :func:`scale_by_adam`.

    Returns:
        A transformation with state :class:`ScaleByAmsgradState`.

    Example:
        >>> tx = optim.scale_by_amsgrad()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u
        {'w': tensor([1.])}
    """
    _check_adam_args(b1, b2, eps, eps_root)

    def init_fn(params: Params) -> ScaleByAmsgradState:
        return ScaleByAmsgradState(
            count=_count_like(params), mu=tree.zeros_like(params, dtype=mu_dtype), nu=tree.zeros_like(params), nu_max=tree.zeros_like(params)
        )

    def update_fn(updates: Updates, state: ScaleByAmsgradState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAmsgradState]:
        del params, extra
        _check_state("scale_by_amsgrad", state, ScaleByAmsgradState)
        g, treedef, (mu, nu, nu_max) = _flatten_like(updates, "scale_by_amsgrad", state.mu, state.nu, state.nu_max)
        count = state.count + 1
        new_mu = foreach_groups(lambda m, gg: _lerp(m, gg, 1.0 - b1), mu, _cast_to(g, mu))
        g_nu = _cast_to(g, nu)
        new_nu = foreach_groups(lambda v, gg: _ema_sq(v, gg, b2), nu, g_nu)
        new_max = foreach_groups(torch._foreach_maximum, _cast_to(nu_max, new_nu), new_nu)
        bc2 = _bias_correction(b2, count)
        out = foreach_groups(
            lambda v, m, gg: _adam_direction(m, _adam_denominator(v, bc2, eps, eps_root), gg, count, b1, False),
            new_max, _cast_to(new_mu, new_max), g_nu,
        )
        new_state = ScaleByAmsgradState(
            count=count, mu=tree.unflatten(treedef, new_mu), nu=tree.unflatten(treedef, new_nu), nu_max=tree.unflatten(treedef, new_max)
        )
        return tree.unflatten(treedef, _cast_to(out, g)), new_state

    return GradientTransformation(init_fn, update_fn)


class ScaleByNadamState(NamedTuple):
    """State of :func:`scale_by_nadam`: count, the product of momentum coefficients, and the moments."""

    count: torch.Tensor
    mu_product: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_nadam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3) -> GradientTransformation:
    """NAdam with Dozat's momentum schedule, exactly ``torch.optim.NAdam``'s rule.

    ``m_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))``; with ``P_t = prod m_1..m_t`` and
    ``d = sqrt(nu / (1 - b2^t)) + eps`` the update is
    ``(1 - m_t) / (1 - P_t) * g / d + m_{t+1} / (1 - P_t m_{t+1}) * mu / d``.
    (optax's ``nadam`` is :func:`scale_by_adam` with ``nesterov=True`` instead.)

    Args:
        b1, b2, eps: as :func:`scale_by_adam`.
        momentum_decay: torch's ``momentum_decay`` (psi), ``>= 0``.

    Returns:
        A transformation with state :class:`ScaleByNadamState`.

    Example:
        >>> tx = optim.scale_by_nadam()
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> tuple(s.mu_product.shape)
        ()
    """
    _check_adam_args(b1, b2, eps, 0.0)
    check_hyperparameter("momentum_decay", momentum_decay)

    def init_fn(params: Params) -> ScaleByNadamState:
        count = _count_like(params)
        return ScaleByNadamState(
            count=count, mu_product=torch.ones((), dtype=torch.float32, device=count.device), mu=tree.zeros_like(params), nu=tree.zeros_like(params)
        )

    def update_fn(updates: Updates, state: ScaleByNadamState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByNadamState]:
        del params, extra
        _check_state("scale_by_nadam", state, ScaleByNadamState)
        g, treedef, (mu, nu) = _flatten_like(updates, "scale_by_nadam", state.mu, state.nu)
        count = state.count + 1
        t = count.to(_scalar_dtype(count))
        m_t = b1 * (1.0 - 0.5 * torch.pow(0.96, t * momentum_decay))
        m_next = b1 * (1.0 - 0.5 * torch.pow(0.96, (t + 1) * momentum_decay))
        # torch keeps mu_product as a float32 tensor; so do we (same rounding, same trajectory).
        mu_product = state.mu_product * m_t.to(state.mu_product.dtype)
        coef_g = (1.0 - m_t) / (1.0 - mu_product.to(t.dtype))
        coef_m = m_next / (1.0 - mu_product.to(t.dtype) * m_next)
        sqrt_bc2 = torch.sqrt(_bias_correction(b2, count))
        g = _cast_to(g, nu)
        new_mu = foreach_groups(lambda m, gg: _lerp(m, gg, 1.0 - b1), mu, g)
        new_nu = foreach_groups(lambda v, gg: _ema_sq(v, gg, b2), nu, g)

        def direction(v: list[torch.Tensor], m: list[torch.Tensor], gg: list[torch.Tensor]) -> list[torch.Tensor]:
            dev = v[0].device
            d = torch._foreach_sqrt(v)
            torch._foreach_div_(d, sqrt_bc2.to(device=dev, dtype=v[0].dtype))
            torch._foreach_add_(d, _scalar(eps, d))
            out = torch._foreach_mul(gg, coef_g.to(device=dev, dtype=v[0].dtype))
            torch._foreach_add_(out, torch._foreach_mul(m, coef_m.to(device=dev, dtype=v[0].dtype)))
            torch._foreach_div_(out, d)
            return out

        out = foreach_groups(direction, new_nu, new_mu, g)
        new_state = ScaleByNadamState(count=count, mu_product=mu_product, mu=tree.unflatten(treedef, new_mu), nu=tree.unflatten(treedef, new_nu))
        return tree.unflatten(treedef, out), new_state

    return GradientTransformation(init_fn, update_fn)


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax: Adam with the infinity norm. ``nu = max(b2 nu, |g| + eps)``; update ``mu_hat / nu``.

    Same rule as ``torch.optim.Adamax``. The state is a :class:`ScaleByAdamState`
    (``nu`` holds the infinity-norm estimate), as in optax.

    Example:
        >>> tx = optim.scale_by_adamax()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u
        {'w': tensor([1.])}
    """
    _check_adam_args(b1, b2, eps, 0.0)

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(count=_count_like(params), mu=tree.zeros_like(params), nu=tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByAdamState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdamState]:
        del params, extra
        _check_state("scale_by_adamax", state, ScaleByAdamState)
        g, treedef, (mu, nu) = _flatten_like(updates, "scale_by_adamax", state.mu, state.nu)
        count = state.count + 1
        g = _cast_to(g, mu)
        new_mu = foreach_groups(lambda m, gg: _lerp(m, gg, 1.0 - b1), mu, g)

        def inf_norm(v: list[torch.Tensor], gg: list[torch.Tensor]) -> list[torch.Tensor]:
            a = torch._foreach_abs(gg)
            torch._foreach_add_(a, _scalar(eps, a))
            return torch._foreach_maximum(torch._foreach_mul(v, _scalar(b2, v)), a)

        new_nu = foreach_groups(inf_norm, nu, g)
        bc1 = _bias_correction(b1, count)

        def direction(m: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
            out = torch._foreach_div(m, v)
            torch._foreach_div_(out, bc1.to(device=m[0].device, dtype=m[0].dtype))
            return out

        out = foreach_groups(direction, new_mu, new_nu)
        return tree.unflatten(treedef, out), ScaleByAdamState(count=count, mu=tree.unflatten(treedef, new_mu), nu=tree.unflatten(treedef, new_nu))

    return GradientTransformation(init_fn, update_fn)


def scale_by_radam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, threshold: float = 5.0, *, nesterov: bool = False
) -> GradientTransformation:
    """Rectified Adam. With ``rho_inf = 2 / (1 - b2) - 1`` and ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``:
    when ``rho_t >= threshold`` the update is ``r_t * mu_hat / (sqrt(nu_hat + eps_root) + eps)``
    with ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``;
    otherwise it is ``mu_hat`` (plain momentum).

    ``torch.optim.RAdam`` is the same rule (its ``eps`` sits on ``sqrt(nu)`` before bias
    correction; the difference is below 1e-6 relative for the usual small ``eps``).

    Example:
        >>> tx = optim.scale_by_radam()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u
        {'w': tensor([2.])}
    """
    _check_adam_args(b1, b2, eps, eps_root)
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(count=_count_like(params), mu=tree.zeros_like(params), nu=tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByAdamState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdamState]:
        del params, extra
        _check_state("scale_by_radam", state, ScaleByAdamState)
        g, treedef, (mu, nu) = _flatten_like(updates, "scale_by_radam", state.mu, state.nu)
        count = state.count + 1
        g = _cast_to(g, mu)
        new_mu = foreach_groups(lambda m, gg: _lerp(m, gg, 1.0 - b1), mu, g)
        new_nu = foreach_groups(lambda v, gg: _ema_sq(v, gg, b2), nu, g)
        t = count.to(_scalar_dtype(count))
        bc2 = _bias_correction(b2, count)
        rho = rho_inf - 2.0 * t * torch.pow(torch.as_tensor(b2, dtype=t.dtype), t) / bc2
        rect = torch.sqrt(torch.clamp((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho), min=0.0))
        use_rect = rho >= threshold

        def direction(m: list[torch.Tensor], v: list[torch.Tensor], gg: list[torch.Tensor]) -> list[torch.Tensor]:
            dev = m[0].device
            adaptive = _adam_direction(m, _adam_denominator(v, bc2, eps, eps_root), gg, count, b1, nesterov)
            torch._foreach_mul_(adaptive, rect.to(device=dev, dtype=m[0].dtype))
            if nesterov:
                plain = _adam_direction(m, [torch.ones((), dtype=x.dtype, device=dev) for x in m], gg, count, b1, True)
            else:
                plain = torch._foreach_div(m, _scalar(_bias_correction(b1, count), m))  # mu_hat
            # Both branches are computed and blended with a 0/1 weight: choosing by a tensor
            # condition in Python would read it to the host.
            w = use_rect.to(device=dev, dtype=m[0].dtype)
            torch._foreach_mul_(adaptive, w)
            torch._foreach_add_(adaptive, torch._foreach_mul(plain, 1 - w))
            return adaptive

        out = foreach_groups(direction, new_mu, new_nu, g)
        return tree.unflatten(treedef, out), ScaleByAdamState(count=count, mu=tree.unflatten(treedef, new_mu), nu=tree.unflatten(treedef, new_nu))

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- rms family


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: the running average of squared updates."""

    nu: Updates


class ScaleByRmsWithCountState(NamedTuple):
    """State of :func:`scale_by_rms` with ``bias_correction=True``."""

    count: torch.Tensor
    nu: Updates


def _rms_denominator(v: list[torch.Tensor], eps: float, eps_in_sqrt: bool, bc: torch.Tensor | None) -> list[torch.Tensor]:
    if bc is not None:
        v = torch._foreach_div(v, bc.to(device=v[0].device, dtype=v[0].dtype))
    if eps_in_sqrt:
        d = torch._foreach_add(v, _scalar(eps, v))
        torch._foreach_sqrt_(d)
    else:
        # torch.optim.RMSprop: square_avg.sqrt().add_(eps)
        d = torch._foreach_sqrt(v)
        torch._foreach_add_(d, _scalar(eps, d))
    return d


def scale_by_rms(
    decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, eps_in_sqrt: bool = True, bias_correction: bool = False
) -> GradientTransformation:
    """Divide by the root mean square of past updates (RMSProp's scaling).

    ``nu = decay nu + (1 - decay) g^2``; update ``g / sqrt(nu + eps)`` (``eps_in_sqrt``) or
    ``g / (sqrt(nu) + eps)``. ``torch.optim.RMSprop`` is ``initial_scale=0, eps_in_sqrt=False``.

    Args:
        decay: in ``[0, 1)``.
        eps: ``>= 0``.
        initial_scale: starting value of ``nu``.
        eps_in_sqrt: put ``eps`` inside the square root (optax default) or outside (torch).
        bias_correction: divide ``nu`` by ``1 - decay^t``.

    Returns:
        A transformation with state :class:`ScaleByRmsState` (or :class:`ScaleByRmsWithCountState`).

    Example:
        >>> tx = optim.scale_by_rms(decay=0.0, eps=0.0)
        >>> tx.update({"w": torch.tensor([-3.0])}, tx.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([-1.])}
    """
    _check_betas(decay=decay)
    check_hyperparameter("eps", eps)
    check_hyperparameter("initial_scale", initial_scale)
    cls = ScaleByRmsWithCountState if bias_correction else ScaleByRmsState

    def init_fn(params: Params) -> Any:
        nu = tree.full_like(params, initial_scale)
        return ScaleByRmsWithCountState(count=_count_like(params), nu=nu) if bias_correction else ScaleByRmsState(nu=nu)

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("scale_by_rms", state, cls)
        g, treedef, (nu,) = _flatten_like(updates, "scale_by_rms", state.nu)
        g = _cast_to(g, nu)
        new_nu = foreach_groups(lambda v, gg: _ema_sq(v, gg, decay), nu, g)
        count = state.count + 1 if bias_correction else None
        bc = _bias_correction(decay, count) if bias_correction else None
        out = foreach_groups(lambda v, gg: torch._foreach_div(gg, _rms_denominator(v, eps, eps_in_sqrt, bc)), new_nu, g)
        nu_tree = tree.unflatten(treedef, new_nu)
        return tree.unflatten(treedef, out), (ScaleByRmsWithCountState(count, nu_tree) if bias_correction else ScaleByRmsState(nu_tree))

    return GradientTransformation(init_fn, update_fn)


class ScaleByRStdDevState(NamedTuple):
    """State of :func:`scale_by_stddev`: running averages of updates and of their squares."""

    mu: Updates
    nu: Updates


class ScaleByRStdDevWithCountState(NamedTuple):
    """State of :func:`scale_by_stddev` with ``bias_correction=True``."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_stddev(
    decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, eps_in_sqrt: bool = True, bias_correction: bool = False
) -> GradientTransformation:
    """Divide by the running standard deviation of the updates (centered RMSProp).

    ``mu = decay mu + (1 - decay) g``, ``nu = decay nu + (1 - decay) g^2``; update
    ``g / sqrt(nu - mu^2 + eps)`` (or ``g / (sqrt(nu - mu^2) + eps)``). torch's
    ``RMSprop(centered=True)`` is ``eps_in_sqrt=False``.

    Example:
        >>> tx = optim.scale_by_stddev(decay=0.5, eps=0.0)
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([2.])}
    """
    _check_betas(decay=decay)
    check_hyperparameter("eps", eps)
    check_hyperparameter("initial_scale", initial_scale)
    cls = ScaleByRStdDevWithCountState if bias_correction else ScaleByRStdDevState

    def init_fn(params: Params) -> Any:
        mu, nu = tree.zeros_like(params), tree.full_like(params, initial_scale)
        return ScaleByRStdDevWithCountState(_count_like(params), mu, nu) if bias_correction else ScaleByRStdDevState(mu, nu)

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("scale_by_stddev", state, cls)
        g, treedef, (mu, nu) = _flatten_like(updates, "scale_by_stddev", state.mu, state.nu)
        g = _cast_to(g, nu)
        new_mu = foreach_groups(lambda m, gg: _lerp(m, gg, 1.0 - decay), mu, g)
        new_nu = foreach_groups(lambda v, gg: _ema_sq(v, gg, decay), nu, g)
        count = state.count + 1 if bias_correction else None
        bc = _bias_correction(decay, count) if bias_correction else None

        def direction(v: list[torch.Tensor], m: list[torch.Tensor], gg: list[torch.Tensor]) -> list[torch.Tensor]:
            if bc is not None:
                m = torch._foreach_div(m, bc.to(device=m[0].device, dtype=m[0].dtype))
                v = torch._foreach_div(v, bc.to(device=m[0].device, dtype=m[0].dtype))
            # torch: square_avg.addcmul(grad_avg, grad_avg, value=-1)
            var = torch._foreach_addcmul(v, m, m, -1.0)
            return torch._foreach_div(gg, _rms_denominator(var, eps, eps_in_sqrt, None))

        out = foreach_groups(direction, new_nu, new_mu, g)
        mu_t, nu_t = tree.unflatten(treedef, new_mu), tree.unflatten(treedef, new_nu)
        return tree.unflatten(treedef, out), (ScaleByRStdDevWithCountState(count, mu_t, nu_t) if bias_correction else ScaleByRStdDevState(mu_t, nu_t))

    return GradientTransformation(init_fn, update_fn)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running sum of squared updates."""

    sum_of_squares: Updates


def scale_by_rss(initial_accumulator_value: float = 0.1, eps: float = 1e-7, eps_in_sqrt: bool = True) -> GradientTransformation:
    """Divide by the root of the sum of all past squared updates (Adagrad's scaling).

    ``s = s + g^2``; update ``g / sqrt(s + eps)`` (optax; 0 where ``s == 0``) or, with
    ``eps_in_sqrt=False``, ``g / (sqrt(s) + eps)`` as ``torch.optim.Adagrad`` does.

    Args:
        initial_accumulator_value: starting value of ``s``, ``>= 0``.
        eps: ``>= 0``.
        eps_in_sqrt: where ``eps`` goes (craftfn addition; optax has only the first form).

    Example:
        >>> tx = optim.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
        >>> tx.update({"w": torch.tensor([-3.0])}, tx.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([-1.])}
    """
    check_hyperparameter("initial_accumulator_value", initial_accumulator_value)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> ScaleByRssState:
        return ScaleByRssState(sum_of_squares=tree.full_like(params, initial_accumulator_value))

    def update_fn(updates: Updates, state: ScaleByRssState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByRssState]:
        del params, extra
        _check_state("scale_by_rss", state, ScaleByRssState)
        g, treedef, (s,) = _flatten_like(updates, "scale_by_rss", state.sum_of_squares)
        g = _cast_to(g, s)
        new_s = foreach_groups(lambda ss, gg: torch._foreach_addcmul(ss, gg, gg, 1.0), s, g)

        def direction(ss: list[torch.Tensor], gg: list[torch.Tensor]) -> list[torch.Tensor]:
            if eps_in_sqrt:
                d = torch._foreach_add(ss, _scalar(eps, ss))
                torch._foreach_sqrt_(d)
                out = torch._foreach_div(gg, d)
                # optax: 0 where the accumulator is 0 (0/0 would be NaN when eps == 0).
                return [torch.where(x > 0, o, torch.zeros_like(o)) for x, o in zip(ss, out)] if _is_zero(eps) else out
            d = torch._foreach_sqrt(ss)
            torch._foreach_add_(d, _scalar(eps, d))
            return torch._foreach_div(gg, d)

        out = foreach_groups(direction, new_s, g)
        return tree.unflatten(treedef, out), ScaleByRssState(sum_of_squares=tree.unflatten(treedef, new_s))

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- other rules


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: the update count and the momentum."""

    count: torch.Tensor
    mu: Updates


def scale_by_lion(b1: float = 0.9, b2: float = 0.99, mu_dtype: Optional[torch.dtype] = None) -> GradientTransformation:
    """Lion: update ``sign((1 - b1) g + b1 mu)``, then ``mu = b2 mu + (1 - b2) g``.

    Example:
        >>> tx = optim.scale_by_lion()
        >>> tx.update({"w": torch.tensor([-3.0])}, tx.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([-1.])}
    """
    _check_betas(b1=b1, b2=b2)

    def init_fn(params: Params) -> ScaleByLionState:
        return ScaleByLionState(count=_count_like(params), mu=tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates: Updates, state: ScaleByLionState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByLionState]:
        del params, extra
        _check_state("scale_by_lion", state, ScaleByLionState)
        g, treedef, (mu,) = _flatten_like(updates, "scale_by_lion", state.mu)
        gm = _cast_to(g, mu)

        def step(m: list[torch.Tensor], gg: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            out = _lerp(m, gg, 1.0 - b1)
            torch._foreach_sign_(out)
            return _lerp(m, gg, 1.0 - b2), out

        new_mu, out = foreach_map(step, mu, gm, num_outputs=2)
        return tree.unflatten(treedef, _cast_to(out, g)), ScaleByLionState(count=state.count + 1, mu=tree.unflatten(treedef, new_mu))

    return GradientTransformation(init_fn, update_fn)


class ScaleByAdaDeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: running averages of squared gradients and squared steps."""

    e_g: Updates
    e_x: Updates


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """Adadelta: ``e_g = rho e_g + (1 - rho) g^2``; ``dx = sqrt(e_x + eps) / sqrt(e_g + eps) * g``;
    ``e_x = rho e_x + (1 - rho) dx^2``; the update is ``dx``. Same rule as ``torch.optim.Adadelta``.

    Example:
        >>> tx = optim.scale_by_adadelta(rho=0.0, eps=1.0)
        >>> tx.update({"w": torch.tensor([0.0])}, tx.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([0.])}
    """
    _check_betas(rho=rho)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> ScaleByAdaDeltaState:
        return ScaleByAdaDeltaState(e_g=tree.zeros_like(params), e_x=tree.zeros_like(params))

    def update_fn(updates: Updates, state: ScaleByAdaDeltaState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ScaleByAdaDeltaState]:
        del params, extra
        _check_state("scale_by_adadelta", state, ScaleByAdaDeltaState)
        g, treedef, (e_g, e_x) = _flatten_like(updates, "scale_by_adadelta", state.e_g, state.e_x)
        g = _cast_to(g, e_g)

        def step(eg: list[torch.Tensor], ex: list[torch.Tensor], gg: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
            # torch.optim.Adadelta's order: std = (e_g + eps).sqrt(); delta = (e_x + eps).sqrt() / std * g
            new_eg = _ema_sq(eg, gg, rho)
            std = torch._foreach_add(new_eg, _scalar(eps, new_eg))
            torch._foreach_sqrt_(std)
            delta = torch._foreach_add(ex, _scalar(eps, ex))
            torch._foreach_sqrt_(delta)
            torch._foreach_div_(delta, std)
            torch._foreach_mul_(delta, gg)
            return new_eg, _ema_sq(ex, delta, rho), delta

        new_eg, new_ex, out = foreach_map(step, e_g, e_x, g, num_outputs=3)
        return tree.unflatten(treedef, out), ScaleByAdaDeltaState(e_g=tree.unflatten(treedef, new_eg), e_x=tree.unflatten(treedef, new_ex))

    return GradientTransformation(init_fn, update_fn)


class FactoredState(NamedTuple):
    """State of :func:`scale_by_factored_rms`: count, row/column statistics (factored leaves) or ``v``."""

    count: torch.Tensor
    v_row: Updates
    v_col: Updates
    v: Updates


def _factored_dims(shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int) -> Optional[tuple[int, int]]:
    """The two largest dims ``(second, largest)`` when the leaf is factored, else None (optax's rule)."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return order[-2], order[-1]


def scale_by_factored_rms(
    factored: bool = True, decay_rate: float = 0.8, step_offset: int = 0, min_dim_size_to_factor: int = 128, epsilon: float = 1e-30, decay_offset: int = 0
) -> GradientTransformation:
    """Adafactor's second-moment scaling, with row/column factored statistics for large matrices.

    With ``beta_t = 1 - (t - decay_offset)^(-decay_rate)`` (t counted from 1) and ``g2 = g^2 + epsilon``:
    a leaf whose two largest dims are ``>= min_dim_size_to_factor`` keeps row and column
    means of ``g2`` and is scaled by ``(v_row / mean(v_row))^(-1/2) (x) v_col^(-1/2)``; other
    leaves keep a full ``v`` and are scaled by ``v^(-1/2)``. Factored leaves are reduced
    along their own axes, one leaf at a time (the reductions differ per shape).

    Args:
        factored: factor the second moment of matrices.
        decay_rate: exponent of the decay schedule.
        step_offset: subtracted from the count before the schedule (optax compatibility).
        min_dim_size_to_factor: smallest second-largest dim that gets factored.
        epsilon: added to ``g^2``.
        decay_offset: subtracted from the count in the decay schedule.

    Example:
        >>> tx = optim.scale_by_factored_rms()
        >>> s = tx.init({"w": torch.zeros(256, 128)})
        >>> tuple(s.v_row["w"].shape), tuple(s.v_col["w"].shape)
        ((128,), (256,))
    """
    check_hyperparameter("decay_rate", decay_rate)
    check_hyperparameter("epsilon", epsilon)

    def init_fn(params: Params) -> FactoredState:
        leaves_, treedef = tree.flatten(params)
        rows, cols, vs = [], [], []
        for p in leaves_:
            dims = _factored_dims(tuple(p.shape), factored, min_dim_size_to_factor)
            if dims is None:
                rows.append(torch.zeros(1, dtype=p.dtype, device=p.device))
                cols.append(torch.zeros(1, dtype=p.dtype, device=p.device))
                vs.append(torch.zeros_like(p))
            else:
                d1, d0 = dims
                rows.append(torch.zeros([s for i, s in enumerate(p.shape) if i != d0], dtype=p.dtype, device=p.device))
                cols.append(torch.zeros([s for i, s in enumerate(p.shape) if i != d1], dtype=p.dtype, device=p.device))
                vs.append(torch.zeros(1, dtype=p.dtype, device=p.device))
        return FactoredState(
            count=_count_like(params), v_row=tree.unflatten(treedef, rows), v_col=tree.unflatten(treedef, cols), v=tree.unflatten(treedef, vs)
        )

    def update_fn(updates: Updates, state: FactoredState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, FactoredState]:
        del params, extra
        _check_state("scale_by_factored_rms", state, FactoredState)
        g, treedef, (v_row, v_col, v) = _flatten_like(updates, "scale_by_factored_rms", state.v_row, state.v_col, state.v)
        t = (state.count - step_offset - decay_offset + 1).to(_scalar_dtype(state.count))
        beta = (1.0 - torch.pow(t, -decay_rate)).to(g[0].device if g else None)
        new_row, new_col, new_v, out = list(v_row), list(v_col), list(v), [None] * len(g)
        unfactored = []
        for i, x in enumerate(g):
            dims = _factored_dims(tuple(x.shape), factored, min_dim_size_to_factor)
            if dims is None:
                unfactored.append(i)
                continue
            d1, d0 = dims
            g2 = x * x + epsilon
            b = beta.to(x.dtype)
            new_row[i] = torch.lerp(g2.mean(dim=d0), v_row[i], b)
            new_col[i] = torch.lerp(g2.mean(dim=d1), v_col[i], b)
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            row_factor = torch.rsqrt(new_row[i] / new_row[i].mean(dim=reduced_d1, keepdim=True))
            col_factor = torch.rsqrt(new_col[i])
            out[i] = x * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
        if unfactored:
            gu = [g[i] for i in unfactored]

            def plain(vv: list[torch.Tensor], gg: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
                g2 = torch._foreach_mul(gg, gg)
                torch._foreach_add_(g2, epsilon)
                b = beta.to(vv[0].dtype)
                nv = torch._foreach_sub(vv, g2)  # g2 + b (v - g2) == b v + (1 - b) g2
                torch._foreach_mul_(nv, b)
                torch._foreach_add_(nv, g2)
                return nv, torch._foreach_div(gg, torch._foreach_sqrt(nv))

            nv, ou = foreach_map(plain, [v[i] for i in unfactored], gu, num_outputs=2)
            for j, i in enumerate(unfactored):
                new_v[i], out[i] = nv[j], ou[j]
        new_state = FactoredState(
            count=state.count + 1, v_row=tree.unflatten(treedef, new_row), v_col=tree.unflatten(treedef, new_col), v=tree.unflatten(treedef, new_v)
        )
        return tree.unflatten(treedef, out), new_state

    return GradientTransformation(init_fn, update_fn)


class ScaleByParamBlockRMSState(NamedTuple):
    """State of :func:`scale_by_param_block_rms` (none)."""


def _leaf_rms(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    norms = foreach_groups(lambda a: list(torch._foreach_norm(a)), xs)
    return [n / math.sqrt(max(x.numel(), 1)) for n, x in zip(norms, xs)]


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    """Scale each leaf's update by ``max(rms(param), min_scale)`` (Adafactor's relative step).

    Example:
        >>> tx = optim.scale_by_param_block_rms()
        >>> tx.update({"w": torch.ones(2)}, tx.init(None), {"w": torch.full((2,), 3.0)})[0]
        {'w': tensor([3., 3.])}
    """
    check_hyperparameter("min_scale", min_scale)

    def init_fn(params: Params) -> ScaleByParamBlockRMSState:
        del params
        return ScaleByParamBlockRMSState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("scale_by_param_block_rms", state, ScaleByParamBlockRMSState)
        _need_params("scale_by_param_block_rms", params)
        u, treedef, (p,) = _flatten_like(updates, "scale_by_param_block_rms", params)
        factors = [torch.clamp(r, min=min_scale).to(x.dtype) for r, x in zip(_leaf_rms(p), u)]
        return tree.unflatten(treedef, foreach_groups(torch._foreach_mul, u, factors)), state

    return GradientTransformation(init_fn, update_fn)


class ScaleByTrustRatioState(NamedTuple):
    """State of :func:`scale_by_trust_ratio` (none)."""


def scale_by_trust_ratio(min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0) -> GradientTransformation:
    """Scale each leaf's update by ``trust_coefficient * ||p|| / (||u|| + eps)`` (LARS/LAMB).

    ``||p||`` is clamped below at ``min_norm``; the ratio is 1 where either norm is 0.

    Example:
        >>> tx = optim.scale_by_trust_ratio()
        >>> tx.update({"w": torch.tensor([0.0, 2.0])}, tx.init(None), {"w": torch.tensor([3.0, 4.0])})[0]
        {'w': tensor([0., 5.])}
    """
    check_hyperparameter("min_norm", min_norm)
    check_hyperparameter("trust_coefficient", trust_coefficient)
    check_hyperparameter("eps", eps)

    def init_fn(params: Params) -> ScaleByTrustRatioState:
        del params
        return ScaleByTrustRatioState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("scale_by_trust_ratio", state, ScaleByTrustRatioState)
        _need_params("scale_by_trust_ratio", params)
        u, treedef, (p,) = _flatten_like(updates, "scale_by_trust_ratio", params)
        p_norms = foreach_groups(lambda a: list(torch._foreach_norm(a)), p)
        u_norms = foreach_groups(lambda a: list(torch._foreach_norm(a)), u)
        factors = []
        for pn, un, x in zip(p_norms, u_norms, u):
            pn = torch.clamp(pn.float(), min=min_norm)
            un = un.float().to(pn.device)
            ratio = trust_coefficient * pn / (un + eps)
            factors.append(torch.where((pn == 0) | (un == 0), torch.ones_like(ratio), ratio).to(device=x.device, dtype=x.dtype))
        return tree.unflatten(treedef, foreach_groups(torch._foreach_mul, u, factors)), state

    return GradientTransformation(init_fn, update_fn)


class ScaleBySignState(NamedTuple):
    """State of :func:`scale_by_sign` (none)."""


def scale_by_sign() -> GradientTransformation:
    """Replace each update by its sign (signSGD).

    Example:
        >>> tx = optim.scale_by_sign()
        >>> tx.update({"w": torch.tensor([-3.0, 0.0, 2.0])}, tx.init(None))[0]
        {'w': tensor([-1.,  0.,  1.])}
    """

    def init_fn(params: Params) -> ScaleBySignState:
        del params
        return ScaleBySignState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("scale_by_sign", state, ScaleBySignState)
        u, treedef = tree.flatten(updates)
        return tree.unflatten(treedef, foreach_groups(torch._foreach_sign, u)), state

    return GradientTransformation(init_fn, update_fn)


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights` (none)."""


def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0, mask: MaskOrFn = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay once scaled by the lr).

    Args:
        weight_decay: ``>= 0`` (a float or a 0-d tensor).
        mask: which leaves decay: ``None`` (all), a tree of Python bools shaped like params
            (or a prefix of it), a callable ``params -> such a tree`` or ``(name, param) -> bool``.
            As in optax, a mask wraps the rule in ``optim.masked`` (state ``MaskedState``);
            masked-out leaves pass through unchanged.

    Returns:
        A stateless transformation (state :class:`AddDecayedWeightsState`, or ``MaskedState`` with a mask).

    Example:
        >>> tx = optim.add_decayed_weights(0.1, mask={"w": True, "b": False})
        >>> p = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(p), p)[0]
        {'w': tensor([0.1000]), 'b': tensor([0.])}
    """
    check_hyperparameter("weight_decay", weight_decay)

    def init_fn(params: Params) -> AddDecayedWeightsState:
        del params
        return AddDecayedWeightsState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("add_decayed_weights", state, AddDecayedWeightsState)
        _need_params("add_decayed_weights", params)
        u, treedef, (p,) = _flatten_like(updates, "add_decayed_weights", params)
        p = _cast_to(p, u)
        if isinstance(weight_decay, torch.Tensor):
            out = foreach_groups(lambda a, b: torch._foreach_add(a, torch._foreach_mul(b, weight_decay.to(device=a[0].device, dtype=a[0].dtype))), u, p)
        else:
            out = foreach_groups(lambda a, b: _add_scaled(a, b, weight_decay), u, p)
        return tree.unflatten(treedef, out), state

    tx = GradientTransformation(init_fn, update_fn)
    if mask is None:
        return tx
    from craftfn.optim.combine import masked  # combine depends on base only; imported late to keep transforms light

    return masked(tx, mask)


class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`: the update count and the key for the next noise draw."""

    count: torch.Tensor
    rng_key: torch.Tensor


def add_noise(eta: float, gamma: float, seed: Union[int, torch.Tensor]) -> GradientTransformation:
    """Add annealed Gaussian noise: ``g + N(0, eta / t^gamma)`` (Neelakantan et al., 2015).

    The key lives in the state (a craftfn key from :mod:`craftfn.random`), so the noise is a
    pure function of the state: the same state gives the same noise.

    Args:
        eta: base variance, ``>= 0``.
        gamma: decay exponent of the variance, ``>= 0``.
        seed: an int seed or a craftfn key (``random.key(seed)``).

    Example:
        >>> tx = optim.add_noise(0.01, 0.55, seed=0)
        >>> s = tx.init({"w": torch.zeros(3)})
        >>> a, _ = tx.update({"w": torch.zeros(3)}, s)
        >>> b, _ = tx.update({"w": torch.zeros(3)}, s)
        >>> torch.equal(a["w"], b["w"])
        True
    """
    check_hyperparameter("eta", eta)
    check_hyperparameter("gamma", gamma)
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)):
        raise TypeError(f"add_noise: seed must be an int or a craftfn key (random.key(seed)), got {seed!r}")
    key0 = random.key(seed) if isinstance(seed, int) else seed

    def init_fn(params: Params) -> AddNoiseState:
        return AddNoiseState(count=_count_like(params), rng_key=key0.clone())

    def update_fn(updates: Updates, state: AddNoiseState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, AddNoiseState]:
        del params, extra
        _check_state("add_noise", state, AddNoiseState)
        u, treedef = tree.flatten(updates)
        count = state.count + 1
        keys = random.split(state.rng_key, 2)
        next_key, draw_key = keys[0], keys[1]
        std = torch.sqrt(eta / torch.pow(count.to(_scalar_dtype(count)), gamma))
        noise = [random.normal(random.fold_in(draw_key, i), tuple(x.shape), dtype=x.dtype, device=x.device) for i, x in enumerate(u)]
        out = foreach_groups(lambda a, n: torch._foreach_add(a, torch._foreach_mul(n, std.to(device=a[0].device, dtype=a[0].dtype))), u, noise)
        return tree.unflatten(treedef, out), AddNoiseState(count=count, rng_key=next_key)

    return GradientTransformation(init_fn, update_fn)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (freezes what it is applied to; see ``optim.partition``).

    Example:
        >>> tx = optim.set_to_zero()
        >>> tx.update({"w": torch.ones(2)}, tx.init(None))[0]
        {'w': tensor([0., 0.])}
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        _check_state("set_to_zero", state, EmptyState)
        return tree.zeros_like(updates), state

    return GradientTransformation(init_fn, update_fn)


def stateless(f: Callable[[Updates, Optional[Params]], Updates]) -> GradientTransformation:
    """A transformation from a pure function ``f(updates, params) -> updates`` (no state).

    Example:
        >>> tx = optim.stateless(lambda u, p: tree.scale(2.0, u))
        >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]
        {'w': tensor([2.])}
    """
    if not callable(f):
        raise TypeError(f"stateless: f must be a callable (updates, params) -> updates, got {f!r}")

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("stateless", state, EmptyState)
        return f(updates, params), state

    return GradientTransformation(init_fn, update_fn)
