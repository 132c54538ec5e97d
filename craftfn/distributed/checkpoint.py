"""Checkpoints of data-parallel states: the single-process form, and a manager every rank calls."""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional

import torch

from craftfn import tree
from craftfn.distributed.collectives import _on_main, broadcast_tree
from craftfn.distributed.dp_state import DataParallelState, _check_dp_state, _config_of, _config_or_none, _norm_init
from craftfn.distributed.fully_sharded import full_tree, is_fully_sharded
from craftfn.distributed.process import _check_rank_world, barrier, is_main, rank
from craftfn.distributed.zero1 import _gather_params_dict, _is_params_dict, _slice_params_dict
from craftfn.optim.base import GradientTransformation
from craftfn.state import DonatedStateError, TrainState, _mark_donated, check_live
from craftfn.training.checkpointing import takes_donate

_ZERO3_CHECKPOINTS = (
    "a fully sharded (ZeRO-3) state is saved by every rank, each its own shards: use "
    "distributed.ShardedCheckpointManager(directory) (it restores on any number of ranks, or in one process)"
)


def gather_state(state: TrainState, dst: Optional[int] = 0) -> Optional[TrainState]:
    """The single-process form of a data-parallel state: ``tx`` unwrapped, optimizer state whole.

    A collective: every rank calls it. The result is what one process running the
    plain optimizer would hold, so it can be saved and restored with any world size
    (or none). With a sharded state the slices are gathered to ``dst`` (the others get
    ``None``), or to every rank when ``dst`` is ``None``.

    Example:
        >>> s = TrainState.create(model=torch.nn.Linear(2, 1), tx=distributed.data_parallel(optim.sgd(0.1)))
        >>> type(distributed.gather_state(s).opt_state).__name__
        'tuple'
    """
    check_live(state)
    cfg = _config_of(state.tx)
    opt_state = state.opt_state
    _check_dp_state(opt_state)
    if dst is not None:
        _check_rank_world(dst, None)
    if cfg.fully_sharded:
        keep = dst is None or rank() == dst
        params, inner = full_tree(state.params, keep), full_tree(opt_state.inner, keep)
        return state.replace(tx=cfg.inner, params=params, opt_state=inner) if keep else None
    if not cfg.sharded:
        if dst is not None and rank() != dst:
            return None
        return state.replace(tx=cfg.inner, opt_state=opt_state.inner)
    names, groups = state.tx.update.craftfn_layout(state.params)
    treedef = tree.structure(state.params)
    is_pd = _is_params_dict(frozenset(names))

    def whole(pieces: Any) -> Any:
        full = _gather_params_dict(pieces, groups, dst)
        # Back to the parameters' own structure: what tx.init(params) makes in one process.
        return None if full is None else tree.unflatten(treedef, [full[n] for n in names])

    inner = tree.map(lambda x: whole(x) if is_pd(x) else x, opt_state.inner, is_leaf=is_pd)
    if dst is not None and rank() != dst:
        return None
    return state.replace(tx=cfg.inner, opt_state=inner)


def shard_state(state: TrainState, tx: GradientTransformation) -> TrainState:
    """The inverse of :func:`gather_state`: put a single-process state under the data-parallel ``tx``.

    Args:
        state: a state whose ``tx`` is the plain optimizer (e.g. restored from a checkpoint).
        tx: the :func:`data_parallel` wrapper of that optimizer; with sharding, this rank
            keeps its slice of the optimizer state.

    Example:
        >>> tx = distributed.data_parallel(optim.sgd(0.1, momentum=0.9), shard_optimizer_state=True)
        >>> plain = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1, momentum=0.9))
        >>> type(distributed.shard_state(plain, tx).opt_state).__name__
        'DataParallelState'
    """
    check_live(state)
    cfg = _config_of(tx, "tx")
    if cfg.fully_sharded:
        raise ValueError("shard_state: for a fully sharded (ZeRO-3) run use distributed.fully_shard(state) on a plain state")
    inner = state.opt_state
    if isinstance(inner, DataParallelState):
        raise ValueError("shard_state: state is already data-parallel; pass the result of gather_state")
    if cfg.sharded:
        _, groups = tx.update.craftfn_layout(state.params)
        treedef = tree.structure(state.params)

        def is_param_shaped(x: Any) -> bool:
            return not isinstance(x, torch.Tensor) and tree.structure(x) == treedef

        def pieces(x: Any) -> dict[str, torch.Tensor]:
            return _slice_params_dict(dict(zip(tree.paths(x), tree.leaves(x))), groups)

        inner = tree.map(lambda x: pieces(x) if is_param_shaped(x) else x, inner, is_leaf=is_param_shaped)
    return state.replace(tx=tx, opt_state=DataParallelState(inner, _norm_init(state.params)))


