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
from craftfn.optim.fused import _fused_adam_step, adam_update_out_of_place, fused_supported
from craftfn.optim.rules import (
    scale_by_adan,
    scale_by_belief,
    scale_by_lbfgs,
    scale_by_novograd,
    scale_by_optimistic_gradient,
    scale_by_polyak,
    scale_by_rprop,
    scale_by_sm3,
    scale_by_yogi,
)
from craftfn.optim.transforms import (
    MaskOrFn,
    ScaleByScheduleState,
    _flatten_like,
    _is_zero,
    add_decayed_weights,
    add_noise,
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
    "signum",
    "noisy_sgd",
    "adamaxw",
    "adabelief",
    "yogi",
    "adan",
    "novograd",
    "sm3",
    "rprop",
    "optimistic_gradient_descent",
    "optimistic_adam",
    "optimistic_adam_v2",
    "fromage",
    "polyak_sgd",
    "lbfgs",
    "with_fused_adam",
]


def sgd(
    learning_rate: ScalarOrSchedule, momentum: Optional[float] = None, nesterov: bool = False, accumulator_dtype: Optional[torch.dtype] = None
) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    ``chain(trace(momentum, nesterov) or identity(), scale_by_learning_rate(lr))``, as optax; equals
    ``torch.optim.SGD(lr, momentum, nesterov=nesterov)`` with ``dampening=0``.

    Args:
        learning_rate: a float, a 0-d tensor, or a schedule ``count -> lr``.
        momentum: decay of the momentum buffer, or ``None`` for plain SGD.
        nesterov: use Nesterov momentum (needs ``momentum``).
        accumulator_dtype: dtype of the momentum buffer (default: the parameters').

    Example:
        >>> tx = optim.sgd(0.1, momentum=0.9)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    if nesterov and (momentum is None or _is_zero(momentum)):
        raise ValueError(f"sgd: nesterov=True needs a positive momentum, got momentum={momentum!r}")
    if momentum is not None:
        check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=True)
    return chain(
        trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype) if momentum is not None else identity(),
        scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------- adam family


