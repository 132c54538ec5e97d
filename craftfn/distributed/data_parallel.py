"""Data parallelism as a transformation of the gradient path, and the data-parallel train step."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from craftfn import tree
from craftfn.distributed.batch import rank_key, shard_batch
from craftfn.distributed.collectives import (
    DEFAULT_BUCKET_MB,
    _all_reduce_mean_leaves,
    _bucket_bytes,
    average_metrics,
    broadcast_tree,
)
from craftfn.distributed.dp_state import (
    DataParallelState,
    _check_dp_state,
    _Config,
    _config_of,
    _config_or_none,
    _norm_init,
)
from craftfn.distributed.dropout import global_batch_masks
from craftfn.distributed.fully_sharded import gather_params
from craftfn.distributed.overlap import ExchangePlanner, current_exchange, exchange_scope
from craftfn.distributed.process import rank, world_size
from craftfn.distributed.zero1 import _sharded
from craftfn.optim.base import GradientTransformation, Params, Updates
from craftfn.state import TrainState, _mark_donated, check_live
from craftfn.step import LossFn, make_train_step


def broadcast_state(state: TrainState, src: int = 0) -> TrainState:
    """Make every rank start from ``src``'s step, params, buffers, key (and unsharded optimizer state).

    Call once after building the state, so ranks agree even if their initialisation differed.

    Example:
        >>> s = distributed.broadcast_state(TrainState.create(model=torch.nn.Linear(2, 1), tx=None))
    """
    check_live(state)
    cfg = _config_or_none(state.tx)
    if cfg is not None and cfg.fully_sharded:
        fields: tuple[str, ...] = ("step", "buffers", "rng")  # the shards came from rank 0 (fully_shard)
    else:
        fields = ("step", "params", "buffers", "rng") + (() if cfg is not None and cfg.sharded else ("opt_state",))
    values = broadcast_tree({f: getattr(state, f) for f in fields}, src)
    return state.replace(**values)


def data_parallel(
    tx: GradientTransformation,
    *,
    shard_optimizer_state: bool = False,
    bucket_mb: float = DEFAULT_BUCKET_MB,
) -> GradientTransformation:
    """Wrap an optimizer so each update first averages the gradients over all ranks.

    The averaging sits in the gradient path (like JAX's ``pmean`` before
    ``optax.update``), so every rule in ``tx`` (clipping included) sees the global
    gradient. Gradient accumulation in the step happens before it: one reduction per step.

    Args:
        tx: the optimizer to run on the averaged gradients.
        shard_optimizer_state: ZeRO-1. Each rank keeps only its contiguous 1/N slice of
            the flattened optimizer state; gradients are reduce-scattered (all-reduced
            on gloo, whose reduce-scatter is slower than its all-reduce), ``tx`` runs on
            the slice, and the updates are all-gathered. ``tx`` sees 1-D pieces of the
            parameters, named as the parameters, so elementwise rules (sgd, momentum,
            adam, adamw, weight-decay masks by name) are exact, and so is
            ``clip_by_global_norm`` (it sums over the slices through ``extra["shard_sum"]``);
            rules that couple elements otherwise (LAMB/LARS trust ratios, factored
            moments, masks that look at shapes, ``apply_if_finite``) see only the slice.
        bucket_mb: size of the flat buffers gradients are packed into per all-reduce
            (plain data parallel; ZeRO-1 reduce-scatters one flat buffer per dtype).

    Returns:
        A ``GradientTransformation`` whose state is a :class:`DataParallelState`.

    Example:
        >>> tx = distributed.data_parallel(optim.sgd(0.1), shard_optimizer_state=True)
        >>> s = tx.init({"w": torch.ones(3)})
        >>> type(s).__name__
        'DataParallelState'
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"data_parallel: tx must be a craftfn.optim.GradientTransformation, got {type(tx).__name__}")
    if _config_or_none(tx) is not None:
        raise ValueError("data_parallel: tx is already data-parallel; wrap the plain optimizer once")
    if not isinstance(shard_optimizer_state, bool):
        raise TypeError(f"shard_optimizer_state must be a bool, got {shard_optimizer_state!r}")
    bucket_bytes = _bucket_bytes(bucket_mb)
    if shard_optimizer_state:
        return _sharded(tx, bucket_bytes)

    def reduce(updates: Updates) -> Updates:
        exchange = current_exchange()
        if exchange is not None and not exchange.finished:
            return exchange.finish(updates)  # started in the backward (make_data_parallel_step)
        leaves, treedef = tree.flatten(updates)
        return tree.unflatten(treedef, _all_reduce_mean_leaves(leaves, bucket_bytes))

    def init_fn(params: Params) -> DataParallelState:
        return DataParallelState(inner=tx.init(params), grad_norm=_norm_init(params))

    def update_fn(
        updates: Updates, state: DataParallelState, params: Optional[Params] = None, **extra: Any
    ) -> tuple[Updates, DataParallelState]:
        _check_dp_state(state)
        grads = reduce(updates)
        norm = tree.global_norm(grads)
        updates, inner = tx.update(grads, state.inner, params, **extra)
        return updates, DataParallelState(inner, norm)

    donated_fn = None
    if tx.donated_update is not None:

        def donated_fn(
            updates: Updates, state: DataParallelState, params: Params, **extra: Any
        ) -> tuple[Params, DataParallelState]:
            _check_dp_state(state)
            grads = reduce(updates)
            norm = tree.global_norm(grads)
            params, inner = tx.donated_update(grads, state.inner, params, **extra)
            return params, DataParallelState(inner, norm)

    update_fn.craftfn_data_parallel = _Config(tx, False, bucket_bytes)  # type: ignore[attr-defined]
    return GradientTransformation(init_fn, update_fn, donated_fn)


