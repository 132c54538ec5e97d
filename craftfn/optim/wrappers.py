"""Wrappers that change *when* or *how* an update rule applies (optax's ``wrappers``).

- :class:`MultiSteps`: accumulate gradients over ``k`` calls, update on the k-th.
- :func:`apply_if_finite`: skip a step whose gradients are not finite.
- :func:`inject_hyperparams`: keep hyperparameters in the state as tensors (schedulable,
  loggable, changeable without recompiling).
- :func:`lookahead`: slow weights that pull the fast ones back every ``sync_period`` steps.
- :func:`tree_get` / :func:`tree_set`: read or replace a named field anywhere in a state.

Decisions that would otherwise need ``if tensor:`` (is this the last micro-step? is this
step finite?) are made with ``torch.where`` on 0-d tensors, so none of these wrappers
syncs with the device and a compiled step has one graph.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    >>> state = tx.init({"w": torch.ones(1)})
    >>> optim.tree_get(state, "learning_rate")
    tensor(0.1000)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from craftfn import tree
from craftfn.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    _state_error,
    apply_updates_,
    check_hyperparameter,
    check_updates_match,
)
from craftfn.optim.transforms import foreach_groups

__all__ = [
    "MultiSteps",
    "MultiStepsState",
    "skip_not_finite",
    "skip_large_updates",
    "ShouldSkipUpdateFunction",
    "ApplyIfFiniteState",
    "apply_if_finite",
    "InjectHyperparamsState",
    "inject_hyperparams",
    "LookaheadState",
    "lookahead",
    "tree_get",
    "tree_set",
]


def _device_of(t: Any) -> Optional[torch.device]:
    leaves_ = [x for x in tree.leaves(t) if isinstance(x, torch.Tensor)]
    return leaves_[0].device if leaves_ else None


def _select(pred: torch.Tensor, on_true: Any, on_false: Any, argname: str = "state") -> Any:
    """Leafwise ``torch.where(pred, a, b)``: one tree or the other, chosen without a host sync."""
    a_leaves, treedef = tree.flatten(on_true)
    try:
        b_leaves = treedef.flatten_up_to(on_false)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{argname}: the tree changed structure during the update ({e})") from None
    out = []
    for a, b in zip(a_leaves, b_leaves):
        if isinstance(a, torch.Tensor):
            out.append(torch.where(pred.to(a.device), a, b.to(a.dtype)))
        else:
            out.append(a)
    return tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- MultiSteps


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`.

    Attributes:
        mini_step: micro-steps accumulated since the last update (0-d int64).
        gradient_step: updates applied so far (0-d int64).
        inner_opt_state: the wrapped rule's state.
        acc_grads: the running mean (or sum) of the micro-step gradients.
        skip_state: what ``should_skip_update_fn`` reports (e.g. ``num_not_finite``).
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_opt_state: OptState
    acc_grads: Updates
    skip_state: Any


def skip_not_finite(updates: Updates, gradient_step: torch.Tensor, params: Optional[Params]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``should_skip_update_fn`` for :class:`MultiSteps`: skip a micro-step whose gradients are not all finite.

    Returns:
        ``(should_skip, {"should_skip": ..., "num_not_finite": ...})`` as 0-d tensors.

    Example:
        >>> skip, info = optim.skip_not_finite({"w": torch.tensor([float("nan")])}, torch.tensor(0), None)
        >>> skip
        tensor(True)
    """
    del gradient_step, params
    device = _device_of(updates)
    num_not_finite = torch.zeros((), dtype=torch.int64, device=device)
    for g in tree.group_by_device_dtype([x for x in tree.leaves(updates) if x.is_floating_point()]):
        # An element is non-finite iff its max-abs (inf) norm is; counting per leaf keeps this one kernel per group.
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(g.tensors, float("inf"))])
        num_not_finite = num_not_finite + (~torch.isfinite(norms)).sum()
    should_skip = num_not_finite > 0
    return should_skip, {"should_skip": should_skip, "num_not_finite": num_not_finite}


