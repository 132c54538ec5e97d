"""What a donated value turns into (internal): placeholders that raise ``DonatedStateError``.

Kept below ``tree``/``random``/``state`` so that every place a donated state can reach first (a
pytree operation, a key check, an attribute) reports the donation, not a confusing TypeError.
"""

from __future__ import annotations

from typing import Any

import optree

from craftfn.tree import NAMESPACE


class DonatedStateError(RuntimeError):
    """A ``TrainState`` was used after being donated to a step."""


DONATED_MESSAGE = (
    "this TrainState was donated (donate=True, or donate_argnums in craftfn.jit): its buffers were "
    "reused in place by the step, so its values are gone. Use the state the step returned, e.g. "
    "`state, metrics = step(state, batch)`."
)


class Donated:
    """Placeholder for the fields of a donated state; any use raises a clear error."""

    __slots__ = ("field",)

    def __init__(self, field: str) -> None:
        object.__setattr__(self, "field", field)

    def __getattr__(self, name: str) -> Any:
        raise DonatedStateError(f"{DONATED_MESSAGE} (accessed .{self.field}.{name})")

    def error(self) -> DonatedStateError:
        return DonatedStateError(f"{DONATED_MESSAGE} (used .{self.field})")

    def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()

    __iter__ = __len__ = __getitem__ = __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __rsub__ = _raise
    __truediv__ = __matmul__ = __float__ = __int__ = __bool__ = __index__ = _raise

    def __repr__(self) -> str:
        return f"<donated {self.field}>"


def _flatten_donated(value: Donated) -> Any:
    raise value.error()


# Flattening a donated state (tree.map, value_and_grad, checkpoint saving) reports the donation.
optree.register_pytree_node(Donated, _flatten_donated, lambda aux, children: None, namespace=NAMESPACE)
