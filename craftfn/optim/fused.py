"""The in-place (donated) Adam-family step on torch's fused kernels.

:func:`fused_adam_step_` is the one place craftfn calls ``torch._fused_adam_`` /
``torch._fused_adamw_``. The aliases ``adam``, ``adamw``, ``amsgrad`` (and the adam
rules wrapped by ``inject_hyperparams``) use it for their ``donated_update``: the
caller donated params and state, so their buffers are overwritten in place, which is
what makes a pure API as fast as ``torch.optim.AdamW(fused=True)``.

The rule is Adam(W) exactly as torch.optim has it (and as craftfn's
``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`` computes it)::

    p   <- p * (1 - lr * weight_decay)              # decoupled weight decay
    mu  <- lerp(mu, g, 1 - b1)
    nu  <- b2 * nu + (1 - b2) * g^2
    v   <- max(max_nu, nu) if amsgrad else nu        (max_nu updated in place)
    p   <- p - lr / (1 - b1^t) * mu / (sqrt(v) / sqrt(1 - b2^t) + eps)

Example:
    >>> import torch
    >>> from craftfn.optim.fused import fused_adam_step_
    >>> p, g = [torch.ones(3)], [torch.ones(3)]
    >>> mu, nu = [torch.zeros(3)], [torch.zeros(3)]
    >>> fused_adam_step_(p, g, mu, nu, None, torch.tensor(1), lr=0.1, b1=0.9, b2=0.999, eps=1e-8)
    >>> p[0]
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from craftfn import tree

__all__ = ["adam_update_out_of_place", "fused_adam_step_", "fused_supported"]

_FUSED_DEVICE_TYPES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_supported(*lists: Sequence[torch.Tensor]) -> bool:
    """True when torch's fused Adam kernel can update these parallel leaf lists in place.

    Every tensor must be a floating tensor on a CPU or CUDA device, and the tensors at
    one position (param, moment, ...) must share shape, dtype and device (the kernel does
    not cast, and it indexes every list with the first one's sizes). Gradients are not
    checked: :func:`fused_adam_step_` checks and casts them.

    Example:
        >>> fused_supported([torch.zeros(2)], [torch.zeros(2)])
        True
        >>> fused_supported([torch.zeros(2)], [torch.zeros(2, dtype=torch.bfloat16)])
        False
    """
    for items in zip(*lists):
        first = items[0]
        if not isinstance(first, torch.Tensor) or first.dtype not in _FUSED_DTYPES or first.device.type not in _FUSED_DEVICE_TYPES:
            return False
        for t in items[1:]:
            if not isinstance(t, torch.Tensor) or t.dtype != first.dtype or t.device != first.device or t.shape != first.shape:
                return False
    return True


# torch 2.13 cannot put ``torch._fused_adamw_`` through AOT autograd (functionalization
# fails on the CPU kernel; its tensor-lr overload has no fake kernel). Under torch.compile the
# same kernel is called through this custom op: it declares what it mutates and has a fake
# (shape-only) implementation, so AOT functionalizes it and inductor puts it back in place.
@torch.library.custom_op(
    "craftfn::fused_adamw_",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
    schema=(
        "(Tensor(a!)[] params, Tensor(e!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor step, Tensor lr, float beta1, float beta2, float weight_decay, "
        "float eps, bool amsgrad, Tensor? grad_scale) -> ()"
    ),
)
def _fused_adamw_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    step: torch.Tensor,
    lr: torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    grad_scale: Optional[torch.Tensor],
) -> None:
    # With grad_scale the kernel divides the gradients by it and writes them back (hence grads(e!)).
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, [step] * len(params),
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=False,
        grad_scale=grad_scale,
    )


@_fused_adamw_op.register_fake
def _fused_adamw_fake(*args: object) -> None:
    return None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fused_adam_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    mu: Sequence[torch.Tensor],
    nu: Sequence[torch.Tensor],
    max_nu: Optional[Sequence[torch.Tensor]],
    count: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    b1: float | torch.Tensor,
    b2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor = 0.0,
    amsgrad: bool = False,
    grad_divisor: Optional[torch.Tensor] = None,
) -> None:
    """One Adam(W)/AMSGrad step, in place on ``params``, ``mu``, ``nu`` (and ``max_nu``).

    Leaves are grouped by (device, dtype) and each group goes through one
    ``torch._fused_adamw_`` call when every hyperparameter but ``lr`` is a Python
    number (the kernel takes them as doubles); otherwise (0-d tensor betas, say from
    ``inject_hyperparams``) the same rule runs as in-place ``torch._foreach_*`` ops.
    Nothing is read back to the host either way.

    Args:
        params, grads, mu, nu: parallel lists of tensors; ``params``, ``mu``, ``nu``
            (and ``max_nu``) must agree in dtype and device per leaf (see
            :func:`fused_supported`). ``grads`` are cast to the params' dtype; their
            buffers may be overwritten (they are donated too).
        max_nu: running maxima for AMSGrad (updated in place), or ``None``.
        count: the step number ``t >= 1`` of this update, i.e. the state's count *after*
            incrementing, a 0-d tensor (any dtype). It is not modified.
        lr: learning rate, a number or a 0-d tensor.
        b1, b2, eps, weight_decay: numbers or 0-d tensors; ``weight_decay`` is decoupled
            (AdamW: ``p *= 1 - lr * weight_decay``); use 0 for Adam.
        amsgrad: use ``max(max_nu, nu)`` in the denominator.
        grad_divisor: a 0-d tensor (or None): the step uses ``grads / grad_divisor``. The kernel
            divides as it reads each gradient (torch's ``grad_scale``, in float32) and writes the
            quotient back into ``grads``, so a global clip costs no pass of its own.

    Returns:
        None; the lists' tensors hold the new values.

    Example:
        >>> p, g, m, v = [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)]
        >>> fused_adam_step_(p, g, m, v, None, torch.tensor(1), lr=torch.tensor(0.5), b1=0.9, b2=0.999, eps=0.0)
        >>> p[0]
        tensor([0.5000, 0.5000])
    """
    params, grads, mu, nu = list(params), list(grads), list(mu), list(nu)
    n = len(params)
    if not (len(grads) == len(mu) == len(nu) == n):
        raise ValueError(f"fused_adam_step_: params, grads, mu, nu must have the same length, got {n}, {len(grads)}, {len(mu)}, {len(nu)}")
    if amsgrad and (max_nu is None or len(max_nu) != n):
        raise ValueError("fused_adam_step_: amsgrad=True needs max_nu, a list as long as params")
    if n == 0:
        return
    max_list = list(max_nu) if amsgrad and max_nu is not None else []
    # The kernel indexes every list with the parameter's sizes: anything else reads out of bounds.
    tree.check_match(grads, params, name="fused_adam_step_: grads")
    moments = {"mu": mu, "nu": nu, **({"max_nu": max_list} if amsgrad else {})}
    tree.check_match(moments, {k: params for k in moments}, name="fused_adam_step_: moments", dtype="any", device=False)
    if not fused_supported(params, mu, nu, *([max_list] if amsgrad else [])):
        raise ValueError(
            "fused_adam_step_: params, mu, nu (and max_nu) must be floating tensors on cpu/cuda with matching "
            "dtype and device per leaf; check fused_supported(...) first"
        )
    _fused_adam_step(params, grads, mu, nu, max_list, count, lr, b1, b2, eps, weight_decay, amsgrad, grad_divisor)


def _fused_adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    mu: list[torch.Tensor],
    nu: list[torch.Tensor],
    max_list: list[torch.Tensor],
    count: torch.Tensor,
    lr: float | torch.Tensor,
    b1: float | torch.Tensor,
    b2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    amsgrad: bool,
    grad_divisor: Optional[torch.Tensor] = None,
) -> None:
    """:func:`fused_adam_step_` for callers that validated the lists (shapes, dtypes, devices) already."""
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]
    use_kernel = all(_is_number(x) for x in (b1, b2, eps, weight_decay))
    groups = tree.group_by_device_dtype(params, grads, mu, nu, *([max_list] if amsgrad else []))
    for group in groups:
        gp, gg, gm, gv = group[:4]
        gmax = group[4].tensors if amsgrad else []
        device = gp.device
        step = count.to(device=device, dtype=torch.float32)
        if isinstance(lr, torch.Tensor):
            # The CUDA kernel reads a float32 lr tensor on the params' device; the CPU one takes any.
            group_lr = lr.to(device=device, dtype=torch.float32 if device.type == "cuda" else lr.dtype)
        else:
            group_lr = float(lr)
        # The kernel reads its gradient scale as a float32 tensor on the params' device.
        scale = grad_divisor.to(device=device, dtype=torch.float32) if grad_divisor is not None else None
        if use_kernel and torch.compiler.is_compiling():
            lr_t = group_lr if isinstance(group_lr, torch.Tensor) else torch.tensor(group_lr, dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)
            _fused_adamw_op(
                gp.tensors, gg.tensors, gm.tensors, gv.tensors, gmax, step, lr_t,
                float(b1), float(b2), float(weight_decay), float(eps), amsgrad, scale,
            )
        elif use_kernel:
            # One float step tensor shared by every leaf: the kernel reads it and never writes it.
            torch._fused_adamw_(
                gp.tensors, gg.tensors, gm.tensors, gv.tensors, gmax, [step] * len(gp.tensors),
                lr=group_lr, beta1=float(b1), beta2=float(b2), weight_decay=float(weight_decay), eps=float(eps),
                amsgrad=amsgrad, maximize=False, grad_scale=scale,
            )
        else:
            if scale is not None:
                torch._foreach_div_(gg.tensors, scale.to(gg.dtype))
            _foreach_adam_step_(gp.tensors, gg.tensors, gm.tensors, gv.tensors, gmax, step, group_lr, b1, b2, eps, weight_decay, amsgrad)


def _check_0d(where: str, **scalars: torch.Tensor) -> None:
    """Raise naming the first input that is not a 0-d tensor, or the dtypes when they differ."""
    for name, x in scalars.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 0:
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)
            raise ValueError(f"{where}: {name} must be a number or a 0-d tensor, got {got}")
    dtypes = {name: x.dtype for name, x in scalars.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{where}: inputs must share one dtype, got {dtypes}")


def _step_scalars(t: torch.Tensor, lr: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``[lr / (1 - b1^t), sqrt(1 - b2^t), lr]`` as a 1-d tensor: the op's body, differentiable."""
    return torch.stack([lr / (1.0 - torch.pow(b1, t)), torch.sqrt(1.0 - torch.pow(b2, t)), lr])


# The per-step scalars of the out-of-place rule, as one op inductor treats as opaque: its output is
# a buffer computed once per step. Written as plain tensor ops, inductor inlines a 0-d computation
# into every consumer, i.e. recomputes pow (and a schedule's ops) in every vector of every leaf.
@torch.library.custom_op("craftfn::adam_step_scalars", mutates_args=())
def _adam_step_scalars(t: torch.Tensor, lr: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """:func:`_step_scalars` (0-d inputs of one dtype), opaque to compilers; it has no autograd formula."""
    _check_0d("craftfn::adam_step_scalars", t=t, lr=lr, b1=b1, b2=b2)
    return _step_scalars(t, lr, b1, b2)


@_adam_step_scalars.register_fake
def _adam_step_scalars_fake(t: torch.Tensor, lr: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    _check_0d("craftfn::adam_step_scalars", t=t, lr=lr, b1=b1, b2=b2)  # so the real op's dtype is t's
    return t.new_empty(3)


# fp16/bf16 leaves are computed in float32 and rounded once, as torch's fused kernel does: in the
# leaf's own dtype eps=1e-8 is 0 in fp16 (0/0 for a zero gradient) and b2=0.999 is 1.0 in bf16.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def adam_update_out_of_place(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    mu: Sequence[torch.Tensor],
    nu: Sequence[torch.Tensor],
    max_nu: Optional[Sequence[torch.Tensor]],
    count: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    b1: float | torch.Tensor,
    b2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: Sequence[float | torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The rule of :func:`fused_adam_step_` as new tensors: ``(updates, mu, nu, max_nu)``, inputs untouched.

    Written for compilers (``craftfn.jit``): per-leaf pointwise ops, which inductor fuses into one
    out-of-place kernel per leaf that reads ``g, mu, nu, p`` once and writes the new moments and
    updates (``apply_updates`` after it fuses in too: the updates are never stored). The step's
    scalars (``lr / (1 - b1^t)``, ``sqrt(1 - b2^t)``, a scheduled ``lr``) come from one small op
    inductor cannot inline, so they are computed once, in float64 like the kernel; inlined,
    inductor repeats them in every vector of every leaf (51.5M parameters, the two ``pow``:
    167 ms/step, slower than eager, instead of 72).
    Eagerly it runs too, as plain tensor ops (slower than the fused kernel).
    float16/bfloat16 leaves are computed in float32 (as the kernel does) and the new moments and
    updates rounded to their dtypes once. With an ``lr``, ``b1`` or ``b2`` that requires grad the
    scalars are plain tensor ops, so gradients reach them (the opaque op has no derivative).

    Args:
        params, grads, mu, nu: parallel lists (same shapes; grads are cast to the params' dtype).
        max_nu: AMSGrad's running maxima of ``nu`` (torch's rule), or ``None``.
        count: the step number ``t >= 1`` of this update, a 0-d tensor.
        lr, b1, b2, eps: numbers or 0-d tensors.
        weight_decay: per leaf, the decoupled decay (0 for none).

    Raises:
        ValueError: lists of other lengths or shapes than ``params`` (``tree.check_match``'s
            message), a ``weight_decay`` not one per leaf, a hyperparameter that is not 0-d.

    Returns:
        ``(updates, mu, nu, max_nu)``: lists of new tensors (``max_nu`` empty without AMSGrad);
        ``params + updates`` is the step.

    Example:
        >>> u, m, v, _ = adam_update_out_of_place([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], None,
        ...                                      torch.tensor(1), lr=0.5, b1=0.9, b2=0.999, eps=0.0, weight_decay=[0.0])
        >>> u[0]
        tensor([-0.5000, -0.5000])
    """
    params, grads, mu, nu = list(params), list(grads), list(mu), list(nu)
    max_list = list(max_nu) if max_nu is not None else None
    weight_decay = list(weight_decay)
    where = "adam_update_out_of_place"
    # fused_adam_step_'s checks (the one tree check): without them zip truncates and shapes broadcast.
    tree.check_match(grads, params, name=f"{where}: grads")
    moments = {"mu": mu, "nu": nu, **({"max_nu": max_list} if max_list is not None else {})}
    tree.check_match(moments, {k: params for k in moments}, name=f"{where}: moments")
    if len(weight_decay) != len(params):
        raise ValueError(f"{where}: weight_decay needs one entry per param ({len(params)}), got {len(weight_decay)}: {weight_decay!r}")
    if not params:
        return [], [], [], []
    device = params[0].device
    # float64 (float32 on mps) on the parameters' device, as the kernel's scalars.
    lr_t, b1_t, b2_t, eps_t = (_as_tensor(x, device) for x in (lr, b1, b2, eps))
    _check_0d(where, lr=lr_t, b1=b1_t, b2=b2_t, eps=eps_t)
    t = _as_tensor(count, device)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (lr_t, b1_t, b2_t)):
        scalars = _step_scalars(t, lr_t, b1_t, b2_t)  # the op has no autograd formula: plain ops
    else:
        # lr comes back out of the op too: a schedule's ops then run once, not per vector.
        scalars = _adam_step_scalars(t, lr_t, b1_t, b2_t)
    step_size, bc2_sqrt, lr_t = scalars.unbind()
    updates, new_mu, new_nu, new_max = [], [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, mu, nu)):
        dt = p.dtype
        cd = torch.float32 if dt in _LOW_PRECISION else dt  # the compute dtype

        def cast(x: torch.Tensor, p: torch.Tensor = p, cd: torch.dtype = cd) -> torch.Tensor:
            return x.to(device=p.device, dtype=cd)

        # For float32/float64 leaves every cast below is skipped: their graph is what it was.
        g = g.to(cd)
        m0, v0 = m, v
        if cd != dt:
            m, v = m.to(cd), v.to(cd)
        m = torch.lerp(m, g, cast(1.0 - b1_t))
        v = v * cast(b2_t) + g * g * cast(1.0 - b2_t)
        new_mu.append(m.to(m0.dtype) if cd != dt else m)
        new_nu.append(v.to(v0.dtype) if cd != dt else v)
        if max_list is not None:
            old_max = max_list[i]
            v = torch.maximum(old_max.to(cd) if cd != dt else old_max, v)
            new_max.append(v.to(old_max.dtype) if cd != dt else v)
        denom = torch.sqrt(v) / cast(bc2_sqrt) + cast(eps_t)
        u = -(m * cast(step_size)) / denom
        wd = weight_decay[i]
        if not (isinstance(wd, (int, float)) and wd == 0):
            u = (p.to(cd) if cd != dt else p) * cast(-lr_t * _as_tensor(wd, device)) + u
        updates.append(u.to(dt) if cd != dt else u)
    return updates, new_mu, new_nu, new_max


def _as_tensor(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float64 if device.type != "mps" else torch.float32) if isinstance(x, torch.Tensor) else torch.tensor(
        float(x), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device
    )


def _foreach_adam_step_(
    p: list[torch.Tensor],
    g: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    vmax: list[torch.Tensor],
    step: torch.Tensor,
    lr: float | torch.Tensor,
    b1: float | torch.Tensor,
    b2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    amsgrad: bool,
) -> None:
    """The fused rule with tensor hyperparameters, as in-place multi-tensor ops (no host reads)."""
    device = p[0].device
    lr_t, b1_t, b2_t, eps_t, wd_t = (_as_tensor(x, device) for x in (lr, b1, b2, eps, weight_decay))
    t = step.to(lr_t.dtype)
    torch._foreach_mul_(p, (1.0 - lr_t * wd_t))
    torch._foreach_mul_(m, b1_t)
    torch._foreach_add_(m, torch._foreach_mul(g, 1.0 - b1_t))
    torch._foreach_mul_(v, b2_t)
    g2 = torch._foreach_mul(g, g)
    torch._foreach_mul_(g2, 1.0 - b2_t)
    torch._foreach_add_(v, g2)
    if amsgrad:
        torch._foreach_maximum_(vmax, v)
        v = vmax
    bc1 = 1.0 - torch.pow(b1_t, t)
    bc2 = 1.0 - torch.pow(b2_t, t)
    d = torch._foreach_sqrt(v)
    torch._foreach_div_(d, torch.sqrt(bc2))
    torch._foreach_add_(d, eps_t)
    delta = torch._foreach_div(m, d)
    torch._foreach_mul_(delta, -lr_t / bc1)
    torch._foreach_add_(p, delta)
