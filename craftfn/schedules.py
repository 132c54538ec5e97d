"""Schedules: pure ``step -> value`` functions (optax's ``schedules`` for craftfn).

A schedule maps the number of updates done so far to a hyperparameter value
(usually the learning rate). Every schedule here

* takes the step as a Python ``int`` and returns a Python ``float``, or takes a
  tensor (a 0-d count, or any shape, e.g. ``torch.arange(1000)`` for plotting) and
  returns a tensor of the same shape in the default float dtype on its device;
* computes with tensor ops only (``torch.where``/``clamp``/arithmetic, in float64),
  never branching in Python on a tensor and never syncing with the host, so a
  ``torch.compile``'d step that evaluates it compiles once as the step advances.

Int and tensor inputs go through the same float64 arithmetic, so they agree to the
rounding of the final cast. A negative ``int`` step is an error; negative tensor
steps (which :func:`join` produces for pieces not yet started) count as step 0.

:func:`create_scheduler` builds any of them by name from config, with optax's
argument names (``init_value``, ``peak_value``, ``warmup_steps``, ...) or, for the
names of ``torch.optim.lr_scheduler`` (``cosine_annealing``, ``step``, ``onecycle``,
...), torch's argument names plus the base ``learning_rate``; those reproduce torch's
sequence exactly (value at step ``t`` = the lr torch's optimizer uses at its
``(t+1)``-th step when the scheduler is stepped once per optimizer step).

Example:
    >>> import torch
    >>> from craftfn import schedules
    >>> lr = schedules.warmup_cosine_decay(0.0, 1.0, warmup_steps=10, decay_steps=110)
    >>> lr(5), lr(10), lr(110)
    (0.5, 1.0, 0.0)
    >>> lr(torch.tensor(5))
    tensor(0.5000)
"""

from __future__ import annotations

import bisect
import difflib
import inspect
import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "Schedule",
    "constant",
    "linear",
    "polynomial",
    "exponential_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    "warmup_exponential_decay",
    "warmup_constant",
    "piecewise_constant",
    "piecewise_interpolate",
    "join",
    "sgdr",
    "linear_onecycle",
    "cosine_onecycle",
    "warmup_stable_decay",
    "inverse_sqrt",
    "create_scheduler",
    "scheduler_names",
    "check_schedule",
    "DECAY_SHAPES",
]

Step = Union[int, torch.Tensor]
Value = Union[float, torch.Tensor]
Schedule = Callable[[Step], Value]

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


# --------------------------------------------------------------------------- helpers


def _prepare(count: Step) -> tuple[torch.Tensor, bool]:
    """The step as a float64 tensor, and whether the caller gave a tensor."""
    if isinstance(count, torch.Tensor):
        if count.dtype == torch.bool or count.is_complex():
            raise TypeError(f"step must be an int or a real tensor, got a {count.dtype} tensor")
        # float64 keeps int and tensor steps in agreement (MPS has no float64). clamp, not a
        # check: reading the value would sync, and join() feeds pieces not started yet a
        # negative step they must treat as 0.
        dtype = torch.float32 if count.device.type == "mps" else torch.float64
        return count.to(dtype).clamp(min=0.0), True
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise TypeError(f"step must be an int or a tensor, got {count!r}")
    if count < 0:
        raise ValueError(f"step must be >= 0, got {count}")
    return torch.tensor(float(count), dtype=torch.float64), False


def _finish(value: torch.Tensor, as_tensor: bool) -> Value:
    return value.to(torch.get_default_dtype()) if as_tensor else float(value)


def _number(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _steps(name: str, value: Any, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int number of steps, got {value!r}")
    value = int(value)
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} steps, got {value}")
    return value


def _sorted_boundaries(name: str, boundaries_and_scales: Optional[Mapping[int, float]]) -> tuple[list[int], list[float]]:
    if boundaries_and_scales is None:
        return [], []
    if not isinstance(boundaries_and_scales, Mapping):
        raise TypeError(f"{name} must be a dict {{step: scale}}, got {type(boundaries_and_scales).__name__}")
    items = sorted((_steps(f"{name} key", b), _number(f"{name}[{b}]", s, low=0.0)) for b, s in boundaries_and_scales.items())
    return [b for b, _ in items], [s for _, s in items]


def _check_ordered(name: str, boundaries: Sequence[int]) -> list[int]:
    out = [_steps(f"{name}[{i}]", b) for i, b in enumerate(boundaries)]
    for i in range(1, len(out)):
        if out[i] < out[i - 1]:
            raise ValueError(f"{name} must be in increasing order, got {list(boundaries)} ({out[i - 1]} before {out[i]})")
    return out


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}{hint}")
    return value


# --------------------------------------------------------------------------- optax-style schedules


def constant(value: float) -> Schedule:
    """The schedule that always returns ``value``.

    Args:
        value: the value.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> constant(0.1)(1000)
        0.1
    """
    value = _number("value", value)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        return _finish(torch.full_like(t, value), as_tensor)

    return schedule