def with_fused_adam(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: Optional[float] = None,
    mask: MaskOrFn = None,
    amsgrad: bool = False,
) -> GradientTransformation:
    """Attach torch's fused Adam(W)/AMSGrad kernel to ``tx``, the chain computing the same rule.

    ``tx`` must be ``chain(scale_by_adam | scale_by_amsgrad(max_raw_nu=True), [add_decayed_weights],
    scale_by_learning_rate)`` with no Nesterov, ``eps_root=0`` and no ``mu_dtype`` (the aliases
    call this only then); the hyperparameters here are that chain's. Both paths then run on the
    kernel (:mod:`craftfn.optim.fused`); its numbers are torch's operation order, equal to the
    chain's up to float32 rounding:

    - ``update`` (pure): copies the moments, starts the updates at ``-lr * wd * p`` (or 0) and
      lets the kernel add the Adam step to them, all in fresh buffers; the inputs are never written.
      Traced (``craftfn.jit``), it is :func:`~craftfn.optim.fused.adam_update_out_of_place`'s
      pointwise ops instead, which inductor fuses into one out-of-place pass per leaf.
    - ``donated_update``: the kernel steps params and moments in place.

    Anything the kernel cannot take (other dtypes or devices, a state from elsewhere) runs ``tx``.

    Example:
        >>> rule = optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(1e-3))
        >>> fast = with_fused_adam(rule, learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8)
        >>> fast.donated_update is not None
        True
    """
    n_parts = 3 if weight_decay is not None else 2
    state_cls = ScaleByAmsgradState if amsgrad else ScaleByAdamState
    name = "amsgrad" if amsgrad else ("adamw" if weight_decay is not None else "adam")

    def plan(updates: Updates, state: Any, params: Optional[Params]) -> Optional[tuple]:
        """The flat lists, lr and new small states for a fused step, or None to take the generic chain."""
        if not (isinstance(state, tuple) and len(state) == n_parts and isinstance(state[0], state_cls)):
            return None  # the generic chain raises the precise error
        if params is None and weight_decay is not None:
            return None
        adam_state, lr_state = state[0], state[-1]
        moments = [adam_state.mu, adam_state.nu] + ([adam_state.nu_max] if amsgrad else [])
        # The kernel indexes the gradients and moments with the parameters' sizes: validate first
        # (the updates' check is free when the caller, e.g. apply_gradients, checked these objects).
        reference = params if params is not None else adam_state.mu
        check_updates_match(updates, reference, f"{name}: updates")
        g, treedef, (*flat_moments,) = _flatten_like(updates, name, *moments)
        p = treedef.flatten_up_to(params) if params is not None else flat_moments[0]
        if not fused_supported(p, *flat_moments):
            # Moments of other shapes than the parameters (a state from another model) are an
            # error, whichever path would run; other dtypes or devices take the generic chain.
            tree.check_match(tuple(moments), (reference,) * len(moments), name=f"{name}: opt_state moments", dtype="any", device=False)
            return None
        for x in g:  # a loop, not all(<generator>): dynamo traces a generator at ~5 ms per item
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
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

    def new_state(state: tuple, adam_state: Any, new_lr_state: Any, moments: Optional[list[list[torch.Tensor]]], treedef: Any) -> tuple:
        """The chain's new state; ``moments=None``: the kernel stepped ``adam_state``'s own moment trees in place."""
        names = ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu")
        if moments is None:
            # Donated: the same trees hold the new values (rebuilding them costs seconds of tracing under compile).
            fields = {k: getattr(adam_state, k) for k in names}
        else:
            fields = {k: tree.unflatten(treedef, m) for k, m in zip(names, moments)}
        fields["count"] = adam_state.count + 1
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
        if torch.compiler.is_compiling():
            # Traced (craftfn.jit): pointwise ops that inductor fuses into one out-of-place kernel
            # per leaf; the kernel is an opaque op there and would need the copies below.
            wd = weight_decay if weight_decay is not None else 0.0
            u, *new_moments = adam_update_out_of_place(
                p, g, moments[0], moments[1], moments[2] if amsgrad else None, adam_state.count + 1,
                lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=[wd if d else 0.0 for d in decay],
            )
            return tree.unflatten(treedef, u), new_state(state, adam_state, new_lr_state, new_moments[: len(moments)], treedef)
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
        return params, new_state(state, adam_state, new_lr_state, None, treedef)

    return GradientTransformation(tx.init, update_fn, donated_fn, fused_divide=True)


