"""craftfn: functional, JAX-style training on PyTorch.

Training is a pure ``train_step(state, batch) -> (state, metrics)`` over an
immutable :class:`TrainState` pytree; optimizers are composable gradient
transformations (:mod:`craftfn.optim`).

Example:
    >>> import torch, craftfn
    >>> state = craftfn.TrainState.create(model=torch.nn.Linear(2, 1), tx=craftfn.optim.sgd(0.1))
"""

from craftfn import host_memory, optim, random, schedules, struct, tree
from craftfn.jit import Jitted, jit  # noqa: I001 - after step: the name craftfn.jit is the function
from craftfn.state import DonatedStateError, TrainState
from craftfn.step import make_eval_step, make_train_step, value_and_grad

__version__ = "0.1.0"

__all__ = [
    "TrainState",
    "DonatedStateError",
    "make_train_step",
    "make_eval_step",
    "value_and_grad",
    "jit",
    "Jitted",
    "tree",
    "struct",
    "random",
    "optim",
    "schedules",
    "host_memory",
    "__version__",
]
