"""Callbacks: hooks that consume the Trainer's metrics stream.

A callback overrides any of the hooks below; each receives the trainer (read
``trainer.state``, ``trainer.step``, ``trainer.tracker``; call ``trainer.stop(reason)``)
and, where there is one, an :class:`~craftfn.training.events.Event` whose metrics
are already floats on the host.

=================  ==========================================  =====================
hook               when                                        arguments
=================  ==========================================  =====================
on_train_begin     before the first step                       trainer, state
on_epoch_begin     before the first step of an epoch           trainer, epoch
on_step_begin      before a step is dispatched                 trainer, step
on_step_end        when a step's metrics were read (deferred)  trainer, event
on_eval_end        after an evaluation                         trainer, event
on_save            after a checkpoint was saved                trainer, step
on_epoch_end       after the last step of an epoch             trainer, epoch, state
on_train_end       after the loop (final eval/save included)   trainer, state
on_log             every event of the stream (train/eval/text) trainer, event
=================  ==========================================  =====================

``every=N`` (on every callback) calls the per-step hooks (``on_step_begin``,
``on_step_end`` and ``on_log`` for ``train`` events) only on steps divisible by N;
``every=0`` never calls them. Callbacks with state to resume (counters) implement
``state_dict``/``load_state_dict``; the Trainer saves it with each checkpoint.

Example:
    >>> class PrintLoss(Callback):
    ...     def on_step_end(self, trainer, event):
    ...         print(event.step, round(event.metrics["loss"], 3))
    >>> cb = PrintLoss(every=100)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO, Union

import torch

from craftfn import random, tree
from craftfn.training.events import Event, TrainerView

__all__ = [
    "Callback",
    "CallbackList",
    "ConsoleLogger",
    "JSONLLogger",
    "TensorBoardLogger",
    "EarlyStopping",
    "NanGuard",
    "SampleText",
    "SaveWeights",
    "ProgressBar",
    "generate_tokens",
]


class Callback:
    """Base class: every hook does nothing; override the ones you need.

    Args:
        every: call the per-step hooks only on steps divisible by ``every`` (0: never).

    Example:
        >>> class CountSteps(Callback):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.count = 0
        ...     def on_step_end(self, trainer, event):
        ...         self.count += 1
        ...     def state_dict(self):
        ...         return {"count": self.count}
        ...     def load_state_dict(self, state):
        ...         self.count = state["count"]
    """

    def __init__(self, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: never call the per-step hooks), got {every!r}")
        self.every = every

    @property
    def name(self) -> str:
        """The key of this callback's state in checkpoints."""
        return type(self).__name__

    def runs_at(self, step: int) -> bool:
        """Whether the per-step hooks run at ``step``."""
        return self.every > 0 and step % self.every == 0

    def on_train_begin(self, trainer: TrainerView, state: Any) -> None: ...
    def on_train_end(self, trainer: TrainerView, state: Any) -> None: ...
    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None: ...
    def on_epoch_end(self, trainer: TrainerView, epoch: int, state: Any) -> None: ...
    def on_step_begin(self, trainer: TrainerView, step: int) -> None: ...
    def on_step_end(self, trainer: TrainerView, event: Event) -> None: ...
    def on_eval_end(self, trainer: TrainerView, event: Event) -> None: ...
    def on_save(self, trainer: TrainerView, step: int) -> None: ...
    def on_log(self, trainer: TrainerView, event: Event) -> None: ...

    def wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        """Return the step the Trainer should run (default: unchanged). See ``NanGuard(action="skip")``."""
        return train_step

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to save with checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class CallbackList(Callback):
    """Calls a sequence of callbacks in order, honouring each one's ``every``.

    Example:
        >>> cbs = CallbackList([ConsoleLogger(every=10), NanGuard()])
        >>> [c.name for c in cbs]
        ['ConsoleLogger', 'NanGuard']
    """

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        super().__init__()
        self.callbacks = list(callbacks)
        for i, cb in enumerate(self.callbacks):
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks[{i}] must be a craftfn.training.Callback, got {type(cb).__name__}")

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def _keys(self) -> list[str]:
        seen: dict[str, int] = {}
        keys = []
        for cb in self.callbacks:
            n = seen.get(cb.name, 0)
            seen[cb.name] = n + 1
            keys.append(cb.name if n == 0 else f"{cb.name}#{n + 1}")
        return keys

    def on_train_begin(self, trainer: TrainerView, state: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(trainer, state)

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer, state)

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_begin(trainer, epoch)

    def on_epoch_end(self, trainer: TrainerView, epoch: int, state: Any) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, epoch, state)

    def on_step_begin(self, trainer: TrainerView, step: int) -> None:
        for cb in self.callbacks:
            if cb.runs_at(step):
                cb.on_step_begin(trainer, step)

    def on_step_end(self, trainer: TrainerView, event: Event) -> None:
        for cb in self.callbacks:
            if cb.runs_at(event.step):
                cb.on_step_end(trainer, event)

    def on_eval_end(self, trainer: TrainerView, event: Event) -> None:
        for cb in self.callbacks:
            cb.on_eval_end(trainer, event)

    def on_save(self, trainer: TrainerView, step: int) -> None:
        for cb in self.callbacks:
            cb.on_save(trainer, step)

    def on_log(self, trainer: TrainerView, event: Event) -> None:
        for cb in self.callbacks:
            if event.kind != "train" or cb.runs_at(event.step):
                cb.on_log(trainer, event)

    def wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        for cb in self.callbacks:
            train_step = cb.wrap_train_step(train_step)
        return train_step

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """``{key: state}`` for the callbacks that have state."""
        out = {}
        for key, cb in zip(self._keys(), self.callbacks):
            state = cb.state_dict()
            if state:
                out[key] = state
        return out

    def load_state_dicts(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Give each callback the state saved under its key."""
        for key, cb in zip(self._keys(), self.callbacks):
            if key in states:
                cb.load_state_dict(states[key])


def _format_metrics(metrics: Mapping[str, float], names: Sequence[str]) -> str:
    parts = []
    for name in names:
        if name in metrics:
            value = metrics[name]
            if name.endswith("per_sec"):
                parts.append(f"{name.replace('_per_sec', '/s')} {value:,.0f}")
            elif name == "lr":
                parts.append(f"lr {value:.2e}")
            elif name == "mfu":
                parts.append(f"mfu {100 * value:.2f}%")
            else:
                parts.append(f"{name} {value:.4f}")
    return " | ".join(parts)


def _write_line(message: str, stream: Optional[TextIO]) -> None:
    from tqdm.auto import tqdm

    # tqdm.write keeps an active progress bar intact.
    tqdm.write(message, file=stream if stream is not None else sys.stdout)


class ConsoleLogger(Callback):
    """Print train metrics every ``every`` steps, every evaluation, text events and why training stopped.

    Args:
        every: print a train line every N steps (0: evaluations and text only).
        stream: where to print (default stdout).
        print_text: print text events (samples) too.

    Example:
        >>> logger = ConsoleLogger(every=100)
    """

    def __init__(self, every: int = 100, stream: Optional[TextIO] = None, print_text: bool = True) -> None:
        super().__init__(every)
        self.stream = stream
        self.print_text = print_text

    def _prefix(self, trainer: TrainerView, event: Event) -> str:
        total = trainer.total_steps
        epoch = f" epoch {event.epoch}" if event.epoch is not None else ""
        return f"step {event.step}/{total}{epoch}"

    def on_log(self, trainer: TrainerView, event: Event) -> None:
        if event.kind == "train":
            body = _format_metrics(event.metrics, ["loss", "loss_smoothed", "grad_norm", "lr", "tokens_per_sec", "mfu"])
            _write_line(f"{self._prefix(trainer, event)} | {body}", self.stream)
        elif event.kind == "eval":
            names = ["loss", "perplexity"] + sorted(k for k in event.metrics if k not in ("loss", "perplexity"))
            _write_line(f"{self._prefix(trainer, event)} | eval | {_format_metrics(event.metrics, names)}", self.stream)
        elif event.text and self.print_text:
            for name, text in event.text.items():
                _write_line(f"{self._prefix(trainer, event)} | {name}:\n{text}", self.stream)

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        if trainer.stop_reason:
            _write_line(f"training stopped at step {trainer.step}: {trainer.stop_reason}", self.stream)


class JSONLLogger(Callback):
    """Append every event of the stream to a JSON-lines file (one object per line).

    Each line is ``{"kind", "step", ["epoch"], "time", "elapsed", **metrics, **text}``.
    Lines are appended and flushed one at a time, so a crash loses at most the line
    being written and a resumed run continues the same file.

    Args:
        path: the file (e.g. ``run_dir/metrics.jsonl``); parent folders are created.
        every: write ``train`` events every N steps (evaluations and text always).

    Example:
        >>> logger = JSONLLogger("runs/demo/metrics.jsonl", every=10)
    """

    def __init__(self, path: Union[str, os.PathLike], every: int = 1) -> None:
        super().__init__(every)
        self.path = Path(path)
        self._file: Optional[TextIO] = None

    def on_train_begin(self, trainer: TrainerView, state: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in on_train_end

    def on_log(self, trainer: TrainerView, event: Event) -> None:
        if self._file is None:
            return
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else repr(v)) for k, v in event.to_dict().items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


# Event metric name -> TensorBoard tag for train events; other names go under train/.
_TB_TRAIN_TAGS = {
    "loss": "train/loss",
    "loss_smoothed": "train/loss_smoothed",
    "grad_norm": "grad_norm",
    "lr": "lr",
    "tokens_per_sec": "throughput/tokens_per_sec",
    "samples_per_sec": "throughput/samples_per_sec",
    "mfu": "mfu",
    "eta_sec": "progress/eta_sec",
}


class TensorBoardLogger(Callback):
    """Write the stream to TensorBoard (``torch.utils.tensorboard.SummaryWriter``).

    Scalars: ``train/loss``, ``eval/loss`` (and every other eval metric as ``eval/<name>``),
    ``lr``, ``grad_norm``, ``throughput/tokens_per_sec``, ``throughput/samples_per_sec``,
    ``mfu``. Text: ``config`` (the operative gin config, when given) and every text event
    (``samples``). Open it with ``tensorboard --logdir <log_dir>``.

    Args:
        log_dir: the event-file folder (usually the run directory).
        config_text: text shown under the ``config`` tag (e.g. ``gin.operative_config_str()``).
        every: write train scalars every N steps.

    Example:
        >>> tb = TensorBoardLogger("runs/demo", every=10)
    """

    def __init__(self, log_dir: Union[str, os.PathLike], config_text: Optional[str] = None, every: int = 1) -> None:
        super().__init__(every)
        self.log_dir = str(log_dir)
        self.config_text = config_text
        self._writer: Any = None

    def on_train_begin(self, trainer: TrainerView, state: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=self.log_dir)
        if self.config_text:
            # Markdown: indent four spaces so the config shows verbatim.
            self._writer.add_text("config", "    " + self.config_text.replace("\n", "\n    "), global_step=trainer.step)

    def on_log(self, trainer: TrainerView, event: Event) -> None:
        writer = self._writer
        if writer is None:
            return
        if event.kind == "train":
            for name, value in event.metrics.items():
                writer.add_scalar(_TB_TRAIN_TAGS.get(name, f"train/{name}"), value, event.step, walltime=event.wall_time)
        elif event.kind == "eval":
            for name, value in event.metrics.items():
                writer.add_scalar(f"eval/{name}", value, event.step, walltime=event.wall_time)
        for name, text in event.text.items():
            writer.add_text(name, "    " + text.replace("\n", "\n    "), event.step, walltime=event.wall_time)

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


class EarlyStopping(Callback):
    """Stop when a monitored metric has not improved for ``patience`` checks.

    Args:
        monitor: ``"eval/<name>"`` (checked after each evaluation) or ``"train/<name>"``
            (checked on each train event that ``every`` lets through).
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement tolerated before stopping.
        min_delta: an improvement must beat the best by more than this.

    Its counters (``best``, ``best_step``, ``wait``) are saved with checkpoints, so a
    resumed run keeps counting.

    Example:
        >>> stopper = EarlyStopping(monitor="eval/loss", mode="min", patience=3, min_delta=1e-3)
    """

    def __init__(self, monitor: str = "eval/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0, every: int = 1) -> None:
        super().__init__(every)
        source, _, metric = monitor.partition("/")
        if source not in ("eval", "train") or not metric:
            raise ValueError(f"monitor must look like 'eval/<metric>' or 'train/<metric>', got {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor, self.source, self.metric = monitor, source, metric
        self.mode, self.patience, self.min_delta = mode, patience, float(min_delta)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.wait = 0

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _check(self, trainer: TrainerView, event: Event) -> None:
        if self.metric not in event.metrics:
            raise KeyError(
                f"EarlyStopping: monitor {self.monitor!r} is not among the {event.kind} metrics {sorted(event.metrics)}"
            )
        value = event.metrics[self.metric]
        if math.isfinite(value) and self._improved(value):
            self.best, self.best_step, self.wait = value, event.step, 0
            return
        self.wait += 1
        if self.wait > self.patience:
            trainer.stop(
                f"EarlyStopping: {self.monitor} has not improved on {self.best:.6g} (step {self.best_step}) "
                f"by more than {self.min_delta:g} for {self.wait} checks (patience {self.patience})"
            )

    def on_eval_end(self, trainer: TrainerView, event: Event) -> None:
        if self.source == "eval":
            self._check(trainer, event)

    def on_step_end(self, trainer: TrainerView, event: Event) -> None:
        if self.source == "train":
            self._check(trainer, event)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_step, self.wait = state.get("best"), state.get("best_step"), int(state.get("wait", 0))


class NanGuard(Callback):
    """Catch a non-finite loss or gradient norm.

    Args:
        action: ``"stop"``: stop training with a message naming the step and the last
            finite loss. ``"skip"``: keep the parameters and optimizer state of the step
            before (selected on the device with ``torch.where``, no host sync) and carry on;
            stop after ``max_consecutive_skips`` skipped steps in a row. ``"skip"`` keeps the
            previous state alive, so it cannot be used with a donated step (``donate=True``).
        max_consecutive_skips: with ``"skip"``, how many bad steps in a row are tolerated.

    With ``"skip"`` the train events carry ``skipped`` (1.0 for a skipped step).

    Example:
        >>> guard = NanGuard(action="skip", max_consecutive_skips=10)
    """

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 20) -> None:
        super().__init__(every=1)
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be a positive int, got {max_consecutive_skips!r}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self.last_finite: Optional[tuple[int, float]] = None

    def wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        if self.action != "skip":
            return train_step
        if getattr(train_step, "donate", False):
            raise ValueError(
                "NanGuard(action='skip') needs the state before each step, which a donated step (donate=True) "
                "overwrites; use NanGuard(action='stop') or make_train_step(..., donate=False)"
            )

        def guarded(state: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
            new_state, metrics = train_step(state, batch)
            loss = metrics["loss"]
            finite = torch.isfinite(loss)
            if "grad_norm" in metrics:
                finite = finite & torch.isfinite(metrics["grad_norm"])

            def pick(new: Any, old: Any) -> Any:
                if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
                    return torch.where(finite.to(new.device), new, old)
                return new

            kept = new_state.replace(
                params=tree.map(pick, new_state.params, state.params),
                buffers=tree.map(pick, new_state.buffers, state.buffers),
                opt_state=tree.map(pick, new_state.opt_state, state.opt_state),
            )
            return kept, {**metrics, "skipped": (~finite).to(torch.float32)}

        for attr in ("accum_steps", "donate", "compiled", "core"):
            if hasattr(train_step, attr):
                setattr(guarded, attr, getattr(train_step, attr))
        return guarded

    def on_step_end(self, trainer: TrainerView, event: Event) -> None:
        loss = event.metrics.get("loss", 0.0)
        grad_norm = event.metrics.get("grad_norm", 0.0)
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not bad:
            self.last_finite = (event.step, loss)
            self.consecutive = 0
            return
        last = (
            f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
            if self.last_finite
            else "no finite loss was seen in this run"
        )
        what = f"loss={loss} grad_norm={grad_norm}"
        if self.action == "skip":
            self.skipped += 1
            self.consecutive += 1
            warnings.warn(f"NanGuard: skipped step {event.step} ({what}); {self.skipped} skipped so far", stacklevel=2)
            if self.consecutive >= self.max_consecutive_skips:
                trainer.stop(
                    f"NanGuard: {self.consecutive} steps in a row had a non-finite loss or gradient "
                    f"(latest: step {event.step}, {what}); {last}. Lower the learning rate, add clip_norm, "
                    "or check the data."
                )
            return
        trainer.stop(
            f"NanGuard: non-finite values at step {event.step} ({what}); {last}. Training stopped. "
            "Lower the learning rate, add gradient clipping (clip_norm), or check the data; "
            "NanGuard(action='skip') skips such steps instead."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _check_sampling(where: str, max_new_tokens: Any, temperature: Any, top_k: Any, block_size: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{where}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{where}: temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{where}: top_k must be a positive int or None (no top-k), got {top_k!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{where}: block_size must be a positive int or None, got {block_size!r}")


@torch.no_grad()
def generate_tokens(
    state: Any,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    block_size: Optional[int] = None,
    key: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Extend ``prompt`` (``(B, T)`` token ids) by sampling from ``state``'s model.

    A minimal loop without a KV cache (``craftfn.generation`` has the fast ones):
    each step runs the model on the last ``block_size`` tokens and samples the next
    one from ``softmax(logits / temperature)`` (``temperature=0``: greedy), with the
    randomness drawn from ``key``. The model may return logits or ``(logits, ...)``.

    Returns:
        ``(B, T + max_new_tokens)`` token ids.

    Example:
        >>> from craftfn import TrainState
        >>> from craftfn.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8))
        >>> state = TrainState.create(model=model, tx=None)
        >>> ids = generate_tokens(state, torch.tensor([[1, 2]]), 10, temperature=0.8, key=random.key(0))
        >>> ids.shape
        torch.Size([1, 12])
    """
    _check_sampling("generate_tokens", max_new_tokens, temperature, top_k, block_size)
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.is_floating_point() or prompt.shape[1] == 0:
        desc = f"shape {tuple(prompt.shape)}, dtype {prompt.dtype}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"generate_tokens: prompt must be integer token ids of shape (batch, length >= 1), got {desc}")
    gen = random.generator(key if key is not None else random.key(0), device=prompt.device)
    ids = prompt
    for i in range(max_new_tokens):
        context = ids[:, -block_size:] if block_size else ids
        out = state.apply(state.params, context, training=False)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        logits = logits[:, -1, :].float()
        # Diverged weights give non-finite logits at once: one host read on the first token, not one per token.
        if i == 0 and not bool(torch.isfinite(logits).all()):
            raise ValueError(
                "generate_tokens: the model's logits are not finite (NaN or inf): its weights have diverged, "
                "so there is nothing to sample"
            )
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    return ids


class SampleText(Callback):
    """Generate a short sample every ``every`` steps and at the end, as a ``text`` event.

    Args:
        encode: ``str -> list[int]`` (e.g. ``tokenizer.encode``).
        decode: ``list[int] -> str``.
        prompt: the text to continue.
        max_new_tokens: tokens to generate.
        temperature: sampling temperature (0: greedy).
        top_k: sample among the k most likely tokens only.
        block_size: the model's context length (older tokens are dropped).
        every: sample every N steps (0: only at the end).
        at_end: also sample after training.
        seed: samples use ``fold_in(key(seed), step)``: the same model gives the same text.
        echo: a function that prints each periodic sample (e.g. ``print``); the end-of-training
            sample is left to the caller (it is in ``samples[-1]``).

    The samples are kept in ``samples`` (a list of ``(step, text)``).

    Example:
        >>> from craftfn.data import ByteTokenizer
        >>> tok = ByteTokenizer()
        >>> sampler = SampleText(tok.encode, tok.decode, prompt="def ", every=500)
    """

    def __init__(
        self,
        encode: Callable[[str], Sequence[int]],
        decode: Callable[[Sequence[int]], str],
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: Optional[int] = None,
        block_size: Optional[int] = None,
        every: int = 0,
        at_end: bool = True,
        seed: int = 0,
        echo: Optional[Callable[[str], None]] = None,
    ) -> None:
        super().__init__(every)
        if not (callable(encode) and callable(decode)):
            raise TypeError(f"SampleText: encode and decode must be callables (str -> ids, ids -> str), got {type(encode).__name__}, {type(decode).__name__}")
        if not isinstance(prompt, str):
            raise TypeError(f"SampleText: prompt must be a str ('' starts from token 0), got {type(prompt).__name__}")
        _check_sampling("SampleText", max_new_tokens, temperature, top_k, block_size)
        self.encode, self.decode = encode, decode
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.block_size = block_size
        self.at_end = at_end
        self.seed = seed
        self.echo = echo
        self.samples: list[tuple[int, str]] = []
        self._last_step = -1

    def prompt_ids(self) -> list[int]:
        """The prompt's token ids (``[0]`` for an empty prompt); ``ValueError`` naming the prompt if it cannot be encoded."""
        try:
            ids = list(self.encode(self.prompt))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"SampleText: the sample prompt {self.prompt!r} cannot be encoded by the tokenizer ({e}); "
                "use text made of characters the tokenizer knows, or '' to start from token 0"
            ) from None
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"SampleText: encode({self.prompt!r}) must give non-negative int token ids, got {ids[:8]}")
        return ids or [0]

    def on_train_begin(self, trainer: TrainerView, state: Any) -> None:
        # Before step 1: a prompt that cannot be encoded must not cost the run its end.
        self.prompt_ids()

    def sample(self, state: Any, step: int) -> str:
        """Generate one sample from ``state`` (the prompt and its continuation)."""
        ids = self.prompt_ids()
        device = next(iter(tree.leaves(state.params))).device
        prompt = torch.tensor([ids], dtype=torch.long, device=device)
        out = generate_tokens(
            state,
            prompt,
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            block_size=self.block_size,
            key=random.fold_in(random.key(self.seed), step),
        )
        return self.decode(out[0].tolist())

    def _emit(self, trainer: TrainerView, state: Any, step: int, final: bool = False) -> None:
        if step == self._last_step:
            return
        self._last_step = step
        try:
            with trainer.paused_clock():
                text = self.sample(state, step)
        except Exception as e:  # noqa: BLE001 - a sample is optional: report it, keep the run
            message = f"SampleText: no sample at step {step}: {e}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            if self.echo is not None:
                self.echo(message)
            trainer.log(trainer.make_event("text", step=step, text={"samples": f"(no sample: {e})"}))
            return
        self.samples.append((step, text))
        if self.echo is not None and not final:
            self.echo(f"sample at step {step}:\n{text}")
        trainer.log(trainer.make_event("text", step=step, text={"samples": text}))

    def on_step_end(self, trainer: TrainerView, event: Event) -> None:
        # trainer.state may be a step ahead (metrics are read late); sample from it.
        self._emit(trainer, trainer.state, trainer.step)

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        if self.at_end:
            self._emit(trainer, state, trainer.step, final=True)


