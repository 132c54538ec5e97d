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

The math modules know nothing of gin: the functions registered here are the plain
functions of :mod:`craftfn.optim` and :mod:`craftfn.schedules`.
"""

from __future__ import annotations

from typing import Any, Callable

import gin

from craftfn import optim, schedules

__all__ = ["register", "create_optimizer", "create_scheduler", "SCHEDULE_NAMES"]

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


_CONFIGURABLES = register()
create_optimizer = _CONFIGURABLES["create_optimizer"]
create_scheduler = _CONFIGURABLES["create_scheduler"]
