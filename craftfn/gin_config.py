"""gin at the edge: the gin names of the optimizers and schedules.

Importing this module (the CLI does; nothing below the CLI imports gin) registers, with
``gin.external_configurable``:

* ``craftfn.optim.create_optimizer`` and every optimizer alias (``adamw``, ``sgd``,
  ``lion``, ``muon``, ...; see :func:`craftfn.optim.optimizer_names`);
* ``craftfn.schedules.create_scheduler`` and every schedule (``warmup_cosine_decay``,
  ``warmup_stable_decay``, ``constant``, ...).

A gin file refers to them by their short name when it is unique (``@create_optimizer()``,
``@warmup_cosine_decay()``) or with the module (``@optim.adamw()``,
``@schedules.warmup_cosine_decay()``). The snippets in ``gin/optim/`` bind
``create_optimizer`` (its ``learning_rate`` is the macro ``LEARNING_RATE``) and define
``OPTIMIZER``; those in ``gin/schedules/`` define ``LEARNING_RATE``. An experiment
includes one of each and uses ``%OPTIMIZER``::

    include 'optim/adamw.gin'
    include 'schedules/warmup_cosine.gin'
    MAX_STEPS = 2000
    train.optimizer = %OPTIMIZER

``run_fraction`` sizes a phase of the schedule from the run length (``warmup/run_fraction()``).

The math modules know nothing of gin: the functions registered here are the plain
functions of :mod:`craftfn.optim` and :mod:`craftfn.schedules`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import gin

from craftfn import optim, schedules

__all__ = ["register", "create_optimizer", "create_scheduler", "run_fraction", "SCHEDULE_NAMES"]

# The public schedule functions (create_scheduler covers the torch-style names).
SCHEDULE_NAMES = tuple(
    n for n in schedules.__all__ if n not in ("Schedule", "create_scheduler", "scheduler_names", "check_schedule", "DECAY_SHAPES")
)


def _register(fn: Callable[..., Any], module: str, name: str | None = None) -> Any:
    """Register ``fn`` once; importing twice, or another edge module registering it first, is fine."""
    full = f"{module}.{name or fn.__name__}"
    try:
        return gin.external_configurable(fn, name=name, module=module)
    except ValueError:  # already registered under this name
        return gin.get_configurable(full)


_REGISTERED: dict[str, Any] = {}


def register() -> dict[str, Any]:
    """Register the optimizers and schedules with gin (idempotent) and return the gin-wrapped callables by name.

    Returns:
        ``{"create_optimizer": ..., "create_scheduler": ..., "adamw": ..., "warmup_cosine_decay": ..., ...}``:
        calling one applies the bindings of the parsed gin config.

    Example:
        >>> import gin
        >>> wrapped = register()
        >>> _ = gin.parse_config("schedules.constant.value = 0.5")
        >>> wrapped["constant"]()(10)
        0.5
    """
    wanted: list[tuple[str, Callable[..., Any], str]] = [("create_optimizer", optim.create_optimizer, "craftfn.optim")]
    wanted += [(n, getattr(optim, n), "craftfn.optim") for n in optim.optimizer_names()]
    wanted += [("create_scheduler", schedules.create_scheduler, "craftfn.schedules")]
    wanted += [(n, getattr(schedules, n), "craftfn.schedules") for n in SCHEDULE_NAMES]
    for name, fn, module in wanted:
        if name not in _REGISTERED:
            _REGISTERED[name] = _register(fn, module, name)
    return dict(_REGISTERED)


def run_fraction(total_steps: int, fraction: float, at_most: Optional[int] = None) -> int:
    """``int(fraction * total_steps)``, at most ``at_most``: a phase length (warm-up, cool-down)
    that follows the run's length, so a short run (``--gin.MAX_STEPS=20``) still fits its schedule.

    Registered with gin as ``run_fraction``; the shipped configs use it scoped, e.g.::

        WARMUP_STEPS = @warmup/run_fraction()
        warmup/run_fraction.total_steps = %MAX_STEPS
        warmup/run_fraction.fraction = 0.05
        warmup/run_fraction.at_most = 100

    Example:
        >>> run_fraction(2000, 0.05, at_most=100), run_fraction(50, 0.05, at_most=100), run_fraction(1, 0.05)
        (100, 2, 0)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise ValueError(f"run_fraction: total_steps must be an int >= 0, got {total_steps!r}")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"run_fraction: fraction must be a number in [0, 1], got {fraction!r}")
    if at_most is not None and (isinstance(at_most, bool) or not isinstance(at_most, int) or at_most < 0):
        raise ValueError(f"run_fraction: at_most must be None or an int >= 0, got {at_most!r}")
    steps = int(fraction * total_steps)
    return steps if at_most is None else min(steps, at_most)


_CONFIGURABLES = register()
_register(run_fraction, "craftfn")
create_optimizer = _CONFIGURABLES["create_optimizer"]
create_scheduler = _CONFIGURABLES["create_scheduler"]
