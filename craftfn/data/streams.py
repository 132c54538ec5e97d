"""Token streams: one long sequence of token ids read from memory-mapped shards (or arrays in memory).

A :class:`TokenStream` is an ordered list of ranges of 1-d arrays: the token shards of a corpus
(``numpy.memmap``, nothing read until a window asks for it), or its training or validation
documents after :func:`split_documents`. Windows are read with :meth:`TokenStream.gather`, so RAM
holds the batch, never the corpus. The batching functions (:func:`craftfn.data.random_window_batch`,
:class:`craftfn.data.WindowDataset`) take a stream wherever they take a token tensor, and give the
same windows for the same tokens.

Example:
    >>> import numpy as np
    >>> s = TokenStream([np.arange(5), np.arange(100, 103)])
    >>> len(s), s.read(3, 7).tolist()
    (8, [3, 4, 100, 101])
    >>> s.gather([0, 4], 3).tolist()
    [[0, 1, 2], [4, 100, 101]]
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from craftfn import random

__all__ = ["TokenStream", "split_documents"]

_SPLIT_TAG = 0x53504C54  # the key stream of the train/validation split of documents


class TokenStream:
    """A 1-d sequence of token ids made of ranges of arrays (memory-mapped shards or in memory).

    Args:
        arrays: 1-d integer numpy arrays (``numpy.memmap`` for shards on disk).
        ranges: ``(k, 3)`` rows ``(array index, start, stop)``, read in order; default: every
            array whole, in order.

    Example:
        >>> TokenStream([np.arange(10)], [[0, 2, 4], [0, 8, 10]]).read(0, 4).tolist()
        [2, 3, 8, 9]
    """

    def __init__(self, arrays: Sequence[np.ndarray], ranges: Optional[Any] = None) -> None:
        arrays = list(arrays)
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
                desc = f"shape {a.shape}, dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
                raise TypeError(f"TokenStream arrays must be 1-d integer numpy arrays; arrays[{i}] is {desc}")
        if ranges is None:
            ranges = [(i, 0, len(a)) for i, a in enumerate(arrays)]
        table = np.asarray(ranges, dtype=np.int64).reshape(-1, 3)
        for index, start, stop in table.tolist():
            if not 0 <= index < len(arrays) or not 0 <= start <= stop <= len(arrays[index]):
                raise ValueError(f"TokenStream range {(index, start, stop)} is outside arrays[{index}] (length {len(arrays[index]) if 0 <= index < len(arrays) else 'n/a'})")
        self.arrays = arrays
        self.ranges = table[table[:, 2] > table[:, 1]]
        self._offsets = np.concatenate([[0], np.cumsum(self.ranges[:, 2] - self.ranges[:, 1])]).astype(np.int64)
        self._files: dict[int, Any] = {}  # array index -> open file of a memory-mapped shard (see _copy)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}  # open files stay in their process

    def _copy(self, index: int, lo: int, hi: int, out: np.ndarray) -> None:
        """``out[:] = arrays[index][lo:hi]``, reading a memory-mapped shard with ``preadv``.

        Slicing the mapping would map whole page-cache folios (hundreds of KB per window on
        Linux with large folios) into this process: RSS would then grow with the corpus over a
        run. A positioned read copies just the window, and the page cache stays the kernel's.
        """
        a = self.arrays[index]
        if not (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and hasattr(os, "preadv") and a.filename):
            out[:] = a[lo:hi]
            return
        f = self._files.get(index)
        if f is None:
            f = self._files[index] = open(a.filename, "rb")  # noqa: SIM115 - kept open for the stream's life
        raw = out if out.dtype == a.dtype else np.empty(hi - lo, a.dtype)
        view = memoryview(raw).cast("B")
        done, offset = 0, a.offset + lo * a.itemsize
        while done < view.nbytes:
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"token shard {a.filename!r} is shorter than its {len(a)} tokens (truncated while in use)")
            done += n
        if raw is not out:
            out[:] = raw

    @classmethod
    def from_tensor(cls, tokens: torch.Tensor) -> TokenStream:
        """A stream over a 1-d CPU token tensor (shares its memory)."""
        return cls([tokens.detach().cpu().numpy()])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def numel(self) -> int:
        """The number of tokens (as ``Tensor.numel``)."""
        return len(self)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a new int64 array.

        Example:
            >>> TokenStream([np.arange(4, dtype=np.uint16)]).read(1, 3).dtype
            dtype('int64')
        """
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"TokenStream.read({start}, {stop}) is outside the stream of {n} tokens")
        out = np.empty(stop - start, np.int64)
        filled = 0
        seg = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while filled < stop - start:
            index, a, b = self.ranges[seg]
            lo = a + (start + filled - self._offsets[seg])
            hi = min(b, lo + (stop - start - filled))
            self._copy(int(index), int(lo), int(hi), out[filled : filled + hi - lo])
            filled += hi - lo
            seg += 1
        return out

    def gather(self, starts: Union[Sequence[int], np.ndarray, torch.Tensor], length: int) -> torch.Tensor:
        """The windows ``[s, s + length)`` for each ``s`` in ``starts``: a ``(len(starts), length)`` int64 tensor.

        Only the windows are read from the shards (one positioned read each, or one gather when
        the stream is a single array in memory).
        """
        if isinstance(starts, torch.Tensor):
            starts = starts.detach().cpu().numpy()
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        n = len(self)
        if starts.size and (int(starts.min()) < 0 or int(starts.max()) + length > n):
            raise IndexError(f"windows of {length} tokens at starts in [{int(starts.min())}, {int(starts.max())}] do not fit a stream of {n} tokens")
        if len(self.ranges) == 1 and not isinstance(self.arrays[int(self.ranges[0, 0])], np.memmap):
            index, base, _ = self.ranges[0]
            rows = self.arrays[index][base + starts[:, None] + np.arange(length)]
            return torch.from_numpy(np.asarray(rows, dtype=np.int64))
        out = np.empty((starts.size, length), np.int64)
        for i, s in enumerate(starts.tolist()):
            out[i] = self.read(s, s + length)
        return torch.from_numpy(out)

    def select(self, spans: Any) -> TokenStream:
        """The stream made of ``spans`` (``(m, 2)`` rows ``[start, stop)`` of this stream), in order.

        Example:
            >>> TokenStream([np.arange(10)]).select([[6, 8], [0, 2]]).read(0, 4).tolist()
            [6, 7, 0, 1]
        """
        rows = []
        n = len(self)
        for start, stop in np.asarray(spans, dtype=np.int64).reshape(-1, 2).tolist():
            if not 0 <= start <= stop <= n:
                raise IndexError(f"span [{start}, {stop}) is outside the stream of {n} tokens")
            seg = int(np.searchsorted(self._offsets, start, side="right")) - 1
            while start < stop:
                index, a, b = self.ranges[seg].tolist()
                lo = a + (start - int(self._offsets[seg]))
                hi = min(b, lo + (stop - start))
                rows.append((index, lo, hi))
                start += hi - lo
                seg += 1
        return TokenStream(self.arrays, rows)

    def to_tensor(self) -> torch.Tensor:
        """Every token as one int64 tensor in memory (for small streams: tests, inspection)."""
        return torch.from_numpy(self.read(0, len(self)))

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} tokens in {len(self.ranges)} range(s) of {len(self.arrays)} array(s))"


