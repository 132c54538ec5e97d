"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for 2-D weights.

Muon (Jordan et al., 2024) replaces the momentum of each weight matrix by (an
approximation of) the nearest semi-orthogonal matrix, ``U V^T`` from its SVD, computed
with a few quintic Newton-Schulz iterations; it is meant for the hidden matrices of a
network, so :func:`muon` sends every 2-D parameter through it and every other one
(biases, norms, ...) through AdamW.

Layout: optax's default reads a matrix as ``(in, out)`` (JAX's) and scales the orthogonalised
update by ``sqrt(max(1, out / in))``; pass ``muon_weight_dimension_numbers=TORCH_LAYOUT`` for
torch's ``(out_features, in_features)`` weights (``torch.optim.Muon``'s scaling).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.muon(learning_rate=0.02)
    >>> params = {"w": torch.randn(8, 4), "b": torch.zeros(8)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(tree.map(torch.ones_like, params), state, params)
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple, Optional

import torch

from craftfn import tree
from craftfn.optim.aliases import adamw
from craftfn.optim.base import (
    EmptyState,
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    chain,
    check_hyperparameter,
)
from craftfn.optim.combine import partition
from craftfn.optim.rules import _nesterov_mu_hat, bias_corrected, moment
from craftfn.optim.transforms import (
    MaskOrFn,
    _cast_to,
    _check_state,
    _count_like,
    _flatten_like,
    add_decayed_weights,
    scale_by_learning_rate,
)

__all__ = ["MuonState", "MuonDimensionNumbers", "TORCH_LAYOUT", "orthogonalize_via_newton_schulz", "scale_by_muon", "scale_by_shape", "muon"]

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize_via_newton_schulz(x: torch.Tensor, ns_coeffs: tuple[float, float, float] = _NS_COEFFS, ns_steps: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """Approximately orthogonalise the matrices in the last two dims of ``x`` (batched over the rest).

    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, starting from ``x / ||x||_F``;
    with the default coefficients the singular values land in about ``[0.7, 1.2]``.

    Example:
        >>> o = orthogonalize_via_newton_schulz(torch.randn(16, 8))
        >>> s = torch.linalg.svdvals(o)
        >>> bool(((s > 0.5) & (s < 1.3)).all())
        True
    """
    if x.ndim < 2:
        raise ValueError(f"orthogonalize_via_newton_schulz: x must have at least 2 dims, got shape {tuple(x.shape)}")
    a, b, c = ns_coeffs
    transpose = x.shape[-2] > x.shape[-1]
    m = x.mT if transpose else x
    m = m / (torch.linalg.matrix_norm(m, keepdim=True) + eps)
    for _ in range(ns_steps):
        gram = m @ m.mT
        m = a * m + (b * gram + c * (gram @ gram)) @ m
    return m.mT if transpose else m


class MuonDimensionNumbers(NamedTuple):
    """Which axes of a matrix are its input (``reduction_axis``) and output (``output_axis``) axes.

    optax's default ``(0, 1)`` is JAX's ``(in, out)`` layout; torch's ``nn.Linear.weight`` is
    ``(out, in)``: ``MuonDimensionNumbers(reduction_axis=1, output_axis=0)`` (:data:`TORCH_LAYOUT`).
    The layout only sets the shape scaling ``sqrt(max(1, fan_out / fan_in))``.
    """

    reduction_axis: int = 0
    output_axis: int = 1


TORCH_LAYOUT = MuonDimensionNumbers(reduction_axis=1, output_axis=0)


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`: the update count and the momentum."""

    count: torch.Tensor
    mu: Updates


def _shape_scale(shape: tuple[int, ...], dims: MuonDimensionNumbers) -> float:
    fan_in, fan_out = shape[dims.reduction_axis], shape[dims.output_axis]
    return math.sqrt(max(1.0, fan_out / fan_in))


def scale_by_muon(
    ns_coeffs: tuple[float, float, float] = _NS_COEFFS,
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    bias_correction: bool = True,
) -> GradientTransformation:
    """Muon's direction for matrices (optax's ``scale_by_muon``): orthogonalise the momentum.

    ``mu = beta mu + (1 - beta) g``; with ``mu_hat`` the bias-corrected momentum (Nesterov:
    ``beta mu / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)``), the update is
    ``NS(mu_hat)``, or ``<mu_hat, NS(mu_hat)> NS(mu_hat)`` with ``adaptive``. The shape scaling
    is a separate step (:func:`muon` adds it). ``bias_correction=False`` is the reference /
    ``torch.optim.Muon`` rule (``NS(lerp(g, mu, beta))`` or ``NS(mu)``).

    Leaves of the same shape are stacked and orthogonalised together (batched matmuls).
    Every leaf must have at least 2 dims (use :func:`muon` to route the others elsewhere).

    Args:
        ns_coeffs: the quintic Newton-Schulz coefficients ``(a, b, c)``.
        ns_steps: number of iterations, ``>= 1``.
        beta: momentum decay in ``[0, 1)``.
        eps: added to the Frobenius norm before normalising.
        mu_dtype: dtype of the momentum (default: the parameters').
        nesterov: orthogonalise the Nesterov look-ahead rather than the momentum.
        adaptive: scale by the inner product of the momentum and its orthogonalisation.
        bias_correction: divide the momentum by ``1 - beta^t`` (optax) or not (torch).

    Example:
        >>> tx = scale_by_muon()
        >>> u, _ = tx.update({"w": torch.randn(4, 4)}, tx.init({"w": torch.zeros(4, 4)}))
        >>> tuple(u["w"].shape)
        (4, 4)
    """
    check_hyperparameter("beta", beta, low=0.0, high=1.0)
    check_hyperparameter("eps", eps)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"scale_by_muon: ns_steps must be an int >= 1, got {ns_steps!r}")

    def init_fn(params: Params) -> MuonState:
        return MuonState(count=_count_like(params), mu=tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates: Updates, state: MuonState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, MuonState]:
        del params, extra
        _check_state("scale_by_muon", state, MuonState)
        g, treedef, (mu,) = _flatten_like(updates, "scale_by_muon", state.mu)
        for name, x in zip(tree.paths(updates), g):
            if x.ndim < 2:
                raise ValueError(f"scale_by_muon: leaf {name!r} has shape {tuple(x.shape)}; Muon needs matrices (use optim.muon, which sends other leaves to AdamW)")
        count = state.count + 1
        gm = _cast_to(g, mu)
        new_mu = [moment(x, m, beta) for x, m in zip(gm, mu)]
        if not bias_correction:
            look = [torch.lerp(x, m, beta) for x, m in zip(gm, new_mu)] if nesterov else new_mu
        elif nesterov:
            look = [_nesterov_mu_hat(m, x, beta, count) for m, x in zip(new_mu, gm)]
        else:
            look = [bias_corrected(m, beta, count) for m in new_mu]
        # One batched Newton-Schulz per distinct (shape, dtype, device): transformer blocks
        # repeat the same matrix shapes, so this is a handful of bmm chains, not one per leaf.
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, x in enumerate(look):
            buckets[(tuple(x.shape), x.dtype, x.device)].append(i)
        out: list[Any] = [None] * len(look)
        for idx in buckets.values():
            ortho = orthogonalize_via_newton_schulz(torch.stack([look[i] for i in idx]), ns_coeffs, ns_steps, eps)
            for j, i in enumerate(idx):
                o = ortho[j]
                if adaptive:
                    o = torch.sum(look[i] * o) * o
                out[i] = o.to(g[i].dtype)
        return tree.unflatten(treedef, out), MuonState(count=count, mu=tree.unflatten(treedef, new_mu))

    return GradientTransformation(init_fn, update_fn)


def scale_by_shape(weight_dimension_numbers: Optional[MuonDimensionNumbers] = None, consistent_rms: Optional[float] = None) -> GradientTransformation:
    """Scale each matrix update by ``sqrt(max(1, fan_out / fan_in))``, or with ``consistent_rms`` by
    ``sqrt(max(fan_in, fan_out)) * consistent_rms`` (optax's Muon shape scaling).

    Example:
        >>> tx = scale_by_shape()
        >>> tx.update({"w": torch.ones(1, 4)}, tx.init(None))[0]["w"][0, 0]
        tensor(2.)
    """
    dims = weight_dimension_numbers or MuonDimensionNumbers()

    def scale_of(shape: tuple[int, ...]) -> float:
        if consistent_rms is not None:
            return math.sqrt(max(shape[dims.reduction_axis], shape[dims.output_axis])) * consistent_rms
        return _shape_scale(shape, dims)

    def update_fn(updates: Updates, state: Any, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        return tree.map(lambda u: u * scale_of(tuple(u.shape)), updates), state

    return GradientTransformation(lambda params: EmptyState(), update_fn)


def muon(
    learning_rate: ScalarOrSchedule,
    ns_coeffs: tuple[float, float, float] = _NS_COEFFS,
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: Optional[ScalarOrSchedule] = None,
    muon_weight_dimension_numbers: Optional[MuonDimensionNumbers] = None,
    consistent_rms: Optional[float] = None,
    bias_correction: bool = True,
) -> GradientTransformation:
    """Muon for 2-D parameters, AdamW for the rest (optax's ``contrib.muon``).

    ``partition({"muon": chain(scale_by_muon(...), scale_by_shape(...), add_decayed_weights(weight_decay),
    scale_by_learning_rate(lr)), "adam": adamw(adam_learning_rate or lr, adam_b1, adam_b2, eps, adam_eps_root,
    weight_decay=adam_weight_decay, nesterov=nesterov)}, lambda name, p: "muon" if p.ndim == 2 else "adam")``.

    For torch's ``(out, in)`` weights with the reference implementation's un-debiased momentum use
    ``muon(lr, muon_weight_dimension_numbers=TORCH_LAYOUT, bias_correction=False, ...)`` (not yet checked
    against ``torch.optim.Muon``, whose first step differs by ~2% of a step here).
    With ``nesterov=False`` the AdamW part keeps its fused donated path.

    Example:
        >>> tx = optim.muon(0.02)
        >>> sorted(tx.init({"w": torch.zeros(4, 4), "b": torch.zeros(4)}).inner_states)
        ['adam', 'muon']
    """
    check_hyperparameter("learning_rate", learning_rate)
    for arg, value in (("adam_b1", adam_b1), ("adam_b2", adam_b2)):
        check_hyperparameter(arg, value, low=0.0, high=1.0)
    check_hyperparameter("adam_eps_root", adam_eps_root)
    check_hyperparameter("adam_weight_decay", adam_weight_decay)
    muon_part = chain(
        scale_by_muon(ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov, adaptive=adaptive, bias_correction=bias_correction),
        scale_by_shape(muon_weight_dimension_numbers, consistent_rms),
        add_decayed_weights(weight_decay, mask=weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
    adam_part = adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=adam_b1, b2=adam_b2, eps=eps, eps_root=adam_eps_root, mu_dtype=mu_dtype, weight_decay=adam_weight_decay, nesterov=nesterov,
    )
    return partition({"muon": muon_part, "adam": adam_part}, lambda name, p: "muon" if p.ndim == 2 else "adam")
