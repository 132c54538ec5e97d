"""Ready-made optimizers: each alias is a short chain of primitives (optax's ``alias``).

Names, arguments and sign conventions follow optax. Where torch.optim has the same
rule the trajectories agree with it; the arguments that select torch's variant are
listed in each docstring (for example ``rmsprop(eps_in_sqrt=False)``,
``adagrad(initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False)``,
``nadam(momentum_decay=4e-3)``).

The Adam family (``adam``, ``adamw``, ``amsgrad``) also carries a ``donated_update``
that runs torch's fused kernel in place (see :mod:`craftfn.optim.fused`), taken by
``state.apply_gradients(grads, donate=True)`` and ``make_train_step(..., donate=True)``.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.adamw(learning_rate=1e-3, weight_decay=0.01)
    >>> state = tx.init({"w": torch.ones(3)})
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from craftfn import tree
from craftfn.optim.adaptive import (
    ScaleByAdamState,
    ScaleByAmsgradState,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_factored_rms,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)
from craftfn.optim.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    apply_updates_,
    chain,
    check_hyperparameter,
    check_updates_match,
    identity,
)
from craftfn.optim.clipping import clip_by_block_rms
from craftfn.optim.fused import _fused_adam_step, fused_supported
from craftfn.optim.transforms import (
    MaskOrFn,
    ScaleByScheduleState,
    _flatten_like,
    _is_zero,
    add_decayed_weights,
    ema,
    foreach_groups,
    scale,
    scale_by_learning_rate,
    scale_by_param_block_rms,
    scale_by_sign,
    scale_by_trust_ratio,
    trace,
)

__all__ = [
    "sgd",
    "adam",
    "adamw",
    "nadam",
    "nadamw",
    "radam",
    "adamax",
    "amsgrad",
    "lion",
    "rmsprop",
    "adagrad",
    "adadelta",
    "adafactor",
    "lamb",
    "lars",
    "sign_sgd",
]


def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None, nesterov: bool = False) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    ``trace(momentum, nesterov)`` then ``scale_by_learning_rate``; equals
    ``torch.optim.SGD(lr, momentum, nesterov=nesterov)`` with ``dampening=0``.

    Args:
        learning_rate: a float, a 0-d tensor, or a schedule ``count -> lr``.
        momentum: decay of the momentum buffer, or ``None`` for plain SGD.
        nesterov: use Nesterov momentum (needs ``momentum``).

    Example:
        >>> tx = optim.sgd(0.1, momentum=0.9)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    if nesterov and (momentum is None or _is_zero(momentum)):
        raise ValueError(f"sgd: nesterov=True needs a positive momentum, got momentum={momentum!r}")
    if momentum is None:
        return chain(scale_by_learning_rate(learning_rate))
    check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=True)
    return chain(trace(decay=momentum, nesterov=nesterov), scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------- adam family


def _adam_family(
    name: str,
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    mu_dtype: Optional[torch.dtype],
    weight_decay: Optional[float],
    mask: MaskOrFn,
    nesterov: bool,
    amsgrad: bool,
) -> GradientTransformation:
    """``chain(scale_by_adam | scale_by_amsgrad, [add_decayed_weights], scale_by_learning_rate)``.

    Where the rule is exactly torch's fused one (no Nesterov, ``eps_root=0``, no separate
    ``mu_dtype``) both paths run on the fused kernel (:mod:`craftfn.optim.fused`):

    - ``update`` (pure): copies the moments, starts the updates at ``-lr * wd * p`` (or 0)
      and lets the kernel add the Adam step to them, all in fresh buffers; the inputs are
      never written. Same numbers as the generic chain up to rounding.
    - ``donated_update``: the kernel steps params and moments in place.

    Anything else (other dtypes or devices, a state from elsewhere) takes the generic chain.
    """
    check_hyperparameter("learning_rate", learning_rate)
    core = scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype) if amsgrad else scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
    parts = [core]
    if weight_decay is not None:
        parts.append(add_decayed_weights(weight_decay, mask))
    parts.append(scale_by_learning_rate(learning_rate))
    tx = chain(*parts)
    if nesterov or not _is_zero(eps_root) or mu_dtype is not None:
        return tx
    state_cls = ScaleByAmsgradState if amsgrad else ScaleByAdamState

    def plan(updates: Updates, state: Any, params: Optional[Params]) -> Optional[tuple]:
        """The flat lists, lr and new small states for a fused step, or None to take the generic chain."""
        if not (isinstance(state, tuple) and len(state) == len(parts) and isinstance(state[0], state_cls)):
            return None  # the generic chain raises the precise error
        if params is None and weight_decay is not None:
            return None
        adam_state, lr_state = state[0], state[-1]
        moments = [adam_state.mu, adam_state.nu] + ([adam_state.nu_max] if amsgrad else [])
        # The kernel indexes the gradients and moments with the parameters' sizes: validate first.
        reference = params if params is not None else adam_state.mu
        check_updates_match(updates, reference, f"{name}: updates")
        tree.check_match(tuple(moments), (reference,) * len(moments), name=f"{name}: opt_state moments", reference_name="params", dtype="any", device=False)
        g, treedef, (*flat_moments,) = _flatten_like(updates, name, *moments)
        p = treedef.flatten_up_to(params) if params is not None else flat_moments[0]
        if not fused_supported(p, *flat_moments) or not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in g):
            return None
        if callable(learning_rate):
            if not isinstance(lr_state, ScaleByScheduleState):
                return None
            lr, new_lr_state = learning_rate(lr_state.count), ScaleByScheduleState(count=lr_state.count + 1)
        else:
            lr, new_lr_state = learning_rate, lr_state
        decay = [False] * len(p)
        if weight_decay is not None:
            from craftfn.optim.combine import _mask_list

            decay = [True] * len(p) if mask is None else _mask_list(mask, params)
        return treedef, g, p, flat_moments, lr, adam_state, new_lr_state, decay

    def new_state(state: tuple, adam_state: Any, new_lr_state: Any, moments: list[list[torch.Tensor]], treedef: Any) -> tuple:
        fields = {"count": adam_state.count + 1, "mu": tree.unflatten(treedef, moments[0]), "nu": tree.unflatten(treedef, moments[1])}
        if amsgrad:
            fields["nu_max"] = tree.unflatten(treedef, moments[2])
        return (state_cls(**fields), *state[1:-1], new_lr_state)

    def step_(
        target: list[torch.Tensor], g: list[torch.Tensor], moments: list[list[torch.Tensor]], count: torch.Tensor, lr: Any,
        wd_per_leaf: list[Any], grad_divisor: Optional[torch.Tensor] = None,
    ) -> None:
        for wd in {id(w): w for w in wd_per_leaf}.values():
            idx = [i for i, w in enumerate(wd_per_leaf) if w is wd]
            pick = lambda xs, idx=idx: [xs[i] for i in idx]  # noqa: E731
            _fused_adam_step(
                pick(target), pick(g), pick(moments[0]), pick(moments[1]), pick(moments[2]) if amsgrad else [], count,
                lr, b1, b2, eps, wd, amsgrad, grad_divisor,
            )

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        planned = plan(updates, state, params)
        if planned is None:
            return tx.update(updates, state, params, **extra)
        treedef, g, p, moments, lr, adam_state, new_lr_state, decay = planned
        fresh = [[torch.empty_like(x) for x in ms] for ms in moments]
        for dst, src in zip(fresh, moments):
            foreach_groups(torch._foreach_copy_, dst, src)
        # The updates start as the decoupled decay term -lr * wd * p (0 elsewhere); the kernel,
        # run with weight_decay=0 on them, then adds the Adam step: one pass for the whole rule.
        out: list[Any] = [None] * len(p)
        dec = [i for i, d in enumerate(decay) if d]
        if dec:
            coef = -lr * weight_decay
            res = foreach_groups(lambda xs: torch._foreach_mul(xs, coef.to(device=xs[0].device, dtype=xs[0].dtype) if isinstance(coef, torch.Tensor) else coef), [p[i] for i in dec])
            for j, i in enumerate(dec):
                out[i] = res[j]
        rest = [i for i, d in enumerate(decay) if not d]
        if rest:
            zeros = [torch.empty_like(p[i]) for i in rest]
            foreach_groups(torch._foreach_zero_, zeros)
            for j, i in enumerate(rest):
                out[i] = zeros[j]
        count = adam_state.count + 1
        step_(out, g, fresh, count, lr, [0.0] * len(p))
        return tree.unflatten(treedef, out), new_state(state, adam_state, new_lr_state, fresh, treedef)

    def donated_fn(updates: Updates, state: Any, params: Params, *, grad_divisor: Optional[torch.Tensor] = None, **extra: Any) -> tuple[Params, Any]:
        # grad_divisor (fused_divide below): a chain's clip factor, divided out inside the kernel.
        planned = plan(updates, state, params)
        if planned is None:
            if grad_divisor is not None:
                u = tree.leaves(updates)
                foreach_groups(lambda xs: torch._foreach_div_(xs, grad_divisor.to(device=xs[0].device, dtype=xs[0].dtype)), u)
            new_updates, st = tx.update(updates, state, params, **extra)
            return apply_updates_(params, new_updates), st
        treedef, g, p, moments, lr, adam_state, new_lr_state, decay = planned
        wd = weight_decay if weight_decay is not None else 0.0
        step_(p, g, moments, adam_state.count + 1, lr, [wd if d else 0.0 for d in decay], grad_divisor)
        return params, new_state(state, adam_state, new_lr_state, moments, treedef)

    return GradientTransformation(tx.init, update_fn, donated_fn, fused_divide=True)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam (Kingma & Ba, 2014): ``chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov), scale_by_learning_rate(lr))``.

    ``mu = b1 mu + (1 - b1) g``, ``nu = b2 nu + (1 - b2) g^2``,
    ``p <- p - lr * mu_hat / (sqrt(nu_hat + eps_root) + eps)`` with bias-corrected
    ``mu_hat = mu / (1 - b1^t)``, ``nu_hat = nu / (1 - b2^t)``. Same as ``torch.optim.Adam``
    (``weight_decay=0``). Donated steps use torch's fused kernel when ``nesterov=False``,
    ``eps_root=0`` and ``mu_dtype=None``.

    Args:
        learning_rate: a float, a 0-d tensor, or a schedule ``count -> lr``; ``>= 0``.
        b1, b2: moment decays in ``[0, 1)``.
        eps, eps_root: ``>= 0``.
        mu_dtype: dtype of the first moment (default: the parameters').
        nesterov: use Nesterov momentum (this is :func:`nadam`).

    Example:
        >>> tx = optim.adam(1e-3)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByAdamState'
    """
    return _adam_family("adam", learning_rate, b1, b2, eps, eps_root, mu_dtype, None, None, nesterov, False)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): Adam plus decoupled weight decay.

    ``chain(scale_by_adam(...), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``:
    ``p <- p - lr * (mu_hat / (sqrt(nu_hat + eps_root) + eps) + weight_decay * p)``. Same as
    ``torch.optim.AdamW`` (note optax's default ``weight_decay=1e-4``; torch's is ``1e-2``).

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov: as :func:`adam`.
        weight_decay: ``>= 0``.
        mask: which leaves decay (see :func:`add_decayed_weights`), e.g.
            ``lambda name, p: p.ndim >= 2`` to skip biases and norms.

    Example:
        >>> tx = optim.adamw(1e-3, weight_decay=0.1, mask=lambda name, p: p.ndim >= 2)
        >>> len(tx.init({"w": torch.ones(2, 2), "b": torch.ones(2)}))
        3
    """
    return _adam_family("adamw", learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov, False)


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018): Adam with ``nu_max = max(nu_max, nu)`` in the denominator.

    ``chain(scale_by_amsgrad(...), scale_by_learning_rate(lr))``; same as
    ``torch.optim.Adam(amsgrad=True)`` (see :func:`scale_by_amsgrad` for where the maximum is taken).

    Example:
        >>> tx = optim.amsgrad(1e-3)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByAmsgradState'
    """
    return _adam_family("amsgrad", learning_rate, b1, b2, eps, eps_root, mu_dtype, None, None, False, True)


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    momentum_decay: Optional[float] = None,
) -> GradientTransformation:
    """NAdam (Dozat, 2016).

    With ``momentum_decay=None`` (optax's NAdam): ``adam(..., nesterov=True)``, i.e. the
    first moment is ``b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)``.
    With ``momentum_decay=psi`` (torch's NAdam, whose default is ``4e-3``): the momentum
    coefficient follows ``b1 (1 - 0.5 * 0.96^(t psi))`` (:func:`scale_by_nadam`); this equals
    ``torch.optim.NAdam(lr, betas=(b1, b2), eps=eps, momentum_decay=psi)``.

    Example:
        >>> tx = optim.nadam(1e-3, momentum_decay=4e-3)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByNadamState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    if momentum_decay is None:
        return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=True)
    _torch_nadam_args("nadam", eps_root, mu_dtype)
    return chain(scale_by_nadam(b1, b2, eps, momentum_decay), scale_by_learning_rate(learning_rate))


def _torch_nadam_args(name: str, eps_root: float, mu_dtype: Optional[torch.dtype]) -> None:
    if not _is_zero(eps_root) or mu_dtype is not None:
        raise ValueError(f"{name}: momentum_decay (torch's NAdam rule) does not take eps_root or mu_dtype; got eps_root={eps_root}, mu_dtype={mu_dtype}")


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 1e-4,
    mask: MaskOrFn = None,
    *,
    momentum_decay: Optional[float] = None,
) -> GradientTransformation:
    """NAdam with decoupled weight decay: :func:`nadam`'s rule, then ``add_decayed_weights``, then the lr.

    With ``momentum_decay=psi`` this equals
    ``torch.optim.NAdam(..., weight_decay=wd, momentum_decay=psi, decoupled_weight_decay=True)``.

    Example:
        >>> tx = optim.nadamw(1e-3, weight_decay=0.01)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    if momentum_decay is None:
        return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=True)
    _torch_nadam_args("nadamw", eps_root, mu_dtype)
    return chain(scale_by_nadam(b1, b2, eps, momentum_decay), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rectified Adam (Liu et al., 2020): ``chain(scale_by_radam(...), scale_by_learning_rate(lr))``.

    Uses the variance-rectified Adam step once the SMA length ``rho_t`` reaches ``threshold``
    and plain bias-corrected momentum before. ``torch.optim.RAdam`` is ``threshold=5.0`` (its
    test is ``rho_t > 5``).

    Example:
        >>> tx = optim.radam(1e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov), scale_by_learning_rate(learning_rate))


