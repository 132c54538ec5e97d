"""Explicit, functional random keys (JAX style) on PyTorch.

A key is a ``(2,)`` int64 tensor holding two 32-bit words. Keys are derived
with a counter-based integer hash computed by tensor ops, so derivation is
identical across runs, platforms and devices, never touches a global RNG, and
traces under ``torch.compile`` without host syncs.

Example:
    >>> from craftfn import random
    >>> k = random.key(0)
    >>> a, b = random.split(k)
    >>> step_key = random.fold_in(k, 7)
    >>> x = random.normal(step_key, (2, 3))
    >>> bool((x == random.normal(step_key, (2, 3))).all())
    True

Keys live on the CPU by default; they are tiny, and keeping them there means
reading one (to seed a ``torch.Generator`` for module dropout) never stalls an
accelerator.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "Key",
    "key",
    "split",
    "fold_in",
    "key_data",
    "seed_of",
    "generator",
    "uniform",
    "normal",
    "bernoulli",
    "randint",
    "permutation",
    "fork_torch_rng",
]

Key = torch.Tensor

_MASK32 = 0xFFFFFFFF
# Domain tags keep split(k)[i], fold_in(k, i) and the sampling streams distinct.
_TAG_SEED = 0x243F6A88
_TAG_SPLIT = 0x85A308D3
_TAG_FOLD = 0x13198A2E
_TAG_BITS = 0x03707344


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (the 'lowbias32' constants), elementwise on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _hash2(k0: torch.Tensor, k1: torch.Tensor, data: torch.Tensor, tag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive two new 32-bit words from a key (k0, k1) and 32-bit data words."""
    a = _mix32(k0 ^ _mix32(data ^ tag))
    b = _mix32(k1 ^ _mix32(a + (data ^ (tag >> 1)) + 0x9E3779B9))
    a = _mix32(a ^ b ^ 0x7F4A7C15)
    return a, b


def _check_key(k: torch.Tensor, argname: str = "key") -> None:
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.shape[-1:] != (2,):
        raise TypeError(
            f"{argname} must be a craftfn key: an int64 tensor of shape (..., 2) from random.key(seed); "
            f"got {type(k).__name__}"
            + (f" with dtype {k.dtype} and shape {tuple(k.shape)}" if isinstance(k, torch.Tensor) else "")
        )


