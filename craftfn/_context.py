"""The contexts a step or a ``craftfn.jit`` call runs user code in (internal).

A step sets :class:`StepContext` around the user's ``loss_fn`` so that ``TrainState.apply``
knows, without the user threading flags through, that the module should run in train or eval
mode and that the buffers it is given are already a private copy (so running statistics may be
written into them). ``craftfn.jit`` sets :class:`JitContext` around its compiled call, so that
``apply_gradients(donate=True)`` leaves the marking of the donated state to the jit (after the
call, outside the graph) and refuses donation the jit was not told about. Both are set outside
any compiled region, so a compiled function only reads them (dynamo guards on them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class StepContext:
    training: bool


@dataclass(frozen=True)
class JitContext:
    # Whether the jit was given donate_argnums (so in-place updates of its inputs are allowed).
    donating: bool


_ACTIVE: list[Optional[StepContext]] = [None]
_JIT: list[Optional[JitContext]] = [None]
# One object per value: a compiled function guards on what it reads, the same object every call.
_JIT_CONTEXTS = {True: JitContext(donating=True), False: JitContext(donating=False)}


def current() -> Optional[StepContext]:
    return _ACTIVE[0]


def current_jit() -> Optional[JitContext]:
    return _JIT[0]


@contextlib.contextmanager
def step_context(training: bool) -> Iterator[StepContext]:
    previous = _ACTIVE[0]
    ctx = StepContext(training=training)
    _ACTIVE[0] = ctx
    try:
        yield ctx
    finally:
        _ACTIVE[0] = previous


@contextlib.contextmanager
def jit_context(donating: bool) -> Iterator[JitContext]:
    previous = _JIT[0]
    ctx = _JIT_CONTEXTS[bool(donating)]
    _JIT[0] = ctx
    try:
        yield ctx
    finally:
        _JIT[0] = previous
