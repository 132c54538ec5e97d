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

Keys live on the CPU by default; they are tiny, and deriving them never stalls an
accelerator.

Module randomness (``nn.Dropout``, ``F.dropout``, the dropout of
``F.scaled_dot_product_attention``, ``torch.rand``/``randn``/``bernoulli`` called inside a
model) becomes a function of a key inside :func:`module_rng`: the same key gives the same masks
eagerly and under ``torch.compile`` (any backend), different keys give independent masks, and
the key is never read to the host. ``TrainState.apply(..., rng=key)`` and the train/eval steps
open that scope for you.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from craftfn._donated import Donated

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
    "dropout",
    "module_rng",
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
    if isinstance(k, Donated):  # the key of a donated TrainState
        raise k.error()
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


# ---------------------------------------------------------------------------------------------
# Module randomness: a keyed counter stream cheap enough to replace torch's dropout RNG.
#
# The stream hashes (key, counter) with 32-bit integer arithmetic in int32 tensors. int32
# multiplication and addition wrap modulo 2**32 (two's complement) in torch's kernels and in the
# code inductor generates, so eager and compiled runs give the same bits; right shifts are made
# logical by masking. Two rounds of the 'lowbias32' mixer, one keyed by each key word, cost about
# what torch's own CPU dropout RNG costs (``benchmarks/dropout_bench.py``), where the int64 hash
# behind :func:`uniform` costs ~6x more.


def _as_i32(c: int) -> int:
    """The int32 with the same low 32 bits as ``c``."""
    c &= _MASK32
    return c - (1 << 32) if c >= (1 << 31) else c


_MIX_M1, _MIX_M2 = _as_i32(0x7FEB352D), _as_i32(0x846CA68B)
_UNIFORM_BITS = 24  # uniform draws and dropout thresholds use the top 24 bits


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """'lowbias32' on int32 in place: xor-shift, multiply, xor-shift, multiply, xor-shift."""
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_MIX_M1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_MIX_M2)
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    return x


def _stream_words(key: Key, device: torch.device) -> torch.Tensor:
    """The key's two 32-bit words as int32 on ``device`` (an exact re-interpretation)."""
    w = ((key.reshape(2) + (1 << 31)) & _MASK32) - (1 << 31)
    return w.to(device=device, dtype=torch.int32)


