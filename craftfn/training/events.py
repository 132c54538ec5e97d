"""What the Trainer and its callbacks share: the :class:`Event` of the metrics stream and the
:class:`TrainerView` a callback receives.

Both :mod:`craftfn.training.trainer` and :mod:`craftfn.training.callbacks` import this module and
neither imports the other's names for its types, so the two modules form no import cycle.

Example:
    >>> from craftfn.training.events import Event
    >>> Event(kind="train", step=3, metrics={"loss": 1.5}).to_dict()["loss"]
    1.5
"""

from __future__ import annotations

import dataclasses
from typing import Any, ContextManager, Mapping, Optional, Protocol

__all__ = ["Event", "TrainerView"]


@dataclasses.dataclass(frozen=True)
class Event:
    """One entry of the metrics stream.

    Attributes:
        kind: ``"train"`` (one optimizer step), ``"eval"`` (an evaluation),
            ``"text"`` (generated text or other strings), or a name a callback chose.
        step: the step the event belongs to (counted from 1; 0 before training).
        epoch: the epoch (from 0) in epoch mode, else ``None``.
        metrics: name -> float, already on the host.
        wall_time: ``time.time()`` when the event was made.
        elapsed: seconds since ``fit`` began.
        text: name -> string (samples, configs).
    """

    kind: str
    step: int
    epoch: Optional[int] = None
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    wall_time: float = 0.0
    elapsed: float = 0.0
    text: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: kind, step, epoch, time, elapsed, then metrics and text."""
        out: dict[str, Any] = {"kind": self.kind, "step": self.step}
        if self.epoch is not None:
            out["epoch"] = self.epoch
        out["time"] = round(self.wall_time, 3)
        out["elapsed"] = round(self.elapsed, 3)
        out.update(self.metrics)
        out.update(self.text)
        return out


class TrainerView(Protocol):
    """What a callback may read and call on the trainer that drives it (:class:`~craftfn.training.Trainer` is one).

    Attributes:
        state: the newest dispatched state.
        step: the number of steps taken (counted from 1).
        epoch: the current epoch in epoch mode, else ``None``.
        total_steps: the step the run ends at.
        tracker: the :class:`~craftfn.training.progress.ProgressTracker`.
        stop_reason: why training stops early, or ``None``.
        interrupted: the signal number (``signal.SIGINT``/``SIGTERM``) that is stopping the run, or ``None``.
        last_eval: metrics of the latest evaluation.
    """

    state: Any
    step: int
    epoch: Optional[int]
    total_steps: int
    tracker: Any
    stop_reason: Optional[str]
    interrupted: Optional[int]
    last_eval: dict[str, float]

    def stop(self, reason: str) -> None: ...
    def log(self, event: Event) -> None: ...
    def make_event(self, kind: str, step: Optional[int] = None, metrics: Optional[Mapping[str, float]] = None, text: Optional[Mapping[str, str]] = None) -> Event: ...
    def paused_clock(self) -> ContextManager[None]: ...
