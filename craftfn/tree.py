"""Pytree helpers over optree, with craftfn's namespace fixed in one place.

Every pytree operation in craftfn goes through this module so that types
registered by :mod:`craftfn.struct` (``TrainState``, optimizer states) are
seen as nodes, and ``None`` is an empty subtree rather than a leaf (as in JAX).

Example:
    >>> import torch
    >>> from craftfn import tree
    >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    >>> tree.global_norm(params)
    tensor(2.)
    >>> sorted(name for name, _ in tree.flatten_with_path(params)[0])
    ['b', 'w']
"""

from __future__ import annotations

import builtins
import operator
import threading
from collections import defaultdict
from typing import Any, Callable, Iterable, NamedTuple, Optional

import optree
import torch

NAMESPACE = "craftfn"

PyTree = Any
TreeDef = optree.PyTreeSpec

__all__ = [
    "NAMESPACE",
    "PyTree",
    "TreeDef",
    "map",
    "map_with_path",
    "leaves",
    "structure",
    "flatten",
    "unflatten",
    "flatten_with_path",
    "paths",
    "zeros_like",
    "ones_like",
    "full_like",
    "add",
    "sub",
    "mul",
    "scale",
    "vdot",
    "sum_of_squares",
    "global_norm",
    "allclose",
    "equal",
    "cast",
    "clone",
    "detach",
    "to",
    "all_finite",
    "LeafGroup",
    "group_by_device_dtype",
    "check_match",
    "leaf_mismatch",
]


def _options() -> dict[str, Any]:
    return {"none_is_leaf": False, "namespace": NAMESPACE}


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> PyTree:  # noqa: A001
    """Apply ``fn`` to every leaf (and the matching leaves of ``rest``).

    Example:
        >>> tree.map(lambda a, b: a + b, {"x": torch.ones(1)}, {"x": torch.ones(1)})
        {'x': tensor([2.])}
    """
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, **_options())


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like :func:`map`, but ``fn(name, leaf, *rest_leaves)`` also gets the dotted path name.

    Example:
        >>> tree.map_with_path(lambda n, x: n, {"a": [torch.ones(1)]})
        {'a': ['a.0']}
    """
    names, treedef = paths(tree), structure(tree)
    flat = [leaves(tree)] + [treedef.flatten_up_to(r) for r in rest]
    return unflatten(treedef, [fn(n, *xs) for n, *xs in zip(names, *flat)])


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in canonical order (dict keys sorted).

    Example:
        >>> tree.leaves({"b": torch.zeros(1), "a": torch.ones(1)})
        [tensor([1.]), tensor([0.])]
    """
    return optree.tree_leaves(tree, **_options())


def structure(tree: PyTree) -> TreeDef:
    """The tree structure (treedef) of ``tree``; static fields are part of it.

    Example:
        >>> tree.structure({"a": torch.ones(1)}).num_leaves
        1
    """
    return optree.tree_structure(tree, **_options())


def flatten(tree: PyTree) -> tuple[list[Any], TreeDef]:
    """Split ``tree`` into ``(leaves, treedef)``; :func:`unflatten` inverts it.

    Example:
        >>> leaves_, treedef = tree.flatten({"a": torch.ones(1)})
        >>> tree.unflatten(treedef, leaves_)
        {'a': tensor([1.])}
    """
    if _TRACE_TREEDEFS_ON and torch.compiler.is_compiling():
        return _flatten_in_trace(tree)
    return optree.tree_flatten(tree, **_options())


def unflatten(treedef: TreeDef, leaves_: Iterable[Any]) -> PyTree:
    """Rebuild a tree from ``treedef`` and leaves (see :func:`flatten`)."""
    out = optree.tree_unflatten(treedef, leaves_)
    if _TRACE_TREEDEFS_ON and torch.compiler.is_compiling():
        _TRACE_TREEDEFS.append((out, treedef))
    return out