def _fused_eligible(*, nesterov: bool, eps_root: Any, mu_dtype: Optional[torch.dtype]) -> bool:
    """torch's fused kernel is Adam without Nesterov, ``eps_root`` or a separate moment dtype."""
    return not nesterov and _is_zero(eps_root) and mu_dtype is None


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
    (``weight_decay=0``). Steps use torch's fused kernel when ``nesterov=False``,
    ``eps_root=0`` and ``mu_dtype=None`` (:func:`with_fused_adam`).

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
    check_hyperparameter("learning_rate", learning_rate)
    tx = chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )
    if not _fused_eligible(nesterov=nesterov, eps_root=eps_root, mu_dtype=mu_dtype):
        return tx
    return with_fused_adam(tx, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


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
    check_hyperparameter("learning_rate", learning_rate)
    tx = chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
    if not _fused_eligible(nesterov=nesterov, eps_root=eps_root, mu_dtype=mu_dtype):
        return tx
    return with_fused_adam(tx, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    max_raw_nu: bool = False,
) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018): Adam with a running maximum of the second moment in the denominator.

    ``chain(scale_by_amsgrad(...), scale_by_learning_rate(lr))``. By default optax's rule (the
    maximum of the bias-corrected ``nu_hat``); ``max_raw_nu=True`` is torch's rule,
    ``torch.optim.Adam(amsgrad=True)``, which also runs on torch's fused kernel. See
    :func:`scale_by_amsgrad`.

    Example:
        >>> tx = optim.amsgrad(1e-3)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByAmsgradState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    tx = chain(
        scale_by_amsgrad(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
            bias_correction_mu=bias_correction_mu, bias_correction_nu=bias_correction_nu, max_raw_nu=max_raw_nu,
        ),
        scale_by_learning_rate(learning_rate),
    )
    if not (max_raw_nu and _fused_eligible(nesterov=False, eps_root=eps_root, mu_dtype=mu_dtype)):
        return tx
    return with_fused_adam(tx, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, amsgrad=True)


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
        return adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=True)
    _torch_nadam_args("nadam", eps_root, mu_dtype)
    return chain(scale_by_nadam(b1=b1, b2=b2, eps=eps, momentum_decay=momentum_decay), scale_by_learning_rate(learning_rate))


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
        return adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask, nesterov=True)
    _torch_nadam_args("nadamw", eps_root, mu_dtype)
    return chain(
        scale_by_nadam(b1=b1, b2=b2, eps=eps, momentum_decay=momentum_decay),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    rectification_dtype: torch.dtype = torch.float32,
) -> GradientTransformation:
    """Rectified Adam (Liu et al., 2020): ``chain(scale_by_radam(...), scale_by_learning_rate(lr))``.

    Uses the variance-rectified Adam step once the SMA length ``rho_t`` reaches ``threshold``
    and plain bias-corrected momentum before. The rectification term is computed in float32 as
    optax does; ``torch.optim.RAdam`` is ``threshold=5.0`` (its test is ``rho_t > 5``) with
    ``rectification_dtype=torch.float64`` (see :func:`scale_by_radam`).

    Example:
        >>> tx = optim.radam(1e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_radam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, threshold=threshold, nesterov=nesterov, rectification_dtype=rectification_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamax(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax (Kingma & Ba, 2014): ``p <- p - lr * mu_hat / max(b2 u, |g| + eps)``; same as ``torch.optim.Adamax``.

    Example:
        >>> tx = optim.adamax(2e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_adamax(b1=b1, b2=b2, eps=eps), scale_by_learning_rate(learning_rate))


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
    return chain(
        scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


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
    scale_by = scale_by_stddev if centered else scale_by_rms
    return chain(
        scale_by(decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt, bias_correction=bias_correction),
        scale_by_learning_rate(learning_rate),
        trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity(),
    )


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
    return chain(
        scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps, eps_in_sqrt=eps_in_sqrt),
        scale_by_learning_rate(learning_rate),
    )


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
    return chain(
        add_decayed_weights(weight_decay, mask=weight_decay_mask),
        scale_by_adadelta(rho=rho, eps=eps),
        scale_by_learning_rate(learning_rate),
    )


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
    parts = [
        scale_by_factored_rms(
            factored=factored, decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor, epsilon=eps, decay_offset=decay_offset
        )
    ]
    if clipping_threshold is not None:
        check_hyperparameter("clipping_threshold", clipping_threshold, low=0.0, low_inclusive=False)
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        parts.append(add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
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
        scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
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
    check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=True)
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



def signum(learning_rate: ScalarOrSchedule, beta: float = 0.9, accumulator_dtype: Optional[torch.dtype] = None) -> GradientTransformation:
    """Signum (Bernstein et al., 2018): sign descent on a momentum, ``p <- p - lr * sign(EMA_beta(g))``.

    ``chain(ema(beta, debias=False), scale_by_sign(), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.signum(0.01)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("beta", beta, high=1.0)  # named here: ema would call it decay
    return chain(
        ema(beta, debias=False, accumulator_dtype=accumulator_dtype),
        scale_by_sign(),
        scale_by_learning_rate(learning_rate),
    )


def noisy_sgd(
    learning_rate: ScalarOrSchedule, eta: float = 0.01, gamma: float = 0.55, key: Any = None, *, seed: Optional[int] = None
) -> GradientTransformation:
    """SGD with annealed Gaussian gradient noise (Neelakantan et al., 2015):
    ``chain(add_noise(eta, gamma, key), scale_by_learning_rate(lr))``.

    The noise comes from craftfn's keys (:mod:`craftfn.random`): same law as optax's, other samples.

    Example:
        >>> tx = optim.noisy_sgd(0.01, key=0)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(add_noise(eta, gamma, key, seed=seed), scale_by_learning_rate(learning_rate))


def adamaxw(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-4, mask: MaskOrFn = None
) -> GradientTransformation:
    """Adamax with decoupled weight decay: ``chain(scale_by_adamax, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> tx = optim.adamaxw(2e-3, weight_decay=0.01)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_adamax(b1=b1, b2=b2, eps=eps),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


def adabelief(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16, *, nesterov: bool = False
) -> GradientTransformation:
    """AdaBelief (Zhuang et al., 2020): ``chain(scale_by_belief(...), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.adabelief(1e-3)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByBeliefState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_belief(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )


def yogi(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3) -> GradientTransformation:
    """Yogi (Zaheer et al., 2018): ``chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.yogi(1e-2)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_yogi(b1=b1, b2=b2, eps=eps), scale_by_learning_rate(learning_rate))


def adan(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """Adan (Xie et al., 2022): ``chain(scale_by_adan(...), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.adan(1e-3)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByAdanState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_adan(b1=b1, b2=b2, b3=b3, eps=eps, eps_root=eps_root),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )


def novograd(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.25, eps: float = 1e-6, eps_root: float = 0.0, weight_decay: float = 0.0
) -> GradientTransformation:
    """NovoGrad (Ginsburg et al., 2019): ``chain(scale_by_novograd(...), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.novograd(1e-2)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByNovogradState'
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_novograd(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay),
        scale_by_learning_rate(learning_rate),
    )


def sm3(learning_rate: ScalarOrSchedule, momentum: float = 0.9) -> GradientTransformation:
    """SM3 (Anil et al., 2019): ``chain(scale_by_sm3(momentum), scale_by_learning_rate(learning_rate))``
    (optax's ``scale(-learning_rate)``; a schedule works too).

    Example:
        >>> tx = optim.sm3(0.1)
        >>> type(tx.init({"w": torch.ones(2, 2)})[0]).__name__
        'ScaleBySM3State'
    """
    check_hyperparameter("learning_rate", learning_rate)
    check_hyperparameter("momentum", momentum, high=1.0, high_inclusive=True)  # named here: scale_by_sm3 calls it b1
    return chain(scale_by_sm3(b1=momentum), scale_by_learning_rate(learning_rate))


def rprop(
    learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2, min_step_size: float = 1e-6, max_step_size: float = 50.0
) -> GradientTransformation:
    """Rprop (Riedmiller & Braun, 1993): ``chain(scale_by_rprop(...), scale(-1))``; ``learning_rate`` is the initial step size.

    Example:
        >>> tx = optim.rprop(1e-2)
        >>> type(tx.init({"w": torch.ones(1)})[0]).__name__
        'ScaleByRpropState'
    """
    return chain(
        scale_by_rprop(learning_rate=learning_rate, eta_minus=eta_minus, eta_plus=eta_plus, min_step_size=min_step_size, max_step_size=max_step_size),
        scale(-1.0),
    )


def optimistic_gradient_descent(learning_rate: ScalarOrSchedule, alpha: float = 1.0, beta: float = 1.0) -> GradientTransformation:
    """Optimistic gradient descent (Daskalakis et al., 2017):
    ``chain(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.optimistic_gradient_descent(1e-2)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(scale_by_optimistic_gradient(alpha=alpha, beta=beta), scale_by_learning_rate(learning_rate))


def optimistic_adam_v2(
    learning_rate: ScalarOrSchedule,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    nesterov: bool = True,
) -> GradientTransformation:
    """Optimistic Adam (Daskalakis et al., 2017): the optimistic gradient of Adam's direction,
    ``chain(scale_by_adam(...), scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(lr))``.

    Example:
        >>> tx = optim.optimistic_adam_v2(1e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        scale_by_optimistic_gradient(alpha=alpha, beta=beta),
        scale_by_learning_rate(learning_rate),
    )


def optimistic_adam(
    learning_rate: float,
    optimism: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = True,
) -> GradientTransformation:
    """optax's first Optimistic Adam (deprecated there for :func:`optimistic_adam_v2`): the learning
    rate and ``optimism`` (default: the learning rate) enter the optimistic gradient,
    ``chain(scale_by_adam(...), scale_by_optimistic_gradient(alpha=lr, beta=optimism), scale_by_learning_rate(1.0))``.

    Example:
        >>> tx = optim.optimistic_adam(1e-3)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    if callable(learning_rate):
        raise TypeError("optimistic_adam: learning_rate must be a number (use optimistic_adam_v2 for a schedule)")
    check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        scale_by_optimistic_gradient(alpha=learning_rate, beta=learning_rate if optimism is None else optimism),
        scale_by_learning_rate(1.0),
    )


def fromage(learning_rate: ScalarOrSchedule, min_norm: float = 1e-6) -> GradientTransformation:
    """Fromage (Bernstein et al., 2020): a trust-ratio step, then the parameters shrink by ``1 / sqrt(1 + lr^2)``.

    With ``m = 1 / sqrt(1 + lr^2)``: ``chain(scale_by_trust_ratio(min_norm), scale_by_learning_rate(lr * m),
    add_decayed_weights(m - 1))`` (the last rate is negative: it scales the parameters by ``m``).

    Example:
        >>> tx = optim.fromage(1e-2)
        >>> len(tx.init({"w": torch.ones(1)}))
        3
    """
    from craftfn.optim.transforms import _add_scaled_params

    check_hyperparameter("learning_rate", learning_rate)
    if not callable(learning_rate):
        mult = 1 / (1 + learning_rate**2) ** 0.5
        return chain(
            scale_by_trust_ratio(min_norm=min_norm),
            scale_by_learning_rate(learning_rate * mult),
            _add_scaled_params(mult - 1),
        )

    def mult_of(count: Any) -> Any:
        return 1 / (1 + learning_rate(count) ** 2) ** 0.5

    return chain(
        scale_by_trust_ratio(min_norm=min_norm),
        scale_by_learning_rate(lambda count: mult_of(count) * learning_rate(count)),
        _add_scaled_params(lambda count: mult_of(count) - 1),
    )


def polyak_sgd(max_learning_rate: float = 1.0, scaling: ScalarOrSchedule = 1.0, f_min: float = 0.0, eps: float = 0.0, variant: str = "sps") -> GradientTransformation:
    """SGD with the Polyak step size (Loizou et al., 2021): ``chain(sgd(scaling), scale_by_polyak(...))``.

    ``update`` needs the loss: ``tx.update(grads, state, params, value=loss)``.

    Example:
        >>> tx = optim.polyak_sgd()
        >>> p = {"w": torch.tensor([2.0])}
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init(p), p, value=torch.tensor(2.0))[0]
        {'w': tensor([-1.])}
    """
    check_hyperparameter("scaling", scaling)  # named here: sgd would call it learning_rate
    return chain(
        sgd(learning_rate=scaling),
        scale_by_polyak(max_learning_rate=max_learning_rate, f_min=f_min, eps=eps, variant=variant),
    )


def lbfgs(
    learning_rate: Optional[ScalarOrSchedule] = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: Optional[GradientTransformation] = None,
) -> GradientTransformation:
    """L-BFGS: ``chain(scale_by_lbfgs(memory_size, scale_init_precond), scale_by_learning_rate(lr) or scale(-1), linesearch)``.

    Unlike optax, no line search by default: optax's zoom line search loops until a
    data-dependent condition holds, which reads values on the host every step. Give any
    transformation as ``linesearch`` (it runs last, like optax's).

    Example:
        >>> tx = optim.lbfgs(memory_size=3)
        >>> type(tx.init({"w": torch.ones(2)})[0]).__name__
        'ScaleByLBFGSState'
    """
    if learning_rate is not None:
        check_hyperparameter("learning_rate", learning_rate)
    return chain(
        scale_by_lbfgs(memory_size=memory_size, scale_init_precond=scale_init_precond),
        scale(-1.0) if learning_rate is None else scale_by_learning_rate(learning_rate),
        identity() if linesearch is None else linesearch,
    )