def skip_large_updates(updates: Updates, gradient_step: torch.Tensor, params: Optional[Params], max_squared_norm: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``should_skip_update_fn`` for :class:`MultiSteps`: skip a micro-step whose squared global norm
    exceeds ``max_squared_norm`` (or is not finite). Bind it with ``functools.partial``.

    Returns:
        ``(should_skip, {"should_skip": ..., "norm_squared": ...})`` as 0-d tensors.

    Example:
        >>> skip, info = optim.skip_large_updates({"w": torch.tensor([3.0])}, torch.tensor(0), None, max_squared_norm=4.0)
        >>> skip, info["norm_squared"]
        (tensor(True), tensor(9.))
    """
    del gradient_step, params
    norm_sq = tree.sum_of_squares(updates)
    should_skip = ~(norm_sq < max_squared_norm)  # NaN compares False: skipped too
    return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}


ShouldSkipUpdateFunction = Callable[[Updates, torch.Tensor, Optional[Params]], tuple[torch.Tensor, Any]]


def _weight_for(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # fp64 only where the data is fp64 (some devices lack it); half types take an fp32 factor.
    return weight.to(torch.float64 if dtype == torch.float64 else torch.float32)


class MultiSteps(GradientTransformation):
    """Gradient accumulation across calls: apply ``opt`` once every ``k`` micro-steps (optax's ``MultiSteps``).

    Each call adds the micro-batch gradient to an accumulator and returns zero updates,
    except every k-th call, which runs ``opt`` on the mean (or sum) of the k gradients
    and returns its updates. A micro-step whose gradients are not finite is skipped
    (nothing accumulated, nothing counted) by default. ``opt`` runs on every call and
    its result is kept only on the k-th (``torch.where``): no host sync, one graph.

    ``MultiSteps(...)`` *is* a :class:`GradientTransformation` (use it directly as ``tx``);
    ``gradient_transformation()`` returns itself for optax compatibility.

    Args:
        opt: the rule to apply to the accumulated gradient.
        every_k_schedule: ``k`` (an int >= 1), or a function of the number of updates
            done so far (``gradient_step``) returning k.
        use_grad_mean: accumulate the mean (default) rather than the sum.
        should_skip_update_fn: ``(updates, gradient_step, params) -> (skip, skip_state)``;
            default :func:`skip_not_finite`; ``None`` never skips.
        accumulator_dtype: dtype of ``acc_grads`` (default: the parameters' dtype).

    Example:
        >>> tx = optim.MultiSteps(optim.sgd(1.0), every_k_schedule=2)
        >>> p = {"w": torch.zeros(1)}
        >>> s = tx.init(p)
        >>> u, s = tx.update({"w": torch.tensor([1.0])}, s, p)
        >>> u, bool(tx.has_updated(s))
        ({'w': tensor([0.])}, False)
        >>> u, s = tx.update({"w": torch.tensor([3.0])}, s, p)
        >>> u, bool(tx.has_updated(s))
        ({'w': tensor([-2.])}, True)
    """

    def __new__(
        cls,
        opt: GradientTransformation,
        every_k_schedule: Union[int, Callable[[torch.Tensor], Any]],
        use_grad_mean: bool = True,
        should_skip_update_fn: Optional[Callable[..., tuple[torch.Tensor, Any]]] = skip_not_finite,
        accumulator_dtype: Optional[torch.dtype] = None,
    ) -> MultiSteps:
        if not isinstance(opt, GradientTransformation):
            raise TypeError(f"MultiSteps: opt must be a GradientTransformation, got {type(opt).__name__}")
        if not callable(every_k_schedule):
            if isinstance(every_k_schedule, bool) or not isinstance(every_k_schedule, numbers.Integral) or every_k_schedule < 1:
                raise ValueError(f"MultiSteps: every_k_schedule must be an int >= 1 or a schedule, got {every_k_schedule!r}")
            k_const = int(every_k_schedule)
            every_k = lambda step: k_const  # noqa: E731
        else:
            every_k = every_k_schedule

        def _zero_skip_state(params: Params) -> Any:
            if should_skip_update_fn is None:
                return ()
            _, skip_state = should_skip_update_fn(tree.zeros_like(params), torch.zeros((), dtype=torch.int64, device=_device_of(params)), params)
            return skip_state

        def init_fn(params: Params) -> MultiStepsState:
            device = _device_of(params)
            zero = torch.zeros((), dtype=torch.int64, device=device)
            return MultiStepsState(
                mini_step=zero,
                gradient_step=zero.clone(),
                inner_opt_state=opt.init(params),
                acc_grads=tree.zeros_like(params, dtype=accumulator_dtype),
                skip_state=_zero_skip_state(params),
            )

        def update_fn(updates: Updates, state: MultiStepsState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, MultiStepsState]:
            if not isinstance(state, MultiStepsState):
                raise _state_error("MultiSteps", "a MultiStepsState", state)
            check_updates_match(updates, state.acc_grads, "MultiSteps: updates")
            k = torch.as_tensor(every_k(state.gradient_step), dtype=torch.int64, device=state.mini_step.device)
            if should_skip_update_fn is not None:
                skip, skip_state = should_skip_update_fn(updates, state.gradient_step, params)
            else:
                skip, skip_state = torch.zeros((), dtype=torch.bool, device=state.mini_step.device), ()

            g_leaves, treedef = tree.flatten(updates)
            acc_leaves = treedef.flatten_up_to(state.acc_grads)
            g_acc = [g.to(a.dtype) for g, a in zip(g_leaves, acc_leaves)]
            if use_grad_mean:
                # Running mean acc + (g - acc) / (n + 1): never overflows, and after k steps it is the mean.
                weight = 1.0 / (state.mini_step + 1).to(torch.float64)
                new_acc = foreach_groups(
                    lambda a, g: torch._foreach_add(a, torch._foreach_mul(torch._foreach_sub(g, a), _weight_for(weight, a[0].dtype))),
                    acc_leaves, g_acc,
                ) or []
            else:
                new_acc = foreach_groups(torch._foreach_add, acc_leaves, g_acc) or []
            new_acc_tree = tree.unflatten(treedef, new_acc)

            inner_in = tree.unflatten(treedef, [a.to(g.dtype) for a, g in zip(new_acc, g_leaves)])
            inner_updates, inner_state = opt.update(inner_in, state.inner_opt_state, params, **extra)

            is_final = state.mini_step >= k - 1
            apply = is_final & ~skip
            zeros = tree.zeros_like(updates)
            out_updates = _select(apply, inner_updates, zeros, "updates")
            new_inner = _select(apply, inner_state, state.inner_opt_state, "inner_opt_state")
            acc_after = _select(is_final, tree.zeros_like(new_acc_tree), new_acc_tree, "acc_grads")
            acc_after = _select(skip, state.acc_grads, acc_after, "acc_grads")
            one = torch.ones_like(state.mini_step)
            mini = torch.where(skip, state.mini_step, torch.where(is_final, torch.zeros_like(state.mini_step), state.mini_step + one))
            gstep = torch.where(apply, state.gradient_step + one, state.gradient_step)
            return out_updates, MultiStepsState(mini, gstep, new_inner, acc_after, skip_state)

        self = super().__new__(cls, init_fn, update_fn, None)
        return self

    def has_updated(self, state: MultiStepsState) -> torch.Tensor:
        """0-d bool tensor: the last call applied an update (the inner rule stepped).

        Example:
            >>> tx = optim.MultiSteps(optim.sgd(1.0), 3)
            >>> tx.has_updated(tx.init({"w": torch.zeros(1)}))
            tensor(False)
        """
        if not isinstance(state, MultiStepsState):
            raise _state_error("MultiSteps.has_updated", "a MultiStepsState", state)
        return (state.mini_step == 0) & (state.gradient_step > 0)

    def gradient_transformation(self) -> GradientTransformation:
        """This transformation (optax compatibility: ``optax.MultiSteps(...).gradient_transformation()``)."""
        return self


# ----------------------------------------------------------------------------- apply_if_finite


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        notfinite_count: consecutive non-finite steps so far (0-d int64).
        last_finite: whether the last step was finite (0-d bool).
        total_notfinite: all non-finite steps so far (0-d int64).
        inner_state: the wrapped rule's state.
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skip a step whose gradients (or resulting updates) are not finite (optax's ``apply_if_finite``).

    A skipped step returns zero updates and keeps the inner state as it was, so the
    parameters and the rule's moments are untouched by a NaN/inf batch. After more than
    ``max_consecutive_errors`` non-finite steps in a row the update is applied anyway,
    so a run that diverged for good shows it instead of silently freezing. The choice
    is a ``torch.where``, so there is no host sync; read ``total_notfinite`` to log skips.

    Args:
        inner: the rule to protect.
        max_consecutive_errors: how many non-finite steps in a row are skipped (>= 0).

    Returns:
        A :class:`GradientTransformation` with state :class:`ApplyIfFiniteState`.

    Example:
        >>> tx = optim.apply_if_finite(optim.sgd(0.1), max_consecutive_errors=5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> u, s = tx.update({"w": torch.tensor([float("nan")])}, s)
        >>> u, s.total_notfinite
        ({'w': tensor([0.])}, tensor(1))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite: inner must be a GradientTransformation, got {type(inner).__name__}")
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, numbers.Integral) or max_consecutive_errors < 0:
        raise ValueError(f"apply_if_finite: max_consecutive_errors must be an int >= 0, got {max_consecutive_errors!r}")

    def init_fn(params: Params) -> ApplyIfFiniteState:
        device = _device_of(params)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=device), zero.clone(), inner.init(params))

    def update_fn(updates: Updates, state: ApplyIfFiniteState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, ApplyIfFiniteState]:
        if not isinstance(state, ApplyIfFiniteState):
            raise _state_error("apply_if_finite", "an ApplyIfFiniteState", state)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
        device = state.notfinite_count.device
        finite = tree.all_finite(updates).to(device) & tree.all_finite(new_updates).to(device)
        one = torch.ones_like(state.notfinite_count)
        notfinite_count = torch.where(finite, torch.zeros_like(one), state.notfinite_count + one)
        total = torch.where(finite, state.total_notfinite, state.total_notfinite + one)
        apply = finite | (notfinite_count > max_consecutive_errors)
        out = _select(apply, new_updates, tree.zeros_like(new_updates), "updates")
        inner_state = _select(apply, new_inner, state.inner_state, "inner_state")
        return out, ApplyIfFiniteState(notfinite_count, finite, total, inner_state)

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- inject_hyperparams


class InjectHyperparamsState(NamedTuple):
    """State of :func:`inject_hyperparams`.

    Attributes:
        count: updates so far (0-d int64): the input of scheduled hyperparameters.
        hyperparams: ``{name: 0-d tensor}``: the values used by the last update (or, for
            constants, the values the next update will use; replace one with a tensor of
            the same dtype to change it without recompiling).
        inner_state: the wrapped rule's state.
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: OptState


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and (value.is_floating_point() or not value.dtype.is_complex)
    return isinstance(value, numbers.Real)


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: Union[str, tuple[str, ...]] = (),
    hyperparam_dtype: Optional[torch.dtype] = None,
) -> Callable[..., GradientTransformation]:
    """Make a rule's numeric hyperparameters part of its state (optax's ``inject_hyperparams``).

    ``inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)`` behaves as
    ``adamw(1e-3, weight_decay=0.1)``, but the numbers live in
    ``state.hyperparams`` as 0-d tensors: you can log them (``tree_get(state, "learning_rate")``),
    change them between steps (:func:`tree_set`) and a ``torch.compile``'d step never
    recompiles, because they are graph inputs rather than constants. A hyperparameter
    given as a schedule (a callable) is evaluated on the update count each step and its
    current value is stored the same way.

    Booleans, strings, dtypes, ``None`` and names in ``static_args`` are passed through
    as they are. The factory is called again on each update with tensor
    hyperparameters, so it must accept 0-d tensors (craftfn's aliases do). When the
    rule has a ``donated_update`` (the adam family's fused path), so does the wrapper.
    torch's fused Adam kernel takes only the learning rate as a tensor: to keep a donated
    ``adamw`` step on it, inject the learning rate alone, e.g.
    ``inject_hyperparams(adamw, static_args=("b1", "b2", "eps", "weight_decay"))(learning_rate=sched)``;
    with tensor betas or weight decay the donated step runs as in-place ``_foreach`` ops.

    Args:
        inner_factory: a function returning a :class:`GradientTransformation`, e.g. ``optim.adamw``.
        static_args: names of numeric arguments to keep as Python values (e.g. ones used
            in Python control flow).
        hyperparam_dtype: dtype of float hyperparameters (default float32; integers are int64).

    Returns:
        A function with the factory's arguments that returns the wrapped transformation.

    Example:
        >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=lambda n: 0.1 / (n + 1))
        >>> p = {"w": torch.zeros(1)}
        >>> s = tx.init(p)
        >>> u, s = tx.update({"w": torch.ones(1)}, s, p)
        >>> u, s = tx.update({"w": torch.ones(1)}, s, p)
        >>> u["w"], s.hyperparams["learning_rate"]
        (tensor([-0.0500]), tensor(0.0500))
    """
    if not callable(inner_factory):
        raise TypeError(f"inject_hyperparams: inner_factory must be callable (e.g. optim.adamw), got {inner_factory!r}")
    static = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    float_dtype = hyperparam_dtype or torch.float32
    if not float_dtype.is_floating_point:
        raise ValueError(f"inject_hyperparams: hyperparam_dtype must be a floating dtype, got {hyperparam_dtype}")

    def _as_tensor(value: Any, device: Optional[torch.device]) -> torch.Tensor:
        t = torch.as_tensor(value, device=device)
        dtype = float_dtype if (t.is_floating_point() or isinstance(value, float)) else torch.int64
        return t.to(device=device, dtype=dtype)

    @functools.wraps(inner_factory)
    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        if args:
            try:
                bound = inspect.signature(inner_factory).bind_partial(*args)
            except (TypeError, ValueError) as e:
                raise TypeError(f"inject_hyperparams({getattr(inner_factory, '__name__', inner_factory)}): {e}") from None
            kwargs = {**bound.arguments, **kwargs}
        sched_hps, numeric_hps, other_hps = {}, {}, {}
        for name, value in kwargs.items():
            if name in static or isinstance(value, bool) or value is None:
                other_hps[name] = value
            elif callable(value) and not isinstance(value, torch.Tensor):
                sched_hps[name] = value
            elif _is_numeric(value):
                numeric_hps[name] = value
            else:
                other_hps[name] = value
        # Build once with the given values, so bad hyperparameters fail here with the factory's
        # message (range checks skip tensors), not at the first step.
        inner_factory(**other_hps, **numeric_hps, **sched_hps)

        def _hyperparams(count: torch.Tensor, stored: Optional[dict[str, torch.Tensor]], device: Optional[torch.device]) -> dict[str, torch.Tensor]:
            hps: dict[str, torch.Tensor] = {}
            for name, value in numeric_hps.items():
                if stored is None:
                    hps[name] = _as_tensor(value, device)
                else:
                    # optax's idiom opt_state.hyperparams["learning_rate"] = 0.01 stores a number: keep it a tensor.
                    hps[name] = stored[name] if isinstance(stored[name], torch.Tensor) else _as_tensor(stored[name], device)
            for name, fn in sched_hps.items():
                hps[name] = _as_tensor(fn(count), device)
            return hps

        # The rule as update builds it (tensor hyperparameters): a schedule given to the factory
        # may select a different rule (scale_by_schedule) than its value does (scale).
        probe = inner_factory(**other_hps, **_hyperparams(torch.zeros((), dtype=torch.int64), None, None))

        def init_fn(params: Params) -> InjectHyperparamsState:
            device = _device_of(params)
            count = torch.zeros((), dtype=torch.int64, device=device)
            hps = _hyperparams(count, None, device)
            return InjectHyperparamsState(count, hps, inner_factory(**other_hps, **hps).init(params))

        def _prepare(state: Any) -> tuple[GradientTransformation, dict[str, torch.Tensor]]:
            if not isinstance(state, InjectHyperparamsState):
                raise _state_error("inject_hyperparams", "an InjectHyperparamsState", state)
            missing = set(numeric_hps) - set(state.hyperparams)
            if missing:
                raise ValueError(f"inject_hyperparams: opt_state.hyperparams lacks {sorted(missing)}; it must come from this transformation's init")
            hps = _hyperparams(state.count, state.hyperparams, state.count.device)
            return inner_factory(**other_hps, **hps), hps

        def update_fn(updates: Updates, state: InjectHyperparamsState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, InjectHyperparamsState]:
            inner, hps = _prepare(state)
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            return updates, InjectHyperparamsState(state.count + 1, hps, inner_state)

        def donated_fn(updates: Updates, state: InjectHyperparamsState, params: Params, **extra: Any) -> tuple[Params, InjectHyperparamsState]:
            inner, hps = _prepare(state)
            if inner.donated_update is not None:
                params, inner_state = inner.donated_update(updates, state.inner_state, params, **extra)
            else:
                new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
                params = apply_updates_(params, new_updates)
            return params, InjectHyperparamsState(state.count + 1, hps, inner_state)

        # The inner rule receives extra keywords (a chain's grad_divisor included) as they come.
        return GradientTransformation(
            init_fn, update_fn, donated_fn if probe.donated_update is not None else None, fused_divide=probe.fused_divide
        )

    return wrapped


# ----------------------------------------------------------------------------- lookahead


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    Attributes:
        fast_state: the fast rule's state.
        steps_since_sync: fast steps since the last synchronisation (0-d int64).
        slow: the slow weights (same tree as the parameters).
    """

    fast_state: OptState
    steps_since_sync: torch.Tensor
    slow: Params


def lookahead(fast_optimizer: GradientTransformation, sync_period: int, slow_step_size: float, reset_state: bool = False) -> GradientTransformation:
    """Lookahead (Zhang et al., 2019): every ``sync_period`` steps, ``slow += a * (fast - slow)`` and fast jumps to slow.

    Unlike optax, which keeps both weight sets in ``LookaheadParams``, craftfn keeps
    the slow weights in the optimizer state, so the parameters stay the model's own tree
    (``TrainState.apply`` keeps working); read them with ``tree_get(opt_state, "slow")``.
    After each synchronisation the parameters equal the slow weights.

    Args:
        fast_optimizer: the inner rule (the "fast" optimizer).
        sync_period: fast steps between synchronisations (>= 1).
        slow_step_size: the interpolation factor ``a`` in [0, 1].
        reset_state: re-initialise the fast rule's state at each synchronisation.

    Returns:
        A :class:`GradientTransformation` with state :class:`LookaheadState`; ``update`` needs ``params``.

    Example:
        >>> tx = optim.lookahead(optim.sgd(1.0), sync_period=2, slow_step_size=0.5)
        >>> p = {"w": torch.zeros(1)}
        >>> s = tx.init(p)
        >>> u, s = tx.update({"w": torch.ones(1)}, s, p); p = optim.apply_updates(p, u)
        >>> u, s = tx.update({"w": torch.ones(1)}, s, p); p = optim.apply_updates(p, u)
        >>> p["w"]
        tensor([-1.])
    """
    if not isinstance(fast_optimizer, GradientTransformation):
        raise TypeError(f"lookahead: fast_optimizer must be a GradientTransformation, got {type(fast_optimizer).__name__}")
    if isinstance(sync_period, bool) or not isinstance(sync_period, numbers.Integral) or sync_period < 1:
        raise ValueError(f"lookahead: sync_period must be an int >= 1, got {sync_period!r}")
    check_hyperparameter("slow_step_size", slow_step_size, low=0.0, high=1.0, high_inclusive=True)

    def init_fn(params: Params) -> LookaheadState:
        return LookaheadState(
            fast_optimizer.init(params),
            torch.zeros((), dtype=torch.int64, device=_device_of(params)),
            tree.clone(tree.detach(params)),
        )

    def update_fn(updates: Updates, state: LookaheadState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, LookaheadState]:
        if not isinstance(state, LookaheadState):
            raise _state_error("lookahead", "a LookaheadState", state)
        if params is None:
            raise ValueError("lookahead: update needs params (the fast weights): tx.update(grads, state, params)")
        check_updates_match(updates, state.slow, "lookahead: updates")
        fast_updates, fast_state = fast_optimizer.update(updates, state.fast_state, params, **extra)
        sync = state.steps_since_sync >= sync_period - 1
        u_leaves, treedef = tree.flatten(fast_updates)
        p_leaves = treedef.flatten_up_to(params)
        s_leaves = treedef.flatten_up_to(state.slow)
        out: list[Any] = [None] * len(u_leaves)
        new_slow: list[Any] = [None] * len(u_leaves)
        for gp, gu, gs in tree.group_by_device_dtype(p_leaves, u_leaves, s_leaves):
            us = [u.to(gp.dtype) for u in gu.tensors]
            syncf = sync.to(device=gp.device, dtype=gp.dtype)
            new_fast = torch._foreach_add(gp.tensors, us)
            # On a sync step: slow' = slow + a (fast' - slow) and the update moves fast to slow';
            # otherwise slow stays and the fast update passes through. Blending by a 0/1 tensor
            # keeps it one multi-tensor kernel per group and free of host syncs.
            slow_delta = torch._foreach_mul(torch._foreach_sub(new_fast, gs.tensors), syncf * slow_step_size)
            slow_next = torch._foreach_add(gs.tensors, slow_delta)
            correction = torch._foreach_mul(torch._foreach_sub(slow_next, new_fast), syncf)
            for i, u, c, sn in zip(gp.indices, us, correction, slow_next):
                out[i] = u + c
                new_slow[i] = sn
        out = [o.to(u.dtype) for o, u in zip(out, u_leaves)]
        if reset_state:
            fast_state = _select(sync, fast_optimizer.init(params), fast_state, "fast_state")
        steps = torch.where(sync, torch.zeros_like(state.steps_since_sync), state.steps_since_sync + 1)
        return tree.unflatten(treedef, out), LookaheadState(fast_state, steps, tree.unflatten(treedef, new_slow))

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- tree_get / tree_set


def _children(node: Any) -> Optional[list[tuple[str, Any]]]:
    """Named children of a container node, or None for a leaf."""
    if isinstance(node, torch.Tensor) or node is None:
        return None
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return [(f, getattr(node, f)) for f in node._fields]
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node) if f.init and not f.metadata.get("craftfn_static", False)]
    return None


def _find(node: Any, key: str, path: str, found: list[tuple[str, Any]]) -> None:
    children = _children(node)
    if children is None:
        return
    for name, child in children:
        child_path = f"{path}.{name}" if path else name
        if name == key:
            found.append((child_path, child))
        _find(child, key, child_path, found)


def tree_get(state: Any, key: str, default: Any = None, filtering: Optional[Callable[[str, Any], bool]] = None) -> Any:
    """The value of the field (NamedTuple field, dict key, dataclass field) named ``key`` anywhere in ``state``.

    As optax's ``tree_get``: ``default`` when no field has that name, ``KeyError`` when several do.

    Args:
        state: an optimizer state (or any pytree, e.g. a ``TrainState``).
        key: the field name, e.g. ``"learning_rate"``, ``"count"``, ``"mu"``.
        default: returned when no field has that name.
        filtering: ``(dotted path, value) -> bool``: keep only the matches it accepts
            (e.g. ``lambda path, v: path.startswith("0.")``) to pick one of several.

    Returns:
        The value (a tensor or a subtree), or ``default``.

    Raises:
        KeyError: several fields named ``key`` pass ``filtering`` (their paths are listed).

    Example:
        >>> tx = optim.chain(optim.trace(0.9), optim.inject_hyperparams(optim.sgd)(learning_rate=0.1))
        >>> optim.tree_get(tx.init({"w": torch.ones(1)}), "learning_rate")
        tensor(0.1000)
    """
    found: list[tuple[str, Any]] = []
    _find(state, key, "", found)
    if filtering is not None:
        found = [(p, v) for p, v in found if filtering(p, v)]
    if not found:
        return default
    if len(found) > 1:
        raise KeyError(f"tree_get: {key!r} is found {len(found)} times, at {[p for p, _ in found]}; pass filtering= or the sub-state that holds the one you want")
    return found[0][1]


def _rebuild(node: Any, key: str, value: Any, hits: list[str], path: str) -> Any:
    children = _children(node)
    if children is None:
        return node
    new = {}
    for name, child in children:
        child_path = f"{path}.{name}" if path else name
        if name == key:
            hits.append(child_path)
            new[name] = value
        else:
            new[name] = _rebuild(child, key, value, hits, child_path)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(**new)
    if isinstance(node, dict):
        return type(node)((k, new[str(k)]) for k in node)
    if isinstance(node, (list, tuple)):
        return type(node)(new[str(i)] for i in range(len(node)))
    return dataclasses.replace(node, **new)


def tree_set(state: Any, **values: Any) -> Any:
    """A copy of ``state`` with the fields named by ``values`` replaced (each name must occur exactly once).

    With :func:`inject_hyperparams`, pass a 0-d tensor of the stored dtype to change a
    hyperparameter without recompiling a compiled step.

    Example:
        >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
        >>> s = optim.tree_set(tx.init({"w": torch.ones(1)}), learning_rate=torch.tensor(0.01))
        >>> optim.tree_get(s, "learning_rate")
        tensor(0.0100)
    """
    for key, value in values.items():
        hits: list[str] = []
        state = _rebuild(state, key, value, hits, "")
        if len(hits) != 1:
            where = f"at {hits}" if hits else "nowhere"
            raise KeyError(f"tree_set: {key!r} must name exactly one field of the state; it is found {where}")
    return state