# ----------------------------------------------------------------------------- treedefs in a trace
# Under torch.compile, dynamo runs optree's flatten as Python and builds one treedef object per node
# (measured: ~1 s of tracing per flatten of a 52-leaf dict), while reading a tree with a treedef it
# already has (flatten_up_to) costs a fifth of that. Inside a scope (_begin_treedef_memo, opened
# by make_train_step's compiled core), flatten and unflatten remember the treedef of each tree they
# see, compared by ``is`` (as _TRACE_TRUSTED; the real lists stay empty), and a later flatten of the
# same object reads it with that treedef. A tree changed in between is still flattened correctly:
# the treedef is reused only when it reads the tree with nothing but tensors at its leaves.
_TRACE_TREEDEFS: list[tuple[Any, TreeDef]] = []
_TRACE_TREEDEFS_ON: list[bool] = []


def _flatten_in_trace(tree: PyTree) -> tuple[list[Any], TreeDef]:
    for seen, treedef in _TRACE_TREEDEFS:
        if seen is tree:
            try:
                leaves_ = treedef.flatten_up_to(tree)
            except (ValueError, TypeError):
                break  # changed since: flatten it anew
            # A loop, not all(<generator>): dynamo traces a generator at ~5 ms per item.
            for x in leaves_:
                if not isinstance(x, torch.Tensor):
                    break  # a leaf became a subtree (or another kind of leaf): flatten it anew
            else:
                return leaves_, treedef
            break
    leaves_, treedef = optree.tree_flatten(tree, **_options())
    _TRACE_TREEDEFS.append((tree, treedef))
    return leaves_, treedef


def _begin_treedef_memo() -> bool:
    """Open a scope in which traced flattens reuse treedefs (see above); no-op when not tracing."""
    if not torch.compiler.is_compiling():
        return False
    _TRACE_TREEDEFS_ON.append(True)
    return True


def _end_treedef_memo(opened: bool) -> None:
    if opened:
        # del, not pop(): when the traced code raises, the caller's ``finally`` may run eagerly
        # after the trace, on the real (empty) lists.
        del _TRACE_TREEDEFS_ON[-1:]
        if not _TRACE_TREEDEFS_ON:
            del _TRACE_TREEDEFS[:]


def _entry_name(entry: Any) -> str:
    for attr in ("field", "name", "key", "index"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry.entry)


def paths(tree: PyTree) -> list[str]:
    """Dotted names of the leaves, in leaf order (``"opt_state.0.mu.fc.weight"``).

    NamedTuple fields and dataclass fields are named by field name; dict keys
    are used as they are, so parameter names keep ``named_parameters()`` form.

    Example:
        >>> tree.paths({"fc": {"weight": torch.ones(1)}, "n": [torch.ones(1)]})
        ['fc.weight', 'n.0']
    """
    accessors = optree.tree_accessors(tree, **_options())
    return [".".join(_entry_name(e) for e in acc) for acc in accessors]


def flatten_with_path(tree: PyTree) -> tuple[list[tuple[str, Any]], TreeDef]:
    """Like :func:`flatten`, with each leaf paired with its dotted name.

    Example:
        >>> pairs, _ = tree.flatten_with_path({"blocks": [{"w": torch.ones(1)}]})
        >>> pairs[0][0]
        'blocks.0.w'
    """
    leaves_, treedef = flatten(tree)
    return list(zip(paths(tree), leaves_)), treedef


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of zeros shaped like ``tree`` (optionally in ``dtype``).

    Example:
        >>> tree.zeros_like({"a": torch.ones(2)})
        {'a': tensor([0., 0.])}
    """
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of ones shaped like ``tree``."""
    return map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def full_like(tree: PyTree, value: float, dtype: torch.dtype | None = None) -> PyTree:
    """A tree filled with ``value`` shaped like ``tree``."""
    return map(lambda x: torch.full_like(x, value, dtype=dtype), tree)


def _foreach_binary(op: Callable, fallback: Callable, a: PyTree, b: PyTree) -> PyTree:
    leaves_a, treedef = flatten(a)
    leaves_b = treedef.flatten_up_to(b)
    if not leaves_a:
        return a
    return unflatten(treedef, op(leaves_a, leaves_b) if _foreach_ok(leaves_a, leaves_b) else [fallback(x, y) for x, y in zip(leaves_a, leaves_b)])


