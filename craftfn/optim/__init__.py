"""Gradient transformations: optax's model on PyTorch.

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> tx = optim.chain(optim.trace(decay=0.9), optim.scale_by_learning_rate(1e-2))
    >>> state = tx.init({"w": torch.zeros(2)})
"""

from craftfn.optim.aliases import sgd
from craftfn.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    apply_updates,
    apply_updates_,
    chain,
    check_hyperparameter,
    check_updates_match,
    identity,
)
from craftfn.optim.combine import MaskedState, PartitionState, freeze, masked, named_chain, partition
from craftfn.optim.transforms import (
    ScaleByScheduleState,
    ScaleState,
    TraceState,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    trace,
)
from craftfn.optim.wrappers import (
    ApplyIfFiniteState,
    InjectHyperparamsState,
    LookaheadState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    inject_hyperparams,
    lookahead,
    skip_not_finite,
    tree_get,
    tree_set,
)

__all__ = [
    # combine.py / wrappers.py
    "MaskedState",
    "PartitionState",
    "freeze",
    "masked",
    "named_chain",
    "partition",
    "ApplyIfFiniteState",
    "InjectHyperparamsState",
    "LookaheadState",
    "MultiSteps",
    "MultiStepsState",
    "apply_if_finite",
    "inject_hyperparams",
    "lookahead",
    "skip_not_finite",
    "tree_get",
    "tree_set",
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "Schedule",
    "Updates",
    "apply_updates",
    "apply_updates_",
    "chain",
    "check_hyperparameter",
    "check_updates_match",
    "identity",
    "ScaleByScheduleState",
    "ScaleState",
    "TraceState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "trace",
    "sgd",
]
