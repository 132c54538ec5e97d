"""optax's schedule names (``optax.schedules`` and the ``*_schedule`` functions) for craftfn.

Each name is an alias of the schedule in :mod:`craftfn.schedules` (one implementation):
``warmup_cosine_decay_schedule`` is ``craftfn.schedules.warmup_cosine_decay``, and so on.

Example:
    >>> from craftfn.optim import schedules
    >>> lr = schedules.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110)
    >>> lr(10)
    1.0
"""

from craftfn import schedules as _s
from craftfn.optim.base import Schedule
from craftfn.optim.wrappers import InjectHyperparamsState, inject_hyperparams

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_onecycle_schedule",
    "linear_schedule",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "polynomial_schedule",
    "sgdr_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
    "inject_hyperparams",
    "InjectHyperparamsState",
]

constant_schedule = _s.constant
cosine_decay_schedule = _s.cosine_decay
cosine_onecycle_schedule = _s.cosine_onecycle
exponential_decay = _s.exponential_decay
join_schedules = _s.join
linear_onecycle_schedule = _s.linear_onecycle
linear_schedule = _s.linear
piecewise_constant_schedule = _s.piecewise_constant
piecewise_interpolate_schedule = _s.piecewise_interpolate
polynomial_schedule = _s.polynomial
sgdr_schedule = _s.sgdr
warmup_constant_schedule = _s.warmup_constant
warmup_cosine_decay_schedule = _s.warmup_cosine_decay
warmup_exponential_decay_schedule = _s.warmup_exponential_decay
