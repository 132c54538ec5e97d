"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for 2-D weights.

Muon (Jordan et al., 2024) replaces the momentum of each weight matrix by (an
approximation of) the nearest semi-orthogonal matrix, ``U V^T`` from its SVD, computed
with a few quintic Newton-Schulz iterations; it is meant for the hidden matrices of a
network, so :func:`muon` sends every 2-D parameter through it and every other one
(biases, norms, ...) through AdamW.

Layout: torch's ``(out_features, in_features)``. The orthogonalised update is scaled
by ``sqrt(max(1, out / in))`` (Keller Jordan's reference implementation).

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
from craftfn.optim.base import GradientTransformation, Params, ScalarOrSchedule, Updates, chain, check_hyperparameter
from craftfn.optim.combine import partition
from craftfn.optim.sharding import refuse_sharded
from craftfn.optim.transforms import (
    MaskOrFn,
    _cast_to,
    _check_state,
    _count_like,
    _flatten_like,
    _lerp,
    add_decayed_weights,
    foreach_map,
    scale_by_learning_rate,
)

__all__ = ["MuonState", "orthogonalize_via_newton_schulz", "scale_by_muon", "muon"]

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


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`: the update count and the momentum."""

    count: torch.Tensor
    mu: Updates


def scale_by_muon(
    ns_coeffs: tuple[float, float, float] = _NS_COEFFS,
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    mu_dtype: Optional[torch.dtype] = None,
    *,
    nesterov: bool = True,
) -> GradientTransformation:
    """Muon's direction for matrices: ``mu = beta mu + (1 - beta) g``; the update is
    ``NS(beta mu + (1 - beta) g)`` (Nesterov) or ``NS(mu)``, times ``sqrt(max(1, rows / cols))``.

    Leaves of the same shape are stacked and orthogonalised together (batched matmuls).
    Every leaf must have at least 2 dims (use :func:`muon` to route the others elsewhere).

    Args:
        ns_coeffs: the quintic Newton-Schulz coefficients ``(a, b, c)``.
        ns_steps: number of iterations, ``>= 1``.
        beta: momentum decay in ``[0, 1)``.
        eps: added to the Frobenius norm before normalising.
        mu_dtype: dtype of the momentum (default: the parameters').
        nesterov: orthogonalise the Nesterov look-ahead rather than the momentum.

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
        refuse_sharded("scale_by_muon (Muon)", "it orthogonalizes each whole matrix")
        _check_state("scale_by_muon", state, MuonState)
        g, treedef, (mu,) = _flatten_like(updates, "scale_by_muon", state.mu)
        for name, x in zip(tree.paths(updates), g):
            if x.ndim < 2:
                raise ValueError(f"scale_by_muon: leaf {name!r} has shape {tuple(x.shape)}; Muon needs matrices (use optim.muon, which sends other leaves to AdamW)")

        def step(m: list[torch.Tensor], gg: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            new_m = _lerp(m, gg, 1.0 - beta)
            look = _lerp(gg, new_m, beta) if nesterov else new_m
            return new_m, look

        new_mu, look = foreach_map(step, mu, _cast_to(g, mu), num_outputs=2)
        # One batched Newton-Schulz per distinct (shape, dtype, device): transformer blocks
        # repeat the same matrix shapes, so this is a handful of bmm chains, not one per leaf.
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, x in enumerate(look):
            buckets[(tuple(x.shape), x.dtype, x.device)].append(i)
        out: list[Any] = [None] * len(look)
        for (shape, _, _), idx in buckets.items():
            ortho = orthogonalize_via_newton_schulz(torch.stack([look[i] for i in idx]), ns_coeffs, ns_steps, eps)
            ortho = ortho * math.sqrt(max(1.0, shape[-2] / shape[-1]))
            for j, i in enumerate(idx):
                out[i] = ortho[j].to(g[i].dtype)
        return tree.unflatten(treedef, out), MuonState(count=state.count + 1, mu=tree.unflatten(treedef, new_mu))

    return GradientTransformation(init_fn, update_fn)


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
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
) -> GradientTransformation:
    """Muon for 2-D parameters, AdamW for the rest (labelled by ``ndim``).

    ``partition({"muon": chain(scale_by_muon(...), add_decayed_weights(weight_decay), lr),
    "adam": adamw(lr, adam_b1, adam_b2, eps, adam_eps_root, weight_decay=adam_weight_decay)},
    lambda name, p: "muon" if p.ndim == 2 else "adam")``. The AdamW part keeps its fused
    donated path. For other routings (e.g. embeddings through AdamW), build the partition
    yourself with :func:`scale_by_muon`.

    Example:
        >>> tx = optim.muon(0.02)
        >>> sorted(tx.init({"w": torch.zeros(4, 4), "b": torch.zeros(4)}).inner_states)
        ['adam', 'muon']
    """
    check_hyperparameter("learning_rate", learning_rate)
    muon_part = chain(
        scale_by_muon(ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov),
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
    adam_part = adamw(learning_rate, adam_b1, adam_b2, eps, adam_eps_root, mu_dtype, weight_decay=adam_weight_decay)
    return partition({"muon": muon_part, "adam": adam_part}, lambda name, p: "muon" if p.ndim == 2 else "adam")