_DROPOUT_MODES = ("per_rank", "global_batch")


def make_data_parallel_step(
    loss_fn: LossFn,
    *,
    shard_global_batch: bool = False,
    dropout: str = "per_rank",
    overlap: Optional[bool] = None,
    **step_options: Any,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, torch.Tensor]]]:
    """The data-parallel training step: ``step(state, local_batch) -> (state, metrics)``.

    It is :func:`craftfn.make_train_step` for a state whose ``tx`` was wrapped by
    :func:`data_parallel` (gradients averaged over the ranks; ZeRO-1 with
    ``shard_optimizer_state=True``) or made by :func:`fully_shard` (ZeRO-3: the parameters are
    gathered inside the differentiated function and the gradients reduce-scattered in the
    backward). ``loss_fn`` is the one-process loss, unchanged. The metrics are averaged over
    ranks, with ``grad_norm`` the norm of the averaged gradient. Without a process group it
    computes exactly what ``make_train_step`` does.

    Args:
        loss_fn: as in :func:`craftfn.make_train_step`.
        shard_global_batch: the step takes the *global* batch (the same on every rank)
            and keeps this rank's rows itself (:func:`shard_batch`); by default it takes
            the rank's shard.
        dropout: ``"per_rank"`` (default): each rank draws its rows' dropout masks from its own
            key (:func:`rank_key`): cheap, a valid random draw, not the one one process would
            make. ``"global_batch"``: each rank draws the masks of the whole global batch from
            the step's key and keeps its rows (:func:`global_batch_masks`), so the run equals
            one process over the global batch, for ``world`` times the random numbers.
        overlap: ``True``: plain data parallel starts each bucket's all-reduce from backward
            hooks as soon as its gradients exist, while the backward goes on (DDP's overlap).
            ``False``: everything is reduced after the backward. ``None`` (default): overlap
            where the collectives run off the compute cores (NCCL), not on gloo, whose
            all-reduce is CPU work that competes with the backward for the same cores
            (measured with 2 ranks on 2 cores: overlapping saved nothing beyond the noise, nor
            did torch's DDP overlap there; benchmarks/RESULTS.md).
            (ZeRO-3's reduce-scatters always run inside the backward.)
        step_options: ``accum_steps``, ``donate``, ``policy``, ``remat``, ``compile`` as in
            :func:`craftfn.make_train_step` (accumulation still reduces once per step).
            ``compile=`` compiles the differentiated forward, as in one process; the
            collectives (gradient all-reduce or ZeRO-1's reduce-scatter and all-gather, the
            metrics) run in the eager update after the compiled backward, so a compiled step
            does not overlap (``overlap=True`` is refused, ``None`` means no overlap), and
            ZeRO-3 states (:func:`fully_shard`, whose gathers run inside the forward) and
            ``dropout="global_batch"`` (a dispatch mode around the forward) are refused.
            ``loss_scale`` (fp16) is not supported yet.

    Returns:
        The step; give it this rank's shard of the global batch (:func:`shard_batch`),
        or the global batch with ``shard_global_batch=True``.

    Example:
        >>> step = distributed.make_data_parallel_step(lambda s, p, b, rng: s.apply(p, b["x"]).pow(2).mean(), accum_steps=2)
        >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=distributed.data_parallel(optim.adamw(1e-3)))
        >>> state, metrics = step(state, distributed.shard_batch({"x": torch.ones(8, 3)}))
        >>> int(state.step)
        1
    """
    compiled = bool(step_options.get("compile"))
    if compiled and overlap:
        raise ValueError(
            "make_data_parallel_step: overlap=True cannot be combined with compile=: the all-reduces start from "
            "hooks in an eager backward, and a compiled step reduces after its compiled backward; "
            "pass overlap=None or False"
        )
    if compiled and dropout == "global_batch":
        raise ValueError(
            "make_data_parallel_step: dropout='global_batch' cannot be combined with compile= (it draws the masks "
            "in a dispatch mode around an eager forward); use dropout='per_rank' or drop compile="
        )
    if step_options.get("loss_scale") not in (None, False):
        raise ValueError(
            "make_data_parallel_step: loss_scale= is not supported yet: the step checks its gradients for "
            "inf/NaN before the optimizer averages them, so ranks could disagree on skipping a step; "
            "train in bf16 (policy='bf16', no loss scaling) or in one process"
        )
    if not isinstance(shard_global_batch, bool):
        raise TypeError(f"shard_global_batch must be a bool, got {shard_global_batch!r}")
    if dropout not in _DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {_DROPOUT_MODES}, got {dropout!r}")
    if overlap is not None and not isinstance(overlap, bool):
        raise TypeError(f"overlap must be True, False or None (by backend), got {overlap!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    def loss_on_this_rank(state: TrainState, params: Any, batch: Any, rng: torch.Tensor) -> Any:
        exchange = current_exchange()
        if exchange is not None:
            exchange.watch(params)  # hooks that start the all-reduces during the backward
        return loss_fn(state, gather_params(params), batch, rng)

    # Compiled: no exchange to watch (no overlap) and no ZeRO-3 gather (refused at the first step), so
    # the compiled forward is the user's loss itself.
    inner = make_train_step(loss_fn if compiled else loss_on_this_rank, **step_options)
    donate = bool(step_options.get("donate", False))
    accum_steps = inner.accum_steps  # type: ignore[attr-defined]
    planner = ExchangePlanner()

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        check_live(state)
        cfg = _config_of(state.tx)
        n = world_size()
        key = state.rng
        local = state.replace(rng=rank_key(key)) if n > 1 and dropout == "per_rank" else state
        if compiled and cfg.fully_sharded:
            raise ValueError(
                "make_data_parallel_step: compile= does not support a fully sharded (ZeRO-3) state: its parameters "
                "are all-gathered inside the forward; use distributed.data_parallel(tx, shard_optimizer_state=True) "
                "(ZeRO-1) with compile=, or a ZeRO-3 state without it"
            )
        exchange = None
        overlapped = not compiled and (overlap if overlap is not None else n > 1 and dist.get_backend() == "nccl")
        if overlapped and n > 1 and not cfg.sharded and not cfg.fully_sharded:
            exchange = planner.exchange(state.params, cfg.bucket_bytes, accum_steps)
        masks = global_batch_masks(rank(), n) if dropout == "global_batch" else contextlib.nullcontext()
        with exchange_scope(exchange), masks:
            new_state, metrics = inner(local, shard_batch(batch) if shard_global_batch else batch)
        if donate:
            _mark_donated(state)
        # The optimizer wrapper measured the norm of the averaged gradient; the inner step's is this rank's.
        metrics.pop("grad_norm", None)
        metrics = average_metrics(metrics)
        metrics["grad_norm"] = new_state.opt_state.grad_norm
        return new_state.replace(rng=key), metrics

    step.accum_steps = accum_steps  # type: ignore[attr-defined]
    step.donate = donate  # type: ignore[attr-defined]
    step.dropout = dropout  # type: ignore[attr-defined]
    step.overlap = overlap  # type: ignore[attr-defined]
    return step