def polynomial(init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value`` (optax's ``polynomial_schedule``).

    ``init`` before ``transition_begin``, then ``(init - end) * (1 - s / T) ** power + end``
    with ``s = step - transition_begin``, and ``end`` from ``transition_begin + T`` on.
    ``transition_steps=0`` holds ``init_value`` forever (as optax).

    Args:
        init_value: value at the start.
        end_value: value at the end of the transition.
        power: exponent (> 0) of the polynomial.
        transition_steps: length ``T`` of the transition.
        transition_begin: steps to hold ``init_value`` before the transition.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> polynomial(1.0, 0.0, power=2, transition_steps=10)(5)
        0.25
    """
    init_value, end_value = _number("init_value", init_value), _number("end_value", end_value)
    power = _number("power", power, low=0.0, low_open=True)
    transition_steps = _steps("transition_steps", transition_steps)
    transition_begin = _steps("transition_begin", transition_begin)
    if transition_steps == 0:
        return constant(init_value)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        frac = 1.0 - (t - transition_begin).clamp(0.0, transition_steps) / transition_steps
        return _finish((init_value - end_value) * frac**power + end_value, as_tensor)

    return schedule


def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear transition from ``init_value`` to ``end_value`` (optax's ``linear_schedule``).

    Args:
        init_value: value up to ``transition_begin``.
        end_value: value from ``transition_begin + transition_steps`` on.
        transition_steps: length of the ramp (0 holds ``init_value``).
        transition_begin: steps to hold ``init_value`` first.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> linear(0.0, 1.0, transition_steps=4)(1)
        0.25
    """
    return polynomial(init_value, end_value, 1.0, transition_steps, transition_begin)


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: Optional[float] = None,
) -> Schedule:
    """``init_value * decay_rate ** ((step - transition_begin) / transition_steps)`` (optax's).

    Args:
        init_value: value up to ``transition_begin``.
        transition_steps: steps per factor of ``decay_rate`` (0 holds ``init_value``).
        decay_rate: factor (> 0) per ``transition_steps``; above 1 it grows.
        transition_begin: steps to hold ``init_value`` first.
        staircase: decay in whole steps of ``transition_steps`` (integer division).
        end_value: a floor (``decay_rate < 1``) or a ceiling (``decay_rate > 1``).

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> exponential_decay(1.0, transition_steps=10, decay_rate=0.5, staircase=True)(25)
        0.25
    """
    init_value = _number("init_value", init_value)
    transition_steps = _steps("transition_steps", transition_steps)
    decay_rate = _number("decay_rate", decay_rate, low=0.0, low_open=True)
    transition_begin = _steps("transition_begin", transition_begin)
    if not isinstance(staircase, bool):
        raise TypeError(f"staircase must be a bool, got {staircase!r}")
    end_value = None if end_value is None else _number("end_value", end_value)
    if transition_steps == 0:
        return constant(init_value)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        p = (t - transition_begin).clamp(min=0.0) / transition_steps
        if staircase:
            p = torch.floor(p)
        value = init_value * torch.pow(decay_rate, p)
        if end_value is not None:
            value = value.clamp(min=end_value) if decay_rate < 1.0 else value.clamp(max=end_value)
        return _finish(value, as_tensor)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0, end_value: Optional[float] = None) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` (or ``end_value``) over ``decay_steps``.

    ``end + (init - end) * (0.5 * (1 + cos(pi * min(step, T) / T))) ** exponent``
    (optax's ``cosine_decay_schedule``); it stays at ``end`` after ``T``.

    Args:
        init_value: value at step 0.
        decay_steps: ``T`` (> 0).
        alpha: the final value as a fraction of ``init_value``.
        exponent: power applied to the cosine factor.
        end_value: the final value itself (instead of ``alpha``).

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> cosine_decay(1.0, decay_steps=10, end_value=0.1)(10)
        0.1
    """
    init_value = _number("init_value", init_value)
    decay_steps = _steps("decay_steps", decay_steps, positive=True)
    alpha = _number("alpha", alpha)
    exponent = _number("exponent", exponent, low=0.0, low_open=True)
    if end_value is not None and alpha != 0.0:
        raise ValueError(f"give cosine_decay either alpha or end_value, not both (alpha={alpha}, end_value={end_value})")
    end = alpha * init_value if end_value is None else _number("end_value", end_value)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * t.clamp(max=decay_steps) / decay_steps))
        return _finish(end + (init_value - end) * cosine**exponent, as_tensor)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, each restarted at its own step 0 (optax's ``join_schedules``).

    Args:
        schedules: ``n`` schedules.
        boundaries: ``n - 1`` steps, in increasing order, where the next schedule takes over.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = join([constant(1.0), linear(1.0, 0.0, 10)], [5])
        >>> s(4), s(10)
        (1.0, 0.5)
    """
    schedules = list(schedules)
    if not schedules or not all(callable(s) for s in schedules):
        raise TypeError(f"schedules must be a non-empty list of schedules (callables), got {schedules!r}")
    boundaries = _check_ordered("boundaries", boundaries)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"join needs len(boundaries) == len(schedules) - 1, got {len(boundaries)} boundaries for {len(schedules)} schedules")

    def schedule(count: Step) -> Value:
        if not isinstance(count, torch.Tensor):
            _prepare(count)  # validates
            i = bisect.bisect_right(boundaries, count)
            return float(schedules[i](count - (boundaries[i - 1] if i else 0)))
        out = schedules[0](count)
        for boundary, piece in zip(boundaries, schedules[1:]):
            out = torch.where(count < boundary, out, piece(count - boundary))
        if not isinstance(out, torch.Tensor):  # a single piece that ignores its step
            out = torch.full(count.shape, out, device=count.device)
        return out.to(torch.get_default_dtype())

    return schedule


def warmup_cosine_decay(init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value`` (optax's).

    Args:
        init_value: value at step 0.
        peak_value: value at the end of the warm-up.
        warmup_steps: length of the warm-up.
        decay_steps: total length, warm-up included (as optax); must exceed ``warmup_steps``.
        end_value: value from ``decay_steps`` on.
        exponent: power applied to the cosine factor.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = warmup_cosine_decay(0.0, 1.0, warmup_steps=10, decay_steps=30)
        >>> s(10), s(20), s(30)
        (1.0, 0.5, 0.0)
    """
    init_value, peak_value = _number("init_value", init_value), _number("peak_value", peak_value)  # named before the pieces check them
    warmup_steps = _steps("warmup_steps", warmup_steps)
    decay_steps = _steps("decay_steps", decay_steps, positive=True)
    if warmup_steps >= decay_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be smaller than decay_steps={decay_steps} "
            "(decay_steps is the total length, warm-up included)"
        )
    return join(
        [linear(init_value, peak_value, warmup_steps), cosine_decay(peak_value, decay_steps - warmup_steps, exponent=exponent, end_value=end_value)],
        [warmup_steps],
    )


def warmup_exponential_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: Optional[float] = None,
) -> Schedule:
    """Linear warm-up to ``peak_value``, then :func:`exponential_decay` from it (optax's).

    Args:
        init_value: value at step 0.
        peak_value: value at the end of the warm-up.
        warmup_steps: length of the warm-up.
        transition_steps, decay_rate, transition_begin, staircase, end_value: as in
            :func:`exponential_decay`, counted from the end of the warm-up.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> warmup_exponential_decay(0.0, 1.0, 10, transition_steps=10, decay_rate=0.5)(20)
        0.5
    """
    init_value, peak_value = _number("init_value", init_value), _number("peak_value", peak_value)  # named before the pieces check them
    warmup_steps = _steps("warmup_steps", warmup_steps)
    return join(
        [linear(init_value, peak_value, warmup_steps), exponential_decay(peak_value, transition_steps, decay_rate, transition_begin, staircase, end_value)],
        [warmup_steps],
    )


def warmup_constant(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then constant (optax's).

    Args:
        init_value: value at step 0.
        peak_value: value from ``warmup_steps`` on.
        warmup_steps: length of the warm-up.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> warmup_constant(0.0, 1.0, 4)(2), warmup_constant(0.0, 1.0, 4)(100)
        (0.5, 1.0)
    """
    init_value, peak_value = _number("init_value", init_value), _number("peak_value", peak_value)  # named before the pieces check them
    return linear(init_value, peak_value, warmup_steps)


def piecewise_constant(init_value: float, boundaries_and_scales: Optional[Mapping[int, float]] = None) -> Schedule:
    """``init_value`` times the product of the scales of every boundary ``<= step`` (optax's).

    Args:
        init_value: value before the first boundary.
        boundaries_and_scales: ``{step: scale}``, scales >= 0.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = piecewise_constant(1.0, {10: 0.5, 20: 0.5})
        >>> s(9), s(10), s(25)
        (1.0, 0.5, 0.25)
    """
    init_value = _number("init_value", init_value)
    boundaries, scales = _sorted_boundaries("boundaries_and_scales", boundaries_and_scales)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        value = torch.full_like(t, init_value)
        for boundary, s in zip(boundaries, scales):
            value = torch.where(t >= boundary, value * s, value)
        return _finish(value, as_tensor)

    return schedule


def _interpolating(kind: str, init_value: float, boundaries: list[int], scales: list[float]) -> Schedule:
    """Interpolate (linear or cosine) between the running products of ``scales``, knots at ``[0] + boundaries``."""
    knots = [0, *boundaries]
    values = [init_value]
    for s in scales:
        values.append(values[-1] * s)

    def interpolate(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if kind == "linear":
            return (end - start) * pct + start
        return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1.0)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        value = torch.full_like(t, values[-1])
        for i in reversed(range(len(knots) - 1)):
            lo, hi = knots[i], knots[i + 1]
            pct = (t - lo) / max(hi - lo, 1)
            value = torch.where((t >= lo) & (t < hi), interpolate(values[i], values[i + 1], pct), value)
        return _finish(value, as_tensor)

    return schedule


def piecewise_interpolate(interpolate_type: str, init_value: float, boundaries_and_scales: Optional[Mapping[int, float]] = None) -> Schedule:
    """Interpolate between knots whose values are running products of scales (optax's).

    The knots are step 0 (``init_value``) and each boundary ``b_i`` (the previous
    knot's value times ``scale_i``); after the last boundary the value holds.

    Args:
        interpolate_type: ``"linear"`` or ``"cosine"``.
        init_value: value at step 0.
        boundaries_and_scales: ``{step: scale}``, scales >= 0.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = piecewise_interpolate("linear", 1.0, {4: 0.1, 8: 0.01})
        >>> s(2), s(4), s(100)
        (0.55, 0.1, 0.001)
    """
    _choice("interpolate_type", interpolate_type, ("linear", "cosine"))
    init_value = _number("init_value", init_value)
    boundaries, scales = _sorted_boundaries("boundaries_and_scales", boundaries_and_scales)
    return _interpolating(interpolate_type, init_value, boundaries, scales)


def sgdr(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    """SGD with warm restarts: :func:`warmup_cosine_decay` cycles run one after another (optax's ``sgdr_schedule``).

    Args:
        cosine_kwargs: one dict of :func:`warmup_cosine_decay` arguments per cycle; each
            cycle lasts its ``decay_steps``.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=10)
        >>> s = sgdr([cycle] * 3)
        >>> s(2), s(12), s(22)
        (1.0, 1.0, 1.0)
    """
    cycles = [dict(kwargs) for kwargs in cosine_kwargs]
    if not cycles:
        raise ValueError("sgdr: cosine_kwargs must hold at least one cycle (a dict of warmup_cosine_decay arguments)")
    pieces, boundaries, start = [], [], 0
    for i, kwargs in enumerate(cycles):
        try:
            pieces.append(warmup_cosine_decay(**kwargs))
        except TypeError as e:
            raise TypeError(f"sgdr: cosine_kwargs[{i}]: {e}") from None
        start += int(kwargs["decay_steps"])
        boundaries.append(start)
    return join(pieces, boundaries[:-1])


def linear_onecycle(transition_steps: int, peak_value: float, pct_start: float = 0.3, pct_final: float = 0.85, div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    """Three linear phases: up to ``peak_value``, back down, then to the floor (optax's ``linear_onecycle_schedule``).

    Knots: 0 (``peak / div_factor``), ``int(pct_start * T)`` (``peak``),
    ``int(pct_final * T)`` (``peak / div_factor``), ``T`` (``peak / div_factor / final_div_factor``).

    Args:
        transition_steps: ``T`` (> 0).
        peak_value: the maximum.
        pct_start: fraction of ``T`` spent rising.
        pct_final: fraction of ``T`` at the end of the fall back to the start value.
        div_factor: start value = ``peak_value / div_factor``.
        final_div_factor: final value = start value / ``final_div_factor``.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = linear_onecycle(100, 1.0)
        >>> s(0), s(30)
        (0.04, 1.0)
    """
    transition_steps = _steps("transition_steps", transition_steps, positive=True)
    peak_value = _number("peak_value", peak_value)
    pct_start = _number("pct_start", pct_start, low=0.0, high=1.0)
    pct_final = _number("pct_final", pct_final, low=0.0, high=1.0)
    if not pct_start < pct_final:
        raise ValueError(f"pct_start={pct_start} must be smaller than pct_final={pct_final}")
    div_factor = _number("div_factor", div_factor, low=0.0, low_open=True)
    final_div_factor = _number("final_div_factor", final_div_factor, low=0.0, low_open=True)
    return _interpolating(
        "linear",
        peak_value / div_factor,
        [int(pct_start * transition_steps), int(pct_final * transition_steps), transition_steps],
        [div_factor, 1.0 / div_factor, 1.0 / final_div_factor],
    )


def cosine_onecycle(transition_steps: int, peak_value: float, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    """Cosine up to ``peak_value`` then cosine down to the floor (optax's ``cosine_onecycle_schedule``).

    Knots: 0 (``peak / div_factor``), ``int(pct_start * T)`` (``peak``), ``T``
    (``peak / div_factor / final_div_factor``).

    Args:
        transition_steps: ``T`` (> 0).
        peak_value: the maximum.
        pct_start: fraction of ``T`` spent rising.
        div_factor: start value = ``peak_value / div_factor``.
        final_div_factor: final value = start value / ``final_div_factor``.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = cosine_onecycle(100, 1.0)
        >>> s(30), s(100)
        (1.0, 4e-06)
    """
    transition_steps = _steps("transition_steps", transition_steps, positive=True)
    peak_value = _number("peak_value", peak_value)
    pct_start = _number("pct_start", pct_start, low=0.0, high=1.0, high_open=True)
    div_factor = _number("div_factor", div_factor, low=0.0, low_open=True)
    final_div_factor = _number("final_div_factor", final_div_factor, low=0.0, low_open=True)
    return _interpolating(
        "cosine",
        peak_value / div_factor,
        [int(pct_start * transition_steps), transition_steps],
        [div_factor, 1.0 / (div_factor * final_div_factor)],
    )


def warmup_stable_decay(
    peak_value: float,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_shape: str = "linear",
) -> Schedule:
    """The trapezoid of LLM pre-training (WSD): warm up, hold ``peak_value``, then cool down.

    Linear from ``init_value`` to ``peak_value`` over ``warmup_steps``; ``peak_value``
    until ``total_steps - decay_steps``; then from ``peak_value`` to ``end_value`` over
    ``decay_steps`` with the chosen shape of ``p`` (the fraction of the decay done):
    ``linear`` ``1 - p``, ``cosine`` ``(1 + cos(pi p)) / 2``, ``1-sqrt`` ``1 - sqrt(p)``
    (Hägele et al. 2024); ``end_value`` after ``total_steps``.

    Args:
        peak_value: the plateau.
        total_steps: total length.
        warmup_steps: length of the warm-up.
        decay_steps: length of the cool-down (``warmup_steps + decay_steps <= total_steps``).
        init_value: value at step 0.
        end_value: value at and after ``total_steps``.
        decay_shape: one of :data:`DECAY_SHAPES`.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = warmup_stable_decay(1.0, total_steps=100, warmup_steps=10, decay_steps=20)
        >>> s(5), s(50), s(90), s(100)
        (0.5, 1.0, 0.5, 0.0)
    """
    peak_value, init_value, end_value = _number("peak_value", peak_value), _number("init_value", init_value), _number("end_value", end_value)
    total_steps = _steps("total_steps", total_steps, positive=True)
    warmup_steps = _steps("warmup_steps", warmup_steps)
    decay_steps = _steps("decay_steps", decay_steps)
    _choice("decay_shape", decay_shape, DECAY_SHAPES)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps = {warmup_steps} + {decay_steps} must be <= total_steps={total_steps}"
        )
    decay_start = total_steps - decay_steps

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        warm = init_value + (peak_value - init_value) * (t / max(warmup_steps, 1)).clamp(max=1.0)
        p = ((t - decay_start) / max(decay_steps, 1)).clamp(0.0, 1.0)
        if decay_shape == "linear":
            factor = 1.0 - p
        elif decay_shape == "cosine":
            factor = 0.5 * (1.0 + torch.cos(math.pi * p))
        else:
            factor = 1.0 - torch.sqrt(p)
        decay = end_value + (peak_value - end_value) * factor
        value = torch.where(t < warmup_steps, warm, torch.where(t < decay_start, torch.full_like(t, peak_value), decay))
        return _finish(value, as_tensor)

    return schedule


def inverse_sqrt(peak_value: float, warmup_steps: int, init_value: float = 0.0, timescale: Optional[int] = None) -> Schedule:
    """Linear warm-up, then decay as the inverse square root of the step (Transformer / fairseq).

    ``peak * sqrt(timescale / (step - warmup_steps + timescale))`` after the warm-up;
    the default ``timescale = warmup_steps`` gives fairseq's ``peak * sqrt(warmup / step)``.

    Args:
        peak_value: value at the end of the warm-up.
        warmup_steps: length of the warm-up.
        init_value: value at step 0.
        timescale: steps after which the value has fallen by ``sqrt(2)``-ish; > 0.

    Returns:
        ``schedule(step) -> value``.

    Example:
        >>> s = inverse_sqrt(1.0, warmup_steps=100)
        >>> s(50), s(100), s(400)
        (0.5, 1.0, 0.5)
    """
    peak_value, init_value = _number("peak_value", peak_value), _number("init_value", init_value)
    warmup_steps = _steps("warmup_steps", warmup_steps)
    timescale = max(warmup_steps, 1) if timescale is None else _steps("timescale", timescale, positive=True)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        warm = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
        decay = peak_value * torch.sqrt(timescale / (t - warmup_steps + timescale).clamp(min=timescale))
        return _finish(torch.where(t < warmup_steps, warm, decay), as_tensor)

    return schedule


# --------------------------------------------------------------------------- torch.optim.lr_scheduler equivalents
# Each reproduces torch's sequence when the torch scheduler is stepped once per optimizer
# step, computing torch's closed forms in torch's order of operations (float64).


def _cosine_annealing(learning_rate: float, T_max: int, eta_min: float = 0.0) -> Schedule:  # noqa: N803
    """``CosineAnnealingLR``: ``eta_min + (lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``, periodic past ``T_max``.

    torch updates it recursively; the closed form agrees with that recursion to ~1e-13
    relative over thousands of steps (tested), including the periodic part past T_max.
    """
    lr, eta_min = _number("learning_rate", learning_rate), _number("eta_min", eta_min)
    t_max = _steps("T_max", T_max, positive=True)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        return _finish(eta_min + (lr - eta_min) * (1.0 + torch.cos(math.pi * t / t_max)) / 2.0, as_tensor)

    return schedule


def _step_lr(learning_rate: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``StepLR``: ``lr * gamma ** (t // step_size)``."""
    lr, gamma = _number("learning_rate", learning_rate), _number("gamma", gamma, low=0.0)
    step_size = _steps("step_size", step_size, positive=True)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        return _finish(lr * torch.pow(gamma, torch.floor(t / step_size)), as_tensor)

    return schedule


def _multistep_lr(learning_rate: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``MultiStepLR``: ``lr * gamma ** (number of milestones <= t)`` (a repeated milestone counts twice, as in torch)."""
    lr, gamma = _number("learning_rate", learning_rate), _number("gamma", gamma, low=0.0)
    milestones = _check_ordered("milestones", milestones)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        n = torch.zeros_like(t)
        for m in milestones:
            n = n + (t >= m).to(t.dtype)
        return _finish(lr * torch.pow(gamma, n), as_tensor)

    return schedule


def _exponential_lr(learning_rate: float, gamma: float) -> Schedule:
    """``ExponentialLR``: ``lr * gamma ** t``."""
    lr, gamma = _number("learning_rate", learning_rate), _number("gamma", gamma, low=0.0)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        return _finish(lr * torch.pow(gamma, t), as_tensor)

    return schedule


def _linear_lr(learning_rate: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5) -> Schedule:
    """``LinearLR``: ``lr * (start + (end - start) * min(t, total_iters) / total_iters)``."""
    lr = _number("learning_rate", learning_rate)
    start_factor = _number("start_factor", start_factor, low=0.0, high=1.0, low_open=True)
    end_factor = _number("end_factor", end_factor, low=0.0, high=1.0)
    total_iters = _steps("total_iters", total_iters, positive=True)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        factor = start_factor + (end_factor - start_factor) * t.clamp(max=total_iters) / total_iters
        return _finish(lr * factor, as_tensor)

    return schedule


def _constant_lr(learning_rate: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
    """``ConstantLR``: ``lr * factor`` for ``t < total_iters``, then ``lr``."""
    lr = _number("learning_rate", learning_rate)
    factor = _number("factor", factor, low=0.0, high=1.0)
    total_iters = _steps("total_iters", total_iters)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        return _finish(torch.where(t < total_iters, lr * factor, torch.full_like(t, lr)), as_tensor)

    return schedule


def _polynomial_lr(learning_rate: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    """``PolynomialLR``: ``lr * (1 - min(t, total_iters) / total_iters) ** power``."""
    lr = _number("learning_rate", learning_rate)
    total_iters = _steps("total_iters", total_iters, positive=True)
    power = _number("power", power, low=0.0, low_open=True)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        return _finish(lr * (1.0 - t.clamp(max=total_iters) / total_iters) ** power, as_tensor)

    return schedule


def _onecycle_lr(
    learning_rate: Optional[float] = None,
    max_lr: Optional[float] = None,
    total_steps: Optional[int] = None,
    epochs: Optional[int] = None,
    steps_per_epoch: Optional[int] = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """``OneCycleLR`` (its lr; ``max_lr`` defaults to ``learning_rate``). Holds its last value after ``total_steps - 1``
    (where torch raises)."""
    if max_lr is None:
        if learning_rate is None:
            raise ValueError("onecycle needs max_lr (or learning_rate, used as max_lr)")
        max_lr = learning_rate
    max_lr = _number("max_lr", max_lr, low=0.0)
    if total_steps is None:
        if epochs is None or steps_per_epoch is None:
            raise ValueError("onecycle needs total_steps, or epochs and steps_per_epoch")
        total_steps = _steps("epochs", epochs, positive=True) * _steps("steps_per_epoch", steps_per_epoch, positive=True)
    total = _steps("total_steps", total_steps, positive=True)
    pct_start = _number("pct_start", pct_start, low=0.0, high=1.0)
    _choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    div_factor = _number("div_factor", div_factor, low=0.0, low_open=True)
    final_div_factor = _number("final_div_factor", final_div_factor, low=0.0, low_open=True)
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    if three_phase:
        phases = [
            (float(pct_start * total) - 1, initial_lr, max_lr),
            (float(2 * pct_start * total) - 2, max_lr, initial_lr),
            (total - 1, initial_lr, min_lr),
        ]
    else:
        phases = [(float(pct_start * total) - 1, initial_lr, max_lr), (total - 1, max_lr, min_lr)]
    starts = [0.0] + [p[0] for p in phases[:-1]]
    for i, ((end, _, _), start) in enumerate(zip(phases, starts)):
        if not end > start:
            raise ValueError(
                f"onecycle: phase {i + 1} would be empty (steps {start} to {end}) with total_steps={total}, "
                f"pct_start={pct_start}, three_phase={three_phase}; use more steps or another pct_start"
            )

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        t = t.clamp(max=total - 1)
        value = None
        # torch takes the first phase whose end_step >= t; applying torch.where from the
        # last phase back to the first gives the same choice without Python branching.
        for (end, lo, hi), start in reversed(list(zip(phases, starts))):
            v = anneal(lo, hi, (t - start) / (end - start))
            value = v if value is None else torch.where(t <= end, v, value)
        return _finish(value, as_tensor)

    return schedule


def _cosine_warm_restarts(learning_rate: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> Schedule:  # noqa: N803
    """``CosineAnnealingWarmRestarts``: cosine from ``lr`` to ``eta_min`` over cycles ``T_0, T_0*T_mult, ...``."""
    lr, eta_min = _number("learning_rate", learning_rate), _number("eta_min", eta_min)
    t_0 = _steps("T_0", T_0, positive=True)
    mult = _steps("T_mult", T_mult, positive=True)

    def schedule(count: Step) -> Value:
        t, as_tensor = _prepare(count)
        if mult == 1:
            t_cur, t_i = torch.remainder(t, t_0), torch.full_like(t, t_0)
        else:
            # cycle n starts at T_0 (T_mult^n - 1) / (T_mult - 1); the log gives n up to
            # rounding at exact boundaries, which the two corrections fix (integers are exact in float64).
            def start_of(n: torch.Tensor) -> torch.Tensor:
                return t_0 * (torch.pow(mult, n) - 1) / (mult - 1)

            n = torch.floor(torch.log(t / t_0 * (mult - 1) + 1) / math.log(mult))
            n = torch.where(t < start_of(n), n - 1, n)
            n = torch.where(t >= start_of(n + 1), n + 1, n)
            t_cur, t_i = t - start_of(n), t_0 * torch.pow(mult, n)
        return _finish(eta_min + (lr - eta_min) * (1 + torch.cos(math.pi * t_cur / t_i)) / 2, as_tensor)

    return schedule


# --------------------------------------------------------------------------- create_scheduler

_OPTAX_STYLE: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "linear": linear,
    "polynomial": polynomial,
    "exponential_decay": exponential_decay,
    "cosine_decay": cosine_decay,
    "warmup_cosine_decay": warmup_cosine_decay,
    "warmup_exponential_decay": warmup_exponential_decay,
    "warmup_constant": warmup_constant,
    "piecewise_constant": piecewise_constant,
    "piecewise_interpolate": piecewise_interpolate,
    "join": join,
    "sgdr": sgdr,
    "linear_onecycle": linear_onecycle,
    "cosine_onecycle": cosine_onecycle,
    "warmup_stable_decay": warmup_stable_decay,
    "inverse_sqrt": inverse_sqrt,
}

_TORCH_STYLE: dict[str, Callable[..., Schedule]] = {
    "cosine_annealing": _cosine_annealing,
    "step": _step_lr,
    "multistep": _multistep_lr,
    "exponential": _exponential_lr,
    "linear": _linear_lr,
    "onecycle": _onecycle_lr,
    "cosine_warm_restarts": _cosine_warm_restarts,
    "constant": _constant_lr,
    "polynomial": _polynomial_lr,
}

# Other spellings: optax's full function names, torch's class names, common short names.
_ALIASES: dict[str, tuple[str, str]] = {
    **{f"{n}_schedule": ("optax", n) for n in ("constant", "linear", "polynomial", "cosine_decay", "warmup_cosine_decay",
                                               "warmup_exponential_decay", "warmup_constant", "piecewise_constant",
                                               "piecewise_interpolate", "linear_onecycle", "cosine_onecycle")},
    "join_schedules": ("optax", "join"),
    "sgdr_schedule": ("optax", "sgdr"),
    "wsd": ("optax", "warmup_stable_decay"),
    "cosineannealinglr": ("torch", "cosine_annealing"),
    "steplr": ("torch", "step"),
    "multisteplr": ("torch", "multistep"),
    "multi_step": ("torch", "multistep"),
    "exponentiallr": ("torch", "exponential"),
    "linearlr": ("torch", "linear"),
    "constantlr": ("torch", "constant"),
    "polynomiallr": ("torch", "polynomial"),
    "onecyclelr": ("torch", "onecycle"),
    "one_cycle": ("torch", "onecycle"),
    "cosineannealingwarmrestarts": ("torch", "cosine_warm_restarts"),
}


def scheduler_names() -> list[str]:
    """Every name :func:`create_scheduler` accepts (canonical names first, then aliases)."""
    canonical = sorted(set(_OPTAX_STYLE) | set(_TORCH_STYLE))
    return canonical + sorted(set(_ALIASES) - set(canonical))


def _bind(fn: Callable[..., Schedule], label: str, hparams: dict[str, Any]) -> Schedule:
    params = inspect.signature(fn).parameters
    unknown = [k for k in hparams if k not in params]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(params), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        extra = ""
        if "learning_rate" in unknown:
            extra = "; optax-style schedules take the base value as init_value / peak_value"
        raise TypeError(f"create_scheduler({label!r}): unexpected argument {', '.join(hints)}; it takes {list(params)}{extra}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in hparams]
    if missing:
        raise TypeError(f"create_scheduler({label!r}): missing required argument {missing}; it takes {list(params)}")
    return fn(**hparams)


def check_schedule(schedule: Schedule, run_steps: int, name: str = "learning_rate", *, allow_negative: bool = False) -> None:
    """Raise ``ValueError`` naming the first step of a run where ``schedule`` is not finite (or is negative).

    A schedule's values depend on the step, so construction cannot check them; this evaluates
    it at every step ``0 .. run_steps - 1`` (the counts a run of ``run_steps`` updates uses),
    in one vectorized call when the schedule takes a tensor of steps, else step by step.
    Meant for setup (create_optimizer, create_scheduler, the CLI), never inside a step.

    Args:
        schedule: ``step -> value``.
        run_steps: the number of updates in the run (>= 1).
        name: the hyperparameter it sets, for the message.
        allow_negative: accept negative values (say, a schedule for a signed coefficient).

    Example:
        >>> check_schedule(linear(1e-3, -1e-3, transition_steps=100), 100)
        Traceback (most recent call last):
        ...
        ValueError: learning_rate schedule is negative at step 51 (-2e-05) of the 100-step run; its values must be >= 0 at every step (check the schedule's end value and length)
    """
    if not callable(schedule):
        raise TypeError(f"check_schedule: schedule must be callable (step -> value), got {type(schedule).__name__}")
    if isinstance(run_steps, bool) or not isinstance(run_steps, int) or run_steps < 1:
        raise ValueError(f"check_schedule: run_steps must be an int >= 1, got {run_steps!r}")
    values: Optional[torch.Tensor] = None
    try:
        out = schedule(torch.arange(run_steps))
        if isinstance(out, torch.Tensor) and out.shape == (run_steps,):
            values = out.detach().to("cpu", torch.float64)
    except Exception:  # noqa: BLE001 - a schedule written for int steps only: evaluate step by step
        values = None
    if values is None:
        values = torch.tensor([float(schedule(step)) for step in range(run_steps)], dtype=torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        step = int((~finite).nonzero()[0])
        raise ValueError(
            f"{name} schedule is not finite at step {step} ({float(values[step])}) of the {run_steps}-step run; "
            "its values must be finite numbers at every step"
        )
    if not allow_negative and bool((values < 0).any()):
        step = int((values < 0).nonzero()[0])
        raise ValueError(
            f"{name} schedule is negative at step {step} ({float(values[step]):.6g}) of the {run_steps}-step run; "
            "its values must be >= 0 at every step (check the schedule's end value and length)"
        )


def create_scheduler(name: str, *, run_steps: Optional[int] = None, **hparams: Any) -> Schedule:
    """Build a schedule by name, as a config file names it.

    Optax-style names take optax's argument names: ``constant`` (value), ``linear``,
    ``polynomial``, ``exponential_decay``, ``cosine_decay``, ``warmup_cosine_decay``,
    ``warmup_exponential_decay``, ``warmup_constant``, ``piecewise_constant``,
    ``piecewise_interpolate``, ``join``, ``sgdr``, ``linear_onecycle``,
    ``cosine_onecycle``, ``warmup_stable_decay`` (``wsd``), ``inverse_sqrt``; optax's
    ``*_schedule`` spellings work too.

    Torch-style names take ``torch.optim.lr_scheduler``'s argument names and the base
    learning rate as ``learning_rate``, and reproduce torch's sequence:
    ``cosine_annealing`` (T_max, eta_min), ``step`` (step_size, gamma), ``multistep``
    (milestones, gamma), ``exponential`` (gamma), ``linear`` (start_factor, end_factor,
    total_iters), ``constant`` (factor, total_iters), ``polynomial`` (total_iters, power),
    ``onecycle`` (max_lr, total_steps, pct_start, anneal_strategy, div_factor,
    final_div_factor, three_phase), ``cosine_warm_restarts`` (T_0, T_mult, eta_min); the
    class names (``CosineAnnealingLR``, ``StepLR``, ...) work too. ``linear``,
    ``constant`` and ``polynomial`` exist in both families: given ``learning_rate``
    they are torch's, otherwise optax's.

    Args:
        name: a name from :func:`scheduler_names` (case-insensitive).
        run_steps: the length of the run, when known: the schedule is then evaluated at every
            step of it and rejected if a value is not finite or negative
            (:func:`check_schedule`; the message names the first bad step).
        **hparams: the schedule's arguments.

    Returns:
        ``schedule(step) -> value``.

    Raises:
        ValueError: unknown name (the message lists the names and the closest one) or a
            bad hyperparameter (the message names it).
        TypeError: an argument the schedule does not take, or a missing one.

    Example:
        >>> lr = create_scheduler("cosine_annealing", learning_rate=0.1, T_max=100)
        >>> lr(0), lr(100)
        (0.1, 0.0)
        >>> create_scheduler("warmup_cosine_decay", init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=100)(10)
        1.0
    """
    if not isinstance(name, str):
        raise TypeError(f"create_scheduler: name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in _ALIASES:
        family, key = _ALIASES[key]
    elif key in _OPTAX_STYLE or key in _TORCH_STYLE:
        in_both = key in _OPTAX_STYLE and key in _TORCH_STYLE
        family = "torch" if key not in _OPTAX_STYLE or (in_both and "learning_rate" in hparams) else "optax"
    else:
        names = scheduler_names()
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"create_scheduler: unknown schedule name {name!r}{hint} Known names: {', '.join(names)}")
    fn = _TORCH_STYLE[key] if family == "torch" else _OPTAX_STYLE[key]
    schedule = _bind(fn, name, hparams)
    if run_steps is not None:
        check_schedule(schedule, run_steps, f"create_scheduler({name!r}):")
    return schedule
