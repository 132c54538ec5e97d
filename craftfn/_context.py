"""The context a step runs its loss function in (internal).

A step sets it around the user's ``loss_fn`` so that ``TrainState.apply`` knows,
without the user threading flags through, that: the module should run in train
or eval mode, the buffers it is given are already a private copy (so running
statistics may be written into them), and torch's RNG is already seeded from the
step's key. It is set outside any compiled region, so a compiled step only reads
it (dynamo guards on it: train and eval get separate graphs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class StepContext:
    training: bool


_ACTIVE: list[Optional[StepContext]] = [None]


def current() -> Optional[StepContext]:
    return _ACTIVE[0]


@contextlib.contextmanager
def step_context(training: bool) -> Iterator[StepContext]:
    previous = _ACTIVE[0]
    ctx = StepContext(training=training)
    _ACTIVE[0] = ctx
    try:
        yield ctx
    finally:
        _ACTIVE[0] = previous