class SaveWeights(Callback):
    """Write the model weights to a safetensors file when training ends, however it ends.

    Runs in ``on_train_end``, which the Trainer calls after the last step (and the final save)
    also when training stopped early (``NanGuard``, ``EarlyStopping``) or was interrupted by
    SIGINT/SIGTERM. Put it before callbacks that do optional end work (``SampleText``): their
    failure then cannot cost the weights. The file is keyed like ``model.state_dict()`` (see
    :func:`craftfn.training.export_params`) and written atomically.

    Args:
        path: the file, e.g. ``run_dir/model.safetensors``.
        metadata: string pairs for the file's header (e.g. the model's config), next to the ones
            :func:`~craftfn.training.export_params` writes itself.

    Attributes:
        written: the path after a successful write (``None`` before).
        finite: whether every parameter was finite when written (a diverged run's weights are
            written too, and say so).

    Example:
        >>> saver = SaveWeights("runs/demo/model.safetensors")
    """

    def __init__(self, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(every=0)
        self.path = Path(path)
        self.metadata = dict(metadata) if metadata else None
        self.written: Optional[Path] = None
        self.finite: Optional[bool] = None

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        from craftfn.training.checkpointing import export_params

        self.path.parent.mkdir(parents=True, exist_ok=True)
        export_params(state, self.path, metadata=self.metadata)
        self.written = self.path
        self.finite = bool(tree.all_finite(state.params))  # once, at the end of the run


def _format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# tqdm's default bar with its "<remaining, rate" part left out (the postfix carries the ETA).
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class ProgressBar(Callback):
    """A tqdm bar on a terminal; plain periodic lines when output is not a terminal (CI).

    Shows the step, smoothed loss, tokens/s, MFU and the ETA from
    :class:`~craftfn.training.progress.ProgressTracker` (warm-up steps left out).

    Args:
        interval_s: without a terminal, print a line at most this often (and at the end).
        stream: where to write (default stderr).
        use_tqdm: force the bar on or off (default: when ``stream`` is a terminal).

    Example:
        >>> bar = ProgressBar(interval_s=30)
    """

    def __init__(self, interval_s: float = 10.0, stream: Optional[TextIO] = None, use_tqdm: Optional[bool] = None, every: int = 1) -> None:
        super().__init__(every)
        self.interval_s = interval_s
        self.stream = stream
        self.use_tqdm = use_tqdm
        self._bar: Any = None
        self._last_print = 0.0
        self._last_event: Optional[Event] = None
        self._printed_step = -1

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def on_train_begin(self, trainer: TrainerView, state: Any) -> None:
        use = self.use_tqdm
        if use is None:
            use = bool(getattr(self._out(), "isatty", lambda: False)())
        if use:
            from tqdm.auto import tqdm

            # tqdm's own remaining time counts the warm-up (compile) steps; the bar shows the
            # tracker's warm-up-free ETA in the postfix instead.
            self._bar = tqdm(
                total=trainer.total_steps, initial=trainer.step, file=self._out(), unit="step", dynamic_ncols=True,
                bar_format=_BAR_FORMAT,
            )
        self._last_print = time.monotonic()

    def _summary(self, event: Event) -> dict[str, str]:
        m = event.metrics
        out = {}
        loss = m.get("loss_smoothed", m.get("loss"))
        if loss is not None:
            out["loss"] = f"{loss:.4f}"
        if "tokens_per_sec" in m:
            out["tok/s"] = f"{m['tokens_per_sec']:,.0f}"
        if "mfu" in m:
            out["mfu"] = f"{100 * m['mfu']:.2f}%"
        return out

    def on_step_end(self, trainer: TrainerView, event: Event) -> None:
        self._last_event = event
        if self._bar is not None:
            self._bar.set_postfix({**self._summary(event), "eta": _format_seconds(event.metrics.get("eta_sec"))}, refresh=False)
            self._bar.update(event.step - self._bar.n)  # redraws at most every tqdm mininterval
            return
        now = time.monotonic()
        if now - self._last_print >= self.interval_s:
            self._last_print = now
            self._print_line(trainer, event)

    def _print_line(self, trainer: TrainerView, event: Event) -> None:
        if event.step == self._printed_step:
            return
        self._printed_step = event.step
        fields = " | ".join(f"{k} {v}" for k, v in self._summary(event).items())
        eta = _format_seconds(event.metrics.get("eta_sec"))
        pct = 100.0 * event.step / max(1, trainer.total_steps)
        print(f"[{pct:5.1f}%] step {event.step}/{trainer.total_steps} | {fields} | elapsed {_format_seconds(event.elapsed)} | eta {eta}", file=self._out(), flush=True)

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last_event is not None:
            self._print_line(trainer, self._last_event)
