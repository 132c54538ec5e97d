"""optax's ``tree_utils`` names for craftfn (``optax.tree_utils.tree_add`` ... ``tree_get``).

Where :mod:`craftfn.tree` or :mod:`craftfn.optim` already has the operation, the name is an
alias of it; the rest are small leafwise functions. Reductions return 0-d tensors (no host sync).

Example:
    >>> import torch
    >>> from craftfn.optim import tree_utils as otu
    >>> otu.tree_add_scale({"w": torch.ones(2)}, 0.5, {"w": torch.ones(2)})
    {'w': tensor([1.5000, 1.5000])}
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from craftfn import tree
from craftfn.optim.rules import bias_corrected, moment, moment_sq
from craftfn.optim.wrappers import tree_get, tree_set
from craftfn.tree import PyTree

__all__ = [
    "tree_add",
    "tree_sub",
    "tree_mul",
    "tree_div",
    "tree_scale",
    "tree_add_scale",
    "tree_vdot",
    "tree_sum",
    "tree_max",
    "tree_min",
    "tree_size",
    "tree_norm",
    "tree_zeros_like",
    "tree_ones_like",
    "tree_full_like",
    "tree_allclose",
    "tree_cast",
    "tree_cast_like",
    "tree_dtype",
    "tree_clip",
    "tree_where",
    "tree_real",
    "tree_conj",
    "tree_bias_correction",
    "tree_update_moment",
    "tree_update_moment_per_elem_norm",
    "tree_update_infinity_moment",
    "tree_get",
    "tree_set",
    "tree_get_all_with_path",
]

tree_add = tree.add
tree_sub = tree.sub
tree_mul = tree.mul
tree_vdot = tree.vdot
tree_zeros_like = tree.zeros_like
tree_ones_like = tree.ones_like
tree_full_like = tree.full_like
tree_allclose = tree.allclose


def tree_scale(scalar: Union[float, torch.Tensor], tree_: PyTree) -> PyTree:
    """``scalar * tree`` leafwise (optax's argument order).

    Example:
        >>> tree_scale(2.0, {"w": torch.ones(1)})
        {'w': tensor([2.])}
    """
    return tree.scale(scalar, tree_)


def tree_div(a: PyTree, b: PyTree) -> PyTree:
    """``a / b`` leafwise.

    Example:
        >>> tree_div({"w": torch.ones(1)}, {"w": torch.full((1,), 4.0)})
        {'w': tensor([0.2500])}
    """
    return tree.map(torch.div, a, b)


def tree_add_scale(a: PyTree, scalar: Union[float, torch.Tensor], b: PyTree) -> PyTree:
    """``a + scalar * b`` leafwise.

    Example:
        >>> tree_add_scale({"w": torch.zeros(1)}, 2.0, {"w": torch.ones(1)})
        {'w': tensor([2.])}
    """
    return tree.map(lambda x, y: x + scalar * y, a, b)


def _reduce(fn: Any, tree_: PyTree, start: torch.Tensor) -> torch.Tensor:
    out = start
    for x in tree.leaves(tree_):
        out = fn(out, x)
    return out


def tree_sum(tree_: PyTree) -> torch.Tensor:
    """The sum of all elements, a 0-d tensor.

    Example:
        >>> tree_sum({"a": torch.ones(2), "b": torch.ones(3)})
        tensor(5.)
    """
    return _reduce(lambda acc, x: acc + torch.sum(x), tree_, torch.zeros(()))


def tree_max(tree_: PyTree) -> torch.Tensor:
    """The largest element, a 0-d tensor.

    Example:
        >>> tree_max({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([2.0])})
        tensor(5.)
    """
    return _reduce(lambda acc, x: torch.maximum(acc, torch.amax(x)), tree_, torch.tensor(float("-inf")))


def tree_min(tree_: PyTree) -> torch.Tensor:
    """The smallest element, a 0-d tensor.

    Example:
        >>> tree_min({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([-2.0])})
        tensor(-2.)
    """
    return _reduce(lambda acc, x: torch.minimum(acc, torch.amin(x)), tree_, torch.tensor(float("inf")))


def tree_size(tree_: PyTree) -> int:
    """The number of elements (a Python int: shapes are static).

    Example:
        >>> tree_size({"a": torch.ones(2, 3), "b": torch.ones(())})
        7
    """
    return sum(x.numel() for x in tree.leaves(tree_))


def tree_norm(tree_: PyTree, ord: Union[int, str, None] = None, squared: bool = False) -> torch.Tensor:  # noqa: A002
    """The norm of all leaves together: ``ord`` None/2 (L2), 1, or ``"inf"``/``inf``; ``squared`` for L2 only.

    Example:
        >>> tree_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    if ord in (None, 2, "fro"):
        sq = tree.sum_of_squares(tree_)
        return sq if squared else torch.sqrt(sq)
    if squared:
        raise ValueError(f"tree_norm: squared=True needs the L2 norm (ord=None or 2), got ord={ord!r}")
    if ord == 1:
        return _reduce(lambda acc, x: acc + torch.sum(torch.abs(x)), tree_, torch.zeros(()))
    if ord in ("inf", float("inf")):
        return _reduce(lambda acc, x: torch.maximum(acc, torch.amax(torch.abs(x))), tree_, torch.zeros(()))
    raise ValueError(f"tree_norm: ord must be None, 1, 2 or 'inf', got {ord!r}")


def tree_cast(tree_: PyTree, dtype: Optional[torch.dtype]) -> PyTree:
    """Floating leaves cast to ``dtype`` (``None``: unchanged).

    Example:
        >>> tree_cast({"w": torch.ones(1)}, torch.float64)["w"].dtype
        torch.float64
    """
    return tree_ if dtype is None else tree.cast(tree_, dtype)


def tree_cast_like(tree_: PyTree, other: PyTree) -> PyTree:
    """Each leaf cast to the dtype of the matching leaf of ``other``.

    Example:
        >>> tree_cast_like({"w": torch.ones(1)}, {"w": torch.ones(1, dtype=torch.float16)})["w"].dtype
        torch.float16
    """
    return tree.map(lambda x, y: x.to(y.dtype), tree_, other)


def tree_dtype(tree_: PyTree, mixed_dtype_handler: Optional[str] = None) -> torch.dtype:
    """The leaves' common dtype; with mixed dtypes ``"lowest"``/``"highest"`` pick one (else ``ValueError``).

    Example:
        >>> tree_dtype({"w": torch.ones(1)})
        torch.float32
    """
    dtypes = {x.dtype for x in tree.leaves(tree_)}
    if len(dtypes) == 1:
        return dtypes.pop()
    if mixed_dtype_handler in ("lowest", "highest") and all(d.is_floating_point for d in dtypes):
        pick = min if mixed_dtype_handler == "lowest" else max
        return pick(dtypes, key=lambda d: torch.finfo(d).bits)
    raise ValueError(f"tree_dtype: leaves have dtypes {sorted(map(str, dtypes))}; pass mixed_dtype_handler='lowest' or 'highest'")


def tree_clip(tree_: PyTree, min_value: Optional[float] = None, max_value: Optional[float] = None) -> PyTree:
    """Every element clamped to ``[min_value, max_value]``.

    Example:
        >>> tree_clip({"w": torch.tensor([-2.0, 3.0])}, -1.0, 1.0)
        {'w': tensor([-1.,  1.])}
    """
    return tree.map(lambda x: torch.clamp(x, min=min_value, max=max_value), tree_)


def tree_where(condition: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """``torch.where(condition, a, b)`` leafwise, for a 0-d (or broadcastable) condition.

    Example:
        >>> tree_where(torch.tensor(True), {"w": torch.ones(1)}, {"w": torch.zeros(1)})
        {'w': tensor([1.])}
    """
    return tree.map(lambda a, b: torch.where(condition.to(a.device), a, b), on_true, on_false)


def tree_real(tree_: PyTree) -> PyTree:
    """The real part of every leaf (real leaves unchanged)."""
    return tree.map(lambda x: x.real if x.is_complex() else x, tree_)


def tree_conj(tree_: PyTree) -> PyTree:
    """The complex conjugate of every leaf (real leaves unchanged)."""
    return tree.map(lambda x: x.conj() if x.is_complex() else x, tree_)


def tree_bias_correction(moment_: PyTree, decay: float, count: torch.Tensor) -> PyTree:
    """``moment / (1 - decay^count)`` leafwise.

    Example:
        >>> tree_bias_correction({"m": torch.tensor([0.1])}, 0.9, torch.tensor(1))
        {'m': tensor([1.])}
    """
    return tree.map(lambda m: bias_corrected(m, decay, count), moment_)


def tree_update_moment(updates: PyTree, moments: PyTree, decay: float, order: int) -> PyTree:
    """``(1 - decay) g^order + decay m`` leafwise (order 1 or 2).

    Example:
        >>> tree_update_moment({"g": torch.tensor([2.0])}, {"g": torch.tensor([0.0])}, 0.5, 1)
        {'g': tensor([1.])}
    """
    if order == 1:
        return tree.map(lambda g, m: moment(g, m, decay), updates, moments)
    if order == 2:
        return tree.map(lambda g, m: moment_sq(g, m, decay), updates, moments)
    return tree.map(lambda g, m: (1 - decay) * g**order + decay * m, updates, moments)


def tree_update_moment_per_elem_norm(updates: PyTree, moments: PyTree, decay: float, order: int) -> PyTree:
    """``(1 - decay) |g|^order + decay m`` leafwise.

    Example:
        >>> tree_update_moment_per_elem_norm({"g": torch.tensor([-2.0])}, {"g": torch.tensor([0.0])}, 0.5, 2)
        {'g': tensor([2.])}
    """
    if order == 2:
        return tree.map(lambda g, m: moment_sq(g, m, decay), updates, moments)
    return tree.map(lambda g, m: (1 - decay) * torch.abs(g) ** order + decay * m, updates, moments)


def tree_update_infinity_moment(updates: PyTree, moments: PyTree, decay: float, eps: float) -> PyTree:
    """``max(|g| + eps, decay * m)`` leafwise (Adamax's moment).

    Example:
        >>> tree_update_infinity_moment({"g": torch.tensor([-2.0])}, {"g": torch.tensor([1.0])}, 0.5, 0.0)
        {'g': tensor([2.])}
    """
    return tree.map(lambda g, m: torch.maximum(torch.abs(g) + eps, decay * m), updates, moments)


def tree_get_all_with_path(tree_: PyTree, key: str) -> list[tuple[str, Any]]:
    """Every ``(dotted path, value)`` of a field named ``key`` in a state (see :func:`tree_get`).

    Example:
        >>> from craftfn import optim
        >>> s = optim.chain(optim.adam(0.1), optim.adam(0.1)).init({"w": torch.ones(1)})
        >>> [p for p, _ in tree_get_all_with_path(s, "count")]
        ['0.0.count', '1.0.count']
    """
    from craftfn.optim.wrappers import _find

    found: list[tuple[str, Any]] = []
    _find(tree_, key, "", found)
    return found
