"""The contexts a step or a ``craftfn.jit`` call runs user code in (internal).

A step sets :class:`StepContext` around the user's ``loss_fn`` so that ``TrainState.apply``
knows, without the user threading flags through, that the module should run in train or eval
mode and that the buffers it is given are already a private copy (so running statistics may be
written into them). ``craftfn.jit`` sets :class:`JitContext` around its compiled call, so that
``apply_gradients(donate=True)`` leaves the marking of the donated state to the jit (after the
call, outside the graph) and refuses donation the jit was not told about. Both are set outside
any compiled region, so a compiled function only reads them (dynamo guards on them).

Both live in a ``threading.local``: steps that run in several threads at once (an evaluator per
thread, a step in a data-loading thread) each see their own context, and one thread's exit
cannot leave another's context behind. Read them with ``getattr(..., None)``: dynamo guards on a
plain ``threading.local``'s attributes, but not on class-level defaults of a subclass.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class StepContext:
    training: bool


@dataclass(frozen=True)
class JitContext:
    # Whether the jit was given donate_argnums (so in-place updates of its inputs are allowed).
    donating: bool


_LOCAL = threading.local()
# One object per value: a compiled function guards on what it reads, the same object every call.
_JIT_CONTEXTS = {True: JitContext(donating=True), False: JitContext(donating=False)}


def current() -> Optional[StepContext]:
    return getattr(_LOCAL, "step", None)


def current_jit() -> Optional[JitContext]:
    return getattr(_LOCAL, "jit", None)


@contextlib.contextmanager
def step_context(training: bool) -> Iterator[StepContext]:
    previous = current()
    ctx = StepContext(training=training)
    _LOCAL.step = ctx
    try:
        yield ctx
    finally:
        _LOCAL.step = previous


@contextlib.contextmanager
def jit_context(donating: bool) -> Iterator[JitContext]:
    previous = current_jit()
    ctx = _JIT_CONTEXTS[bool(donating)]
    _LOCAL.jit = ctx
    try:
        yield ctx
    finally:
        _LOCAL.jit = previous
