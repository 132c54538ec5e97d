"""Frozen dataclasses that are pytrees (flax.struct for craftfn).

Example:
    >>> import torch
    >>> from craftfn import struct, tree
    >>> @struct.dataclass
    ... class Point:
    ...     x: torch.Tensor
    ...     name: str = struct.field(static=True, default="p")
    >>> p = Point(torch.zeros(2))
    >>> tree.leaves(p)
    [tensor([0., 0.])]
    >>> p.replace(x=torch.ones(2)).x
    tensor([1., 1.])

Fields are leaves unless marked ``static=True``; static values are part of the
tree structure (like optax/flax), so they must compare with ``==``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import optree

from craftfn.tree import NAMESPACE

__all__ = ["dataclass", "field", "PyTreeNode", "is_static"]

T = TypeVar("T")

_STATIC = "craftfn_static"


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; ``static=True`` keeps it out of the leaves (part of the treedef).

    Example:
        >>> @struct.dataclass
        ... class Cfg:
        ...     lr: float = struct.field(static=True, default=0.1)
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_STATIC] = static
    return dataclasses.field(metadata=metadata, **kwargs)


def is_static(f: dataclasses.Field) -> bool:
    """Whether a dataclass field was declared with ``field(static=True)``."""
    return bool(f.metadata.get(_STATIC, False))


def _replace(self: T, **changes: Any) -> T:
    """Return a copy with ``changes`` applied (the value itself never changes)."""
    return dataclasses.replace(self, **changes)


def dataclass(cls: type[T] | None = None, **kwargs: Any) -> Any:
    """Make ``cls`` a frozen dataclass registered as a craftfn pytree node.

    Non-static fields are children (in declaration order); static fields travel
    in the tree structure. Adds ``.replace(**changes)``.

    Example:
        >>> @struct.dataclass
        ... class Pair:
        ...     a: torch.Tensor
        ...     b: torch.Tensor
        >>> len(tree.leaves(Pair(torch.ones(1), torch.ones(1))))
        2
    """
    if cls is None:
        return lambda c: dataclass(c, **kwargs)
    if "__dataclass_fields__" in cls.__dict__ and getattr(cls, "__craftfn_struct__", None) is cls:
        return cls  # already processed (a PyTreeNode subclass decorated again)
    kwargs.setdefault("frozen", True)
    data_cls = dataclasses.dataclass(cls, **kwargs)
    fields = [f for f in dataclasses.fields(data_cls) if f.init]
    child_names = tuple(f.name for f in fields if not is_static(f))
    static_names = tuple(f.name for f in fields if is_static(f))

    def flatten(obj: Any) -> tuple[tuple[Any, ...], tuple[tuple[Any, ...], tuple[str, ...]], tuple[str, ...]]:
        values = [getattr(obj, name) for name in child_names]
        # An empty dict field (a TrainState's buffers when the model has none) holds no leaves and
        # is recorded in the structure instead: Dynamo (torch 2.13 with optree 0.20) cannot flatten
        # a dict without tensors, which made tree.map/leaves/clone of such a state fail to compile.
        empty = tuple([name for name, v in zip(child_names, values) if type(v) is dict and not v])
        if empty:
            kept = tuple([name for name in child_names if name not in empty])
            children = tuple([v for name, v in zip(child_names, values) if name not in empty])
        else:
            kept, children = child_names, tuple(values)
        statics = tuple(getattr(obj, name) for name in static_names)
        return children, (statics, empty), kept

    def unflatten(meta: tuple[tuple[Any, ...], tuple[str, ...]], children: tuple[Any, ...]) -> Any:
        statics, empty = meta
        obj = object.__new__(data_cls)
        kept = child_names if not empty else [n for n in child_names if n not in empty]
        for name, value in zip(kept, children):
            object.__setattr__(obj, name, value)
        for name in empty:
            object.__setattr__(obj, name, {})
        for name, value in zip(static_names, statics):
            object.__setattr__(obj, name, value)
        return obj

    optree.register_pytree_node(
        data_cls, flatten, unflatten, path_entry_type=optree.GetAttrEntry, namespace=NAMESPACE
    )
    if "replace" not in data_cls.__dict__:
        data_cls.replace = _replace
    data_cls.__craftfn_struct__ = data_cls
    return data_cls


class PyTreeNode:
    """Base class whose subclasses are automatically :func:`dataclass`-ed (flax.struct.PyTreeNode).

    Example:
        >>> class Counter(struct.PyTreeNode):
        ...     count: torch.Tensor
        >>> Counter(torch.tensor(0)).replace(count=torch.tensor(1)).count
        tensor(1)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(cls)

    replace: Callable[..., Any]
