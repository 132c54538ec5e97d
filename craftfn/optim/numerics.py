"""Numerically safe helpers of optax's ``numerics`` (norms with a floor, saturating counters).

Example:
    >>> import torch
    >>> from craftfn import optim
    >>> optim.safe_norm(torch.zeros(3), min_norm=1e-6)
    tensor(1.0000e-06)
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["safe_norm", "safe_root_mean_squares", "safe_increment", "safe_int32_increment"]


def safe_norm(x: torch.Tensor, min_norm: Union[float, torch.Tensor], ord: Union[int, float, str, None] = None, axis: Optional[Union[int, tuple[int, ...]]] = None, keepdims: bool = False) -> torch.Tensor:  # noqa: A002
    """``max(||x||, min_norm)`` (the L2 norm over all elements, or ``ord``/``axis`` as ``torch.linalg.vector_norm``).

    Example:
        >>> safe_norm(torch.tensor([3.0, 4.0]), 1.0)
        tensor(5.)
    """
    norm = torch.linalg.vector_norm(x, ord=2 if ord is None else ord, dim=axis, keepdim=keepdims)
    floor = min_norm.to(norm.dtype) if isinstance(min_norm, torch.Tensor) else torch.tensor(min_norm, dtype=norm.dtype)
    return torch.maximum(norm, floor.to(norm.device))


def safe_root_mean_squares(x: torch.Tensor, min_rms: Union[float, torch.Tensor]) -> torch.Tensor:
    """``max(sqrt(mean(x^2)), min_rms)``.

    Example:
        >>> safe_root_mean_squares(torch.tensor([3.0, 4.0]), 0.0)
        tensor(3.5355)
    """
    rms = torch.sqrt(torch.mean(x * x))
    floor = min_rms.to(rms.dtype) if isinstance(min_rms, torch.Tensor) else torch.tensor(min_rms, dtype=rms.dtype)
    return torch.maximum(rms, floor.to(rms.device))


def safe_increment(count: torch.Tensor) -> torch.Tensor:
    """``count + 1``, saturating at the dtype's maximum instead of wrapping.

    Example:
        >>> safe_increment(torch.tensor(2**31 - 1, dtype=torch.int32))
        tensor(2147483647, dtype=torch.int32)
    """
    top = torch.iinfo(count.dtype).max if not count.is_floating_point() else torch.finfo(count.dtype).max
    return torch.where(count < top, count + 1, count)


def safe_int32_increment(count: torch.Tensor) -> torch.Tensor:
    """:func:`safe_increment` for an int32 counter (optax's older name).

    Example:
        >>> safe_int32_increment(torch.tensor(1, dtype=torch.int32))
        tensor(2, dtype=torch.int32)
    """
    if count.dtype != torch.int32:
        raise TypeError(f"safe_int32_increment: count must be an int32 tensor, got {count.dtype}")
    return safe_increment(count)
