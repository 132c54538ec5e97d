"""Ready-made optimizers: each alias is a short chain of primitives (optax's ``alias``).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.sgd(learning_rate=0.1, momentum=0.9, nesterov=True)
    >>> state = tx.init({"w": torch.ones(3)})
"""

from __future__ import annotations

from typing import Optional

from craftfn.optim.base import GradientTransformation, ScalarOrSchedule, chain, check_hyperparameter
from craftfn.optim.transforms import scale_by_learning_rate, trace

__all__ = ["sgd"]


def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None, nesterov: bool = False) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    ``trace(momentum, nesterov)`` then ``scale_by_learning_rate``; equals
    ``torch.optim.SGD(lr, momentum, nesterov=nesterov)`` with ``dampening=0``.

    Args:
        learning_rate: a float, a 0-d tensor, or a schedule ``count -> lr``.
        momentum: decay of the momentum buffer, or ``None`` for plain SGD.
        nesterov: use Nesterov momentum (needs ``momentum``).

    Example:
        >>> tx = optim.sgd(0.1, momentum=0.9)
        >>> len(tx.init({"w": torch.ones(1)}))
        2
    """
    check_hyperparameter("learning_rate", learning_rate)
    if nesterov and not momentum:
        raise ValueError(f"sgd: nesterov=True needs a positive momentum, got momentum={momentum!r}")
    if momentum is None:
        return chain(scale_by_learning_rate(learning_rate))
    check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=True)
    return chain(trace(decay=momentum, nesterov=nesterov), scale_by_learning_rate(learning_rate))
