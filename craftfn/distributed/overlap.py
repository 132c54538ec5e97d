"""Gradient all-reduces that start while the backward still runs (DDP's buckets, for a pure step).

The data-parallel step registers a hook on every traced parameter of the loss. As the backward
produces a parameter's gradient, the hook writes it, already divided by the number of
ranks (and of microbatches), into its place in a flat bucket; when the
last microbatch's gradients of every member of a bucket have arrived, the bucket's all-reduce
starts (asynchronously) while the backward goes on with earlier layers. The optimizer's
update then only waits for the reductions still in flight. With accumulation the buckets sum
the microbatches' gradients and reduce once, after the last one: one reduction per step.

Buckets follow the order in which gradients arrive: the first step guesses it (the reverse of
the parameters' order: the backward runs from the last layer to the first) and records the
real order, which the next steps use. Like DDP, the first bucket is small (``FIRST_BUCKET_MB``)
so that communication starts early.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist

from craftfn import tree
from craftfn.distributed.process import _guard, world_size

FIRST_BUCKET_MB = 1.0

_CURRENT: list[Optional[GradientExchange]] = [None]


class _Bucket(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    members: list[int]  # leaf indices
    offsets: list[int]
    numel: int


def _plan(leaves: list[torch.Tensor], order: list[int], bucket_bytes: int) -> list[_Bucket]:
    """Consecutive (in ``order``) leaves of one device and dtype, packed into buckets of about ``bucket_bytes``."""
    open_: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    out: list[list[int]] = []
    first_cap = min(bucket_bytes, int(FIRST_BUCKET_MB * 2**20))
    for i in order:
        t = leaves[i]
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        cap = first_cap if not out else bucket_bytes
        if key in open_ and sizes[key] + nbytes > cap:
            out.append(open_.pop(key))
        if key not in open_:
            open_[key], sizes[key] = [], 0
        open_[key].append(i)
        sizes[key] += nbytes
    out.extend(open_.values())
    buckets = []
    for members in out:
        offsets, at = [], 0
        for i in members:
            offsets.append(at)
            at += leaves[i].numel()
        buckets.append(_Bucket(leaves[members[0]].device, leaves[members[0]].dtype, members, offsets, at))
    return buckets


class ExchangePlanner:
    """Bucket layouts per parameter signature: guessed for the first step, then the observed order."""

    def __init__(self) -> None:
        self._plans: dict[Any, tuple[list[_Bucket], bool]] = {}

    def exchange(self, params: Any, bucket_bytes: int, accum_steps: int) -> GradientExchange:
        leaves, treedef = tree.flatten(params)
        key = (treedef, tuple((tuple(x.shape), x.dtype, x.device) for x in leaves), bucket_bytes)
        if key not in self._plans:
            if len(self._plans) > 4:
                self._plans.clear()
            self._plans[key] = (_plan(leaves, list(reversed(range(len(leaves)))), bucket_bytes), False)
        buckets, observed = self._plans[key]

        def replan(order: list[int]) -> None:
            if not observed:
                rest = [i for i in reversed(range(len(leaves))) if i not in set(order)]
                self._plans[key] = (_plan(leaves, order + rest, bucket_bytes), True)

        return GradientExchange(buckets, [x.shape for x in leaves], accum_steps, None if observed else replan)


class GradientExchange:
    """One step's exchange: buckets filled by backward hooks, all-reduced as soon as they are complete."""

    def __init__(self, buckets: list[_Bucket], shapes: list[torch.Size], accum_steps: int, replan: Optional[Callable[[list[int]], None]]) -> None:
        n_leaves = len(shapes)
        self.shapes = shapes
        self.buckets = buckets
        self.accum_steps = accum_steps
        # The mean's 1/(world * accum_steps), applied as each gradient is written into its bucket: no
        # pass over the buckets afterwards (a power of two in the usual cases: exact).
        self.scale = 1.0 / (world_size() * self.accum_steps)
        self.where: list[int] = [0] * n_leaves  # leaf -> bucket
        self.flats = [torch.empty(b.numel, dtype=b.dtype, device=b.device) for b in buckets]
        # Each leaf's place in its bucket, made once per step, so a hook only writes.
        self.places: list[torch.Tensor] = [torch.empty(0)] * n_leaves
        for b, bucket in enumerate(buckets):
            for i, o in zip(bucket.members, bucket.offsets):
                self.where[i] = b
                self.places[i] = self.flats[b][o : o + math.prod(shapes[i])].view(shapes[i])
        self.seen = [False] * n_leaves  # written once: the next microbatches add to it
        self.missing = [len(b.members) for b in buckets]
        self.works: list[Any] = [None] * len(buckets)
        self.started_in_backward = 0  # buckets whose all-reduce the hooks started (the overlap)
        self.microbatch = -1
        self.arrived: list[int] = []
        self.replan = replan
        self.handles: list[Any] = []
        self.finished = False

    def watch(self, params: Any) -> None:
        """Hook the traced parameters of one microbatch's loss (called once per microbatch)."""
        self.microbatch += 1
        last = self.microbatch == self.accum_steps - 1
        for i, p in enumerate(tree.leaves(params)):
            if isinstance(p, torch.Tensor) and p.requires_grad:
                self.handles.append(p.register_hook(self._hook(i, last)))

    def _hook(self, i: int, last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        b, place = self.where[i], self.places[i]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.seen[i]:
                place.add_(grad, alpha=self.scale)
            else:
                torch.mul(grad, self.scale, out=place)  # the one write of this gradient into its bucket
                self.seen[i] = True
            if last:
                self.arrived.append(i)
                self.missing[b] -= 1
                if self.missing[b] == 0:
                    self._launch(b)
                    self.started_in_backward += 1
            # The gradient lives in its bucket now. Autograd gets a placeholder without storage in its
            # place (the step's own copy of the gradients is never read: finish() returns the buckets),
            # so this gradient's memory is freed at once, as DDP's gradient_as_bucket_view does.
            return grad.new_zeros(()).expand(grad.shape)

        return hook

    def _launch(self, b: int) -> None:
        self.works[b] = _guard("all_reduce of gradients", dist.all_reduce, self.flats[b], async_op=True)

    def finish(self, like: Any) -> Any:
        """Wait for every bucket (starting those whose members were never all used) and return the mean gradients."""
        self.finished = True
        for i, seen in enumerate(self.seen):
            if not seen:  # a parameter the loss did not use: no hook call, a zero gradient
                self.places[i].zero_()
        for b, work in enumerate(self.works):
            if work is None:
                self._launch(b)
        for work in self.works:
            _guard("all_reduce of gradients", work.wait)
        for h in self.handles:
            h.remove()
        if self.replan is not None:
            self.replan(list(dict.fromkeys(self.arrived)))
        return tree.unflatten(tree.structure(like), self.places)


def current_exchange() -> Optional[GradientExchange]:
    """The exchange of the data-parallel step in progress (None outside one, or when it does not overlap)."""
    return _CURRENT[0]


@contextlib.contextmanager
def exchange_scope(exchange: Optional[GradientExchange]) -> Iterator[Optional[GradientExchange]]:
    previous = _CURRENT[0]
    _CURRENT[0] = exchange
    try:
        yield exchange
    finally:
        _CURRENT[0] = previous
        if exchange is not None:
            for h in exchange.handles:
                h.remove()
