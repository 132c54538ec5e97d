"""Hypothesis strategies for property-testing update rules: parameter trees and gradients shaped like them.

Tensor values come from a drawn seed (``torch.Generator``), not element by element:
hypothesis still explores and shrinks shapes, dtypes, structure and scale, and a
draw costs microseconds, so a property with 25 examples runs in well under a second.

Example:
    >>> from hypothesis import given
    >>> from craftfn.testing import param_trees, grads_like
    >>> @given(param_trees().flatmap(lambda p: grads_like(p).map(lambda g: (p, g))))
    ... def test_shapes(pg):
    ...     p, g = pg
    ...     assert [x.shape for x in tree.leaves(p)] == [x.shape for x in tree.leaves(g)]
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - hypothesis is in the dev extra
    raise ImportError("craftfn.testing's strategies need hypothesis: pip install 'craftfn[dev]' (or hypothesis)") from e

from craftfn import tree

__all__ = ["param_trees", "grads_like", "DEFAULT_DTYPES", "LEAF_NAMES"]

DEFAULT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16)
# Names as nn.Module.named_parameters() would give them, so name-based label functions get exercised.
LEAF_NAMES: tuple[str, ...] = ("weight", "bias", "scale", "embed", "proj", "norm")
_STRUCTURES = ("dict", "nested", "list", "mixed")


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@st.composite
def _leaf(draw: Any, dtypes: Sequence[torch.dtype], min_dims: int, max_dims: int, max_side: int) -> torch.Tensor:
    ndim = draw(st.integers(min_value=min_dims, max_value=max_dims))
    shape = tuple(draw(st.lists(st.integers(min_value=1, max_value=max_side), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    return _tensor(shape, dtype, seed, scale)


def param_trees(
    *,
    dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
    min_leaves: int = 1,
    max_leaves: int = 4,
    min_dims: int = 0,
    max_dims: int = 3,
    max_side: int = 4,
    structures: Sequence[str] = _STRUCTURES,
) -> st.SearchStrategy[Any]:
    """A strategy of small parameter pytrees: dicts, nested dicts, lists, and mixes of them.

    Leaves are tensors of ``min_dims`` to ``max_dims`` dimensions (sides 1..``max_side``) in ``dtypes``;
    dict keys are ``named_parameters()``-like names (``"weight"``, ``"bias"``, ...).

    Args:
        dtypes: leaf dtypes to draw from (default fp32, fp64, bf16).
        min_leaves: fewest leaves in a tree (>= 1).
        max_leaves: most leaves in a tree.
        min_dims: fewest dimensions of a leaf (0 allows 0-d leaves, like a learnable temperature).
        max_dims: most dimensions of a leaf.
        max_side: largest size of any dimension.
        structures: kinds of tree to draw: ``"dict"``, ``"nested"`` (dict of dicts),
            ``"list"``, ``"mixed"`` (dict holding a list and a dict).

    Returns:
        A hypothesis ``SearchStrategy`` of pytrees.

    Example:
        >>> params = param_trees(dtypes=[torch.float32]).example()
        >>> all(x.dtype == torch.float32 for x in tree.leaves(params))
        True
    """
    if not dtypes or any(not isinstance(d, torch.dtype) or not d.is_floating_point for d in dtypes):
        raise ValueError(f"param_trees: dtypes must be a non-empty list of floating torch dtypes, got {dtypes!r}")
    if not 1 <= min_leaves <= max_leaves:
        raise ValueError(f"param_trees: need 1 <= min_leaves <= max_leaves, got min_leaves={min_leaves}, max_leaves={max_leaves}")
    unknown = [s for s in structures if s not in _STRUCTURES]
    if not structures or unknown:
        raise ValueError(f"param_trees: structures must be a non-empty subset of {_STRUCTURES}, got {structures!r}")
    if not 0 <= min_dims <= max_dims:
        raise ValueError(f"param_trees: need 0 <= min_dims <= max_dims, got min_dims={min_dims}, max_dims={max_dims}")
    leaf = _leaf(dtypes, min_dims, max_dims, max_side)

    @st.composite
    def build(draw: Any) -> Any:
        n = draw(st.integers(min_value=min_leaves, max_value=max_leaves))
        kind = draw(st.sampled_from(list(structures)))
        leaves_ = [draw(leaf) for _ in range(n)]
        if kind == "list":
            return leaves_
        if kind == "dict" and n <= len(LEAF_NAMES):
            names = draw(st.lists(st.sampled_from(LEAF_NAMES), min_size=n, max_size=n, unique=True))
            return dict(zip(names, leaves_))
        if kind == "mixed" and n >= 2:
            split = draw(st.integers(min_value=1, max_value=n - 1))
            head = dict(zip(LEAF_NAMES, leaves_[split:]))
            return {"layers": leaves_[:split], "head": head}
        # "nested" (and the fallbacks): blocks of at most two leaves, like weight/bias pairs.
        out: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(0, n, 2):
            block = leaves_[i:i + 2]
            out[f"block{i // 2}"] = dict(zip(("weight", "bias"), block))
        return out

    return build()


def grads_like(params: Any, *, scales: Sequence[float] = (1e-3, 1.0, 10.0), nonfinite: bool = False) -> st.SearchStrategy[Any]:
    """A strategy of gradient trees with the structure, shapes and dtypes of ``params``.

    Args:
        params: the parameter tree to mirror.
        scales: standard deviations to draw from.
        nonfinite: put one NaN or inf into one drawn leaf (to test skipping rules).

    Returns:
        A hypothesis ``SearchStrategy`` of pytrees like ``params``.

    Example:
        >>> g = grads_like({"w": torch.zeros(2, 3)}).example()
        >>> g["w"].shape
        torch.Size([2, 3])
    """
    leaves_, treedef = tree.flatten(params)
    for name, x in zip(tree.paths(params), leaves_):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"grads_like: params leaf {name!r} must be a floating tensor, got {x!r:.60}")

    @st.composite
    def build(draw: Any) -> Any:
        seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
        scale = draw(st.sampled_from(list(scales)))
        out = [_tensor(tuple(x.shape), x.dtype, seed + i, scale) for i, x in enumerate(leaves_)]
        if nonfinite and out:
            i = draw(st.integers(min_value=0, max_value=len(out) - 1))
            pos = draw(st.integers(min_value=0, max_value=max(out[i].numel() - 1, 0)))
            bad = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
            flat = out[i].reshape(-1).clone()
            flat[pos] = bad
            out[i] = flat.reshape(out[i].shape)
        return tree.unflatten(treedef, out)

    return build()
