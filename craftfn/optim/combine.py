"""Combinators over gradient transformations: named chains, partitions, masks (optax's ``combine``).

``partition`` (optax's ``multi_transform``) gives each parameter group its own rule;
``masked`` applies a rule to some leaves and lets the others pass through unchanged;
``freeze`` zeroes the updates of chosen leaves. Groups are chosen by a tree of labels
(or booleans), by a function of the parameter tree, or by a function of each
parameter's *name* (``named_parameters()`` form), which is usually the shortest::

    tx = optim.partition(
        {"decay": optim.adamw(1e-3, weight_decay=0.1), "no_decay": optim.adam(1e-3)},
        lambda name, p: "no_decay" if name.endswith("bias") or p.ndim < 2 else "decay",
    )

The inner rule sees only its leaves, as a flat dict keyed by dotted parameter names
(``{"blocks.0.attn.weight": ...}``; optax instead leaves ``MaskedNode`` holes in the tree), so
the inner state only holds what it updates and is easy to read.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
    >>> tx = optim.masked(optim.sgd(0.1), {"w": True, "b": False})
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["w"], updates["b"]
    (tensor([-0.1000, -0.1000]), tensor([1.]))
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Optional, Union

import torch

from craftfn import tree
from craftfn.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    _state_error,
    apply_updates_,
)
from craftfn.optim.sharding import whole_leaves

__all__ = [
    "named_chain",
    "partition",
    "PartitionState",
    "masked",
    "MaskedState",
    "freeze",
]

# A tree of labels/bools (possibly a prefix of the params tree), a function of the whole tree,
# or a function ``(name, leaf) -> label`` of each parameter's dotted name.
LabelSpec = Union[Any, Callable[[Params], Any], Callable[[str, torch.Tensor], Hashable]]


def _is_per_leaf_fn(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes ``(name, leaf)`` rather than the whole tree."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [
        p for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 2


def _prefix_entries(prefix: Any) -> list[tuple[str, Any]]:
    """``(dotted path, value)`` for each leaf of a labels/mask tree (``""`` for a single value).

    Dicts, lists, tuples and NamedTuples (what label and mask trees are made of) are walked in
    plain Python: a labels tree built inside a compiled step (``mask=fn(params)``) holds only
    Python values, and Dynamo (torch 2.13) cannot build an optree structure of constants. Other
    pytree nodes go through :func:`craftfn.tree.flatten_with_path`, with the same names.
    """
    out: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        join = (lambda k: f"{path}.{k}" if path else str(k))  # noqa: E731
        if node is None:
            return
        if type(node) is dict:
            for k, v in node.items():
                walk(v, join(k))
        elif type(node) in (list, tuple):
            for i, item in enumerate(node):
                walk(item, join(i))
        elif isinstance(node, tuple) and hasattr(node, "_fields"):
            for name in node._fields:
                walk(getattr(node, name), join(name))
        elif isinstance(node, (bool, int, float, str, torch.Tensor)) or not _is_pytree_node(node):
            out.append((path, node))
        else:
            out.extend((join(name) if name else path, leaf) for name, leaf in tree.flatten_with_path(node)[0])

    walk(prefix, "")
    return out


def _is_pytree_node(value: Any) -> bool:
    return not (len(tree.leaves(value)) == 1 and tree.leaves(value)[0] is value)


def _match_prefix(entries: list[tuple[str, Any]], names: list[str], argname: str) -> list[Any]:
    """One value per parameter name: the entry with the same path, else the longest path prefix.

    Matching dotted names (rather than tree structures) keeps this plain Python over strings, which
    ``torch.compile`` traces without graph breaks, and lets a prefix label whole subtrees.
    """
    lookup = dict(entries)
    used: set[str] = set()
    out = []
    for name in names:
        if name in lookup:
            key = name
        else:
            candidates = [k for k, _ in entries if k == "" or name.startswith(k + ".")]
            if not candidates:
                raise ValueError(
                    f"{argname} has no entry for parameter {name!r}: it must have the structure of the parameters "
                    f"(or of a prefix of it); its entries are {[k for k, _ in entries][:8]}"
                )
            key = max(candidates, key=len)
        used.add(key)
        out.append(lookup[key])
    unused = [k for k, _ in entries if k not in used]
    if unused:
        raise ValueError(f"{argname} entries {unused[:8]} match no parameter (parameters: {names[:8]})")
    return out


def _resolve_per_leaf(spec: LabelSpec, target: Any, argname: str, entries: Optional[list[tuple[str, Any]]] = None) -> list[Any]:
    """One label (or bool) per leaf of ``target``, from a tree, a tree function or a name function.

    ``entries``: :func:`_prefix_entries` of ``spec`` when it is a tree, computed once up front.
    """
    pairs, treedef = tree.flatten_with_path(target)
    if callable(spec):
        # On shards (ZeRO-1/3) a function of the parameters decides on the whole parameters'
        # shapes (meta tensors), so a mask such as ``p.ndim >= 2`` decides as in one process.
        leaves = whole_leaves([name for name, _ in pairs], [leaf for _, leaf in pairs])
        if _is_per_leaf_fn(spec):
            return [spec(name, leaf) for (name, _), leaf in zip(pairs, leaves)]
        entries = _prefix_entries(spec(tree.unflatten(treedef, leaves)))
    elif entries is None:
        entries = _prefix_entries(spec)
    return _match_prefix(entries, [name for name, _ in pairs], argname)


def _subtree(names: list[str], leaves: list[Any], keep: list[bool]) -> Union[dict[str, Any], tuple[()]]:
    """``{dotted name: leaf}`` for the kept leaves: the tree an inner rule of a partition or mask sees.

    A flat dict keyed by ``named_parameters()``-style names (rather than the original tree with
    holes) keeps the inner states readable, lets name-based masks inside the inner rule work as
    they would on the full tree, and traces under ``torch.compile`` (Dynamo's optree support fails
    on trees whose subtrees are all ``None``). With nothing kept it is ``()``: Dynamo's optree
    support (torch 2.13) cannot flatten an empty dict either, and a partition with an empty side
    is common (Muon on a model of matrices only, a label no parameter has).
    """
    sub = {name: x for name, x, k in zip(names, leaves, keep) if k}
    return sub if sub else ()


def _scatter(out: list[Any], names: list[str], keep: list[bool], sub: Mapping[str, Any]) -> None:
    """Write the values of ``sub`` (keyed like :func:`_subtree`) back into ``out`` where ``keep``."""
    for i, (name, k) in enumerate(zip(names, keep)):
        if k:
            out[i] = sub[name]


def _names(target: Any, argname: str) -> list[str]:
    names = tree.paths(target)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{argname}: leaves {dup[:8]} share a dotted name; rename the keys so every leaf has its own name")
    return names


def _flat_params(treedef: tree.TreeDef, params: Any) -> list[Any]:
    try:
        return treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"params must have the same tree structure as updates: {e}") from None


def _donated_or_fallback(tx: GradientTransformation, updates: Updates, state: OptState, params: Params, **extra: Any) -> tuple[Params, OptState]:
    if tx.donated_update is not None:
        return tx.donated_update(updates, state, params, **extra)
    new_updates, state = tx.update(updates, state, params, **extra)
    return apply_updates_(params, new_updates), state


# ----------------------------------------------------------------------------- named_chain


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with each state stored under a name: the state is ``{name: state}``.

    Named states are easy to read (``opt_state["adam"].mu``) and to find with
    :func:`tree_get`. When the last transformation has a ``donated_update``, so does the chain.

    Args:
        transforms: ``(name, transformation)`` pairs, applied left to right; names are unique strings.

    Returns:
        A :class:`GradientTransformation` whose state is a dict keyed by the names.

    Example:
        >>> tx = optim.named_chain(("momentum", optim.trace(0.9)), ("lr", optim.scale_by_learning_rate(0.1)))
        >>> sorted(tx.init({"w": torch.ones(1)}))
        ['lr', 'momentum']
    """
    names: list[str] = []
    for i, item in enumerate(transforms):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], GradientTransformation)):
            raise TypeError(f"named_chain: argument {i} must be a (name: str, GradientTransformation) pair, got {item!r:.80}")
        if item[0] in names:
            raise ValueError(f"named_chain: name {item[0]!r} is used twice; names must be unique")
        names.append(item[0])

    def _check(state: Any) -> None:
        if not isinstance(state, dict) or sorted(state) != sorted(names):
            raise _state_error("named_chain", f"a dict with keys {sorted(names)}", state)

    def init_fn(params: Params) -> dict[str, OptState]:
        return {name: t.init(params) for name, t in transforms}

    def update_fn(updates: Updates, state: dict, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, dict]:
        _check(state)
        new_state = {}
        for name, t in transforms:
            updates, new_state[name] = t.update(updates, state[name], params, **extra)
        return updates, new_state

    donated_fn = None
    if transforms and transforms[-1][1].donated_update is not None:

        def donated_fn(updates: Updates, state: dict, params: Params, **extra: Any) -> tuple[Params, dict]:
            _check(state)
            new_state = {}
            for name, t in transforms[:-1]:
                updates, new_state[name] = t.update(updates, state[name], params, **extra)
            last_name, last = transforms[-1]
            params, new_state[last_name] = last.donated_update(updates, state[last_name], params, **extra)
            return params, new_state

    return GradientTransformation(init_fn, update_fn, donated_fn)