def save_checkpoint(manager: Any, step: int, state: Any, *args: Any, **kwargs: Any) -> Any:
    """Save a data-parallel state through a checkpoint manager: ranks agree, the main rank writes.

    Every rank calls it. A data-parallel state is first brought to its single-process
    form (:func:`gather_state`), so the checkpoint restores with any number of ranks,
    or in a plain single-process run; any other state is taken as replicated and
    saved as it is. The ranks meet before the write and learn its outcome after it:
    an error in the write is raised on every rank.

    Args:
        manager: anything with ``save(step, state, ...)``, e.g.
            ``craftfn.training.CheckpointManager``; only the main rank's is used (others may pass None).
        step: the step number to save under.
        state: the state to save.
        args, kwargs: passed on to ``manager.save`` (metrics, extra, ...).

    Returns:
        What ``manager.save`` returned (on every rank).

    Example:
        >>> distributed.save_checkpoint(manager, int(state.step), state)  # doctest: +SKIP
    """
    if is_fully_sharded(state):
        raise ValueError(_ZERO3_CHECKPOINTS)
    plain = gather_state(state, dst=0) if _config_or_none(getattr(state, "tx", None)) is not None else state
    barrier("barrier before writing a checkpoint")
    return _on_main("checkpoint save", lambda: manager.save(step, plain, *args, **kwargs))


def _plain_template(template: Any) -> Any:
    cfg = _config_or_none(getattr(template, "tx", None))
    if cfg is None:
        return template
    if not cfg.sharded:
        return template.replace(tx=cfg.inner, opt_state=template.opt_state.inner)
    # The whole optimizer state is allocated once here, only to give the restore its shapes.
    return template.replace(tx=cfg.inner, opt_state=cfg.inner.init(template.params))


def restore_checkpoint(manager: Any, template: Any, *args: Any, donate: bool = False, **kwargs: Any) -> Any:
    """Restore a checkpoint written by :func:`save_checkpoint` (by any number of ranks) into ``template``.

    The main rank reads it (so only it needs the files) and broadcasts the state; with
    a sharded optimizer every rank then keeps its slice. Every rank calls it; an error
    on the main rank (e.g. ``FileNotFoundError``: nothing to restore) is raised on every rank.

    Args:
        manager: anything with ``restore(template, ...) -> state`` (main rank only; others may pass None).
        template: a state of the run (e.g. the freshly created one), data-parallel or not.
        args, kwargs: passed on to ``manager.restore`` (step, fallback, ...).
        donate: the template is used up (as a donated step's input): the main rank's manager
            reads into its memory when its ``restore`` takes ``donate=`` (``CheckpointManager``
            does), and every rank's template is marked donated once the restore succeeds.

    Returns:
        The restored state, under ``template.tx``.

    Example:
        >>> state = distributed.restore_checkpoint(manager, state, step="latest")  # doctest: +SKIP
    """
    if isinstance(template, TrainState):
        check_live(template, "template")
    if not isinstance(donate, bool):
        raise TypeError(f"restore_checkpoint: donate must be a bool, got {donate!r}")
    if is_fully_sharded(template):
        raise ValueError(_ZERO3_CHECKPOINTS)
    plain = _plain_template(template)
    box: dict[str, Any] = {}

    def read() -> None:
        forward = {"donate": True} if donate and takes_donate(manager.restore) else {}
        box["state"] = manager.restore(plain, *args, **kwargs, **forward)

    try:
        _on_main("checkpoint restore", read)
        # Tensors travel by one broadcast per (device, dtype), not through pickle.
        restored = broadcast_tree(box["state"] if is_main() else plain, 0)
    except BaseException:
        if isinstance(template, TrainState) and _used_up(plain):
            _mark_donated(template)  # the main rank's restore wrote into memory the template shares
        raise
    if isinstance(template, TrainState) and (donate or _used_up(plain)):
        # Used up on every rank alike (the main rank's memory holds the checkpoint now), so code
        # after a restore behaves the same everywhere.
        _mark_donated(template)
    if plain is template:
        return restored
    return shard_state(restored.replace(tx=plain.tx), template.tx)


