"""Functions of parameter trees that training loops use next to ``apply_updates`` (optax's ``update``).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> optim.incremental_update({"w": torch.ones(1)}, {"w": torch.zeros(1)}, step_size=0.1)
    {'w': tensor([0.1000])}
"""

from __future__ import annotations

from typing import Any, Union

import torch

from craftfn import tree
from craftfn.optim.base import Params

__all__ = ["incremental_update", "periodic_update"]


def incremental_update(new_tensors: Params, old_tensors: Params, step_size: Union[float, torch.Tensor]) -> Params:
    """``step_size * new + (1 - step_size) * old`` leafwise: a Polyak (EMA) average of parameters.

    Args:
        new_tensors: the latest values (e.g. the online parameters).
        old_tensors: the running values (e.g. the target / EMA parameters), same structure.
        step_size: a number or a 0-d tensor in ``[0, 1]``.

    Returns:
        A new tree (inputs are not modified).

    Example:
        >>> incremental_update({"w": torch.tensor([2.0])}, {"w": torch.tensor([0.0])}, 0.25)
        {'w': tensor([0.5000])}
    """

    def mix(new: Any, old: Any) -> Any:
        s = step_size.to(device=new.device, dtype=new.dtype) if isinstance(step_size, torch.Tensor) else step_size
        return s * new + (1.0 - s) * old

    return tree.map(mix, new_tensors, old_tensors)


def periodic_update(new_tensors: Params, old_tensors: Params, steps: Union[int, torch.Tensor], update_period: int) -> Params:
    """``new_tensors`` when ``steps % update_period == 0``, else ``old_tensors`` (a periodically synced copy).

    With a tensor ``steps`` the choice is a ``torch.where`` per leaf (no host sync); with an int it is
    made in Python.

    Example:
        >>> periodic_update({"w": torch.ones(1)}, {"w": torch.zeros(1)}, steps=torch.tensor(4), update_period=2)
        {'w': tensor([1.])}
    """
    if isinstance(steps, torch.Tensor):
        take = torch.remainder(steps, update_period) == 0
        return tree.map(lambda new, old: torch.where(take.to(new.device), new, old), new_tensors, old_tensors)
    return new_tensors if steps % update_period == 0 else old_tensors
