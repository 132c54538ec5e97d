"""Deterministic batching: random windows as a pure function of (seed, step), and epochs.

Data order is part of the experiment: :func:`random_window_batch` derives batch ``step`` from
``fold_in(key(seed), step)`` with craftfn's counter-based keys, so it is the same in every
process and every run, and a run resumed at step ``k`` sees exactly the batches it would have seen.
Under data parallelism rank ``r`` of ``world`` reads only its rows of that global batch
(``rank=``, ``world=``). For finite, map-style datasets, :func:`epoch_batches` walks a
permutation keyed by ``(seed, epoch)``.

Tokens are a 1-d tensor in memory or a :class:`~craftfn.data.TokenStream` over memory-mapped
token shards: the same tokens give the same windows either way.

Example:
    >>> import torch
    >>> from craftfn.data import random_window_batch
    >>> tokens = torch.arange(100)
    >>> b = random_window_batch(tokens, batch_size=2, block_size=4, seed=0, step=3)
    >>> b["input_ids"].shape, bool((b["labels"] == b["input_ids"] + 1).all())
    (torch.Size([2, 4]), True)
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

import torch

from craftfn import random, tree
from craftfn.data.streams import TokenStream

__all__ = [
    "train_val_split",
    "window_starts",
    "random_window_batch",
    "RandomWindows",
    "WindowDataset",
    "WindowBatches",
    "epoch_batches",
    "num_batches",
    "collate",
]

# Separate key streams for window batches and epoch permutations drawn from the same seed.
_WINDOW_TAG = 0x57494E44
_EPOCH_TAG = 0x45504F43


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_tokens(tokens: Any, allow_stream: bool = True) -> None:
    if allow_stream and isinstance(tokens, TokenStream):
        return
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        desc = f"a tensor of shape {tuple(tokens.shape)} and dtype {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"tokens must be a 1-d integer tensor{' or a TokenStream' if allow_stream else ''}, got {desc}")


def _check_rank(rank: Any, world: Any, batch_size: int) -> int:
    """The rows per rank of a global batch of ``batch_size``."""
    _check_positive_int("world", world)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be a multiple of world={world}")
    return batch_size // world


def _windows(tokens: Union[torch.Tensor, TokenStream], starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``tokens[s : s + length]`` for each start, int64."""
    if isinstance(tokens, TokenStream):
        return tokens.gather(starts, length)
    idx = starts[:, None] + torch.arange(length, device=tokens.device)
    return tokens[idx].to(torch.int64)


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into (train, validation): the last ``val_fraction`` is validation.

    A contiguous tail (not a random sample) keeps validation windows from overlapping training text.

    Args:
        tokens: 1-d token ids.
        val_fraction: in (0, 1).

    Returns:
        ``(train_tokens, val_tokens)``, views of ``tokens``.

    Example:
        >>> train, val = train_val_split(torch.arange(10), 0.2)
        >>> val.tolist()
        [8, 9]
    """
    _check_tokens(tokens, allow_stream=False)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = tokens.numel()
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} tokens leaves an empty train or validation split")
    return tokens[: n - n_val], tokens[n - n_val :]


def window_starts(
    num_tokens: int,
    batch_size: int,
    block_size: int,
    seed: int,
    step: Union[int, torch.Tensor],
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """The window starts of batch ``step``: ``batch_size`` ints in ``[0, num_tokens - block_size)`` from ``fold_in(key(seed), step)``.

    Example:
        >>> window_starts(100, 3, 8, seed=0, step=0).shape
        torch.Size([3])
    """
    key = random.fold_in(random.fold_in(random.key(seed), _WINDOW_TAG), step)
    span = num_tokens - block_size
    if span <= 1 << 32:
        return random.randint(key, (batch_size,), 0, span, device=device)
    # Streams of more than 2**32 tokens: a 63-bit draw, reduced (bias below span / 2**63).
    high = random.randint(random.fold_in(key, 1), (batch_size,), 0, 1 << 31, device=device)
    low = random.randint(random.fold_in(key, 2), (batch_size,), 0, 1 << 32, device=device)
    return torch.remainder(high * (1 << 32) + low, span)


def random_window_batch(
    tokens: Union[torch.Tensor, TokenStream],
    batch_size: int,
    block_size: int,
    seed: int,
    step: Union[int, torch.Tensor],
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, torch.Tensor]:
    """Batch ``step``: ``batch_size`` windows at starts drawn from ``fold_in(key(seed), step)``.

    Args:
        tokens: 1-d token ids (a tensor, or a :class:`~craftfn.data.TokenStream` over token
            shards), longer than ``block_size``.
        batch_size: windows per (global) batch.
        block_size: tokens per window.
        seed: the data seed.
        step: the step (int or 0-d integer tensor).
        rank, world: read only rows ``[rank * b, (rank + 1) * b)`` of the global batch,
            ``b = batch_size / world`` (what :func:`craftfn.distributed.shard_batch` keeps of it).

    Returns:
        ``{"input_ids": (B, T), "labels": (B, T)}`` int64 on ``tokens``' device (CPU for a
        stream); labels are the inputs shifted by one. ``B = batch_size / world``.

    Example:
        >>> b = random_window_batch(torch.arange(50), 4, 8, seed=1, step=0)
        >>> b["labels"].shape
        torch.Size([4, 8])
        >>> half = random_window_batch(torch.arange(50), 4, 8, seed=1, step=0, rank=1, world=2)
        >>> bool((half["input_ids"] == b["input_ids"][2:]).all())
        True
    """
    _check_tokens(tokens)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("block_size", block_size)
    rows = _check_rank(rank, world, batch_size)
    n = tokens.numel()
    if n <= block_size:
        raise ValueError(f"tokens has {n} tokens; random windows need more than block_size={block_size}")
    device = tokens.device if isinstance(tokens, torch.Tensor) else None
    starts = window_starts(n, batch_size, block_size, seed, step, device=device)[rank * rows : (rank + 1) * rows]
    chunk = _windows(tokens, starts, block_size + 1)
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


class RandomWindows:
    """An endless source of :func:`random_window_batch` batches: ``windows[step]`` or iterate.

    Args:
        tokens: a 1-d token tensor or a :class:`~craftfn.data.TokenStream`.
        batch_size: windows per global batch.
        block_size: tokens per window.
        seed: the data seed.
        rank, world: this process reads only its rows of each global batch (see
            :func:`random_window_batch`); ranks together read the global batch, each row once.

    Example:
        >>> src = RandomWindows(torch.arange(50), batch_size=2, block_size=4, seed=0)
        >>> bool((src[5]["input_ids"] == next(src.iterate(start_step=5))["input_ids"]).all())
        True
    """

    def __init__(
        self,
        tokens: Union[torch.Tensor, TokenStream],
        batch_size: int,
        block_size: int,
        seed: int = 0,
        *,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        _check_tokens(tokens)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("block_size", block_size)
        _check_rank(rank, world, batch_size)
        if tokens.numel() <= block_size:
            raise ValueError(f"tokens has {tokens.numel()} tokens; random windows need more than block_size={block_size}")
        self.tokens, self.batch_size, self.block_size, self.seed = tokens, batch_size, block_size, seed
        self.rank, self.world = rank, world

    def starts(self, step: int) -> torch.Tensor:
        """The starts of this rank's windows of batch ``step``."""
        rows = self.batch_size // self.world
        device = self.tokens.device if isinstance(self.tokens, torch.Tensor) else None
        starts = window_starts(self.tokens.numel(), self.batch_size, self.block_size, self.seed, step, device=device)
        return starts[self.rank * rows : (self.rank + 1) * rows]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return random_window_batch(self.tokens, self.batch_size, self.block_size, self.seed, step, rank=self.rank, world=self.world)

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        step = start_step
        while True:
            yield self[step]
            step += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterate(0)


class MapDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


class WindowDataset:
    """A finite, map-style dataset of windows over a token stream (for epoch training and evaluation).

    Example ``i`` is the window starting at ``i * stride``: ``{"input_ids": (T,), "labels": (T,)}``.
    With the default ``stride = block_size`` windows do not overlap, so an epoch sees every token once
    (up to a tail shorter than a window).

    Example:
        >>> ds = WindowDataset(torch.arange(21), block_size=5)
        >>> len(ds), ds[1]["input_ids"].tolist()
        (4, [5, 6, 7, 8, 9])
    """

    def __init__(self, tokens: Union[torch.Tensor, TokenStream], block_size: int, stride: int | None = None) -> None:
        _check_tokens(tokens)
        _check_positive_int("block_size", block_size)
        stride = block_size if stride is None else stride
        _check_positive_int("stride", stride)
        if tokens.numel() <= block_size:
            raise ValueError(f"tokens has {tokens.numel()} tokens; a window needs block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride
        self._len = (tokens.numel() - 1 - block_size) // stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for a WindowDataset of length {self._len}")
        return {k: v[0] for k, v in self.get_batch(torch.tensor([index % self._len])).items()}

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Examples ``indices`` (1-d) stacked with one gather: ``{"input_ids": (len(indices), T), ...}``."""
        device = self.tokens.device if isinstance(self.tokens, torch.Tensor) else None
        starts = torch.as_tensor(indices).to(device=device, dtype=torch.int64) * self.stride
        chunk = _windows(self.tokens, starts, self.block_size + 1)
        return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


class WindowBatches:
    """The first ``max_windows`` windows of a :class:`WindowDataset` in order, in batches: a re-iterable,
    map-style list of batches read on demand (evaluation data that does not sit in memory).

    Batch ``i`` holds windows ``[i * batch_size, (i + 1) * batch_size)``; the last may be smaller.

    Example:
        >>> batches = WindowBatches(WindowDataset(torch.arange(41), block_size=4), batch_size=4, max_windows=9)
        >>> len(batches), [b["input_ids"].shape[0] for b in batches]
        (3, [4, 4, 1])
    """

    def __init__(self, dataset: WindowDataset, batch_size: int, max_windows: Optional[int] = None) -> None:
        _check_positive_int("batch_size", batch_size)
        if max_windows is not None:
            _check_positive_int("max_windows", max_windows)
        self.dataset, self.batch_size = dataset, batch_size
        self.num_windows = len(dataset) if max_windows is None else min(max_windows, len(dataset))

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        index %= len(self)
        start = index * self.batch_size
        return self.dataset.get_batch(torch.arange(start, min(start + self.batch_size, self.num_windows)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


def collate(examples: Sequence[Any]) -> Any:
    """Stack a list of examples (pytrees of tensors with equal shapes) along a new leading dimension.

    Example:
        >>> collate([{"x": torch.zeros(2)}, {"x": torch.ones(2)}])["x"].shape
        torch.Size([2, 2])
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    return tree.map(lambda *xs: torch.stack(xs), *examples)


def num_batches(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`epoch_batches` yields for ``num_examples`` examples."""
    _check_positive_int("batch_size", batch_size)
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


def epoch_batches(
    dataset: MapDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    shuffle: bool = True,
) -> Iterator[Any]:
    """The batches of one epoch over a map-style dataset, in an order keyed by ``(seed, epoch)``.

    Every example appears exactly once per epoch (``drop_last`` leaves out the final partial
    batch). A dataset with a ``get_batch(indices)`` method (e.g. :class:`WindowDataset`) is read
    with one gather per batch; otherwise examples are stacked with :func:`collate`.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i]``.
        batch_size: examples per batch.
        seed: the data seed.
        epoch: the epoch number (0, 1, ...): each epoch gets its own permutation.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        shuffle: ``False`` keeps dataset order (evaluation).

    Returns:
        An iterator of batches.

    Example:
        >>> ds = WindowDataset(torch.arange(41), block_size=4)
        >>> [b["input_ids"].shape[0] for b in epoch_batches(ds, 4, seed=0, epoch=0)]
        [4, 4, 2]
    """
    _check_positive_int("batch_size", batch_size)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    if shuffle:
        order = random.permutation(random.fold_in(random.fold_in(random.key(seed), _EPOCH_TAG), epoch), n)
    else:
        order = torch.arange(n)
    get_batch = getattr(dataset, "get_batch", None)
    for b in range(num_batches(n, batch_size, drop_last)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        if get_batch is not None:
            yield get_batch(idx)
        else:
            yield collate([dataset[int(i)] for i in idx])