# ----------------------------------------------------------------------------- partition


class PartitionState(NamedTuple):
    """State of :func:`partition`: one inner state per label, over that label's leaves only."""

    inner_states: dict[Any, OptState]


def partition(transforms: Mapping[Hashable, GradientTransformation], param_labels: LabelSpec) -> GradientTransformation:
    """Give each group of parameters its own transformation (optax's ``multi_transform``/``partition``).

    Args:
        transforms: ``{label: transformation}``.
        param_labels: which label each parameter gets, as one of
            - a tree of labels with the structure of the parameters (or a prefix of it:
              ``{"encoder": "frozen", "head": "train"}`` labels whole subtrees);
            - a function ``params -> tree of labels``;
            - a function ``(name, param) -> label`` over dotted parameter names such as
              ``"blocks.0.attn.bias"`` (recognised by its two positional arguments).
            Inside a ``torch.compile``'d step use a tree or a name function: a function that
            builds a labels tree is traced too, and Dynamo (torch 2.13) cannot flatten it.

    Returns:
        A :class:`GradientTransformation`; its state is :class:`PartitionState`. Each inner
        rule sees its group as a flat dict ``{dotted name: leaf}``.

    Raises:
        ValueError: a parameter gets a label that is not a key of ``transforms``, or the
            labels tree does not match the parameters.

    Example:
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> tx = optim.partition({"a": optim.sgd(1.0), "b": optim.sgd(0.0)},
        ...                      lambda name, p: "a" if name == "w" else "b")
        >>> updates, _ = tx.update(params, tx.init(params), params)
        >>> updates["w"], updates["b"]
        (tensor([-1., -1.]), tensor([-0.]))
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError(f"partition: transforms must be a non-empty dict {{label: GradientTransformation}}, got {transforms!r:.80}")
    for label, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"partition: transforms[{label!r}] must be a GradientTransformation, got {type(t).__name__}")
    known = list(transforms)
    # A labels tree is flattened once, here, outside any compiled step.
    label_entries = None if callable(param_labels) else _prefix_entries(param_labels)

    def _labels(target: Any) -> tuple[list[Any], tree.TreeDef, list[str], list[Any]]:
        leaves_, treedef = tree.flatten(target)
        names = _names(target, "partition")
        labels = _resolve_per_leaf(param_labels, target, "param_labels", label_entries)
        for name, label in zip(names, labels):
            if label not in transforms:
                raise ValueError(f"param_labels: parameter {name!r} has label {label!r}, which is not one of the transforms' labels {known}")
        return leaves_, treedef, names, labels

    def init_fn(params: Params) -> PartitionState:
        leaves_, _, names, labels = _labels(params)
        return PartitionState({
            label: t.init(_subtree(names, leaves_, [lab == label for lab in labels])) for label, t in transforms.items()
        })

    def _check(state: Any) -> None:
        if not isinstance(state, PartitionState) or not isinstance(state.inner_states, dict) or set(state.inner_states) != set(known):
            raise _state_error("partition", f"a PartitionState with labels {known}", state)

    def update_fn(updates: Updates, state: PartitionState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, PartitionState]:
        _check(state)
        leaves_, treedef, names, labels = _labels(updates)
        p_leaves = _flat_params(treedef, params) if params is not None else None
        out = list(leaves_)
        new_inner = {}
        for label, t in transforms.items():
            keep = [lab == label for lab in labels]
            sub_params = _subtree(names, p_leaves, keep) if p_leaves is not None else None
            sub_updates, new_inner[label] = t.update(_subtree(names, leaves_, keep), state.inner_states[label], sub_params, **extra)
            _scatter(out, names, keep, sub_updates)
        return tree.unflatten(treedef, out), PartitionState(new_inner)

    donated_fn = None
    if any(t.donated_update is not None for t in transforms.values()):

        def donated_fn(updates: Updates, state: PartitionState, params: Params, **extra: Any) -> tuple[Params, PartitionState]:
            _check(state)
            leaves_, treedef, names, labels = _labels(updates)
            p_leaves = _flat_params(treedef, params)
            out = list(p_leaves)
            new_inner = {}
            for label, t in transforms.items():
                keep = [lab == label for lab in labels]
                # The sub-dicts hold the very parameter tensors, so an in-place inner step
                # updates them where they are; scattering its results also covers rules that
                # return fresh tensors.
                sub_params, new_inner[label] = _donated_or_fallback(
                    t, _subtree(names, leaves_, keep), state.inner_states[label], _subtree(names, p_leaves, keep), **extra
                )
                _scatter(out, names, keep, sub_params)
            return tree.unflatten(treedef, out), PartitionState(new_inner)

    return GradientTransformation(init_fn, update_fn, donated_fn)


# ----------------------------------------------------------------------------- masked / freeze


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner state, over the masked-in leaves only."""

    inner_state: OptState


