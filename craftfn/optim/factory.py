"""``create_optimizer``: an optimizer by name, as a config file names it.

The seed's ``create_optimizer("AdamW", lr=..., weight_decay=...)`` for craftfn: one call
builds the whole transformation an experiment needs::

    MultiSteps(                                   # accum_steps > 1: accumulate across calls
        chain(
            clip_by_global_norm(clip_norm),       # clip_norm given: clip the (accumulated) gradient
            inject_hyperparams(rule)(learning_rate=lr),   # the named rule, lr in the state
        ),
        every_k_schedule=accum_steps,
    )

where ``rule`` is the alias (``adamw``, ``lion``, ``muon``, ...) with its decoupled weight
decay masked to leave out the parameters whose names match ``no_decay``. The learning
rate (a float or a schedule) lives in the optimizer state, so a trainer logs it with
``optim.tree_get(opt_state, "learning_rate")`` (what ``craftfn.training.learning_rate_of``
reads): after ``k`` updates it holds the rate the ``k``-th update used.

Example:
    >>> import torch
    >>> from craftfn import optim, schedules
    >>> lr = schedules.warmup_cosine_decay(0.0, 1e-3, warmup_steps=10, decay_steps=100)
    >>> tx = optim.create_optimizer("sgd", learning_rate=lr, momentum=0.9, clip_norm=1.0)
    >>> state = tx.init({"w": torch.zeros(2)})
    >>> optim.tree_get(state, "learning_rate")
    tensor(0.)
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import numbers
from typing import Any, Callable, Sequence, Union

import torch

from craftfn.optim.base import GradientTransformation, ScalarOrSchedule, chain, check_hyperparameter
from craftfn.optim.clipping import clip_by_global_norm
from craftfn.optim.combine import partition
from craftfn.optim.transforms import add_decayed_weights
from craftfn.optim.wrappers import MultiSteps, inject_hyperparams

__all__ = ["create_optimizer", "optimizer_names", "no_decay_mask"]

NoDecay = Union[str, Sequence[str], Callable[[str, torch.Tensor], bool]]


# Modules whose public functions taking a ``learning_rate`` are optimizer aliases.
_ALIAS_MODULES = (
    "craftfn.optim.aliases",
    "craftfn.optim.orthogonal",
    "craftfn.optim.schedulefree",
)
# Deprecated in optax, and its learning rate enters the optimistic gradient, so it takes no schedule.
_NOT_BY_NAME = frozenset({"optimistic_adam"})


def _aliases() -> dict[str, Callable[..., GradientTransformation]]:
    """The optimizer aliases: public functions of the alias modules that take a ``learning_rate``."""
    out = {}
    for modname in _ALIAS_MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        for name in getattr(module, "__all__", ()):
            fn = getattr(module, name, None)
            if callable(fn) and not isinstance(fn, type) and not name.startswith("scale_by"):
                try:
                    params = inspect.signature(fn).parameters
                except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
                    continue
                # An alias needs nothing but hyperparameters (not, e.g., a base optimizer to wrap).
                required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                if "learning_rate" in params and set(required) <= {"learning_rate"} and name not in _NOT_BY_NAME:
                    out[name] = fn
    return out


def optimizer_names() -> list[str]:
    """The names :func:`create_optimizer` accepts (the aliases of :mod:`craftfn.optim`).

    Example:
        >>> "sgd" in optimizer_names()
        True
    """
    return sorted(_aliases())


def _lookup(name: Any) -> tuple[str, Callable[..., GradientTransformation]]:
    if not isinstance(name, str):
        raise TypeError(f"create_optimizer: name must be a string such as 'adamw', got {name!r}")
    table = _aliases()
    key = name.strip().lower().replace("-", "_")
    if key not in table:
        names = sorted(table)
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"create_optimizer: unknown optimizer name {name!r}{hint} Known names: {', '.join(names)}")
    return key, table[key]


def no_decay_mask(no_decay: NoDecay) -> Callable[[str, torch.Tensor], bool]:
    """The weight-decay mask ``(name, param) -> bool`` (True = decay) that leaves out ``no_decay``.

    A parameter is left out when its dotted name (``named_parameters()`` form, as
    ``tree.flatten_with_path`` gives it) contains one of the patterns or matches one as an
    ``fnmatch`` glob (``"*.bias"``, ``"blocks.*.ln_?.weight"``). A callable
    ``(name, param) -> bool`` returning True for the parameters to leave out is used as is.

    Args:
        no_decay: a pattern, a sequence of patterns, or a callable.

    Returns:
        The mask function, for ``add_decayed_weights(mask=...)`` or an alias's ``mask``.

    Example:
        >>> mask = no_decay_mask(("bias", "norm"))
        >>> mask("fc.weight", None), mask("fc.bias", None), mask("layernorm.weight", None)
        (True, False, False)
    """
    if callable(no_decay):
        user = no_decay

        def mask_fn(name: str, param: torch.Tensor) -> bool:
            return not bool(user(name, param))

        return mask_fn
    patterns = (no_decay,) if isinstance(no_decay, str) else tuple(no_decay)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"no_decay must hold non-empty name patterns (strings), got {p!r} in {no_decay!r}")
        if "," in p:  # no parameter name has a comma: 'bias,ln_' was meant as two patterns
            raise ValueError(
                f"no_decay pattern {p!r} contains a comma and would match no parameter; give a list of patterns, "
                f"e.g. {[q.strip() for q in p.split(',') if q.strip()]!r}"
            )

    # Names are static: match each once (at init, which runs eagerly) and remember it, so a
    # compiled update reads a dict instead of tracing fnmatch's regex machinery (a graph break).
    decided: dict[str, bool] = {}

    def mask_fn(name: str, param: torch.Tensor) -> bool:
        del param
        decay = decided.get(name)
        if decay is None:
            decay = decided[name] = not any(p in name or fnmatch.fnmatchcase(name, p) for p in patterns)
        return decay

    return mask_fn


# How aliases spell their weight decay and its mask (optax's names).
_DECAY_ARGS = ("weight_decay", "weight_decay_rate")
_MASK_ARGS = ("mask", "weight_decay_mask")


def _check_kwargs(label: str, factory: Callable[..., Any], hparams: dict[str, Any]) -> inspect.Signature:
    sig = inspect.signature(factory)
    accepted = [n for n in sig.parameters if n not in ("learning_rate", *_DECAY_ARGS, *_MASK_ARGS)]
    for k in hparams:
        if k in _MASK_ARGS:
            raise TypeError(f"create_optimizer({label!r}): give the weight-decay mask as no_decay=(name patterns...), not {k}=")
        if k in _DECAY_ARGS:
            raise TypeError(f"create_optimizer({label!r}): give the weight decay as weight_decay=, not {k}=")
        if k not in sig.parameters:
            close = difflib.get_close_matches(k, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"create_optimizer({label!r}): unexpected argument {k!r}{hint}; {label} takes {accepted}")
    return sig


def create_optimizer(
    name: str,
    *,
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    accum_steps: int = 1,
    no_decay: NoDecay = (),
    run_steps: int | None = None,
    **hparams: Any,
) -> GradientTransformation:
    """Build an optimizer by name: clipping, the rule with masked weight decay, accumulation.

    Args:
        name: an alias of :mod:`craftfn.optim` (``"adamw"``, ``"sgd"``, ``"lion"``, ``"muon"``,
            ...; see :func:`optimizer_names`; case-insensitive, so ``"AdamW"`` works).
        learning_rate: a float, or a schedule ``count -> lr`` (e.g. from
            :func:`craftfn.schedules.create_scheduler`). It is kept in the state as
            ``learning_rate`` (``optim.tree_get(opt_state, "learning_rate")``).
        weight_decay: the decay rate. Rules with their own weight-decay argument use it
            (decoupled in ``adamw``, ``nadamw``, ``lion``, ``lamb``, ``muon``, as in optax);
            it overrides the alias's default, so ``0.0`` means none. For the rules without
            one (``sgd``, ``adam``, ``rmsprop``, ...) it is added to the gradient (L2)
            before the rule, as ``torch.optim``'s ``weight_decay`` does.
        clip_norm: clip the gradient to this global L2 norm first (None: no clipping).
        accum_steps: apply an update every ``accum_steps`` calls on the mean of their
            gradients (:class:`MultiSteps`). This is accumulation *across* train steps;
            ``make_train_step(accum_steps=...)`` splits one batch *inside* a step instead.
        no_decay: parameters to leave out of weight decay: name patterns such as
            ``("bias", "norm")`` (substring or glob, see :func:`no_decay_mask`) or a callable
            ``(name, param) -> bool``.
        run_steps: the number of updates in the run, when known (the CLI passes the
            Trainer's ``max_steps``): a learning-rate schedule is then evaluated over the
            whole run and rejected if a value is not finite or negative, naming the first bad
            step (:func:`craftfn.schedules.check_schedule`).
        **hparams: the rule's own arguments (``b1``, ``b2``, ``eps``, ``momentum``, ...).

    Returns:
        The :class:`GradientTransformation`.

    Raises:
        ValueError: an unknown name (the message lists the names and suggests the closest),
            or a hyperparameter out of range.
        TypeError: an argument the rule does not take.

    Example:
        >>> from craftfn import schedules
        >>> tx = create_optimizer(
        ...     "adamw",
        ...     learning_rate=schedules.create_scheduler("warmup_cosine_decay", init_value=0.0, peak_value=3e-4, warmup_steps=100, decay_steps=5000),
        ...     weight_decay=0.1, clip_norm=1.0, no_decay=("bias", "norm"), b2=0.95,
        ... )  # doctest: +SKIP
    """
    key, factory = _lookup(name)
    if isinstance(learning_rate, bool) or not (callable(learning_rate) or isinstance(learning_rate, (numbers.Real, torch.Tensor))):
        raise TypeError(f"create_optimizer: learning_rate must be a number or a schedule, got {learning_rate!r}")
    check_hyperparameter("learning_rate", learning_rate)
    if run_steps is not None and callable(learning_rate):
        from craftfn.schedules import check_schedule

        check_schedule(learning_rate, run_steps, f"create_optimizer({name!r}): learning_rate")
    check_hyperparameter("weight_decay", weight_decay)
    if clip_norm is not None:
        check_hyperparameter("clip_norm", clip_norm, low=0.0, low_inclusive=False)
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, numbers.Integral) or accum_steps < 1:
        raise ValueError(f"create_optimizer: accum_steps must be an int >= 1, got {accum_steps!r}")
    sig = _check_kwargs(key, factory, hparams)
    mask = no_decay_mask(no_decay) if no_decay else None
    params = sig.parameters
    decay_arg = next((a for a in _DECAY_ARGS if a in params), None)
    mask_arg = next((a for a in _MASK_ARGS if a in params), None)

    pre: list[GradientTransformation] = []
    rule_kwargs = dict(hparams)
    if decay_arg is not None:
        # The rule's own decay; 0.0 also overrides a non-zero default of the alias.
        rule_kwargs[decay_arg] = weight_decay
        if mask is not None and weight_decay != 0 and mask_arg is not None:
            rule_kwargs[mask_arg] = mask
    elif weight_decay != 0:
        # torch.optim's weight_decay for these rules: g + wd * p before the rule.
        pre.append(add_decayed_weights(weight_decay, mask=mask))

    if decay_arg is not None and mask is not None and weight_decay != 0 and mask_arg is None:
        no_decay_kwargs = {**rule_kwargs, decay_arg: 0.0}

        def rule(learning_rate: ScalarOrSchedule) -> GradientTransformation:
            # No mask argument: the same rule twice, with and without decay, on the two groups.
            return partition(
                {
                    "decay": factory(learning_rate=learning_rate, **rule_kwargs),
                    "no_decay": factory(learning_rate=learning_rate, **no_decay_kwargs),
                },
                lambda name, p: "decay" if mask(name, p) else "no_decay",
            )
    else:

        def rule(learning_rate: ScalarOrSchedule) -> GradientTransformation:
            return factory(learning_rate=learning_rate, **rule_kwargs)

    rule.__name__ = key
    rule.__qualname__ = key
    steps = ([clip_by_global_norm(clip_norm)] if clip_norm is not None else []) + pre
    steps.append(inject_hyperparams(rule)(learning_rate=learning_rate))
    tx = steps[0] if len(steps) == 1 else chain(*steps)
    if accum_steps > 1:
        tx = MultiSteps(tx, every_k_schedule=int(accum_steps))
    return tx
