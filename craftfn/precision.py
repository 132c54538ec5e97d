"""Mixed precision as step options: dtype policies and dynamic loss scaling as pure state.

A :class:`Policy` says in which dtype parameters are stored (``param_dtype``), in which
the forward computes (``compute_dtype``) and in which the loss and metrics come out
(``output_dtype``), as in jmp. ``make_train_step(loss_fn, policy="bf16")`` applies it
inside the differentiated function:

- *mixed* (``param_dtype != compute_dtype``, e.g. ``"bf16"``): fp32 master weights; the
  forward and the loss run under ``torch.autocast(compute_dtype)``, so matmuls run in
  bf16 while reductions autocast keeps in fp32; gradients and the update are fp32.
- *pure* (``param_dtype == compute_dtype``, e.g. ``"bf16_pure"``): parameters (and the
  optimizer state) are stored in bf16 (:func:`cast_state`); floating batch leaves are cast
  to the compute dtype; no autocast.

In both, the loss is cast to ``output_dtype`` before it is differentiated and reported.

fp16 needs loss scaling: :class:`DynamicLossScale` is a pytree (two 0-d tensors and static
hyperparameters) carried in the train state (:class:`LossScaledTrainState`, field
``loss_scale``). The step multiplies the loss by the scale, unscales the gradients, and on
non-finite gradients keeps the old parameters and optimizer state (``torch.where``, no
host sync) and halves the scale; after ``growth_interval`` finite steps in a row it grows.

Example:
    >>> import torch
    >>> from craftfn import precision
    >>> p = precision.get_policy("bf16")
    >>> p.param_dtype, p.compute_dtype, p.output_dtype
    (torch.float32, torch.bfloat16, torch.float32)
    >>> ls = precision.DynamicLossScale(scale=8.0, growth_interval=2)
    >>> ls = ls.adjust(torch.tensor(True)).adjust(torch.tensor(True))
    >>> ls.scale
    tensor(16.)
    >>> ls.adjust(torch.tensor(False)).scale
    tensor(8.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
import warnings
from typing import Any, ContextManager, Optional, Union

import torch

from craftfn import struct, tree
from craftfn.state import TrainState

__all__ = [
    "Policy",
    "POLICIES",
    "get_policy",
    "cast_state",
    "DynamicLossScale",
    "LossScaledTrainState",
    "with_loss_scale",
    "SlowPrecisionWarning",
    "warn_if_slow",
]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as_dtype(value: Any, argname: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _FLOAT_DTYPES:
            raise ValueError(f"{argname} must be a floating dtype ({', '.join(map(str, _FLOAT_DTYPES))}), got {value}")
        return value
    if isinstance(value, str) and value.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower()]
    raise ValueError(f"{argname} must be a torch floating dtype or one of {sorted(_DTYPE_NAMES)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where each dtype is used: storage of parameters, forward compute, loss/metrics output.

    Args:
        param_dtype: dtype the parameters (and optimizer state) are stored and updated in.
        compute_dtype: dtype of the forward pass. Differs from ``param_dtype``: autocast
            (mixed precision, fp32 master weights). Equal: the model simply runs in it.
        output_dtype: dtype of the loss before differentiation, and of the metrics.

    Dtypes may be given as ``torch.dtype`` or names (``"bf16"``, ``"float32"`` ...).

    Example:
        >>> Policy(torch.float32, "bf16", torch.float32).is_mixed
        True
    """

    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32
    output_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, name, _as_dtype(getattr(self, name), name))

    @property
    def is_mixed(self) -> bool:
        """True when the forward runs under autocast (compute dtype differs from the parameters')."""
        return self.compute_dtype != self.param_dtype

    @property
    def needs_loss_scale(self) -> bool:
        """True when the compute dtype is fp16, whose narrow range needs loss scaling."""
        return self.compute_dtype == torch.float16

    def autocast(self, device_type: str) -> ContextManager[Any]:
        """The context the forward and loss run in: ``torch.autocast`` when mixed, else nothing.

        Example:
            >>> with get_policy("bf16").autocast("cpu"):
            ...     y = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2))
            >>> y.dtype
            torch.bfloat16
        """
        if not self.is_mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    def cast_to_param(self, x: Any) -> Any:
        """Floating leaves of ``x`` cast to ``param_dtype`` (integer leaves unchanged)."""
        return tree.cast(x, self.param_dtype)

    def cast_to_compute(self, x: Any) -> Any:
        """Floating leaves of ``x`` cast to ``compute_dtype``."""
        return tree.cast(x, self.compute_dtype)

    def cast_to_output(self, x: Any) -> Any:
        """Floating leaves of ``x`` cast to ``output_dtype``."""
        return tree.cast(x, self.output_dtype)

    def __repr__(self) -> str:
        short = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
        return (
            f"Policy(param_dtype={short[self.param_dtype]}, compute_dtype={short[self.compute_dtype]}, "
            f"output_dtype={short[self.output_dtype]})"
        )