def _foreach_ok(*lists: list[Any]) -> bool:
    return all(isinstance(x, torch.Tensor) for lst in lists for x in lst)


def add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b`` (one multi-tensor kernel when leaves are tensors).

    Example:
        >>> tree.add({"a": torch.ones(1)}, {"a": torch.ones(1)})
        {'a': tensor([2.])}
    """
    return _foreach_binary(torch._foreach_add, lambda x, y: x + y, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``.

    Example:
        >>> tree.sub({"a": torch.ones(1)}, {"a": torch.ones(1)})
        {'a': tensor([0.])}
    """
    return _foreach_binary(torch._foreach_sub, lambda x, y: x - y, a, b)


def mul(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a * b``."""
    return _foreach_binary(torch._foreach_mul, lambda x, y: x * y, a, b)


def scale(factor: float | torch.Tensor, tree: PyTree) -> PyTree:
    """Multiply every leaf by ``factor`` (a number or a 0-d tensor).

    Example:
        >>> tree.scale(2.0, {"a": torch.ones(1)})
        {'a': tensor([2.])}
    """
    leaves_, treedef = flatten(tree)
    if not leaves_:
        return tree
    return unflatten(treedef, torch._foreach_mul(leaves_, factor))


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Sum over leaves of the inner products ``<a_i, b_i>``, as a 0-d fp32 tensor.

    Example:
        >>> tree.vdot({"a": torch.ones(3)}, {"a": torch.ones(3)})
        tensor(3.)
    """
    leaves_a, treedef = flatten(a)
    leaves_b = treedef.flatten_up_to(b)
    total = torch.zeros((), dtype=torch.float32, device=leaves_a[0].device if leaves_a else None)
    for x, y in zip(leaves_a, leaves_b):
        total = total + torch.sum(x.float() * y.float()).to(total.device)
    return total


def sum_of_squares(tree: PyTree) -> torch.Tensor:
    """Sum of squares of every element, as a 0-d fp32 tensor (no host sync)."""
    leaves_ = leaves(tree)
    if not leaves_:
        return torch.zeros((), dtype=torch.float32)
    device = leaves_[0].device
    # One fused norm per leaf group, then a single reduction: no Python per-element work.
    norms = []
    for group in group_by_device_dtype(leaves_):
        # Accumulate low-precision leaves in fp32: a bf16 norm is off in the third digit.
        acc = torch.float32 if group.dtype in (torch.bfloat16, torch.float16) else None
        norms.extend(n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(group.tensors, 2, dtype=acc))
    return torch.sum(torch.stack(norms) ** 2)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all leaves taken together (optax.global_norm), a 0-d fp32 tensor.

    Example:
        >>> tree.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    return torch.sqrt(sum_of_squares(tree))


def allclose(a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False) -> bool:
    """True when both trees have the same structure and every leaf pair is allclose.

    Meant for tests and checks outside steps (it reads values to the host).

    Example:
        >>> tree.allclose({"a": torch.ones(1)}, {"a": torch.ones(1) + 1e-9})
        True
    """
    leaves_a, def_a = flatten(a)
    leaves_b, def_b = flatten(b)
    if def_a != def_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            if x.shape != y.shape or not torch.allclose(x.to(y.dtype), y, rtol=rtol, atol=atol, equal_nan=equal_nan):
                return False
        elif x != y:
            return False
    return True


def equal(a: PyTree, b: PyTree) -> bool:
    """True when both trees have the same structure and bit-identical leaves (dtype included).

    Example:
        >>> tree.equal({"a": torch.ones(1)}, {"a": torch.ones(1)})
        True
    """
    leaves_a, def_a = flatten(a)
    leaves_b, def_b = flatten(b)
    if def_a != def_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def cast(tree: PyTree, dtype: torch.dtype, *, only_floating: bool = True) -> PyTree:
    """Cast leaves to ``dtype``; by default integer and bool leaves are kept as they are.

    Example:
        >>> tree.cast({"a": torch.ones(1), "n": torch.tensor(3)}, torch.bfloat16)
        {'a': tensor([1.], dtype=torch.bfloat16), 'n': tensor(3)}
    """
    def _cast(x: torch.Tensor) -> torch.Tensor:
        if only_floating and not (x.is_floating_point() or x.is_complex()):
            return x
        return x.to(dtype)

    return map(_cast, tree)


def clone(tree: PyTree) -> PyTree:
    """A copy of every tensor leaf (fresh storage)."""
    return map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def detach(tree: PyTree) -> PyTree:
    """Every tensor leaf detached from autograd (no copy)."""
    return map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def to(tree: PyTree, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PyTree:
    """Move tensor leaves to ``device`` (and floating leaves to ``dtype`` when given)."""
    def _to(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    return map(_to, tree)


def all_finite(tree: PyTree) -> torch.Tensor:
    """0-d bool tensor: every element of every floating leaf is finite (no host sync).

    Example:
        >>> tree.all_finite({"a": torch.tensor([1.0, float("nan")])})
        tensor(False)
    """
    # Empty leaves are finite (and have no inf norm: a shard of a sharded parameter may be empty).
    leaves_ = [x for x in leaves(tree) if x.is_floating_point() and x.numel()]
    if not leaves_:
        return torch.ones((), dtype=torch.bool)
    # The max-abs (inf) norm is NaN/inf exactly when some element is, and unlike a sum of
    # squares it never overflows on large finite values. One multi-tensor kernel per group.
    device = leaves_[0].device
    maxes = [
        n.to(device=device, dtype=torch.float32)
        for group in group_by_device_dtype(leaves_)
        for n in torch._foreach_norm(group.tensors, float("inf"))
    ]
    return torch.isfinite(torch.stack(maxes)).all()


class LeafGroup(NamedTuple):
    """Leaves that share (device, dtype), with their positions in the original list."""

    device: torch.device
    dtype: torch.dtype
    indices: list[int]
    tensors: list[torch.Tensor]


def group_by_device_dtype(*lists: list[torch.Tensor]) -> list[LeafGroup] | list[tuple[LeafGroup, ...]]:
    """Group tensors by (device, dtype) so each group can go through one ``torch._foreach_*`` call.

    With one list, returns ``[LeafGroup, ...]``. With several parallel lists (say params, grads,
    moments), grouping follows the first list and returns, per group, a tuple with one
    ``LeafGroup`` per list holding the matching tensors.

    Example:
        >>> groups = tree.group_by_device_dtype([torch.ones(1), torch.ones(1, dtype=torch.bfloat16)])
        >>> [(g.dtype, g.indices) for g in groups]
        [(torch.float32, [0]), (torch.bfloat16, [1])]
    """
    if not lists:
        raise ValueError("group_by_device_dtype needs at least one list of tensors")
    first = lists[0]
    for i, other in enumerate(lists[1:], start=1):
        if len(other) != len(first):
            raise ValueError(f"group_by_device_dtype: list {i} has {len(other)} tensors, list 0 has {len(first)}")
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(first):
        buckets[(t.device, t.dtype)].append(i)
    groups = []
    for (device, dtype), idx in buckets.items():
        per_list = tuple(LeafGroup(device, dtype, idx, [lst[i] for i in idx]) for lst in lists)
        groups.append(per_list[0] if len(lists) == 1 else per_list)
    return groups


# ----------------------------------------------------------------------------- matching trees

_DTYPE_RULES = ("floating", "equal", "any")
_META = operator.attrgetter("shape", "dtype", "device")
_SHAPE = operator.attrgetter("shape")
# Signatures of (tree, reference) pairs that passed check_match. Bounded: a program that keeps
# making new shapes (say, variable sequence lengths in a tree it checks) never grows it past this.
_MATCH_CACHE: dict[Any, None] = {}
_MATCH_CACHE_SIZE = 4096
# (id(tree), id(reference)) of pairs an enclosing call has checked and is still holding (see
# _trust): the update paths it calls need not check the same objects again.
_TRUSTED = threading.local()
# The same marks while torch.compile traces: dynamo simulates this list's appends and pops (the
# real one stays empty) and compares entries with ``is``; ``id()`` would guard on the identity of
# the step's input trees and recompile every step.
_TRACE_TRUSTED: list[tuple[Any, Any]] = []
_MARKED_IN_TRACE = 2


def _signature(leaves_: list[Any], shapes_only: bool = False) -> tuple[Any, ...]:
    """(shape, dtype, device) per tensor leaf (the type otherwise): what a match depends on."""
    get = _SHAPE if shapes_only else _META
    try:
        return tuple(builtins.map(get, leaves_))  # the builtin: this module defines its own map
    except AttributeError:  # a non-tensor leaf
        return tuple(get(x) if isinstance(x, torch.Tensor) else type(x) for x in leaves_)


def _trust(tree: PyTree, reference: PyTree) -> int:
    """Mark a pair that passed :func:`check_match` (default rules) for the calls made while it is held.

    The caller keeps both objects alive and calls :func:`_untrust` with the result when its
    call returns. Returns which mark was made (true either way).
    """
    if torch.compiler.is_compiling():
        _TRACE_TRUSTED.append((tree, reference))
        return _MARKED_IN_TRACE
    pairs = _TRUSTED.__dict__.setdefault("pairs", [])
    pairs.append((id(tree), id(reference)))
    return True


def _untrust(marked: int) -> None:
    if marked == _MARKED_IN_TRACE:
        # Not pop(): when a check inside the scope raises, the caller's ``finally`` may run eagerly
        # after the traced part (on the real list, which dynamo never filled).
        del _TRACE_TRUSTED[-1:]
    elif marked:
        _TRUSTED.pairs.pop()


def _dtypes_ok(dtype: torch.dtype, ref: torch.dtype, rule: str) -> bool:
    if rule == "any" or dtype == ref:
        return True
    if rule == "equal":
        return False
    # "floating": the caller casts a leaf to the reference's dtype; only the kind must agree.
    if ref.is_floating_point:
        return dtype.is_floating_point
    if ref.is_complex:
        return dtype.is_floating_point or dtype.is_complex
    return False


def _leaf_problems(leaf: Any, reference: Any, dtype: str, device: bool) -> list[tuple[str, str, str]]:
    """``[(what, leaf's value, reference's value), ...]`` for each way ``leaf`` does not fit."""
    is_t, ref_t = isinstance(leaf, torch.Tensor), isinstance(reference, torch.Tensor)
    if not (is_t and ref_t):
        if is_t == ref_t and type(leaf) is type(reference):
            return []
        kind = lambda x: f"tensor {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
        return [("type", kind(leaf), kind(reference))]
    out = []
    if leaf.shape != reference.shape:
        out.append(("shape", str(tuple(leaf.shape)), str(tuple(reference.shape))))
    if not _dtypes_ok(leaf.dtype, reference.dtype, dtype):
        floating = dtype == "floating" and (reference.is_floating_point() or reference.is_complex())
        out.append(("dtype", str(leaf.dtype), f"{reference.dtype}{' (a floating dtype is needed)' if floating else ''}"))
    if device and leaf.device != reference.device:
        out.append(("device", str(leaf.device), str(reference.device)))
    return out


def leaf_mismatch(
    leaf: Any, reference: Any, *, dtype: str = "floating", device: bool = True, labels: Optional[tuple[str, str]] = None
) -> Optional[str]:
    """Why ``leaf`` does not fit ``reference`` (shape, dtype, device), or ``None`` when it does.

    The per-leaf rule of :func:`check_match`, for callers that pair leaves themselves
    (checkpoint restore pairs saved tensors with a template by name).

    Args:
        leaf, reference: tensors (other leaves: only their types are compared).
        dtype: ``"floating"``: a floating (complex) reference needs a floating (floating or
            complex) leaf, any width, as when the leaf is cast to the reference's dtype;
            other dtypes must be equal. ``"equal"``: the same dtype. ``"any"``: not compared.
        device: compare devices.
        labels: names for the two sides: ``("checkpoint", "template")`` gives
            ``"checkpoint shape (2,), template shape (3,)"`` instead of ``"shape (2,) vs (3,)"``.

    Example:
        >>> tree.leaf_mismatch(torch.zeros(2, 1), torch.zeros(1, 2))
        'shape (2, 1) vs (1, 2)'
        >>> tree.leaf_mismatch(torch.zeros(2, 1), torch.zeros(1, 2), labels=("grads", "params"))
        'grads shape (2, 1), params shape (1, 2)'
        >>> tree.leaf_mismatch(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)) is None
        True
    """
    if dtype not in _DTYPE_RULES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_RULES)}, got {dtype!r}")
    return _describe(_leaf_problems(leaf, reference, dtype, device), labels)


def _describe(problems: list[tuple[str, str, str]], labels: Optional[tuple[str, str]]) -> Optional[str]:
    if labels is None:
        return ", ".join(f"{what} {a} vs {b}" for what, a, b in problems) or None
    return ", ".join(f"{labels[0]} {what} {a}, {labels[1]} {what} {b}" for what, a, b in problems) or None


def _raise_mismatch(
    tree: PyTree, reference: PyTree, leaves_: list[Any], ref_leaves: list[Any], same_structure: bool,
    name: str, reference_name: str, dtype: str, device: bool, error: type[Exception],
) -> None:
    """Build the message (names are computed here, on the error path only) and raise if anything differs."""
    if not same_structure:
        names, ref_names = paths(tree), paths(reference)
        missing = sorted(set(ref_names) - set(names))
        unexpected = sorted(set(names) - set(ref_names))
        if missing or unexpected:
            detail = f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        else:
            detail = f"{structure(tree)} vs {structure(reference)}"
        raise error(f"{name} must have the same tree structure as {reference_name}: {detail}")
    bad = [(i, p) for i, (x, r) in enumerate(zip(leaves_, ref_leaves)) if (p := _leaf_problems(x, r, dtype, device))]
    if not bad:
        return
    ref_names = paths(reference)
    shown = "; ".join(f"leaf {ref_names[i] or '<root>'!r}: {_describe(problems, (name, reference_name))}" for i, problems in bad[:8])
    more = f" (and {len(bad) - 8} more leaves)" if len(bad) > 8 else ""
    raise error(f"{name} do not match {reference_name}: {shown}{more}")


def _empty_side(x: Any) -> bool:
    """``()`` or ``[]`` (a partition's empty side, see optim.combine._subtree, and the lists a
    kernel wrapper makes of it) or a dict of them (the moments built on it). The top level only:
    a tree walk costs tracing time in every check."""
    if type(x) is tuple or type(x) is list:
        return not x
    if type(x) is not dict or not x:
        return False
    for v in x.values():  # noqa: SIM110 (a loop: Dynamo traces a generator at ~5 ms per item)
        if (type(v) is not tuple and type(v) is not list) or v:
            return False
    return True


def check_match(
    tree: PyTree,
    reference: PyTree,
    *,
    name: str = "updates",
    reference_name: str = "params",
    dtype: str = "floating",
    device: bool = True,
    error: type[Exception] = ValueError,
) -> None:
    """Raise unless ``tree`` has ``reference``'s structure and each leaf its shape, dtype kind and device.

    The one check of a tree against another in craftfn (updates against parameters in every
    update path, fused kernels included; moments against parameters; gradients against
    accumulators). It reads only metadata (shapes, dtypes, devices): no host sync. A pair of
    trees with a signature (structures, shapes, dtypes, devices) that passed before costs one
    flatten and a dictionary lookup. Under ``torch.compile`` the comparison runs while tracing
    (dynamo guards on the shapes it reads), so the compiled graph holds none of it.

    Args:
        tree: the tree to check (e.g. updates or gradients).
        reference: the tree it must match (e.g. the parameters).
        name, reference_name: how the message calls the two trees.
        dtype: ``"floating"`` (default: a floating reference leaf needs a floating leaf of any
            width, since update paths cast to the parameter's dtype), ``"equal"`` or ``"any"``;
            see :func:`leaf_mismatch`.
        device: require each leaf on its reference leaf's device.
        error: the exception type raised (a ``ValueError`` subclass such as
            ``CheckpointMismatchError`` for callers with their own).

    Raises:
        ``error`` (``ValueError``), naming every differing leaf (up to 8) with both shapes,
        dtypes or devices, or the missing and unexpected leaf names.

    Example:
        >>> tree.check_match({"w": torch.zeros(2)}, {"w": torch.ones(2)})
        >>> tree.check_match({"w": torch.zeros(2, 1)}, {"w": torch.ones(1, 2)})
        Traceback (most recent call last):
        ...
        ValueError: updates do not match params: leaf 'w': updates shape (2, 1), params shape (1, 2)
    """
    if dtype not in _DTYPE_RULES:
        raise ValueError(f"check_match: dtype must be one of {list(_DTYPE_RULES)}, got {dtype!r}")
    if torch.compiler.is_compiling():
        # Loops, not any(<generator>): dynamo traces a generator at ~5 ms per item.
        if dtype != "equal":
            for t, r in _TRACE_TRUSTED:
                if t is tree and r is reference:
                    return  # checked by an enclosing call in this trace: each tree walk costs seconds of tracing
        if _empty_side(tree) and _empty_side(reference):
            # Nothing to compare (the empty side of a partition). Dynamo (torch 2.13, optree 0.20)
            # cannot flatten a tree without tensors that holds a dict; eagerly it is checked.
            return
        leaves_, treedef = flatten(tree)
        # Tracing: Python on static metadata, evaluated once per compile (dynamo guards on shapes).
        # flatten_up_to as below (building a second treedef is the costly part of a traced walk).
        try:
            ref_leaves = treedef.flatten_up_to(reference)
        except (ValueError, TypeError):
            ref_leaves = None
        bad = ref_leaves is None
        if not bad:
            for x, r in zip(leaves_, ref_leaves):
                if _leaf_problems(x, r, dtype, device):
                    bad = True
                    break
        if bad:
            ref_leaves, ref_def = flatten(reference)
            _raise_mismatch(tree, reference, leaves_, ref_leaves, treedef == ref_def, name, reference_name, dtype, device, error)
        return
    pairs = getattr(_TRUSTED, "pairs", None)
    if pairs and dtype != "equal" and (id(tree), id(reference)) in pairs:
        return  # an enclosing call checked these very objects under rules at least as strict
    shapes_only = dtype == "any" and not device
    sig = ref_sig = None
    if type(tree) is list and type(reference) is list and len(tree) == len(reference):
        # Flat lists of tensors (what kernels take) are their own leaves: no flattening needed.
        get = _SHAPE if shapes_only else _META
        try:
            sig, ref_sig = tuple(builtins.map(get, tree)), tuple(builtins.map(get, reference))
        except AttributeError:  # not all tensors: the general path
            sig = ref_sig = None
    if sig is None:
        leaves_, treedef = flatten(tree)
        try:
            # Cheaper than flattening the reference anew; a reference with another structure either
            # raises here or yields a non-tensor "leaf", and the full comparison below sorts it out.
            ref_leaves = treedef.flatten_up_to(reference)
        except (ValueError, TypeError):
            ref_leaves = None
        if ref_leaves is not None:
            sig, ref_sig = _signature(leaves_, shapes_only), _signature(ref_leaves, shapes_only)
    if sig is not None:
        if sig == ref_sig:
            return  # the same metadata leaf for leaf: a match under every rule
        if (dtype, device, sig, ref_sig) in _MATCH_CACHE:
            return
    # First sight of this pair of signatures (or a mismatch): the full comparison.
    leaves_, treedef = flatten(tree)
    ref_leaves, ref_def = flatten(reference)
    _raise_mismatch(tree, reference, leaves_, ref_leaves, treedef == ref_def, name, reference_name, dtype, device, error)
    if len(_MATCH_CACHE) >= _MATCH_CACHE_SIZE:
        _MATCH_CACHE.clear()
    _MATCH_CACHE[(dtype, device, _signature(leaves_, shapes_only), _signature(ref_leaves, shapes_only))] = None
