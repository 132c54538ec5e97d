"""The ``Trainer``: drives a pure ``train_step`` and emits a stream of metric events.

The Trainer owns no math. It calls ``train_step(state, batch) -> (state, metrics)``
(from :func:`craftfn.make_train_step`), fetches batches as a pure function of the
step, runs the :class:`~craftfn.training.evaluation.Evaluator` every ``eval_every``
steps, saves through an optional checkpoint manager, and turns everything it
observes into :class:`Event` objects that callbacks consume.

Metrics are read to the host *late*: the 0-d tensors of step ``t`` are read after
step ``t + 1`` has been dispatched (or every ``log_every`` steps, in one transfer),
so logging never stalls the device between steps. Callbacks therefore see step
``t``'s event while step ``t + 1`` is already running.

Steps are counted from 1: step ``s`` is the update that takes ``state.step`` from
``s - 1`` to ``s``, and it trains on ``train_data`` at index ``s - 1``. Because reads are
late, a callback that stops training (``EarlyStopping`` on train metrics, ``NanGuard``)
acts up to ``log_every`` steps after the step it saw; evaluations, saves and epoch ends
read everything first, so they always see every step before them.

Example:
    >>> import torch
    >>> from craftfn import TrainState, make_train_step, optim
    >>> from craftfn.training import Trainer
    >>> def loss_fn(state, params, batch, rng):
    ...     return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
    >>> data = lambda step: {"x": torch.ones(4, 2) * (step % 3), "y": torch.zeros(4, 1)}
    >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
    >>> state = Trainer(make_train_step(loss_fn), data, max_steps=5).fit(state)
    >>> int(state.step)
    5
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from craftfn import host_memory, precision, random, tree
from craftfn.optim import tree_get
from craftfn.state import TrainState, _mark_donated
from craftfn.training.callbacks import Callback, CallbackList
from craftfn.training.checkpointing import takes_donate
from craftfn.training.evaluation import Evaluator
from craftfn.training.events import Event
from craftfn.training.progress import ProgressTracker

__all__ = ["Event", "Trainer", "TrainingInterrupted", "count_tokens", "learning_rate_of"]


class TrainingInterrupted(KeyboardInterrupt):
    """``Trainer.fit`` stopped on SIGINT or SIGTERM after saving (a ``KeyboardInterrupt``, so
    ``except Exception`` does not swallow it).

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        state: the state after the last completed step (saved, when there is a checkpoint manager).
        step: that step.
        exit_code: the conventional exit status, ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).

    Example:
        >>> try:
        ...     state = trainer.fit(state)
        ... except TrainingInterrupted as e:
        ...     sys.exit(e.exit_code)  # doctest: +SKIP
    """

    def __init__(self, signum: int, state: Any, step: int) -> None:
        self.signum, self.state, self.step = int(signum), state, int(step)
        self.exit_code = 128 + self.signum
        super().__init__(f"training interrupted by {signal.Signals(self.signum).name} after step {self.step}")


def count_tokens(batch: Any) -> tuple[int, int]:
    """``(tokens, samples)`` of a batch, from static shapes (no host sync).

    Tokens are the elements of the first integer tensor leaf (token ids); a batch
    without one counts one token per sample. Samples are the leading size.

    Example:
        >>> count_tokens((torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long)))
        (32, 4)
    """
    leaves = [x for x in tree.leaves(batch) if isinstance(x, torch.Tensor)]
    if not leaves:
        return 0, 0
    samples = int(leaves[0].shape[0]) if leaves[0].dim() else 1
    for x in leaves:
        if not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
            return int(x.numel()), samples
    return samples, samples


def learning_rate_of(opt_state: Any) -> Optional[torch.Tensor]:
    """The learning rate recorded in an optimizer state, or ``None`` when it has none.

    It is ``craftfn.optim.tree_get(opt_state, "learning_rate")`` (states of
    ``inject_hyperparams``, e.g. from ``create_optimizer``); a state holding several
    learning rates (a ``partition`` of rules) has no single one to log, and gives ``None``.

    Example:
        >>> from craftfn import optim
        >>> learning_rate_of(optim.sgd(0.1).init({"w": torch.zeros(2)})) is None
        True
    """
    try:
        value = tree_get(opt_state, "learning_rate", default=None)
    except KeyError:
        return None
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(float(value)) if isinstance(value, (int, float)) else None


@dataclasses.dataclass
class _Pending:
    step: int
    epoch: Optional[int]
    metrics: dict[str, Any]
    tokens: int
    samples: int


def _is_map_style(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not callable(data)


def _check_positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


class Trainer:
    """Run a pure train step for ``max_steps`` steps and/or ``epochs`` epochs.

    Args:
        train_step: ``train_step(state, batch) -> (state, metrics)``; metrics are 0-d tensors.
        train_data: either a function ``step -> batch`` (``step`` counted from 0: a pure
            function of the step, so a resumed run replays the same data), or a finite
            map-style dataset (``len`` and ``[i]``): of batches, or of examples when
            ``batch_size`` is given (batched by :func:`craftfn.data.epoch_batches`). One
            epoch is one pass, in an order shuffled per epoch from ``seed`` when ``shuffle``.
        eval_step: ``eval_step(state, batch) -> metrics`` (from :func:`craftfn.make_eval_step`).
        eval_data: the evaluation batches (a sequence, or a function returning an iterable);
            or pass a ready ``evaluator=``.
        max_steps: stop after this many steps (counted over the whole run, resumes included).
        epochs: with map-style ``train_data``, stop after this many epochs. With both,
            the first limit reached stops.
        eval_every: evaluate every N steps; default: at the end of each epoch in epoch
            mode, else only at the end. Training always ends with an evaluation when
            there is evaluation data (``eval_at_end``).
        log_every: read metrics to the host every N steps (each read takes all steps
            dispatched before the newest one). 1 reads step ``t`` right after step
            ``t + 1`` was dispatched.
        callbacks: :class:`~craftfn.training.callbacks.Callback` objects.
        checkpoint_manager: an object with ``save(step, state, metrics=None, extra=None)``
            (and for ``fit(resume=True)``: ``latest_step()``, ``restore(template, step,
            fallback)`` and ``metadata(step)``), e.g. ``CheckpointManager``.
        save_every: save every N steps (and always at the end) when a manager is given.
        batch_size: with a map-style dataset of examples, the examples per batch.
        drop_last: with ``batch_size``, drop each epoch's final partial batch.
        seed: the seed of the epoch shuffles.
        shuffle: shuffle the order of each epoch (map-style data).
        flops_per_token: training FLOPs per token, for the MFU estimate.
        peak_flops: the device's peak FLOP/s (see :class:`ProgressTracker`).
        warmup_steps: the first steps of a run left out of throughput and ETA (compilation).
        eval_at_end: evaluate after the last step (if it was not just evaluated).
        checkpoint_extra: JSON-ready values saved with every checkpoint besides the
            callbacks' state (e.g. ``{"tokenizer": ...}``).
        handle_signals: while ``fit`` runs (in the main thread), SIGINT (Ctrl-C) and SIGTERM
            (preemption) stop training after the step in flight: the state is saved through the
            checkpoint manager, the callbacks' ``on_train_end`` run (e.g. :class:`SaveWeights`),
            and ``fit`` raises :class:`TrainingInterrupted` (exit status 130 / 143). A second
            signal acts at once, as it would without the Trainer. Turn it off in multi-process
            runs: ranks that stop after different steps would wait on each other's collectives.
        keep_freed_memory: when ``fit`` starts, make the C allocator keep freed host memory
            for the next tensors (:func:`craftfn.host_memory.keep_freed_memory`): a pure step's
            new state lands in pages the process already has, instead of freshly faulted ones.
            The process then keeps its peak memory. ``False`` leaves the allocator alone.

    Attributes (read by callbacks): ``state`` (the newest dispatched state), ``step``,
    ``epoch``, ``total_steps``, ``tracker`` (the :class:`ProgressTracker`),
    ``stop_reason``, ``last_eval`` (metrics of the latest evaluation).

    Example:
        >>> from craftfn import TrainState, make_eval_step, make_train_step, optim
        >>> def loss_fn(state, params, batch, rng):
        ...     return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
        >>> data = lambda step: {"x": torch.ones(4, 2) * (step % 3), "y": torch.zeros(4, 1)}
        >>> val = [{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}]
        >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
        >>> trainer = Trainer(make_train_step(loss_fn), data, eval_step=make_eval_step(loss_fn), eval_data=val,
        ...                   max_steps=20, eval_every=10)
        >>> state = trainer.fit(state)
        >>> int(state.step), sorted(trainer.last_eval)
        (20, ['loss', 'num_samples', 'perplexity'])
    """

    def __init__(
        self,
        train_step: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
        train_data: Any,
        *,
        eval_step: Optional[Callable[[Any, Any], Mapping[str, Any]]] = None,
        eval_data: Any = None,
        evaluator: Optional[Evaluator] = None,
        max_steps: Optional[int] = None,
        epochs: Optional[int] = None,
        eval_every: Optional[int] = None,
        log_every: int = 1,
        callbacks: Sequence[Callback] = (),
        checkpoint_manager: Any = None,
        save_every: Optional[int] = None,
        batch_size: Optional[int] = None,
        drop_last: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        flops_per_token: Optional[float] = None,
        peak_flops: Optional[float] = None,
        warmup_steps: int = 2,
        eval_at_end: bool = True,
        checkpoint_extra: Optional[Mapping[str, Any]] = None,
        handle_signals: bool = True,
        keep_freed_memory: bool = True,
    ) -> None:
        if not callable(train_step):
            raise TypeError(f"train_step must be callable (see craftfn.make_train_step), got {type(train_step).__name__}")
        if not (callable(train_data) or _is_map_style(train_data)):
            raise TypeError(
                "train_data must be a function step -> batch, or a map-style dataset of batches "
                f"(with len() and [i]), got {type(train_data).__name__}"
            )
        _check_positive("max_steps", max_steps)
        _check_positive("epochs", epochs)
        _check_positive("eval_every", eval_every)
        _check_positive("log_every", log_every, allow_none=False)
        _check_positive("save_every", save_every)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.map_style = _is_map_style(train_data)
        if epochs is not None and not self.map_style:
            raise ValueError(
                "epochs= needs a finite map-style train_data (len() and [i]); "
                f"got a {type(train_data).__name__} (a step -> batch function): use max_steps="
            )
        if self.map_style and len(train_data) == 0:
            raise ValueError("train_data is empty (len() == 0): nothing to train on")
        _check_positive("batch_size", batch_size)
        if batch_size is not None and not self.map_style:
            raise ValueError("batch_size= batches a map-style dataset of examples; train_data is a step -> batch function")
        if max_steps is None and epochs is None:
            raise ValueError("give max_steps= or epochs= (or both): the Trainer needs to know when to stop")
        if evaluator is not None and (eval_step is not None or eval_data is not None):
            raise ValueError("pass either evaluator= or eval_step= with eval_data=, not both")
        if (eval_step is None) != (eval_data is None):
            raise ValueError("eval_step= and eval_data= go together: pass both or neither")
        if not isinstance(keep_freed_memory, bool):
            raise TypeError(f"keep_freed_memory must be True or False, got {keep_freed_memory!r}")
        self.keep_freed_memory = keep_freed_memory
        self.train_step = train_step
        self.train_data = train_data
        self.evaluator = evaluator if evaluator is not None else (Evaluator(eval_step, eval_data) if eval_step is not None else None)
        self.max_steps = max_steps
        self.epochs = epochs
        self.eval_every = eval_every
        self.log_every = log_every
        self.callbacks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(list(callbacks))
        self.checkpoint_manager = checkpoint_manager
        self.save_every = save_every
        self.seed = seed
        self.shuffle = shuffle
        self.eval_at_end = eval_at_end
        self.handle_signals = bool(handle_signals)
        self.interrupted: Optional[int] = None
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.steps_per_epoch: Optional[int] = None
        if self.map_style:
            if batch_size is None:
                self.steps_per_epoch = len(train_data)
            else:
                from craftfn.data import num_batches

                self.steps_per_epoch = num_batches(len(train_data), batch_size, drop_last)
                if self.steps_per_epoch == 0:
                    raise ValueError(f"train_data has {len(train_data)} examples: not one full batch of {batch_size} with drop_last=True")
        self._epoch_iter: tuple[int, int, Any] = (-1, -1, None)
        self.total_steps = self._total_steps()
        self.tracker = ProgressTracker(
            total_steps=self.total_steps,
            warmup_steps=warmup_steps,
            flops_per_token=flops_per_token,
            peak_flops=peak_flops,
        )
        self.state: Any = None
        self.step = 0
        self.epoch: Optional[int] = None
        self.stop_reason: Optional[str] = None
        self.last_eval: dict[str, float] = {}
        self._pending: list[_Pending] = []
        self._t0 = time.time()
        self._lr_absent = False
        self._epoch_order: tuple[int, Optional[torch.Tensor]] = (-1, None)
        self._step_fn = self.callbacks.wrap_train_step(train_step)

    # ----------------------------------------------------------------- public helpers
    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step; ``reason`` is reported at the end."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def log(self, event: Event) -> None:
        """Put an event on the metrics stream (every callback's ``on_log`` sees it)."""
        self.callbacks.on_log(self, event)

    def make_event(self, kind: str, step: Optional[int] = None, metrics: Optional[Mapping[str, float]] = None, text: Optional[Mapping[str, str]] = None) -> Event:
        """An :class:`Event` stamped with the current time, epoch and (by default) step."""
        now = time.time()
        return Event(
            kind=kind,
            step=self.step if step is None else step,
            epoch=self.epoch,
            metrics=dict(metrics or {}),
            wall_time=now,
            elapsed=now - self._t0,
            text=dict(text or {}),
        )

    @contextlib.contextmanager
    def paused_clock(self) -> Iterator[None]:
        """Leave the enclosed work (evaluation, sampling, saving) out of throughput and ETA."""
        try:
            yield
        finally:
            self.tracker.resume_clock()

    def batch_at(self, index: int) -> Any:
        """The training batch for 0-based step ``index`` (a pure function of it and the seed)."""
        if not self.map_style:
            return self.train_data(index)
        spe = self.steps_per_epoch
        assert spe is not None
        epoch, position = divmod(index, spe)
        if self.batch_size is not None:
            return self._example_batch(epoch, position)
        if not self.shuffle:
            return self.train_data[position]
        if self._epoch_order[0] != epoch:
            order = random.permutation(random.fold_in(random.key(self.seed), epoch), spe)
            self._epoch_order = (epoch, order)
        order = self._epoch_order[1]
        assert order is not None
        return self.train_data[int(order[position])]

    def _example_batch(self, epoch: int, position: int) -> Any:
        from craftfn.data import epoch_batches

        cached_epoch, next_position, iterator = self._epoch_iter
        if cached_epoch != epoch or next_position != position:
            # A fresh epoch, or a resume in the middle of one: rebuild and skip ahead.
            iterator = epoch_batches(self.train_data, self.batch_size, self.seed, epoch, self.drop_last, self.shuffle)  # type: ignore[arg-type]
            for _ in range(position):
                next(iterator)
        batch = next(iterator)
        self._epoch_iter = (epoch, position + 1, iterator)
        return batch

    def evaluate(self, state: Any) -> dict[str, float]:
        """Run the evaluator on ``state``, emit an ``eval`` event, and return its metrics."""
        if self.evaluator is None:
            raise ValueError("this Trainer has no evaluation data (pass eval_step= and eval_data=, or evaluator=)")
        self._flush()
        with self.paused_clock():
            metrics = self.evaluator.evaluate(state)
        self.last_eval = metrics
        event = self.make_event("eval", metrics=metrics)
        self.callbacks.on_eval_end(self, event)
        self.callbacks.on_log(self, event)
        return metrics

    def save(self, state: Any) -> None:
        """Save ``state`` through the checkpoint manager (with the callbacks' state).

        A state whose parameters are not finite (a diverged run) is not saved, with a warning:
        the newest checkpoint stays the last finite state, which is what a rerun with a lower
        learning rate should resume from. (One read of the parameters per save.)
        """
        if self.checkpoint_manager is None:
            return
        self._flush()
        params = getattr(state, "params", None)
        if params is not None and not bool(tree.all_finite(params)):
            warnings.warn(
                f"Trainer: not saving step {self.step}: its parameters are not finite (the run diverged); "
                "the newest checkpoint stays the last finite state",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        extra = {**self.checkpoint_extra, "callbacks": self.callbacks.state_dicts()}
        with self.paused_clock():
            self.checkpoint_manager.save(self.step, state, metrics=dict(self.last_eval) or None, extra=extra)
        self.callbacks.on_save(self, self.step)

    # ----------------------------------------------------------------- the loop
    def _total_steps(self) -> int:
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.epochs is not None:
            assert self.steps_per_epoch is not None
            limits.append(self.epochs * self.steps_per_epoch)
        return min(limits)

    def _epoch_of(self, step: int) -> Optional[int]:
        # The epoch a 0-based step index falls in.
        return step // self.steps_per_epoch if self.steps_per_epoch else None

    def _restore(self, state: Any) -> Any:
        manager = self.checkpoint_manager
        if manager is None:
            raise ValueError("fit(resume=True) needs a checkpoint_manager")
        latest = manager.latest_step()
        if latest is None:
            return state
        # A step with loss scaling keeps the scale in the state (precision.LossScaledTrainState), so
        # the checkpoint holds it: give the template that field, with the step's static settings.
        given = state
        initial_scale = getattr(self.train_step, "loss_scale", None)
        if isinstance(initial_scale, precision.DynamicLossScale) and getattr(state, "loss_scale", None) is None:
            state = precision.with_loss_scale(state, tree.clone(initial_scale))
        # A donating step would use up the state it is given anyway: the checkpoint is read into that
        # state's memory (already mapped; new memory's page faults were most of a restore's time).
        donate = bool(getattr(self.train_step, "donate", False)) and takes_donate(manager.restore)
        template = state
        state = manager.restore(template, step="latest", fallback=True, **({"donate": True} if donate else {}))
        if donate and given is not template and isinstance(given, TrainState):
            _mark_donated(given)  # with_loss_scale's copy shared its tensors, which now hold the checkpoint
        restored_step = int(state.step)
        try:
            meta = manager.metadata(restored_step) or {}
        except (KeyError, ValueError, FileNotFoundError):
            meta = {}
        extra = meta.get("extra") or {}
        self.callbacks.load_state_dicts(extra.get("callbacks") or {})
        if meta.get("metrics"):
            self.last_eval = {k: float(v) for k, v in meta["metrics"].items()}
        return state

    def fit(self, state: Any, resume: bool = False) -> Any:
        """Train ``state`` and return the final state.

        Args:
            state: a ``TrainState`` (or anything ``train_step`` takes with a ``step`` field).
            resume: restore the newest checkpoint of ``checkpoint_manager`` (if it has one,
                falling back to an older one if the newest is damaged), together with the
                callbacks' state, and continue from its step. Data continue from that step
                too, since batches are a pure function of the step.

        Returns:
            The state after the last step. ``stop_reason`` tells why training ended early.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived (with ``handle_signals``): the state of
                the last completed step was saved and the end hooks ran; it is in ``e.state``.
        """
        self._t0 = time.time()
        self.stop_reason = None
        self.interrupted = None
        self.compile_seconds: Optional[float] = None
        if self.keep_freed_memory:
            host_memory.keep_freed_memory()
        with self._signals_caught():
            state = self._fit(state, resume)
        if self.interrupted is not None:
            raise TrainingInterrupted(self.interrupted, state, self.step)
        return state

    @contextlib.contextmanager
    def _signals_caught(self) -> Iterator[None]:
        """SIGINT/SIGTERM set ``interrupted`` (the loop stops after the step in flight); a second one acts at once."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

        def handler(signum: int, frame: Any) -> None:
            del frame
            self.interrupted = signum
            self.stop(f"interrupted by {signal.Signals(signum).name}")
            restore()  # a second signal takes the usual way out
            print(
                f"craftfn: {signal.Signals(signum).name} received: stopping after step {self.step + 1}, saving a checkpoint "
                "and the weights (send it again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            restore()

    def _fit(self, state: Any, resume: bool) -> Any:
        policy = getattr(self.train_step, "policy", None)
        if policy is not None:
            device = next((x.device for x in tree.leaves(getattr(state, "params", None)) if isinstance(x, torch.Tensor)), None)
            if device is not None:
                precision.warn_if_slow(policy, device)
        if resume:
            state = self._restore(state)
        # One host read at the start; the loop keeps its own count afterwards.
        start = int(state.step)
        self.step = start
        self.state = state
        self.epoch = self._epoch_of(start) if self.map_style else None
        self.tracker.start(start)
        self.callbacks.on_train_begin(self, state)
        step = start
        evaluated_at = saved_at = -1
        epoch_open = False
        while step < self.total_steps and not self.should_stop:
            if self.map_style and not epoch_open:
                self.epoch = self._epoch_of(step)
                self.callbacks.on_epoch_begin(self, self.epoch)
                epoch_open = True
            batch = self.batch_at(step)
            tokens, samples = count_tokens(batch)
            self.callbacks.on_step_begin(self, step + 1)
            state, metrics = self._step_fn(state, batch)
            metrics = dict(metrics)
            if step == start:
                # A compiled step (make_train_step(compile=...)) times its first call, trace and
                # compile included; report it once, with the first step's metrics.
                compile_seconds = getattr(self.train_step, "compile_seconds", None)
                if compile_seconds is not None:
                    self.compile_seconds = float(compile_seconds)
                    metrics["compile_seconds"] = torch.tensor(self.compile_seconds)
            lr = None if self._lr_absent else learning_rate_of(getattr(state, "opt_state", None))
            if lr is None:
                self._lr_absent = True
            else:
                # A copy: a donated next step may update the state's hyperparameters in place.
                metrics["lr"] = lr.detach().clone()
            step += 1
            self.step = step
            self.state = state
            self._pending.append(_Pending(step, self.epoch, metrics, tokens, samples))
            if step % self.log_every == 0:
                # Step `step` is in flight: read everything dispatched before it.
                self._flush(keep_newest=True)
            epoch_done = self.map_style and step % self.steps_per_epoch == 0  # type: ignore[operator]
            eval_now = self.evaluator is not None and (
                (self.eval_every is not None and step % self.eval_every == 0)
                or (self.eval_every is None and epoch_done)
            )
            if eval_now:
                self.evaluate(state)
                evaluated_at = step
            if epoch_done:
                self._flush()
                self.callbacks.on_epoch_end(self, self.epoch, state)
                epoch_open = False
            if self.checkpoint_manager is not None and self.save_every is not None and step % self.save_every == 0:
                self.save(state)
                saved_at = step
        self._flush()
        if self.map_style and epoch_open and step % self.steps_per_epoch != 0 and self.interrupted is None:  # type: ignore[operator]
            self.callbacks.on_epoch_end(self, self.epoch, state)
        # The run is saved before anything optional: a final evaluation that fails (or an
        # interruption, which skips it) still leaves the checkpoint and the end hooks' weights.
        try:
            if self.evaluator is not None and self.eval_at_end and evaluated_at != step and step > start and self.interrupted is None:
                self.evaluate(state)
        finally:
            if self.checkpoint_manager is not None and saved_at != step and step > start:
                self.save(state)
            self.callbacks.on_train_end(self, state)
            if self.checkpoint_manager is not None and hasattr(self.checkpoint_manager, "wait"):
                self.checkpoint_manager.wait()
        return state

    def _flush(self, keep_newest: bool = False) -> None:
        """Read pending metrics to the host (one transfer per device) and emit ``train`` events."""
        if not self._pending:
            return
        if keep_newest:
            items, self._pending = self._pending[:-1], self._pending[-1:]
        else:
            items, self._pending = self._pending, []
        if not items:
            return
        values = _read_to_host([p.metrics for p in items])
        for p, host in zip(items, values):
            derived = self.tracker.update(p.step, host.get("loss"), tokens=p.tokens, samples=p.samples)
            now = time.time()
            event = Event(
                kind="train",
                step=p.step,
                epoch=p.epoch,
                metrics={**host, **derived},
                wall_time=now,
                elapsed=now - self._t0,
            )
            self.callbacks.on_step_end(self, event)
            self.callbacks.on_log(self, event)


def _read_to_host(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Convert rows of 0-d tensors to floats with one stacked transfer per device."""
    by_device: dict[torch.device, list[tuple[int, str, torch.Tensor]]] = {}
    out: list[dict[str, float]] = [{} for _ in rows]
    for i, row in enumerate(rows):
        for name, value in row.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue  # only scalars go on the stream
                by_device.setdefault(value.device, []).append((i, name, value.detach().reshape(())))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[i][name] = float(value)
    for entries in by_device.values():
        stacked = torch.stack([v.to(torch.float64) for _, _, v in entries]).tolist()
        for (i, name, _), x in zip(entries, stacked):
            out[i][name] = x if math.isfinite(x) else float(x)
    return out