#: Policies by name; ``get_policy`` also parses ``"params=float32,compute=bfloat16,output=float32"``.
POLICIES: dict[str, Policy] = {
    "fp32": Policy(torch.float32, torch.float32, torch.float32),
    "bf16": Policy(torch.float32, torch.bfloat16, torch.float32),
    "bf16_pure": Policy(torch.bfloat16, torch.bfloat16, torch.float32),
    "fp16": Policy(torch.float32, torch.float16, torch.float32),
}
_ALIASES = {"float32": "fp32", "full": "fp32", "mixed_bf16": "bf16", "bfloat16": "bf16", "pure_bf16": "bf16_pure", "mixed_fp16": "fp16", "float16": "fp16"}


def get_policy(policy: Union[Policy, str]) -> Policy:
    """A :class:`Policy` from itself or a name (gin-friendly).

    Names: ``"fp32"``; ``"bf16"`` (fp32 weights, bf16 autocast); ``"bf16_pure"`` (bf16
    weights and compute, fp32 loss); ``"fp16"`` (fp32 weights, fp16 autocast: use with a
    loss scale); or ``"params=<dtype>,compute=<dtype>,output=<dtype>"``.

    Example:
        >>> get_policy("params=bf16,compute=bf16,output=fp32") == get_policy("bf16_pure")
        True
    """
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a precision.Policy or a name, got {type(policy).__name__}")
    name = policy.strip().lower()
    name = _ALIASES.get(name, name)
    if name in POLICIES:
        return POLICIES[name]
    if "=" in name:
        keys = {"params": "param_dtype", "param": "param_dtype", "compute": "compute_dtype", "output": "output_dtype"}
        kwargs = {}
        for part in name.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in keys:
                raise ValueError(f"policy {policy!r}: unknown key {key.strip()!r}; allowed: params, compute, output")
            kwargs[keys[key.strip()]] = value.strip()
        return Policy(**kwargs)
    raise ValueError(f"unknown precision policy {policy!r}; known: {sorted(POLICIES)} or 'params=..,compute=..,output=..'")


def cast_state(state: TrainState, policy: Union[Policy, str]) -> TrainState:
    """``state`` with floating params and buffers in ``policy.param_dtype``, optimizer state re-initialized.

    For pure low-precision training (``"bf16_pure"``): call on a freshly created state,
    since the optimizer state is rebuilt with ``tx.init`` from the cast parameters.

    Example:
        >>> from craftfn import optim
        >>> s = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
        >>> cast_state(s, "bf16_pure").params["weight"].dtype
        torch.bfloat16
    """
    policy = get_policy(policy)
    params = policy.cast_to_param(state.params)
    buffers = policy.cast_to_param(state.buffers)
    opt_state = state.tx.init(params) if state.tx is not None else state.opt_state
    return state.replace(params=params, buffers=buffers, opt_state=opt_state)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: Optional[float]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (value > low and (high is None or value < high)):
        bound = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