def key(seed: int, device: torch.device | str | None = "cpu") -> Key:
    """A key from an integer seed (any Python int; negative and > 64-bit seeds are fine).

    Example:
        >>> random.key(0).shape
        torch.Size([2])
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int, got {seed!r} of type {type(seed).__name__}")
    words = []
    s = abs(seed)
    while True:
        words.append(s & _MASK32)
        s >>= 32
        if s == 0:
            break
    k0 = torch.tensor(_TAG_SEED, dtype=torch.int64)
    # The word count and the sign go into the initial state, so every int gives its own key.
    k1 = torch.tensor(len(words) * 2 + (seed < 0), dtype=torch.int64)
    for w in words:
        k0, k1 = _hash2(k0, k1, torch.tensor(w, dtype=torch.int64), _TAG_SEED)
    return torch.stack([k0, k1]).to(device)


def _as_data(data: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex():
            raise TypeError(f"data must be an integer (or integer tensor), got a tensor of dtype {data.dtype}")
        return data.to(device=device, dtype=torch.int64) & _MASK32
    if isinstance(data, bool) or not isinstance(data, int):
        raise TypeError(f"data must be an int or an integer tensor, got {data!r}")
    return torch.tensor(data & _MASK32, dtype=torch.int64, device=device)


def fold_in(key: Key, data: int | torch.Tensor) -> Key:
    """A new key derived from ``key`` and an integer (e.g. the step, a 0-d tensor: no sync).

    Example:
        >>> k = random.key(0)
        >>> bool((random.fold_in(k, 1) != random.fold_in(k, 2)).any())
        True
    """
    _check_key(key)
    d = _as_data(data, key.device)
    a, b = _hash2(key[..., 0], key[..., 1], d, _TAG_FOLD)
    return torch.stack([a, b], dim=-1)


def split(key: Key, num: int = 2) -> Key:
    """``num`` new keys, shape ``(num, 2)``; they differ from each other and from ``key``.

    Example:
        >>> random.split(random.key(0), 3).shape
        torch.Size([3, 2])
    """
    _check_key(key)
    if key.dim() != 1:
        raise ValueError(f"split takes a single key of shape (2,), got shape {tuple(key.shape)}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    counter = torch.arange(num, dtype=torch.int64, device=key.device)
    a, b = _hash2(key[0].expand(num), key[1].expand(num), counter, _TAG_SPLIT)
    return torch.stack([a, b], dim=-1)


def key_data(key: Key) -> list[int]:
    """The two 32-bit words of a key as Python ints (reads to the host)."""
    _check_key(key)
    return [int(v) for v in key.reshape(-1, 2)[0].tolist()]


def seed_of(key: Key) -> int:
    """A 63-bit seed for torch's own generators, derived from ``key`` (reads to the host)."""
    hi, lo = key_data(key)
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def generator(key: Key, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``key``, for APIs that take a ``generator=``.

    Example:
        >>> g = random.generator(random.key(1))
        >>> torch.rand(2, generator=g).shape
        torch.Size([2])
    """
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(seed_of(key))
    return g


def _bits(key: Key, shape: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    """Uniform 32-bit words (in int64), one per element: hash(key, element index)."""
    _check_key(key)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    device = key.device if device is None else torch.device(device)
    k = key.to(device)
    n = math.prod(shape)
    counter = torch.arange(n, dtype=torch.int64, device=device)
    a, b = _hash2(k[0], k[1], counter, _TAG_BITS)
    return (a ^ _mix32(b + counter)).reshape(shape)


def uniform(
    key: Key,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform samples in ``[low, high)`` as a pure function of ``key``.

    Example:
        >>> u = random.uniform(random.key(0), (1000,))
        >>> 0.4 < float(u.mean()) < 0.6
        True
    """
    if not dtype.is_floating_point:
        raise TypeError(f"uniform needs a floating dtype, got {dtype}")
    # 24 high bits -> exactly representable in fp32, never reaches 1.0.
    u = (_bits(key, shape, device) >> 8).to(torch.float64) * (1.0 / (1 << 24))
    return (low + (high - low) * u).to(dtype)


def normal(
    key: Key,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal samples (Box-Muller over two uniform streams).

    Example:
        >>> z = random.normal(random.key(0), (4000,))
        >>> abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
        True
    """
    k1, k2 = split(key, 2)
    u1 = uniform(k1, shape, torch.float64, device=device)
    u2 = uniform(k2, shape, torch.float64, device=device)
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
    return (mean + std * z).to(dtype)


def bernoulli(key: Key, p: float | torch.Tensor = 0.5, shape: Sequence[int] | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean samples that are True with probability ``p``.

    Example:
        >>> random.bernoulli(random.key(0), 0.0, (3,))
        tensor([False, False, False])
    """
    if shape is None:
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else ()
    return uniform(key, shape, torch.float64, device=device) < torch.as_tensor(p, dtype=torch.float64, device=device)


def randint(key: Key, shape: Sequence[int], low: int, high: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integers uniform in ``[low, high)`` (int64).

    Example:
        >>> r = random.randint(random.key(0), (100,), 0, 10)
        >>> int(r.min()) >= 0 and int(r.max()) < 10
        True
    """
    if high <= low:
        raise ValueError(f"randint needs high > low, got low={low}, high={high}")
    span = high - low
    if span > (1 << 32):
        raise ValueError(f"randint range must be at most 2**32 wide, got {span}")
    # Multiply-shift maps 32 uniform bits onto [0, span) with bias below 2**-32 * span.
    return low + ((_bits(key, shape, device) * span) >> 32) if span < (1 << 31) else low + _bits(key, shape, device) % span


def permutation(key: Key, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` (argsort of hashed counters).

    Example:
        >>> sorted(random.permutation(random.key(0), 5).tolist())
        [0, 1, 2, 3, 4]
    """
    return torch.argsort(_bits(key, (n,), device), stable=True)


class fork_torch_rng:  # noqa: N801 - used like a function (``with random.fork_torch_rng(key):``)
    """Run a block with torch's global RNG seeded from ``key``, restoring it afterwards.

    This is how module-internal randomness (``nn.Dropout``) becomes a pure
    function of an explicit key: the step derives a key, and the forward runs
    inside this context. Reads the (CPU) key to the host once.

    Example:
        >>> with random.fork_torch_rng(random.key(3)):
        ...     a = torch.rand(2)
        >>> with random.fork_torch_rng(random.key(3)):
        ...     b = torch.rand(2)
        >>> bool((a == b).all())
        True
    """

    def __init__(self, key: Key, devices: Sequence[torch.device] | None = None) -> None:
        self.seed = seed_of(key)
        self.devices = list(devices) if devices is not None else None

    def __enter__(self) -> fork_torch_rng:
        cuda_devices = [d for d in (self.devices or []) if torch.device(d).type == "cuda"]
        self._fork = torch.random.fork_rng(devices=[torch.device(d).index or 0 for d in cuda_devices], enabled=True)
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