def _stream_bits(words: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
    """``numel`` 32-bit words (int32) of the stream keyed by ``words``, at counters ``offset + i``."""
    if numel >= (1 << 31):
        raise ValueError(f"a keyed draw takes at most 2**31 - 1 elements at once, got {numel}")
    c = torch.arange(numel, dtype=torch.int32, device=words.device)
    if offset % (1 << 32):
        c.add_(_as_i32(offset))
    c.bitwise_xor_(words[0])
    _mix32_(c)
    c.add_(words[1])
    return _mix32_(c)


def _uniform_from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in [0, 1) from 32-bit words, with no more bits than ``dtype`` holds (never 1.0)."""
    m = {torch.float16: 11, torch.bfloat16: 8}.get(dtype, _UNIFORM_BITS)
    u = ((bits >> (32 - m)) & ((1 << m) - 1)).to(torch.float32) * (1.0 / (1 << m))
    return u if dtype == torch.float32 else u.to(dtype)


def _check_p(p: Any, argname: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout probability {argname} must be a Python float, got {p!r:.60}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability {argname} must be in [0, 1], got {p}")
    return float(p)


def _dropout_with(draw: Callable[[int, torch.device], torch.Tensor], x: torch.Tensor, p: float, training: bool, inplace: bool, mask_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Dropout of ``x`` with the keep mask (of ``mask_shape``, broadcast) drawn by ``draw``."""
    p = _check_p(p)
    if not training or p == 0.0:
        return x
    shape = tuple(x.shape) if mask_shape is None else tuple(mask_shape)
    if p == 1.0:
        return x.mul_(0.0) if inplace else x * 0.0
    threshold = int(round(p * (1 << _UNIFORM_BITS)))
    bits = draw(math.prod(shape), x.device)
    keep = (((bits >> (32 - _UNIFORM_BITS)) & ((1 << _UNIFORM_BITS) - 1)) >= threshold).reshape(shape)
    scale = 1.0 / (1.0 - p)
    if inplace:
        return x.mul_(keep).mul_(scale)
    return torch.where(keep, x * scale, 0.0)


def dropout(key: Key, x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout of ``x`` as a pure function of ``key``: zero each element with probability ``p``,
    scale the rest by ``1 / (1 - p)``.

    The same key gives the same mask eagerly and under ``torch.compile``; the key stays on its
    device (no host read). Inside :func:`module_rng`, ``F.dropout`` draws from the same kind of
    stream.

    Example:
        >>> x = torch.ones(2, 4)
        >>> a = random.dropout(random.key(0), x, 0.5)
        >>> bool((a == random.dropout(random.key(0), x, 0.5)).all()), sorted(set(a.flatten().tolist())) <= [0.0, 2.0]
        (True, True)
    """
    _check_key(key)
    return _dropout_with(lambda n, device: _stream_bits(_stream_words(key, device), 0, n), x, p, training, False)


class _KeyedRandomness(TorchFunctionMode):
    """The torch function mode behind :func:`module_rng` (see there)."""

    def __init__(self, key: Key, offset: int = 0) -> None:
        super().__init__()
        self.key = key
        # Counter of the next draw: each draw takes the next ``numel`` counters, so draws in one
        # scope never overlap and replay identically in the same call order.
        self.offset = offset
        self._fallback: Optional[fork_torch_rng] = None

    def draw(self, numel: int, device: torch.device) -> torch.Tensor:
        share = _ROWS_OF_GLOBAL_BATCH[0]
        if share is not None:
            # This rank's rows of a draw made for the global batch (rank r of n holds the r-th of n
            # equal row blocks): counters are positions, so the rank takes its block of them.
            rank, world = share
            bits = _stream_bits(_stream_words(self.key, device), self.offset + rank * numel, numel)
            self.offset += numel * world
            return bits
        bits = _stream_bits(_stream_words(self.key, device), self.offset, numel)
        self.offset += numel
        return bits

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        handler = _KEYED_HANDLERS.get(func)
        if handler is not None and kwargs.get("generator") is None:
            out = handler(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        elif func in _UNKEYED_RANDOM and kwargs.get("generator") is None:
            self._seed_fallback(func)
        return func(*args, **kwargs)

    def _seed_fallback(self, func: Any) -> None:
        if torch.compiler.is_compiling():
            raise TypeError(
                f"{getattr(func, '__name__', func)} is not keyed: inside craftfn.random.module_rng (a step or "
                f"TrainState.apply(..., rng=key)) under torch.compile, module randomness must come from: "
                f"{', '.join(sorted(_KEYED_NAMES))}; draw anything else with craftfn.random (randint, permutation, ...) from a key."
            )
        if self._fallback is None:
            # Eagerly, other random functions run on torch's global RNG seeded from the key on
            # first use (one host read), restored when the scope ends.
            self._fallback = fork_torch_rng(fold_in(self.key, _TAG_FALLBACK))
            self._fallback.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._fallback is not None:
                self._fallback.__exit__(*exc)
                self._fallback = None


_TAG_FALLBACK = 0x5EED

# (rank, world) while keyed draws are this rank's rows of the global batch's (craftfn.distributed's
# dropout="global_batch"); None otherwise.
_ROWS_OF_GLOBAL_BATCH: list[Optional[tuple[int, int]]] = [None]


@contextlib.contextmanager
def _rows_of_global_batch(rank: int, world: int) -> Iterator[None]:
    previous = _ROWS_OF_GLOBAL_BATCH[0]
    _ROWS_OF_GLOBAL_BATCH[0] = (rank, world)
    try:
        yield
    finally:
        _ROWS_OF_GLOBAL_BATCH[0] = previous


def module_rng(key: Key) -> _KeyedRandomness:
    """A scope in which module randomness is a pure function of ``key``.

    Inside it, ``F.dropout`` (``nn.Dropout``), ``F.dropout1d/2d/3d``, the dropout of
    ``F.scaled_dot_product_attention``, ``torch.rand``/``randn``, ``torch.bernoulli`` and
    ``Tensor.bernoulli_``/``uniform_``/``normal_`` (without a ``generator=``) draw from a counter
    stream keyed by ``key``: successive draws take successive counters, so a forward in the same
    order gives the same masks, eagerly and under ``torch.compile``, without reading the key to
    the host. Other random functions (``randint``, ``multinomial``, ``rrelu``, ...) run eagerly on
    torch's RNG seeded from the key, and raise under ``torch.compile``; ``rand_like``/``randn_like``
    too, except that under ``torch.compile`` (torch 2.13) they bypass the scope and draw from
    torch's RNG: write ``torch.rand(x.shape, dtype=x.dtype, device=x.device)`` instead. Steps open this scope with their key; ``TrainState.apply(...,
    rng=key)`` with the given key.

    Example:
        >>> drop = torch.nn.Dropout(0.5)
        >>> with random.module_rng(random.key(0)):
        ...     a = drop(torch.ones(8))
        >>> with random.module_rng(random.key(0)):
        ...     b = drop(torch.ones(8))
        >>> bool((a == b).all())
        True
    """
    _check_key(key)
    return _KeyedRandomness(key)


def _active_module_rng() -> Optional[_KeyedRandomness]:
    """The innermost :func:`module_rng` scope in effect, if any (for activation checkpointing)."""
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, _KeyedRandomness):
            return mode
    return None


# --- keyed versions of torch's random functions (argument names as torch's)


def _keyed_dropout(mode: _KeyedRandomness, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    return _dropout_with(mode.draw, input, p, training, inplace)


def _channel_dropout(batched_ndim: int) -> Callable[..., torch.Tensor]:
    def keyed(mode: _KeyedRandomness, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if input.dim() not in (batched_ndim, batched_ndim - 1):
            return NotImplemented  # torch raises its own error
        lead = 2 if input.dim() == batched_ndim else 1
        mask_shape = tuple(input.shape[:lead]) + (1,) * (input.dim() - lead)
        return _dropout_with(mode.draw, input, p, training, inplace, mask_shape)

    return keyed


def _keyed_sdpa(
    mode: _KeyedRandomness,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Any:
    if not dropout_p:
        return NotImplemented  # no randomness: torch's fused kernels
    # Attention with dropout on the weights, as torch's math kernel computes it, the mask keyed.
    L, S = query.size(-2), key.size(-2)  # noqa: N806
    if enable_gqa and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * factor
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = _dropout_with(mode.draw, torch.softmax(scores, dim=-1), dropout_p, True, False)
    return weights @ value


def _size_args(size: Sequence[Any]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    return tuple(size)


def _keyed_rand(normal: bool) -> Callable[..., Any]:
    def keyed(mode: _KeyedRandomness, *size: Any, out: Any = None, dtype: Optional[torch.dtype] = None, layout: Any = None,
              device: Any = None, requires_grad: bool = False, pin_memory: bool = False, names: Any = None) -> Any:
        if out is not None or names is not None or layout not in (None, torch.strided):
            return NotImplemented
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            return NotImplemented
        device = torch.device(device) if device is not None else torch.empty(0).device
        values = _draw_values(mode, _size_args(size), dtype, device, normal)
        return values.requires_grad_(requires_grad) if requires_grad else values

    return keyed


def _draw_values(mode: _KeyedRandomness, shape: Sequence[int], dtype: torch.dtype, device: torch.device, normal: bool) -> torch.Tensor:
    n = math.prod(shape)
    if not normal:
        return _uniform_from_bits(mode.draw(n, device), dtype).reshape(shape)
    u1 = _uniform_from_bits(mode.draw(n, device), torch.float32)
    u2 = _uniform_from_bits(mode.draw(n, device), torch.float32)
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype).reshape(shape)


def _keyed_bernoulli(mode: _KeyedRandomness, input: torch.Tensor, p: Any = None, *, out: Any = None) -> Any:
    if out is not None or not input.is_floating_point():
        return NotImplemented
    probs = input if p is None else p
    u = _uniform_from_bits(mode.draw(input.numel(), input.device), torch.float32).reshape(input.shape)
    return (u < probs).to(input.dtype)


def _keyed_bernoulli_(mode: _KeyedRandomness, self: torch.Tensor, p: Any = 0.5) -> Any:
    if not self.is_floating_point():
        return NotImplemented
    u = _uniform_from_bits(mode.draw(self.numel(), self.device), torch.float32).reshape(self.shape)
    return self.copy_(u < p)


def _keyed_uniform_(mode: _KeyedRandomness, self: torch.Tensor, from_: float = 0.0, to: float = 1.0, **kwargs: Any) -> Any:
    if kwargs or not self.is_floating_point():
        return NotImplemented
    u = _draw_values(mode, tuple(self.shape), torch.float32, self.device, normal=False)
    return self.copy_(from_ + (to - from_) * u)


def _keyed_normal_(mode: _KeyedRandomness, self: torch.Tensor, mean: float = 0.0, std: float = 1.0, **kwargs: Any) -> Any:
    if kwargs or not self.is_floating_point():
        return NotImplemented
    z = _draw_values(mode, tuple(self.shape), torch.float32, self.device, normal=True)
    return self.copy_(mean + std * z)


_KEYED_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.dropout: _keyed_dropout,
    F.dropout1d: _channel_dropout(3),
    F.dropout2d: _channel_dropout(4),
    F.dropout3d: _channel_dropout(5),
    F.scaled_dot_product_attention: _keyed_sdpa,
    torch.rand: _keyed_rand(normal=False),
    torch.randn: _keyed_rand(normal=True),
    torch.bernoulli: _keyed_bernoulli,
    torch.Tensor.bernoulli: _keyed_bernoulli,
    torch.Tensor.bernoulli_: _keyed_bernoulli_,
    torch.Tensor.uniform_: _keyed_uniform_,
    torch.Tensor.normal_: _keyed_normal_,
}
_KEYED_NAMES = {
    "F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d", "F.scaled_dot_product_attention(dropout_p=...)",
    "torch.rand", "torch.randn", "torch.bernoulli",
    "Tensor.bernoulli_", "Tensor.uniform_", "Tensor.normal_",
}
# torch.rand_like/randn_like: dynamo (torch 2.13) calls them without consulting function modes,
# so keying them eagerly would make eager and compiled draws differ.
_UNKEYED_RANDOM = {
    torch.rand_like, torch.randn_like, torch.randint, torch.randint_like, torch.randperm, torch.multinomial, torch.normal, torch.poisson,
    torch.rrelu, F.rrelu, F.rrelu_, F.alpha_dropout, F.feature_alpha_dropout, F.gumbel_softmax,
    torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_,
    torch.Tensor.log_normal_, torch.Tensor.multinomial,
}


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