class DynamicLossScale(struct.PyTreeNode):
    """Dynamic loss scaling as a pure value: ``scale`` and ``counter`` leaves, static hyperparameters.

    Args:
        scale: the current loss scale (float or 0-d float32 tensor). Powers of two keep
            scaling exact.
        counter: finite steps in a row since the scale last changed (int or 0-d tensor).
        growth_interval: after this many finite steps in a row the scale grows.
        growth_factor: the growth multiplier (> 1).
        backoff_factor: the multiplier on a non-finite step (in (0, 1)).
        min_scale: the scale never backs off below this.

    ``adjust(grads_finite)`` returns the next value; it never reads to the host. The
    same rule as ``torch.amp.GradScaler`` (and jmp), with the scale capped at the
    largest finite fp32 value.

    Example:
        >>> ls = DynamicLossScale(scale=2.0**15, growth_interval=2000)
        >>> ls.scale_loss(torch.tensor(1.0))
        tensor(32768.)
        >>> ls.unscale({"w": torch.tensor([32768.0])})
        {'w': tensor([1.])}
    """

    scale: torch.Tensor = 2.0**15  # type: ignore[assignment]
    counter: torch.Tensor = 0  # type: ignore[assignment]
    growth_interval: int = struct.field(static=True, default=2000)
    growth_factor: float = struct.field(static=True, default=2.0)
    backoff_factor: float = struct.field(static=True, default=0.5)
    min_scale: float = struct.field(static=True, default=1.0)

    def __post_init__(self) -> None:
        if not isinstance(self.scale, torch.Tensor):
            _check_float("scale", self.scale, 0.0, None)
            object.__setattr__(self, "scale", torch.tensor(float(self.scale), dtype=torch.float32))
        if not isinstance(self.counter, torch.Tensor):
            if isinstance(self.counter, bool) or not isinstance(self.counter, int) or self.counter < 0:
                raise ValueError(f"counter must be a non-negative int, got {self.counter!r}")
            object.__setattr__(self, "counter", torch.tensor(self.counter, dtype=torch.int32))
        _check_positive_int("growth_interval", self.growth_interval)
        _check_float("growth_factor", self.growth_factor, 1.0, None)
        _check_float("backoff_factor", self.backoff_factor, 0.0, 1.0)
        _check_float("min_scale", self.min_scale, 0.0, None)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (in the loss's dtype)."""
        return loss * self.scale.to(loss.dtype)

    def unscale(self, grads: Any) -> Any:
        """``grads / scale``: one multi-tensor multiply per (device, dtype) group."""
        return tree.scale(torch.reciprocal(self.scale), grads)

    def adjust(self, grads_finite: torch.Tensor) -> DynamicLossScale:
        """The next loss scale after a step whose gradients were (not) all finite.

        Finite: ``counter + 1``; when that reaches ``growth_interval`` the scale is
        multiplied by ``growth_factor`` (unless that overflows) and the counter resets.
        Non-finite: scale times ``backoff_factor`` (at least ``min_scale``), counter 0.
        """
        finite = grads_finite.to(device=self.scale.device, dtype=torch.bool)
        counter = self.counter + 1
        grow = counter >= self.growth_interval
        grown = self.scale * self.growth_factor
        grown = torch.where(torch.isfinite(grown), grown, self.scale)
        backed_off = torch.clamp(self.scale * self.backoff_factor, min=self.min_scale)
        scale = torch.where(finite, torch.where(grow, grown, self.scale), backed_off)
        counter = torch.where(finite & ~grow, counter, torch.zeros_like(counter))
        return self.replace(scale=scale, counter=counter)

    def to(self, device: Union[torch.device, str, None]) -> DynamicLossScale:
        """The same value on ``device`` (the step moves it next to the parameters once)."""
        return self.replace(scale=self.scale.to(device), counter=self.counter.to(device))


class LossScaledTrainState(TrainState):
    """A :class:`~craftfn.TrainState` that also carries a ``loss_scale`` (a :class:`DynamicLossScale`).

    ``make_train_step(..., loss_scale=...)`` reads and advances ``state.loss_scale``. Any
    TrainState subclass with a ``loss_scale`` field works the same; a plain ``TrainState``
    given to such a step is converted to this class (see :func:`with_loss_scale`).

    Example:
        >>> from craftfn import optim
        >>> s = LossScaledTrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1),
        ...                                 loss_scale=DynamicLossScale(scale=1024.0))
        >>> s.loss_scale.scale
        tensor(1024.)
    """

    loss_scale: Optional[DynamicLossScale] = None


def with_loss_scale(state: TrainState, loss_scale: DynamicLossScale) -> TrainState:
    """``state`` carrying ``loss_scale``: ``state.replace(loss_scale=...)``, or for a plain
    ``TrainState`` a :class:`LossScaledTrainState` with the same fields (tensors shared).

    Example:
        >>> from craftfn import optim
        >>> s = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
        >>> type(with_loss_scale(s, DynamicLossScale())).__name__
        'LossScaledTrainState'
    """
    if not isinstance(loss_scale, DynamicLossScale):
        raise TypeError(f"loss_scale must be a precision.DynamicLossScale, got {type(loss_scale).__name__}")
    names = {f.name for f in dataclasses.fields(state)}
    if "loss_scale" in names:
        return state.replace(loss_scale=loss_scale)
    if type(state) is not TrainState:
        raise TypeError(
            f"loss scaling needs the state to carry a `loss_scale` field; {type(state).__name__} has none. "
            "Add `loss_scale: Optional[precision.DynamicLossScale] = None` to it, or subclass precision.LossScaledTrainState"
        )
    fields = {f.name: state.__dict__[f.name] for f in dataclasses.fields(state)}
    return LossScaledTrainState(**fields, loss_scale=loss_scale)


class SlowPrecisionWarning(UserWarning):
    """A precision policy that this machine runs much slower than fp32 (see :func:`warn_if_slow`)."""


# x86 CPU features that give bf16 matmuls native speed; without them oneDNN/MKL emulate bf16.
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> Optional[frozenset[str]]:
    """The CPU feature flags from /proc/cpuinfo (x86 Linux), or None where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def warn_if_slow(policy: Union[Policy, str, None], device: Union[torch.device, str]) -> bool:
    """Warn (:class:`SlowPrecisionWarning`) when ``policy`` computes in bf16 on an x86 CPU without
    bf16 units (AVX512-BF16 or AMX); returns whether it warned.

    On such CPUs bf16 matmuls are emulated: the char job's step measured 16x slower under
    ``policy="bf16"`` than in fp32 on an AVX2-only AMD EPYC (1012 vs 62 ms), while a CPU with
    AVX512-BF16 halved a 50M-parameter step. The :class:`~craftfn.training.Trainer` calls this
    before training; nothing is changed, the run goes on as asked.

    Example:
        >>> warn_if_slow("fp32", "cpu")
        False
    """
    if policy is None:
        return False
    policy = get_policy(policy)
    if policy.compute_dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return False
    flags = _cpu_flags()
    if flags is None or any(f in flags for f in _X86_BF16_FLAGS):
        return False
    warnings.warn(
        f"precision policy {policy!r} computes in bfloat16, but this CPU has no bf16 units (no "
        f"{' or '.join(_X86_BF16_FLAGS)} in /proc/cpuinfo): bf16 matmuls are emulated and typically run many "
        "times slower than fp32 (16x measured at the char job's size). Use policy='fp32' on this machine.",
        SlowPrecisionWarning,
        stacklevel=2,
    )
    return True