def _mask_list(mask: LabelSpec, target: Any, entries: Optional[list[tuple[str, Any]]] = None) -> list[bool]:
    values = _resolve_per_leaf(mask, target, "mask", entries)
    names = tree.paths(target)
    out = []
    for name, v in zip(names, values):
        if isinstance(v, torch.Tensor):
            raise TypeError(
                f"mask: the value for {name!r} is a tensor; mask values must be Python bools "
                "(reading a tensor would sync with the device)"
            )
        if not isinstance(v, bool):
            try:
                import numpy as np  # numpy bools are fine: they are host values

                if isinstance(v, np.bool_):
                    v = bool(v)
            except ImportError:  # pragma: no cover - numpy is a dependency
                pass
        if not isinstance(v, bool):
            raise TypeError(f"mask: the value for {name!r} must be True or False, got {v!r}")
        out.append(v)
    return out


def masked(inner: GradientTransformation, mask: LabelSpec) -> GradientTransformation:
    """Apply ``inner`` only where ``mask`` is True; other leaves pass through unchanged.

    As in optax, masked-out updates are returned as they came in (not zeroed); use
    :func:`freeze` or :func:`partition` with ``set_to_zero`` to stop leaves from changing.

    Args:
        inner: the transformation to apply to the masked-in leaves.
        mask: a tree of bools with the structure of the parameters (or a prefix of it), a
            function ``params -> tree of bools``, or a function ``(name, param) -> bool``.

    Returns:
        A :class:`GradientTransformation` with state :class:`MaskedState`.

    Example:
        >>> tx = optim.masked(optim.scale(0.0), lambda name, p: name.startswith("w"))
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> tx.update(params, tx.init(params))[0]
        {'w': tensor([0.]), 'b': tensor([1.])}
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked: inner must be a GradientTransformation, got {type(inner).__name__}")
    mask_entries = None if callable(mask) else _prefix_entries(mask)

    def init_fn(params: Params) -> MaskedState:
        leaves_ = tree.leaves(params)
        return MaskedState(inner.init(_subtree(_names(params, "masked"), leaves_, _mask_list(mask, params, mask_entries))))

    def _check(state: Any) -> None:
        if not isinstance(state, MaskedState):
            raise _state_error("masked", "a MaskedState", state)

    def update_fn(updates: Updates, state: MaskedState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, MaskedState]:
        _check(state)
        leaves_, treedef = tree.flatten(updates)
        names = _names(updates, "masked")
        keep = _mask_list(mask, updates, mask_entries)
        sub_params = _subtree(names, _flat_params(treedef, params), keep) if params is not None else None
        sub_updates, inner_state = inner.update(_subtree(names, leaves_, keep), state.inner_state, sub_params, **extra)
        out = list(leaves_)
        _scatter(out, names, keep, sub_updates)
        return tree.unflatten(treedef, out), MaskedState(inner_state)

    donated_fn = None
    if inner.donated_update is not None:

        def donated_fn(updates: Updates, state: MaskedState, params: Params, **extra: Any) -> tuple[Params, MaskedState]:
            _check(state)
            leaves_, treedef = tree.flatten(updates)
            names = _names(updates, "masked")
            keep = _mask_list(mask, updates, mask_entries)
            p_leaves = _flat_params(treedef, params)
            sub_params, inner_state = inner.donated_update(
                _subtree(names, leaves_, keep), state.inner_state, _subtree(names, p_leaves, keep), **extra
            )
            # Masked-out leaves take their update unchanged, in place like the rest.
            drop = [not k for k in keep]
            apply_updates_(_subtree(names, p_leaves, drop), _subtree(names, leaves_, drop))
            out = list(p_leaves)
            _scatter(out, names, keep, sub_params)
            return tree.unflatten(treedef, out), MaskedState(inner_state)

    return GradientTransformation(init_fn, update_fn, donated_fn)


def _zero_updates() -> GradientTransformation:
    from craftfn.optim.base import EmptyState

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(updates: Updates, state: EmptyState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, EmptyState]:
        del params, extra
        # zeros_like, not multiply-by-zero: a NaN gradient of a frozen leaf must not leak through.
        return tree.zeros_like(updates), state

    return GradientTransformation(init_fn, update_fn)


def freeze(mask: LabelSpec) -> GradientTransformation:
    """Zero the updates of the leaves where ``mask`` is True (they stop changing); others pass through.

    Put it first in a chain so the following rules never see the frozen leaves' gradients
    as nonzero: ``chain(freeze(mask), adamw(...))``. To also keep the rule's state off the
    frozen leaves, use ``partition({"train": adamw(...), "frozen": set_to_zero()}, labels)``.

    Args:
        mask: a tree of bools (or a prefix of one), a function ``params -> tree of bools``,
            or a function ``(name, param) -> bool``; True means frozen.

    Returns:
        A stateless-looking :class:`GradientTransformation` (state: :class:`MaskedState`).

    Example:
        >>> tx = optim.freeze({"w": True, "b": False})
        >>> g = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> tx.update(g, tx.init(g))[0]
        {'w': tensor([0.]), 'b': tensor([1.])}
    """
    return masked(_zero_updates(), mask)
