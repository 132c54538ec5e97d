"""``Evaluator``: run a pure ``eval_step`` over evaluation data and average the metrics.

Means are weighted by token count: a batch's weight is its ``num_tokens`` metric
when the eval step reports one (language models should: the last batch is often
shorter), else its number of samples. So the result equals the metric computed
over the whole evaluation set at once, however it was cut into batches.
Perplexity (``exp(loss)``) is added when there is a ``loss``.

Sums are kept on the device and read to the host once per evaluation.

Split across ranks (``split=``, e.g. ``craftfn.distributed.eval_split()``): rank ``r`` of ``n``
evaluates batches ``r, r + n, r + 2n, ...`` and the weighted sums are added over the ranks, so
every rank gets the metrics one process gets over all batches, for ~1/n of the work.

Example:
    >>> import torch
    >>> from craftfn import TrainState, make_eval_step
    >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=None)
    >>> eval_step = make_eval_step(lambda s, p, b, rng: torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2))
    >>> data = [{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}, {"x": torch.ones(2, 2), "y": torch.ones(2, 1)}]
    >>> sorted(Evaluator(eval_step, data).evaluate(state))
    ['loss', 'num_samples', 'perplexity']
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import torch

from craftfn import tree

__all__ = ["Evaluator", "EvalSplit"]


class EvalSplit(NamedTuple):
    """How an :class:`Evaluator` shares the batches among ranks.

    ``rank``/``world``: this rank takes batches ``i`` with ``i % world == rank``. ``sum``: adds a
    1-D float64 tensor over the ranks (an all-reduce; every rank calls it once per evaluation).
    ``equal_calls``: every rank calls ``eval_step`` equally often (padding with a zero-weight
    repeat of a batch), needed when ``eval_step`` itself runs collectives (fully sharded
    parameters are gathered per batch). Build it with ``craftfn.distributed.eval_split()``.
    """

    rank: int
    world: int
    sum: Callable[[torch.Tensor], torch.Tensor]
    equal_calls: bool = True


def _num_samples(batch: Any) -> int:
    for x in tree.leaves(batch):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    raise ValueError("an evaluation batch must contain a tensor with a leading batch dimension")


class Evaluator:
    """Evaluate a state over a finite set of batches.

    Args:
        eval_step: ``eval_step(state, batch) -> dict of 0-d tensors`` (see
            :func:`craftfn.make_eval_step`); a metric named ``weight_key`` is the batch's weight.
        eval_data: a re-iterable collection of batches (list, map-style dataset), or a
            function with no arguments returning an iterable of batches. A one-shot
            iterator is refused: the second evaluation would see nothing.
        weight_key: the metric holding a batch's weight (default ``"num_tokens"``).
        max_batches: evaluate on at most this many batches.
        split: share the batches among ranks (:class:`EvalSplit`); the result is the same on
            every rank and equals the one-process result.

    Returns (from :meth:`evaluate`): the weighted means, the total weight (``num_tokens``
    or ``num_samples``) and ``perplexity`` when there is a ``loss``.

    Example:
        >>> from craftfn import TrainState, make_eval_step
        >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=None)
        >>> eval_step = make_eval_step(lambda s, p, b, rng: torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2))
        >>> val_batches = [{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}]
        >>> evaluator = Evaluator(eval_step, val_batches)
        >>> metrics = evaluator.evaluate(state)
        >>> metrics["num_samples"]
        4.0
    """

    def __init__(
        self,
        eval_step: Callable[[Any, Any], Mapping[str, Any]],
        eval_data: Any,
        *,
        weight_key: str = "num_tokens",
        max_batches: Optional[int] = None,
        split: Optional[EvalSplit] = None,
    ) -> None:
        if not callable(eval_step):
            raise TypeError(f"eval_step must be callable (see craftfn.make_eval_step), got {type(eval_step).__name__}")
        if not callable(eval_data):
            try:
                iterator = iter(eval_data)
            except TypeError:
                raise TypeError(f"eval_data must be a collection of batches or a function returning one, got {type(eval_data).__name__}") from None
            if iterator is eval_data:
                raise TypeError(
                    "eval_data is a one-shot iterator (a generator?): it would be empty at the second evaluation; "
                    "pass a list, or a function returning a fresh iterable"
                )
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        if split is not None:
            if not isinstance(split, EvalSplit):
                raise TypeError(f"split must be an EvalSplit (e.g. craftfn.distributed.eval_split()), got {type(split).__name__}")
            if not (isinstance(split.world, int) and split.world >= 1 and isinstance(split.rank, int) and 0 <= split.rank < split.world):
                raise ValueError(f"split: rank must be in [0, world) and world >= 1, got rank={split.rank!r}, world={split.world!r}")
        self.split = split
        self.eval_step = eval_step
        self.eval_data = eval_data
        self.weight_key = weight_key
        self.max_batches = max_batches

    def _batches(self) -> Iterable[Any]:
        return self.eval_data() if callable(self.eval_data) else self.eval_data

    def evaluate(self, state: Any) -> dict[str, float]:
        """Run the evaluation and return the weighted means (floats)."""
        sums: dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        weighted_by_tokens: Optional[bool] = None
        count = 0
        rank, world = (self.split.rank, self.split.world) if self.split is not None else (0, 1)
        mine, spare = 0, None

        def run(batch: Any) -> dict[str, Any]:
            return dict(self.eval_step(state, batch))

        for batch in self._batches():
            if self.max_batches is not None and count >= self.max_batches:
                break
            count += 1
            if spare is None:
                spare = batch
            if (count - 1) % world != rank:
                continue
            mine += 1
            metrics = run(batch)
            has_weight = self.weight_key in metrics
            if weighted_by_tokens is None:
                weighted_by_tokens = has_weight
            elif weighted_by_tokens != has_weight:
                raise ValueError(f"eval_step reported {self.weight_key!r} for some batches and not others")
            weight = metrics.pop(self.weight_key) if has_weight else _num_samples(batch)
            weight = torch.as_tensor(weight, dtype=torch.float64)
            for name, value in metrics.items():
                value = torch.as_tensor(value)
                if value.numel() != 1:
                    continue
                contribution = value.detach().reshape(()).to(torch.float64) * weight.to(value.device)
                sums[name] = contribution if name not in sums else sums[name] + contribution.to(sums[name].device)
            total = weight if total is None else total + weight.to(total.device)
        if count == 0:
            raise ValueError("the evaluation data is empty: no batches to evaluate")
        if self.split is not None:
            # Ranks with fewer batches (or none) run the first batch again with weight 0: every rank
            # learns the metric names, and collective eval steps are called equally often.
            calls = -(-count // world) if self.split.equal_calls else max(1, mine)
            for _ in range(calls - mine):
                metrics = run(spare)
                if weighted_by_tokens is None:
                    weighted_by_tokens = self.weight_key in metrics
                metrics.pop(self.weight_key, None)
                for name, value in metrics.items():
                    value = torch.as_tensor(value)
                    if value.numel() == 1 and name not in sums:
                        sums[name] = torch.zeros((), dtype=torch.float64, device=value.device)
                if total is None:
                    total = torch.zeros((), dtype=torch.float64)
        names = list(sums)  # the eval step's order: the same on every rank
        # One host read for the whole evaluation.
        vector = torch.stack([sums[n].cpu() for n in names] + [total.cpu()])
        if self.split is not None:
            vector = self.split.sum(vector)
        host = vector.tolist()
        weight_total = host[-1]
        if weight_total <= 0:
            raise ValueError(f"the evaluation weights ({self.weight_key}) sum to {weight_total}; nothing to average")
        out = {n: v / weight_total for n, v in zip(names, host[:-1])}
        out["num_tokens" if weighted_by_tokens else "num_samples"] = weight_total
        if "loss" in out:
            out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 700 else float("inf")
        return out
