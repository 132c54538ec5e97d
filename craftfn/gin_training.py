"""gin at the edge: the language-model experiment and the gin names of the model, data, Trainer and callbacks.

Only the CLI layer imports this module (nothing below imports gin). It registers:

* model: ``GPTConfig`` (call it from gin files as ``@GPTConfig``: vocab_size and
  block_size are filled in by the experiment);
* data: ``stdlib_corpus``, ``text_file`` (text in memory); ``lm_task.data`` names files that are
  tokenized once into token shards and read memory-mapped (:func:`craftfn.data.prepare_corpus`);
* training: ``Trainer`` (``Trainer.max_steps``, ``Trainer.eval_every``, ...), the callbacks
  (``ConsoleLogger``, ``ProgressBar``, ``EarlyStopping``, ``NanGuard``, ``SampleText`` ...)
  and ``CheckpointManager``;
* the experiment: ``lm_task`` (data, tokenizer, model), ``train`` (optimizer, callbacks,
  run options) and ``evaluate``.

Optimizers and schedules are registered by :mod:`craftfn.gin_config`.

Example (a gin file)::

    lm_task.text = @stdlib_corpus()
    lm_task.model_config = @GPTConfig
    train.optimizer = @create_optimizer()
    GPTConfig.n_layer = 4
    Trainer.max_steps = 1000
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import gin
import torch

from craftfn import data as cdata
from craftfn import distributed, make_eval_step, make_train_step, optim
from craftfn.models.gpt import GPT, GPTConfig, lm_eval_metrics, lm_loss
from craftfn.state import TrainState
from craftfn.training import callbacks as cb
from craftfn.training.checkpointing import CheckpointManager, CheckpointMismatchError, load_exported
from craftfn.training.evaluation import Evaluator
from craftfn.training.runlock import RunDirLock, RunDirLockedError
from craftfn.training.trainer import Trainer

__all__ = [
    "ConfigError",
    "train_language_model",
    "evaluate_language_model",
    "unigram_entropy",
    "entropy_of_counts",
    "LanguageModelTask",
    "build_language_model_task",
]


class ConfigError(ValueError):
    """A user error found while building the experiment (bad data path, sizes, bindings)."""


def _register(fn: Any, module: str, name: Optional[str] = None) -> Any:
    """Register ``fn`` with gin once (re-importing this module must not fail)."""
    try:
        return gin.external_configurable(fn, name=name, module=module)
    except ValueError:  # already registered
        return gin.get_configurable(f"{module}.{name or fn.__name__}")


ConfiguredGPTConfig = _register(GPTConfig, "craftfn.models")
_register(cdata.stdlib_corpus, "craftfn.data")
_register(cdata.text_file, "craftfn.data")
ConfiguredTrainer = _register(Trainer, "craftfn.training")
ConfiguredConsoleLogger = _register(cb.ConsoleLogger, "craftfn.training")
ConfiguredProgressBar = _register(cb.ProgressBar, "craftfn.training")
ConfiguredNanGuard = _register(cb.NanGuard, "craftfn.training")
ConfiguredSampleText = _register(cb.SampleText, "craftfn.training")
ConfiguredJSONLLogger = _register(cb.JSONLLogger, "craftfn.training")
ConfiguredTensorBoardLogger = _register(cb.TensorBoardLogger, "craftfn.training")
_register(cb.EarlyStopping, "craftfn.training")
ConfiguredCheckpointManager = _register(CheckpointManager, "craftfn.training")


def ensure_optimizer_configurables() -> None:
    """Register ``create_optimizer`` and the schedules with gin unless :mod:`craftfn.gin_config` did.

    The CLI imports ``craftfn.gin_config`` first; this only fills in names it lacks, so
    the two never register the same name twice.
    """
    from craftfn import schedules
    from craftfn.optim.factory import create_optimizer

    wanted = [(create_optimizer, "craftfn.optim"), (optim.sgd, "craftfn.optim")]
    wanted += [(getattr(schedules, n), "craftfn.schedules") for n in ("constant", "warmup_cosine_decay", "cosine_decay", "warmup_constant", "linear")]
    for fn, module in wanted:
        try:
            gin.get_configurable(fn.__name__)
        except ValueError:  # not registered under any module
            gin.external_configurable(fn, module=module)
        except KeyError:  # ambiguous: registered already (e.g. craftfn.schedules.constant and gin.constant)
            pass


def unigram_entropy(tokens: torch.Tensor) -> float:
    """The entropy (nats per token) of the token frequencies: the loss of the best model that ignores context.

    Example:
        >>> round(unigram_entropy(torch.tensor([0, 1, 0, 1])), 4)
        0.6931
    """
    return entropy_of_counts(torch.bincount(tokens.flatten().to(torch.int64)))


def entropy_of_counts(counts: Any) -> float:
    """:func:`unigram_entropy` from a histogram of token ids (e.g. a token corpus's ``token_counts``).

    Example:
        >>> round(entropy_of_counts(torch.tensor([2, 2])), 4)
        0.6931
    """
    counts = torch.as_tensor(counts).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


class LanguageModelTask:
    """Everything a language-model run is made of (built by :func:`build_language_model_task`)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


_TOKENIZER_KINDS = ("char", "byte", "bpe")


def _resolve_tokenizer(tokenizer: Any, vocab_size: Optional[int]) -> Any:
    """A kind (``'char'``, ``'byte'``, ``'bpe'``) as it is, or the tokenizer of a ``tokenizer.json`` path."""
    if not isinstance(tokenizer, str):
        raise TypeError(f"lm_task.tokenizer must be a str ('char', 'byte', 'bpe' or a tokenizer.json path), got {type(tokenizer).__name__}")
    if tokenizer in _TOKENIZER_KINDS:
        if tokenizer == "bpe" and vocab_size is None:
            raise ValueError("lm_task.tokenizer = 'bpe' needs lm_task.vocab_size (e.g. 1024)")
        if tokenizer != "bpe" and vocab_size is not None:
            raise ValueError(f"lm_task.vocab_size = {vocab_size} is only for lm_task.tokenizer = 'bpe' (the {tokenizer!r} vocabulary comes from the text)")
        return tokenizer
    if os.path.isfile(os.path.expanduser(tokenizer)):
        if vocab_size is not None:
            raise ValueError(f"lm_task.vocab_size = {vocab_size} is only for lm_task.tokenizer = 'bpe'; {tokenizer!r} has its own vocabulary")
        return cdata.load_tokenizer(os.path.expanduser(tokenizer))
    raise ValueError(f"lm_task.tokenizer must be 'char', 'byte', 'bpe' or the path of a tokenizer.json, got {tokenizer!r} (no such file)")


@gin.configurable("lm_task", module="craftfn", denylist=["log", "progress"])
def build_language_model_task(
    text: Optional[str] = None,
    tokenizer: str = "char",
    model_config: Callable[..., GPTConfig] = gin.REQUIRED,
    block_size: int = 64,
    batch_size: int = 32,
    val_fraction: float = 0.1,
    eval_batch_size: int = 64,
    eval_windows: Optional[int] = 512,
    seed: int = 0,
    epoch_data: bool = False,
    data: Optional[Union[str, Sequence[str]]] = None,
    vocab_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
    jsonl_field: str = "text",
    bpe_train_bytes: int = 64 << 20,
    verify_data: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> LanguageModelTask:
    """Tokenize the corpus, split it, and build the model, data and steps' inputs.

    The corpus is either ``text`` (a string in memory) or ``data`` (files, tokenized once into
    token shards in ``cache_dir`` and read memory-mapped: see :func:`craftfn.data.prepare_corpus`).
    Both give the same windows for the same tokens. Under torchrun each rank reads only its
    rows of every global batch.

    Args:
        text: the corpus as a string (``@stdlib_corpus()``, ``@text_file()``).
        tokenizer: ``"char"`` (vocabulary = the characters of the corpus), ``"byte"`` (256 ids),
            ``"bpe"`` (a byte-level BPE of ``vocab_size`` trained on the corpus), or the path of a
            ``tokenizer.json`` (e.g. a run's).
        model_config: a ``GPTConfig`` factory (``@GPTConfig``); called with ``vocab_size`` and ``block_size``.
        block_size: tokens per training window.
        batch_size: windows per (global) training batch.
        val_fraction: the part of the corpus held out for evaluation: the tail of a text, or
            whole documents (chosen by ``seed``) of a corpus of several files.
        eval_batch_size: windows per evaluation batch.
        eval_windows: evaluate on the first N non-overlapping validation windows (None: all).
        seed: the seed of the model initialisation and of the data.
        epoch_data: train on epochs over non-overlapping windows (set ``Trainer.epochs``)
            instead of random windows drawn per step.
        data: a text file, directory, glob pattern (or a list of them) of ``.txt``/``.jsonl`` files.
        vocab_size: the BPE vocabulary size (``tokenizer = 'bpe'`` only).
        cache_dir: where token shards go (default ``$CRAFTFN_CACHE_DIR`` or ``~/.cache/craftfn/tokens``).
        jsonl_field: the text field of ``.jsonl`` records.
        bpe_train_bytes: how much of a ``data`` corpus the BPE is trained on.
        verify_data: hash every source file and token shard in full before training (by default
            files unchanged by stat since their last check are trusted: see :func:`craftfn.data.prepare_corpus`).
    """
    if (text is None) == (data is None):
        raise ValueError(
            "lm_task needs exactly one corpus: lm_task.text (a string, e.g. @stdlib_corpus()) or lm_task.data "
            f"(files to tokenize into shards); got {'both' if text is not None else 'neither'}"
        )
    kind = _resolve_tokenizer(tokenizer, vocab_size)
    corpus = None
    if data is not None:
        corpus = cdata.prepare_corpus(
            data, kind, vocab_size=vocab_size, cache_dir=cache_dir, jsonl_field=jsonl_field,
            bpe_train_bytes=bpe_train_bytes, progress=progress, log=log, verify=verify_data,
        )
        tok: Any = corpus.tokenizer
        tokens: Any = corpus.tokens
        token_counts = torch.from_numpy(corpus.token_counts)
    else:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str (e.g. @stdlib_corpus() or @text_file()), got {type(text).__name__}")
        if not text:
            raise ValueError("the training text is empty: give a non-empty corpus (train_language_model text / DATA_PATH)")
        if kind == "char":
            tok = cdata.CharTokenizer.from_text(text)
        elif kind == "byte":
            tok = cdata.ByteTokenizer()
        elif kind == "bpe":
            tok = cdata.BPETokenizer.train([text], vocab_size)
        else:
            tok = kind
        tokens = tok.encode_tensor(text)
        token_counts = torch.bincount(tokens, minlength=tok.vocab_size)
    if tokens.numel() < 2 * (block_size + 1):
        raise ValueError(
            f"the text has {tokens.numel()} tokens, too few for block_size={block_size} "
            f"(need at least {2 * (block_size + 1)} for a train and a validation window); use more text or a smaller block_size"
        )
    if corpus is not None:
        train_tokens, val_tokens = corpus.split(val_fraction, seed)
    else:
        train_tokens, val_tokens = cdata.train_val_split(tokens, val_fraction)
    if val_tokens.numel() <= block_size:
        raise ValueError(
            f"the validation split has {val_tokens.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "raise val_fraction or use more text"
        )
    if train_tokens.numel() <= block_size:
        raise ValueError(f"the training split has {train_tokens.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; lower val_fraction or use more text")
    config = model_config(vocab_size=tok.vocab_size, block_size=block_size)
    torch.manual_seed(seed)
    model = GPT(config)
    eval_batches = cdata.WindowBatches(cdata.WindowDataset(val_tokens, block_size), eval_batch_size, eval_windows)
    if epoch_data:
        train_data: Any = cdata.WindowDataset(train_tokens, block_size)
    else:
        # Under torchrun this rank reads only its rows of each global batch.
        world = distributed.world_size()
        if batch_size % world:
            raise ValueError(f"lm_task.batch_size = {batch_size} (the global batch) must be a multiple of the world size {world}")
        train_data = cdata.RandomWindows(train_tokens, batch_size, block_size, seed=seed, rank=distributed.rank(), world=world).__getitem__
    return LanguageModelTask(
        tokenizer=tok,
        tokens=tokens,
        token_counts=token_counts,
        corpus=corpus,
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        config=config,
        model=model,
        train_data=train_data,
        rank_batches=not epoch_data,
        eval_batches=eval_batches,
        batch_size=batch_size if epoch_data else None,
        seed=seed,
    )


def _atomic_write_text(path: Path, text: str) -> None:
    cdata.atomic_write_text(path, text)


MODEL_CONFIG_FILE = "model_config.json"


def _model_config_json(config: GPTConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True)


def _clean_gin_message(e: BaseException) -> str:
    # gin appends "In call to configurable ..." lines; the cause is the first part.
    lines = [ln for ln in str(e).splitlines() if not ln.strip().startswith("In call to configurable")]
    return " ".join(ln.strip() for ln in lines if ln.strip())


def _prepare_training(
    run_dir: str, optimizer: Any, callbacks: Sequence[cb.Callback], donate: bool, compile: bool, console_every: int,
    tensorboard_every: int, sample_every: int, sample_prompt: str, sample_tokens: int, temperature: float,
    save_checkpoints: bool, num_threads: Optional[int], print_fn: Callable[[str], None],
    shard_optimizer_state: bool = False, step_options: Optional[dict[str, Any]] = None,
) -> tuple[Any, ...]:
    if num_threads:
        torch.set_num_threads(num_threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    main = distributed.is_main()
    task = build_language_model_task(log=print_fn, progress=main)
    # Under torchrun (distributed.init() was called): data parallel over the ranks; each rank
    # reads its rows of the global batch (epoch data: builds the global batch and keeps its rows);
    # only the main rank logs and writes.
    data_parallel = distributed.world_size() > 1
    if data_parallel:
        optimizer = distributed.data_parallel(optimizer, shard_optimizer_state=shard_optimizer_state)
    state = TrainState.create(model=task.model, tx=optimizer, seed=task.seed)
    if data_parallel:
        state = distributed.broadcast_state(state)
        train_step = distributed.make_data_parallel_step(
            lm_loss, donate=donate, compile=compile, shard_global_batch=not task.rank_batches, **(step_options or {})
        )
    else:
        train_step = make_train_step(lm_loss, donate=donate, compile=compile, **(step_options or {}))
    eval_step = make_eval_step(lm_eval_metrics, policy=(step_options or {}).get("policy"))
    if main:
        task.tokenizer.save(run / "tokenizer.json")
        # GPT(GPTConfig(**json.load(open("model_config.json")))) rebuilds the model without gin.
        _atomic_write_text(run / MODEL_CONFIG_FILE, _model_config_json(task.config) + "\n")
    sampler = ConfiguredSampleText(
        task.tokenizer.encode,
        task.tokenizer.decode,
        prompt=sample_prompt,
        max_new_tokens=sample_tokens,
        temperature=temperature,
        block_size=task.config.block_size,
        every=sample_every,
        seed=task.seed,
        echo=print_fn,
    )
    tensorboard = ConfiguredTensorBoardLogger(run, every=tensorboard_every)
    # The sampler comes before the loggers: its end-of-training sample is logged before they close.
    all_callbacks = [
        ConfiguredNanGuard(),
        # The weights are written before the optional end work (the final sample), whatever ends the run.
        # The model config travels in the file's header too, so the weights alone describe the model.
        cb.SaveWeights(run / "model.safetensors", metadata={"model_config": _model_config_json(task.config)}),
        sampler,
        ConfiguredProgressBar(),
        # Samples are printed by SampleText(echo=) and the final summary.
        ConfiguredConsoleLogger(every=console_every, print_text=False),
        ConfiguredJSONLLogger(run / "metrics.jsonl"),
        tensorboard,
        *callbacks,
    ]
    if not main:  # the other ranks keep only callbacks that steer training, not the ones that report
        all_callbacks = [all_callbacks[0], *callbacks]
    manager = None
    if save_checkpoints:
        manager = ConfiguredCheckpointManager(run / "checkpoints") if main else None
        if data_parallel:  # every rank calls it; the main rank's manager writes
            manager = distributed.CheckpointCoordinator(manager)
    trainer = ConfiguredTrainer(
        train_step,
        task.train_data,
        evaluator=Evaluator(eval_step, task.eval_batches),
        callbacks=all_callbacks,
        checkpoint_manager=manager,
        batch_size=task.batch_size,
        seed=task.seed,
        flops_per_token=float(task.model.flops_per_token()),
        checkpoint_extra={"tokenizer": task.tokenizer.to_dict(), "world_size": distributed.world_size()},
        # Under torchrun the ranks could stop after different steps (a deadlock in the next
        # collective): there, signals keep their default action and the periodic checkpoints count.
        handle_signals=not data_parallel,
    )
    # Every configurable has been called now, so the operative config is complete.
    config_text = _run_header() + gin.operative_config_str()
    if main:
        _atomic_write_text(run / "config.gin", config_text)
    tensorboard.config_text = config_text
    if data_parallel and trainer.tracker.peak_flops and not task.rank_batches:
        # The throughput counts the global batch, so MFU compares it with every rank's peak together
        # (with per-rank batches it counts this rank's tokens against this rank's peak).
        trainer.tracker.peak_flops *= distributed.world_size()
    trainer.checkpoint_extra["gin_config"] = config_text
    return trainer, state, task, sampler, manager, run


def _run_header() -> str:
    import craftfn

    return (
        f"# Operative config of a craftfn train run (craftfn {craftfn.__version__}, torch {torch.__version__}, "
        f"world size {distributed.world_size()}).\n# Replay it: craftfn train --gin_file RUN_DIR/config.gin --run_dir NEW_RUN_DIR [--gin.NAME=VALUE ...]\n\n"
    )


def _silent(text: str) -> None:
    del text


@gin.configurable("train", module="craftfn", denylist=["run_dir", "resume", "print_fn"])
def train_language_model(
    run_dir: str,
    resume: bool = False,
    optimizer: optim.GradientTransformation = gin.REQUIRED,
    callbacks: Sequence[cb.Callback] = (),
    donate: bool = False,
    compile: bool = False,
    console_every: int = 100,
    tensorboard_every: int = 10,
    sample_every: int = 0,
    sample_prompt: str = "def ",
    sample_tokens: int = 200,
    temperature: float = 0.8,
    save_checkpoints: bool = True,
    num_threads: Optional[int] = None,
    shard_optimizer_state: bool = False,
    policy: Optional[str] = None,
    loss_scale: Optional[bool] = None,
    remat: Optional[Any] = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a GPT language model; the run directory gets config.gin, metrics.jsonl,
    TensorBoard events, checkpoints/, model.safetensors, model_config.json and tokenizer.json.

    Args:
        run_dir: the run directory (created).
        resume: continue from ``run_dir/checkpoints`` (the CLI sets it when checkpoints exist).
        optimizer: the gradient transformation (``@create_optimizer()``).
        callbacks: extra callbacks (e.g. ``[@EarlyStopping()]``).
        donate: donate the state to each step (in-place, fused updates).
        compile: ``torch.compile`` the train step.
        console_every: print a train line every N steps (0: evaluations only).
        tensorboard_every: write train scalars every N steps.
        sample_every: print a generated sample every N steps (0: only at the end).
        sample_prompt: the text the samples continue.
        sample_tokens: characters/tokens per sample.
        temperature: sampling temperature.
        save_checkpoints: keep resumable checkpoints in ``run_dir/checkpoints``
            (every ``Trainer.save_every`` steps and at the end).
        num_threads: ``torch.set_num_threads`` for the run (default: torch's).
        shard_optimizer_state: under torchrun, keep each rank's 1/N slice of the optimizer
            state only (ZeRO-1, see :func:`craftfn.distributed.data_parallel`: exact for
            elementwise rules and clipping by global norm).
        policy: mixed precision by name (``"fp32"``, ``"bf16"``, ``"bf16_pure"``, ``"fp16"``;
            see :mod:`craftfn.precision`).
        loss_scale: dynamic loss scaling (``True`` for fp16).
        remat: activation checkpointing targets, e.g. ``"transformer.h.*"`` (see :mod:`craftfn.remat`).

    Returns:
        A summary: final eval metrics, unigram entropy, the final sample, steps, seconds.
    """
    t0 = time.time()
    if not distributed.is_main():
        print_fn = _silent
    # One trainer per run directory (the main rank holds the lock for the run's ranks).
    lock = RunDirLock(run_dir) if distributed.is_main() else None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirLockedError as e:
            raise ConfigError(str(e)) from None
        if lock.took_over:
            print_fn(
                f"craftfn: took over the lock of {run_dir} left by pid {lock.took_over.get('pid')}, "
                "which is no longer running"
            )
    try:
        return _train_locked(
            run_dir, resume, optimizer, callbacks, donate, compile, console_every, tensorboard_every, sample_every,
            sample_prompt, sample_tokens, temperature, save_checkpoints, num_threads, shard_optimizer_state,
            policy, loss_scale, remat, print_fn, t0,
        )
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    run_dir: str, resume: bool, optimizer: Any, callbacks: Sequence[cb.Callback], donate: bool, compile: bool,
    console_every: int, tensorboard_every: int, sample_every: int, sample_prompt: str, sample_tokens: int,
    temperature: float, save_checkpoints: bool, num_threads: Optional[int], shard_optimizer_state: bool,
    policy: Optional[str], loss_scale: Optional[bool], remat: Optional[Any], print_fn: Callable[[str], None], t0: float,
) -> dict[str, Any]:
    try:
        trainer, state, task, sampler, manager, run = _prepare_training(
            run_dir, optimizer, callbacks, donate, compile, console_every, tensorboard_every, sample_every,
            sample_prompt, sample_tokens, temperature, save_checkpoints, num_threads, print_fn,
            shard_optimizer_state,
            {k: v for k, v in {"policy": policy, "loss_scale": loss_scale, "remat": remat}.items() if v is not None},
        )
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(_clean_gin_message(e)) from e
    print_fn(
        f"craftfn: training a {task.model.num_params():,}-parameter GPT on {task.train_tokens.numel():,} tokens "
        f"(vocab {task.tokenizer.vocab_size}) up to step {trainer.total_steps}; run directory {run}"
    )
    try:
        state = trainer.fit(state, resume=resume and manager is not None)
    except CheckpointMismatchError as e:
        detail = _clean_gin_message(e)
        detail = detail if len(detail) <= 200 else detail[:200] + " ..."
        raise ConfigError(
            f"the checkpoints in {run / 'checkpoints'} were made with a different model or optimizer than this "
            f"configuration ({detail}); train in a fresh --run_dir, or use the configuration they were made with"
        ) from e
    finally:
        if manager is not None:
            manager.close()
    # model.safetensors was written by the SaveWeights callback, before the final sample.
    saver = next((c for c in trainer.callbacks if isinstance(c, cb.SaveWeights)), None)
    if saver is not None and saver.finite is False:
        print_fn(
            f"craftfn: the weights in {run / 'model.safetensors'} are not finite (the run diverged); the checkpoints "
            f"in {run / 'checkpoints'} hold the last finite state. Lower the learning rate and run again to resume from it."
        )
    entropy = entropy_of_counts(task.token_counts)
    final = trainer.last_eval
    sample = sampler.samples[-1][1] if sampler.samples else ""
    summary = {
        "steps": trainer.step,
        "val_loss": final.get("loss"),
        "val_perplexity": final.get("perplexity"),
        "unigram_entropy": entropy,
        "sample": sample,
        "seconds": time.time() - t0,
        "stop_reason": trainer.stop_reason,
        "run_dir": str(run),
    }
    val = final.get("loss", float("nan"))
    print_fn(
        f"\nfinal validation loss {val:.4f} nats/token (perplexity {math.exp(val) if val < 700 else float('inf'):.2f}) "
        f"vs unigram entropy {entropy:.4f} nats/token: the model uses context worth {entropy - val:.2f} nats/token."
    )
    print_fn(f"sample after {trainer.step} steps:\n{'-' * 60}\n{sample}\n{'-' * 60}")
    print_fn(f"run directory: {run} (config.gin, metrics.jsonl, TensorBoard events, model.safetensors, model_config.json); {summary['seconds']:.0f} s")
    return summary


@gin.configurable("evaluate", module="craftfn", denylist=["run_dir", "checkpoint", "print_fn"])
def evaluate_language_model(run_dir: str, checkpoint: Optional[str] = None, print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Evaluate a trained run on the validation split of the configured data.

    Args:
        run_dir: the run directory of ``craftfn train``.
        checkpoint: a safetensors file of model weights (default ``run_dir/model.safetensors``).

    Returns:
        The evaluation metrics (loss, perplexity, num_tokens) and the unigram entropy.
    """
    path = Path(checkpoint) if checkpoint else Path(run_dir) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"no model weights at {str(path)!r}: train first (craftfn train --run_dir {run_dir}) or pass --checkpoint")
    task = build_language_model_task(log=print_fn)
    load_exported(task.model, path)  # either tied layout; a ValueError names what does not fit
    state = TrainState.create(model=task.model, tx=None, seed=task.seed)
    metrics = Evaluator(make_eval_step(lm_eval_metrics), task.eval_batches).evaluate(state)
    metrics["unigram_entropy"] = entropy_of_counts(task.token_counts)
    print_fn(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
