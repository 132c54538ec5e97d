"""Deterministic batching: random windows as a pure function of (seed, step), and epochs.

Data order is part of the experiment: :func:`random_window_batch` derives batch ``step`` from
``fold_in(key(seed), step)`` with craftfn's counter-based keys, so it is the same in every
process and every run, and a run resumed at step ``k`` sees exactly the batches it would have seen.
For finite, map-style datasets, :func:`epoch_batches` walks a permutation keyed by
``(seed, epoch)``.

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
from typing import Any, Iterator, Protocol, Sequence, Union

import torch

from craftfn import random, tree

__all__ = [
    "train_val_split",
    "random_window_batch",
    "RandomWindows",
    "WindowDataset",
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


def _check_tokens(tokens: Any) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        desc = f"a tensor of shape {tuple(tokens.shape)} and dtype {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"tokens must be a 1-d integer tensor, got {desc}")


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
    _check_tokens(tokens)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = tokens.numel()
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} tokens leaves an empty train or validation split")
    return tokens[: n - n_val], tokens[n - n_val :]


def random_window_batch(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    seed: int,
    step: Union[int, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Batch ``step``: ``batch_size`` windows at starts drawn from ``fold_in(key(seed), step)``.

    Args:
        tokens: 1-d token ids, longer than ``block_size``.
        batch_size: windows per batch.
        block_size: tokens per window.
        seed: the data seed.
        step: the step (int or 0-d integer tensor).

    Returns:
        ``{"input_ids": (B, T), "labels": (B, T)}`` int64 on ``tokens``' device; labels are the
        inputs shifted by one.

    Example:
        >>> b = random_window_batch(torch.arange(50), 4, 8, seed=1, step=0)
        >>> b["labels"].shape
        torch.Size([4, 8])
    """
    _check_tokens(tokens)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("block_size", block_size)
    n = tokens.numel()
    if n <= block_size:
        raise ValueError(f"tokens has {n} tokens; random windows need more than block_size={block_size}")
    key = random.fold_in(random.fold_in(random.key(seed), _WINDOW_TAG), step)
    starts = random.randint(key, (batch_size,), 0, n - block_size, device=tokens.device)
    idx = starts[:, None] + torch.arange(block_size + 1, device=tokens.device)
    chunk = tokens[idx].to(torch.int64)
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


class RandomWindows:
    """An endless source of :func:`random_window_batch` batches: ``windows[step]`` or iterate.

    Example:
        >>> src = RandomWindows(torch.arange(50), batch_size=2, block_size=4, seed=0)
        >>> bool((src[5]["input_ids"] == next(src.iterate(start_step=5))["input_ids"]).all())
        True
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int = 0) -> None:
        _check_tokens(tokens)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("block_size", block_size)
        if tokens.numel() <= block_size:
            raise ValueError(f"tokens has {tokens.numel()} tokens; random windows need more than block_size={block_size}")
        self.tokens, self.batch_size, self.block_size, self.seed = tokens, batch_size, block_size, seed

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return random_window_batch(self.tokens, self.batch_size, self.block_size, self.seed, step)

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

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int | None = None) -> None:
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
        starts = indices.to(device=self.tokens.device, dtype=torch.int64) * self.stride
        chunk = self.tokens[starts[:, None] + torch.arange(self.block_size + 1, device=self.tokens.device)].to(torch.int64)
        return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


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