def adamax(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax (Kingma & Ba, 2014): ``p <- p - lr * mu_hat / max(b2 u, |g| + eps)``; same as ``torch.optim.Adamax``.

    Example:
        >>> tx = optim.adamax(2e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------- other aliases


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 1e-3,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): ``p <- p - lr * (sign((1 - b1) g + b1 mu) + weight_decay * p)``,
    then ``mu = b2 mu + (1 - b2) g``.

    Example:
        >>> tx = optim.lion(1e-4)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_lion(b1, b2, mu_dtype), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> GradientTransformation:
    """RMSProp (Tieleman & Hinton, 2012), optionally centered and with momentum.

    ``chain(scale_by_rms | scale_by_stddev, scale_by_learning_rate(lr), trace(momentum, nesterov))``:
    ``nu = decay nu + (1 - decay) g^2``, step ``-lr * g / (sqrt(nu) + eps)`` (centered: ``nu - mu^2``),
    accumulated by momentum when given.

    To match ``torch.optim.RMSprop(lr, alpha, eps, momentum, centered)`` use
    ``rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False, centered=centered, momentum=momentum or None)``
    (torch starts ``nu`` at 0, which is ``initial_scale=0.0``).

    Example:
        >>> tx = optim.rmsprop(1e-2, eps_in_sqrt=False, momentum=0.9)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    if nesterov and (momentum is None or _is_zero(momentum)):
        raise ValueError(f"rmsprop: nesterov=True needs a positive momentum, got momentum={momentum!r}")
    if momentum is not None:
        check_hyperparameter("momentum", momentum, low=0.0, high=1.0)
    core = (scale_by_stddev if centered else scale_by_rms)(decay, eps, initial_scale, eps_in_sqrt, bias_correction)
    return chain(core, scale_by_learning_rate(learning_rate), trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity())


def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1, eps: float = 1e-7, *, eps_in_sqrt: bool = True) -> GradientTransformation:
    """Adagrad (Duchi et al., 2011): ``s = s + g^2``, ``p <- p - lr * g / sqrt(s + eps)``.

    ``chain(scale_by_rss(...), scale_by_learning_rate(lr))``. To match ``torch.optim.Adagrad``
    (``lr_decay=0``) use ``adagrad(lr, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False)``
    (torch puts ``eps`` outside the root: ``g / (sqrt(s) + eps)``).

    Example:
        >>> tx = optim.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt), scale_by_learning_rate(learning_rate))


