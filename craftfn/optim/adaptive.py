"""Adaptive scaling rules: the Adam family, the RMSProp family, Lion, Adadelta, Adafactor's moments.

Each is a primitive in optax's sense (``scale_by_*``): it turns gradients into a
direction, to be followed by ``scale_by_learning_rate``. States are NamedTuples named
as in optax (``ScaleByAdamState(count, mu, nu)`` ...). Moments are updated with
multi-tensor ``torch._foreach_*`` kernels per (device, dtype) group, in torch.optim's
operation order where torch has the rule; step counts are 0-d int64 tensors and bias
corrections stay tensors (no host reads). Hyperparameters may be numbers or 0-d tensors
(``inject_hyperparams``).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": torch.zeros(3)})
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.base import GradientTransformation, Params, Updates, check_hyperparameter
from craftfn.optim.transforms import (
    _bias_correction,
    _cast_to,
    _check_betas,
    _check_state,
    _count_like,
    _flatten_like,
    _is_zero,
    _lerp,
    _scalar,
    _scalar_dtype,
    foreach_groups,
    foreach_map,
)

__all__ = [
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
]


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
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    max_raw_nu: bool = False,
) -> GradientTransformation:
    """AMSGrad: Adam with the running maximum of the second moment in the denominator.

    optax's rule (the default): ``nu_max = max(nu_max, nu_hat)`` over the bias-corrected
    ``nu_hat = nu / (1 - b2^t)``; update ``mu_hat / (sqrt(nu_max + eps_root) + eps)``.
    With ``max_raw_nu=True``, torch's rule (``torch.optim.Adam(amsgrad=True)``): the maximum is
    taken over the raw ``nu`` and bias-corrected afterwards,
    ``mu_hat / (sqrt(max(nu_max, nu) / (1 - b2^t) + eps_root) + eps)``. The two agree once
    ``b2^t`` is negligible.

    Args:
        b1, b2, eps, eps_root, mu_dtype: as :func:`scale_by_adam`.
        bias_correction_mu, bias_correction_nu: divide ``mu`` / ``nu`` by ``1 - b^t`` (optax's
            arguments; torch's rule needs both True).
        max_raw_nu: take torch's variant (see above).

    Returns:
        A transformation with state :class:`ScaleByAmsgradState`.

    Example:
        >>> tx = optim.scale_by_amsgrad()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u
        {'w': tensor([1.])}
    """
    _check_adam_args(b1, b2, eps, eps_root)
    if max_raw_nu and not (bias_correction_mu and bias_correction_nu):
        raise ValueError("scale_by_amsgrad: max_raw_nu=True (torch's rule) bias-corrects both moments; "
                         f"got bias_correction_mu={bias_correction_mu}, bias_correction_nu={bias_correction_nu}")

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
        bc2 = _bias_correction(b2, count)
        if max_raw_nu:
            new_max = foreach_groups(torch._foreach_maximum, _cast_to(nu_max, new_nu), new_nu)
            out = foreach_groups(
                lambda v, m, gg: _adam_direction(m, _adam_denominator(v, bc2, eps, eps_root), gg, count, b1, False),
                new_max, _cast_to(new_mu, new_max), g_nu,
            )
        else:
            # optax: nu_max = max(nu_max, nu_hat); update mu_hat / (sqrt(nu_max + eps_root) + eps).
            one = torch.ones((), dtype=torch.float64, device=count.device)
            bc1 = _bias_correction(b1, count) if bias_correction_mu else one
            bc2 = bc2 if bias_correction_nu else one
            nu_hat = foreach_groups(lambda v: torch._foreach_div(v, bc2.to(device=v[0].device, dtype=v[0].dtype)), new_nu)
            new_max = foreach_groups(torch._foreach_maximum, _cast_to(nu_max, nu_hat), nu_hat)

            def direction(v: list[torch.Tensor], m: list[torch.Tensor]) -> list[torch.Tensor]:
                d = torch._foreach_add(v, _scalar(eps_root, v))
                torch._foreach_sqrt_(d)
                torch._foreach_add_(d, _scalar(eps, d))
                out = torch._foreach_div(m, bc1.to(device=m[0].device, dtype=m[0].dtype))
                torch._foreach_div_(out, d)
                return out

            out = foreach_groups(direction, new_max, _cast_to(new_mu, new_max))
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
    check_hyperparameter("threshold", threshold)
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