def _used_up(state: Any) -> bool:
    try:
        check_live(state, "state")
    except DonatedStateError:
        return True
    return False


class CheckpointCoordinator:
    """A checkpoint manager for data-parallel runs: every rank calls it, the main rank's manager does the I/O.

    It has the interface the :class:`~craftfn.training.Trainer` uses (``save``,
    ``restore``, ``latest_step``, ``metadata``, ``wait``, ``close``), so a Trainer on every
    rank drives it as it would a ``CheckpointManager``. Saves go through
    :func:`save_checkpoint`, restores through :func:`restore_checkpoint`; answers
    (latest step, metadata) and errors come from the main rank, so all ranks take the
    same decisions. Build the real manager on the main rank only: two managers on one
    directory would race (each cleans the other's temporary files).

    Args:
        manager: the main rank's manager (e.g. ``CheckpointManager(dir)``); ``None`` elsewhere.

    Example:
        >>> from craftfn.training import CheckpointManager
        >>> ckpt = distributed.CheckpointCoordinator(CheckpointManager(d) if distributed.is_main() else None)  # doctest: +SKIP
    """

    def __init__(self, manager: Any) -> None:
        if is_main() and manager is None:
            raise ValueError("CheckpointCoordinator: the main rank needs a manager (e.g. CheckpointManager(directory))")
        self.manager = manager if is_main() else None

    def save(self, step: int, state: Any, metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> Any:
        """Save (collective); see :func:`save_checkpoint`."""
        return save_checkpoint(self.manager, step, state, metrics=metrics, extra=extra)

    def restore(self, template: Any, step: Any = "latest", fallback: bool = False, donate: bool = False) -> Any:
        """Restore (collective); see :func:`restore_checkpoint`. With ``donate=True`` the template is
        used up on every rank, and the main rank's manager reads into its memory if its ``restore``
        takes ``donate=`` (``CheckpointManager.restore(donate=True)``)."""
        if not isinstance(donate, bool):
            raise TypeError(f"restore: donate must be a bool, got {donate!r}")
        return restore_checkpoint(self.manager, template, step=step, fallback=fallback, donate=donate)

    def latest_step(self) -> Optional[int]:
        """The main rank's newest step (collective)."""
        return _on_main("latest checkpoint step", lambda: self.manager.latest_step())

    def all_steps(self) -> list[int]:
        """The main rank's steps (collective)."""
        return _on_main("list of checkpoint steps", lambda: self.manager.all_steps())

    def metadata(self, step: Any = "latest") -> dict[str, Any]:
        """The main rank's metadata of a step (collective)."""
        return _on_main("checkpoint metadata", lambda: self.manager.metadata(step))

    def wait(self) -> None:
        """Wait until the main rank's pending write is on disk (collective)."""
        _on_main("checkpoint write", lambda: self.manager.wait() if hasattr(self.manager, "wait") else None)

    def close(self) -> None:
        """Finish writes and close the main rank's manager (collective, except while an error unwinds)."""
        if sys.exc_info()[0] is not None:
            # Called from a `finally` during an error (maybe a dead rank): the other ranks may never
            # arrive, so close locally only.
            self._close_local()
            return
        _on_main("checkpoint close", self._close_local)

    def _close_local(self) -> None:
        if self.manager is not None and hasattr(self.manager, "close"):
            self.manager.close()

    def __enter__(self) -> CheckpointCoordinator:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self._close_local()
            return
        self.close()