def adadelta(
    learning_rate: ScalarOrSchedule = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0, weight_decay_mask: MaskOrFn = None
) -> GradientTransformation:
    """Adadelta (Zeiler, 2012): ``chain(add_decayed_weights(wd), scale_by_adadelta(rho, eps), scale_by_learning_rate(lr))``.

    Same as ``torch.optim.Adadelta(lr, rho, eps, weight_decay)`` (whose weight decay is added
    to the gradient, as here).

    Example:
        >>> tx = optim.adadelta(1.0)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(add_decayed_weights(weight_decay, weight_decay_mask), scale_by_adadelta(rho, eps), scale_by_learning_rate(learning_rate))


def adafactor(
    learning_rate: Optional[ScalarOrSchedule] = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: Optional[float] = 1.0,
    momentum: Optional[float] = None,
    dtype_momentum: torch.dtype = torch.float32,
    weight_decay_rate: Optional[float] = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: MaskOrFn = None,
) -> GradientTransformation:
    """Adafactor (Shazeer & Stern, 2018), as optax composes it.

    ``scale_by_factored_rms`` (factored second moments), ``clip_by_block_rms(clipping_threshold)``,
    the learning rate, ``scale_by_param_block_rms`` (relative step size), optional ``ema``
    momentum and weight decay, then a sign flip (descent).

    Example:
        >>> tx = optim.adafactor(1e-2)
        >>> s = tx.init({"w": torch.ones(256, 128)})
        >>> tuple(s[0].v_row["w"].shape)
        (128,)
    """
    if learning_rate is not None:
        check_hyperparameter("learning_rate", learning_rate)
    parts = [scale_by_factored_rms(factored, decay_rate, 0, min_dim_size_to_factor, eps, decay_offset)]
    if clipping_threshold is not None:
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        parts.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    parts.append(scale(-1.0))
    return chain(*parts)


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """LAMB (You et al., 2020): Adam direction plus weight decay, rescaled per leaf by the trust ratio
    ``||p|| / ||u||``, then the learning rate.

    ``chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate)``.

    Example:
        >>> tx = optim.lamb(1e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        4
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(weight_decay, mask), scale_by_trust_ratio(), scale_by_learning_rate(learning_rate)
    )


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: MaskOrFn = True,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> GradientTransformation:
    """LARS (You et al., 2017): ``g + wd p``, rescaled per leaf by ``trust_coefficient * ||p|| / (||u|| + eps)``,
    times the learning rate, through (Nesterov) momentum.

    Example:
        >>> tx = optim.lars(0.1)
        >>> len(tx.init({"w": torch.ones(1)}))
        4
    """
    check_hyperparameter("learning_rate", learning_rate)
    from craftfn.optim.combine import masked

    trust = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    return chain(
        add_decayed_weights(weight_decay, mask=None if weight_decay_mask is True else weight_decay_mask),
        trust if trust_ratio_mask is True else masked(trust, trust_ratio_mask),
        scale_by_learning_rate(learning_rate),
        trace(decay=momentum, nesterov=nesterov),
    )


def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """signSGD (Bernstein et al., 2018): ``p <- p - lr * sign(g)``.

    Example:
        >>> tx = optim.sign_sgd(0.01)
        >>> tx.update({"w": torch.tensor([-3.0, 2.0])}, tx.init(None))[0]
        {'w': tensor([ 0.0100, -0.0100])}
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))