def _check_fraction(val_fraction: Any) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


def split_documents(document_ends: Any, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a stream of documents into (train, validation) spans, by whole documents, fixed by ``seed``.

    Documents are taken into validation in an order keyed by ``seed`` until they hold
    ``val_fraction`` of the tokens (at least one document each side). A stream of one document
    is split like :func:`craftfn.data.train_val_split`: its last ``val_fraction`` is validation.

    Args:
        document_ends: the increasing end offsets of the documents (the last is the stream length).
        val_fraction: in (0, 1).
        seed: the data seed.

    Returns:
        ``(train_spans, val_spans)``: ``(m, 2)`` int64 rows ``[start, stop)``, in stream order;
        use them with :meth:`TokenStream.select`.

    Example:
        >>> train, val = split_documents([10, 20, 30, 40], 0.25, seed=0)
        >>> int((val[:, 1] - val[:, 0]).sum()), int((train[:, 1] - train[:, 0]).sum())
        (10, 30)
    """
    _check_fraction(val_fraction)
    ends = np.asarray(document_ends, dtype=np.int64).reshape(-1)
    if ends.size == 0 or ends[-1] <= 0:
        raise ValueError("split_documents: the stream is empty")
    starts = np.concatenate([[0], ends[:-1]])
    if np.any(ends <= starts):
        raise ValueError("split_documents: document_ends must be strictly increasing and positive")
    n = int(ends[-1])
    if ends.size == 1:
        n_val = int(round(n * val_fraction))
        if n_val < 1 or n_val >= n:
            raise ValueError(f"val_fraction={val_fraction} of {n} tokens leaves an empty train or validation split")
        return np.array([[0, n - n_val]], np.int64), np.array([[n - n_val, n]], np.int64)
    order = random.permutation(random.fold_in(random.key(seed), _SPLIT_TAG), ends.size).numpy()
    taken = np.cumsum((ends - starts)[order])
    count = int(np.searchsorted(taken, n * val_fraction)) + 1
    if count >= ends.size:
        raise ValueError(
            f"val_fraction={val_fraction} takes all {ends.size} documents into validation (documents are not split); "
            "lower val_fraction or add documents"
        )
    is_val = np.zeros(ends.size, bool)
    is_val[order[:count]] = True
    return _runs(starts, ends, ~is_val), _runs(starts, ends, is_val)


def _runs(starts: np.ndarray, ends: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The spans of the kept documents, neighbours merged."""
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    first = np.concatenate([[idx[0]], idx[breaks + 1]])
    last = np.concatenate([idx[breaks], [idx[-1]]])
    return np.stack([starts[first], ends[last]], axis=1).astype(np.int64)
