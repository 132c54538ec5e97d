"""Evaluation split across ranks: each rank evaluates ~1/N of the batches, every rank gets the whole result.

Example (one process: the split is the whole):
    >>> from craftfn import make_eval_step
    >>> from craftfn.training import Evaluator
    >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=None)
    >>> eval_step = distributed.make_data_parallel_eval_step(lambda s, p, b, rng: torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2))
    >>> data = [{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}] * 3
    >>> sorted(Evaluator(eval_step, data, split=distributed.eval_split()).evaluate(state))
    ['loss', 'num_samples', 'perplexity']
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from craftfn.distributed.collectives import _shard_sum
from craftfn.distributed.fully_sharded import gather_params
from craftfn.distributed.process import rank, world_size
from craftfn.state import TrainState
from craftfn.step import MetricFn, make_eval_step
from craftfn.training.evaluation import EvalSplit

__all__ = ["eval_split", "make_data_parallel_eval_step"]


def eval_split(equal_calls: bool = True) -> EvalSplit:
    """This rank's share of an evaluation, for ``Evaluator(..., split=eval_split())``.

    Rank ``r`` of ``n`` evaluates batches ``r, r + n, ...``; the weighted sums are all-reduced,
    so every rank returns what one process returns over all the batches.

    Args:
        equal_calls: every rank calls the eval step equally often (a rank short of a batch
            repeats one with weight 0). Needed for fully sharded states, whose eval step gathers
            the parameters (a collective) for every batch; harmless otherwise.

    Example:
        >>> distributed.eval_split().world
        1
    """
    if not isinstance(equal_calls, bool):
        raise TypeError(f"equal_calls must be a bool, got {equal_calls!r}")
    return EvalSplit(rank(), world_size(), _shard_sum, equal_calls)  # via the wire device (NCCL needs CUDA)


def make_data_parallel_eval_step(metric_fn: MetricFn, **options: Any) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """:func:`craftfn.make_eval_step` for data-parallel and fully sharded states.

    ``metric_fn`` sees whole, plain parameters: fully sharded ones are gathered (a collective:
    every rank calls the step equally often, as :func:`eval_split` arranges).

    Example:
        >>> step = distributed.make_data_parallel_eval_step(lambda s, p, b, rng: s.apply(p, b["x"]).sum())
    """
    if not callable(metric_fn):
        raise TypeError(f"metric_fn must be callable, got {type(metric_fn).__name__}")

    def on_whole_params(state: TrainState, params: Any, batch: Any, rng: torch.Tensor) -> Any:
        return metric_fn(state, gather_params(params), batch, rng)

    return make_eval_step(on_whole_params, **options)
