"""``ProgressTracker``: smoothed loss, throughput, ETA and MFU from the metrics stream.

The first ``warmup_steps`` steps of a run (compilation, allocator warm-up) are left
out of throughput and ETA; after that, rates are measured over a sliding window of
recent steps. Time spent outside training steps (evaluation, sampling, saving) is
excluded with :meth:`ProgressTracker.resume_clock`.

MFU (model FLOPs utilisation) is ``flops_per_token * tokens_per_sec / peak_flops``.
``peak_flops`` defaults to :func:`default_peak_flops`: on CPU a rough
``100 GFLOP/s per thread`` (fp32 FMA on AVX2/AVX-512 cores at 2-3 GHz), on known
GPUs their dense bf16 peak; pass your machine's number for a meaningful figure.

Example:
    >>> tracker = ProgressTracker(total_steps=100, warmup_steps=1, flops_per_token=6e6, peak_flops=1e12)
    >>> tracker.start(0, now=0.0)
    >>> tracker.update(1, 2.0, tokens=512, samples=8, now=5.0)   # warm-up: no rates yet
    {'loss_smoothed': 2.0}
    >>> sorted(tracker.update(2, 1.8, tokens=512, samples=8, now=5.5))
    ['eta_sec', 'loss_smoothed', 'mfu', 'samples_per_sec', 'tokens_per_sec']
"""

from __future__ import annotations

import collections
import time
from typing import Optional

import torch

__all__ = ["ProgressTracker", "default_peak_flops", "CPU_PEAK_FLOPS_PER_THREAD"]

CPU_PEAK_FLOPS_PER_THREAD = 100e9

# Dense bf16 peaks (FLOP/s) of common accelerators, by a substring of the device name.
_GPU_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("L4", 121e12), ("A10", 125e12), ("V100", 125e12), ("4090", 165e12), ("3090", 71e12))


def default_peak_flops(device: Optional[torch.device] = None) -> Optional[float]:
    """A rough peak FLOP/s for ``device`` (``None``: unknown GPU).

    CPU: ``torch.get_num_threads() * CPU_PEAK_FLOPS_PER_THREAD`` (100 GFLOP/s a thread).

    Example:
        >>> default_peak_flops(torch.device("cpu")) == torch.get_num_threads() * 100e9
        True
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS:
            if key in name:
                return peak
        return None
    if device.type == "cpu":
        return torch.get_num_threads() * CPU_PEAK_FLOPS_PER_THREAD
    return None


class ProgressTracker:
    """Turn per-step (loss, tokens, samples) into smoothed loss, rates, ETA and MFU.

    Args:
        total_steps: the last step of the run (for the ETA).
        warmup_steps: steps after ``start`` left out of rates and ETA.
        smoothing: weight of the past in the loss EMA in [0, 1).
        window: steps in the sliding window for rates.
        flops_per_token: training FLOPs per token (``6 * params`` plus attention), for MFU.
        peak_flops: the device's peak FLOP/s; default :func:`default_peak_flops` on CPU.

    Example:
        >>> tracker = ProgressTracker(total_steps=1000)
    """

    def __init__(
        self,
        total_steps: Optional[int] = None,
        warmup_steps: int = 2,
        smoothing: float = 0.9,
        window: int = 50,
        flops_per_token: Optional[float] = None,
        peak_flops: Optional[float] = None,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.smoothing = smoothing
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops if peak_flops is not None else (default_peak_flops() if flops_per_token else None)
        self._window: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=window)
        self.start(0)

    def start(self, step: int, now: Optional[float] = None) -> None:
        """Begin (or resume) at ``step``; the next ``warmup_steps`` steps are warm-up."""
        self.start_step = step
        self._last_time = time.perf_counter() if now is None else now
        self._ema: Optional[float] = None
        self._window.clear()

    def resume_clock(self, now: Optional[float] = None) -> None:
        """Forget the time since the last update (it was spent outside training steps)."""
        self._last_time = time.perf_counter() if now is None else now

    def update(self, step: int, loss: Optional[float], tokens: int = 0, samples: int = 0, now: Optional[float] = None) -> dict[str, float]:
        """Record step ``step`` and return the derived metrics known so far.

        Returns:
            ``loss_smoothed``; after warm-up also ``tokens_per_sec``, ``samples_per_sec``,
            ``eta_sec`` (with ``total_steps``) and ``mfu`` (with FLOPs and a peak).
        """
        now = time.perf_counter() if now is None else now
        dt = max(now - self._last_time, 1e-9)
        self._last_time = now
        out: dict[str, float] = {}
        if loss is not None and loss == loss and abs(loss) != float("inf"):
            s = self.smoothing
            # Seeded with the first value, so the average needs no bias correction.
            self._ema = loss if self._ema is None else s * self._ema + (1 - s) * loss
        if self._ema is not None:
            out["loss_smoothed"] = self._ema
        if step - self.start_step <= self.warmup_steps:
            return out
        self._window.append((dt, tokens, samples))
        seconds = sum(w[0] for w in self._window)
        tokens_per_sec = sum(w[1] for w in self._window) / seconds
        out["tokens_per_sec"] = tokens_per_sec
        out["samples_per_sec"] = sum(w[2] for w in self._window) / seconds
        if self.total_steps is not None:
            out["eta_sec"] = max(0, self.total_steps - step) * seconds / len(self._window)
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_sec / self.peak_flops
        return out
