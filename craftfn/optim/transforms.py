"""Primitive gradient transformations (optax's ``transform`` module for craftfn).

The adaptive rules (Adam, RMSProp, Lion, Adafactor's moments ...) live in
:mod:`craftfn.optim.adaptive`; clipping in :mod:`craftfn.optim.clipping`.

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
    "AddNoiseState",
    "AddDecayedWeightsState",
    "WeightDecayScheduleState",
    "ScaleByTrustRatioState",
    "ScaleBySignState",
    "ScaleByParamBlockRMSState",
    "MaskOrFn",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "trace",
    "ema",
    "scale_by_param_block_rms",
    "scale_by_trust_ratio",
    "scale_by_sign",
    "add_decayed_weights",
    "add_noise",
    "set_to_zero",
    "stateless",
    "stateless_with_tree_map",
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
    check_hyperparameter("step_size", step_size, low=None)  # any sign (sgd scales by -lr), but finite

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


# ----------------------------------------------------------------------------- other rules


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

    Both norms are clamped below at ``min_norm``; the ratio is 1 where either norm is 0.

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
            # optax's safe_norm: both norms are clamped below at min_norm.
            pn = torch.clamp(pn.float(), min=min_norm)
            un = torch.clamp(un.float().to(pn.device), min=min_norm)
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
    """State of :func:`add_decayed_weights` with a constant rate (none)."""


class WeightDecayScheduleState(NamedTuple):
    """State of :func:`add_decayed_weights` with a scheduled rate: the update count."""

    count: torch.Tensor


def add_decayed_weights(weight_decay: ScalarOrSchedule = 0.0, mask: MaskOrFn = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay once scaled by the lr).

    Args:
        weight_decay: ``>= 0``: a float, a 0-d tensor, or a schedule ``count -> rate`` (the
            state then counts the updates, as in optax).
        mask: which leaves decay: ``None`` (all), a tree of Python bools shaped like params
            (or a prefix of it), a callable ``params -> such a tree`` or ``(name, param) -> bool``.
            As in optax, a mask wraps the rule in ``optim.masked`` (state ``MaskedState``);
            masked-out leaves pass through unchanged.

    Returns:
        A transformation with state :class:`AddDecayedWeightsState` (:class:`WeightDecayScheduleState`
        for a schedule; ``MaskedState`` with a mask).

    Example:
        >>> tx = optim.add_decayed_weights(0.1, mask={"w": True, "b": False})
        >>> p = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(p), p)[0]
        {'w': tensor([0.1000]), 'b': tensor([0.])}
    """
    check_hyperparameter("weight_decay", weight_decay)
    return _add_scaled_params(weight_decay, mask)


def _add_scaled_params(weight_decay: ScalarOrSchedule, mask: MaskOrFn = None) -> GradientTransformation:
    """:func:`add_decayed_weights` without the range check (``fromage`` adds a negative multiple)."""
    scheduled = callable(weight_decay)
    state_cls = WeightDecayScheduleState if scheduled else AddDecayedWeightsState

    def init_fn(params: Params) -> Any:
        return WeightDecayScheduleState(count=_count_like(params)) if scheduled else AddDecayedWeightsState()

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del extra
        _check_state("add_decayed_weights", state, state_cls)
        _need_params("add_decayed_weights", params)
        rate = weight_decay(state.count) if scheduled else weight_decay
        new_state = WeightDecayScheduleState(count=state.count + 1) if scheduled else state
        u, treedef, (p,) = _flatten_like(updates, "add_decayed_weights", params)
        p = _cast_to(p, u)
        if isinstance(rate, torch.Tensor):
            out = foreach_groups(lambda a, b: torch._foreach_add(a, torch._foreach_mul(b, rate.to(device=a[0].device, dtype=a[0].dtype))), u, p)
        else:
            out = foreach_groups(lambda a, b: _add_scaled(a, b, rate), u, p)
        return tree.unflatten(treedef, out), new_state

    tx = GradientTransformation(init_fn, update_fn)
    if mask is None:
        return tx
    from craftfn.optim.combine import masked  # combine depends on base only; imported late to keep transforms light

    return masked(tx, mask)


class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`: the update count and the key for the next noise draw."""

    count: torch.Tensor
    rng_key: torch.Tensor


def add_noise(eta: float, gamma: float, key: Union[int, torch.Tensor, None] = None, *, seed: Optional[int] = None) -> GradientTransformation:
    """Add annealed Gaussian noise: ``g + N(0, eta / t^gamma)`` (Neelakantan et al., 2015).

    The key lives in the state (a craftfn key from :mod:`craftfn.random`), so the noise is a
    pure function of the state: the same state gives the same noise. The noise is drawn from
    craftfn's keys, not JAX's, so it is not optax's sample (its law is the same).

    Args:
        eta: base variance, ``>= 0``.
        gamma: decay exponent of the variance, ``>= 0``.
        key: a craftfn key (``random.key(seed)``) or an int seed (optax's argument); default 0.
        seed: an int seed (optax's older spelling); give ``key`` or ``seed``, not both.

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
    if key is not None and seed is not None:
        raise ValueError(f"add_noise: give key or seed, not both (got key={key!r}, seed={seed!r})")
    key = seed if key is None else key
    key = 0 if key is None else key
    if isinstance(key, bool) or not isinstance(key, (int, torch.Tensor)):
        raise TypeError(f"add_noise: key must be an int seed or a craftfn key (random.key(seed)), got {key!r}")
    key0 = random.key(key) if isinstance(key, int) else key

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


def stateless_with_tree_map(f: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]) -> GradientTransformation:
    """A stateless transformation applying ``f(update_leaf, param_leaf)`` to every leaf (``param_leaf`` is
    ``None`` when ``update`` gets no params).

    Example:
        >>> tx = optim.stateless_with_tree_map(lambda g, p: 2.0 * g)
        >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]
        {'w': tensor([2.])}
    """
    if not callable(f):
        raise TypeError(f"stateless_with_tree_map: f must be a callable (update, param) -> update, got {f!r}")

    def apply(updates: Updates, params: Optional[Params]) -> Updates:
        if params is None:
            return tree.map(lambda u: f(u, None), updates)
        return tree.map(f, updates, params)

    return stateless(apply)


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
