"""Sharded checkpoints: every rank writes its own shards (safetensors), any number of ranks restores them.

A :class:`ShardedCheckpointManager` keeps one directory per step, like
:class:`craftfn.training.CheckpointManager`, written with torch's distributed checkpoint
(``torch.distributed.checkpoint``) and its safetensors storage::

    run/checkpoints/
      step_00001000/
        shard-00001-model-00001-of-00001.safetensors   rank 0's shards (plain safetensors files; the
        shard-00002-model-00001-of-00001.safetensors   header says where each piece lies in its tensor)
        ...
        meta.json      step, metrics, extra, the world size, every tensor's shape and dtype, the
                       sha256 and size of every file, versions

Saving gathers nothing: each rank writes the shards it holds (a replicated tensor, such as the
step or the key, is written once), streamed from the tensors' memory into its file, so a save adds
no copy of the shards to a rank's memory (``benchmarks/ckpt_rss_bench.py``). The tensors are keyed by the tree paths of the state's
*single-process form* (``params.fc.weight``, ``opt_state.0.mu.fc.weight``, ``step``, ``rng``),
so a checkpoint written by N ranks restores on M ranks (the distributed checkpoint reads each
rank's rows from whichever files hold them), or in one process into a plain state.

Guarantees, as :class:`~craftfn.training.CheckpointManager`'s: a step is written into a hidden
temporary directory and renamed into place by rank 0 only once every rank's files are complete
and fsynced (a crash leaves the last good step); every file's sha256 is checked before loading
(the ranks split the files between them); retention keeps the last ``keep_last`` and the
``keep_best`` best steps. Every rank calls every method (collectives), with the same arguments.

Example (one process here; under torchrun every rank runs the same lines):
    >>> import tempfile
    >>> state = distributed.fully_shard(TrainState.create(model=torch.nn.Linear(3, 2), tx=optim.adamw(1e-3)))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with distributed.ShardedCheckpointManager(d) as ckpt:
    ...         ckpt.save(0, state, metrics={"loss": 1.0})
    ...         back = ckpt.restore(state)
    ...         plain = ckpt.restore(TrainState.create(model=torch.nn.Linear(3, 2), tx=optim.adamw(1e-3)))
    >>> tree.equal(back.params, state.params) and tree.equal(plain.opt_state, state.opt_state.inner)
    True
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist

from craftfn import tree
from craftfn.distributed.collectives import _on_main, broadcast_object
from craftfn.distributed.dp_state import DataParallelState, _config_or_none
from craftfn.distributed.process import _guard, barrier, is_main, rank, world_size
from craftfn.state import TrainState, _mark_donated, check_live
from craftfn.training.checkpointing import (
    _TMP_PREFIX,
    META_FILE,
    CheckpointFallbackWarning,
    CheckpointMismatchError,
    CorruptCheckpointError,
    _check_json,
    _check_retention,
    _check_step,
    _clean_leftovers,
    _craftfn_version,
    _delete_steps_not_kept,
    _fsync_dir,
    _meta_text,
    _metric_ok,
    _move_aside,
    _read_meta,
    _resolve_step,
    _scan_steps,
    _step_dirname,
    _to_json_number,
    _unshared,
    select_steps_to_keep,
)

__all__ = ["ShardedCheckpointManager", "SHARDED_FORMAT"]

logger = logging.getLogger(__name__)

SHARDED_FORMAT = "craftfn.sharded_checkpoint"
SHARDED_FORMAT_VERSION = 1
_CHUNK = 16 << 20


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """Without a process group the distributed checkpoint warns that it assumes one process: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _single_process_form(state: Any) -> Any:
    """The state as one process would hold it (``tx`` and ``opt_state`` unwrapped); its DTensors stay shards."""
    cfg = _config_or_none(getattr(state, "tx", None))
    if cfg is None:
        return state
    if cfg.sharded:
        raise ValueError(
            "ShardedCheckpointManager: a ZeRO-1 state (data_parallel(shard_optimizer_state=True)) keeps flat "
            "slices, not DTensors; save it with distributed.CheckpointCoordinator, or shard it fully "
            "(distributed.fully_shard)"
        )
    return state.replace(tx=cfg.inner, opt_state=state.opt_state.inner)


def _to_state_dict(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Tensor leaves by tree path (bool ones as uint8: the safetensors storage has no bool), scalar leaves, bool paths."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    bools: list[str] = []
    for name, leaf in tree.flatten_with_path(state)[0]:
        if name in tensors or name in scalars:
            raise ValueError(f"two leaves of the state have the same path {name!r}; rename one")
        if isinstance(leaf, torch.Tensor):
            if leaf.dtype == torch.bool:
                bools.append(name)
                leaf = leaf.to(torch.uint8)
            tensors[name] = leaf.detach()
        elif isinstance(leaf, (bool, int, float, str)):
            scalars[name] = leaf
        else:
            raise TypeError(
                f"state leaf {name!r} is a {type(leaf).__name__}; checkpoints hold tensors and JSON scalars "
                "(int, float, bool, str). Mark it static (struct.field(static=True)) or convert it."
            )
    return tensors, scalars, bools


def _describe(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


class ShardedCheckpointManager:
    """Save and restore (fully sharded) TrainStates, each rank writing and reading its own shards.

    Args:
        directory: where the step directories live (created by rank 0). Every rank must see the
            same directory (a shared file system across nodes).
        keep_last: how many of the newest steps to keep (``None``: all).
        keep_best: how many of the best steps (by ``best_metric``) to keep besides.
        best_metric: the metric (in ``save(..., metrics=)``) that ranks steps.
        mode: ``"min"`` or ``"max"``.

    It has the interface the :class:`~craftfn.training.Trainer` uses, so a Trainer on every rank
    drives it like a ``CheckpointManager``. Saves are synchronous.

    Example:
        >>> ckpt = distributed.ShardedCheckpointManager("run/checkpoints", keep_last=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        *,
        keep_last: Optional[int] = 3,
        keep_best: int = 0,
        best_metric: Optional[str] = None,
        mode: str = "min",
    ) -> None:
        _check_retention(keep_last, keep_best, best_metric, mode)
        self.directory = Path(directory)
        self.keep_last, self.keep_best, self.best_metric, self.mode = keep_last, keep_best, best_metric, mode
        self._closed = False
        _on_main("checkpoint directory setup", self._setup)
        barrier("barrier after creating the checkpoint directory")

    # ---- public API -----------------------------------------------------------------------

    def save(self, step: int, state: Any, metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
        """Save ``state`` as step ``step``: every rank writes its shards; rank 0 commits the step (collective).

        Raises:
            OSError: a write failed on some rank (raised on every rank); earlier steps are untouched.
        """
        self._check_open()
        step = _check_step(step)
        if isinstance(state, TrainState):
            check_live(state)
        metrics_json = _check_json("metrics", {str(k): _to_json_number(str(k), v) for k, v in dict(metrics or {}).items()})
        extra_json = _check_json("extra", dict(extra or {}))
        tensors, scalars, bools = _to_state_dict(_single_process_form(state))
        tmp = self.directory / broadcast_object(f"{_TMP_PREFIX}{_step_dirname(step)}-{uuid.uuid4().hex}" if is_main() else None)
        _on_main("checkpoint temporary directory", lambda: os.mkdir(tmp))
        error: Optional[str] = None
        files: dict[str, Any] = {}
        try:
            # The storage names each rank's file after its position (shard-<rank+1>-...).
            for name, (sha, size) in sorted(self._dcp_save(tensors, tmp).items()):
                files[name] = {"sha256": sha, "bytes": size, "rank": rank()}
        except Exception as e:  # reported on every rank below
            error = f"rank {rank()}: {type(e).__name__}: {e}"
        everyone = self._all_gather((error, files))
        errors = [e for e, _ in everyone if e]
        body = {
            "format": SHARDED_FORMAT,
            "format_version": SHARDED_FORMAT_VERSION,
            "step": step,
            "world_size": world_size(),
            "metrics": metrics_json,
            "extra": extra_json,
            "scalars": scalars,
            "bool_tensors": bools,
            "tensors": _describe({k: v for k, v in tensors.items()}),
            "files": {k: v for _, f in everyone for k, v in f.items()},
            "craftfn_version": _craftfn_version(),
            "torch_version": torch.__version__,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "unix_time": time.time(),
        }

        def commit() -> None:
            if errors:
                shutil.rmtree(tmp, ignore_errors=True)
                raise OSError(f"ShardedCheckpointManager: could not save step {step} to {self.directory}: {'; '.join(errors)}; earlier checkpoints are untouched")
            self._commit(step, tmp, body)

        _on_main("checkpoint save", commit)

    def restore(self, template: Any, step: Union[int, str] = "latest", fallback: bool = False, donate: bool = False) -> Any:
        """Load a step into the structure and sharding of ``template`` (collective; works in one process too).

        Args:
            template: a state with the wanted structure: fully sharded (any number of ranks) or plain
                (one process). Its values are not touched unless ``donate``.
            step: ``"latest"``, ``"best"`` or a step number.
            fallback: with ``"latest"``: skip (and move aside) corrupt steps, warning loudly.
            donate: load into the template's own tensors (each rank's shards) instead of new ones, as
                ``CheckpointManager.restore(donate=True)`` does: the restore then needs no second copy
                of the state in memory. The template is used up (a ``TrainState`` is marked donated)
                once loading begins; a missing, corrupt or mismatched checkpoint leaves it intact
                (those are found before anything is written). Bool leaves and leaves sharing memory
                with another leaf get new tensors.

        Raises:
            FileNotFoundError, CorruptCheckpointError, CheckpointMismatchError: as ``CheckpointManager.restore``.
        """
        self._check_open()
        if not isinstance(donate, bool):
            raise TypeError(f"restore: donate must be a bool, got {donate!r}")
        if isinstance(template, TrainState):
            check_live(template, "template")
        if fallback and step != "latest":
            raise ValueError(f"restore: fallback=True goes back from step='latest' only, got step={step!r}")
        candidates = _on_main("checkpoint lookup", lambda: list(reversed(self._scan())) if fallback else [self._resolve(step)])
        if not candidates:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        skipped: list[str] = []
        for candidate in candidates:
            meta = _on_main("checkpoint metadata", lambda c=candidate: self._meta(c))
            problem = self._verify(candidate, meta)
            if problem is None:
                if skipped:
                    msg = f"ShardedCheckpointManager.restore: fell back to step {candidate} after skipping {len(skipped)} corrupt checkpoint(s)"
                    logger.error(msg)
                    warnings.warn(msg, CheckpointFallbackWarning, stacklevel=2)
                return self._load(template, candidate, meta, donate)
            if not fallback:
                raise CorruptCheckpointError(problem)
            moved = _on_main("checkpoint quarantine", lambda c=candidate: self._quarantine(c))
            msg = f"ShardedCheckpointManager.restore: checkpoint step {candidate} is corrupt and was skipped (moved to {moved}): {problem}"
            logger.error(msg)
            warnings.warn(msg, CheckpointFallbackWarning, stacklevel=2)
            skipped.append(problem)
        raise CorruptCheckpointError(f"no valid checkpoint in {self.directory}; every one is corrupt: " + "; ".join(skipped))

    def metadata(self, step: Union[int, str] = "latest") -> dict[str, Any]:
        """The verified meta.json of a step (collective)."""
        return _on_main("checkpoint metadata", lambda: self._meta(self._resolve(step)))

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first (collective)."""
        return _on_main("list of checkpoint steps", self._scan)

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or ``None`` (collective)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The step with the best ``best_metric`` (collective)."""
        if self.best_metric is None:
            raise ValueError("best_step needs ShardedCheckpointManager(..., best_metric=<metric name>)")
        return _on_main("best checkpoint step", self._best)

    def wait(self) -> None:
        """Saves are synchronous: nothing to wait for."""

    def close(self) -> None:
        """Mark the manager closed (saves are synchronous, so nothing is pending)."""
        self._closed = True

    def __enter__(self) -> ShardedCheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedCheckpointManager({str(self.directory)!r}, keep_last={self.keep_last}, keep_best={self.keep_best})"

    # ---- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"ShardedCheckpointManager for {self.directory} is closed")

    def _setup(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"ShardedCheckpointManager: cannot create the checkpoint directory ({e.strerror})", str(self.directory)) from e
        _clean_leftovers(self.directory, type(self).__name__)

    def _all_gather(self, value: Any) -> list[Any]:
        if world_size() == 1:
            return [value]
        out: list[Any] = [None] * world_size()
        _guard("all_gather of checkpoint file records", dist.all_gather_object, out, value)
        return out

    def _dcp_save(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[str, int]]:
        """Write this rank's file(s) into ``path``; their names with (sha256, bytes)."""
        import torch.distributed.checkpoint as dcp

        from craftfn.distributed.streaming_writer import StreamingSafetensorsWriter

        # Streamed from the tensors: torch's writer builds each file in memory (two more copies of the shards).
        writer = StreamingSafetensorsWriter(str(path))
        with _one_process_is_intended():
            dcp.save(tensors, storage_writer=writer, no_dist=world_size() == 1)
        return writer.written

    def _commit(self, step: int, tmp: Path, body: dict[str, Any]) -> None:
        final = self.directory / _step_dirname(step)
        with open(tmp / META_FILE, "x", encoding="utf-8") as f:
            f.write(_meta_text(body))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = self.directory / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._apply_retention()

    def _scan(self) -> list[int]:
        return _scan_steps(self.directory)

    def _resolve(self, step: Union[int, str]) -> int:
        return _resolve_step(step, self._scan(), self._best, self.directory, self.best_metric)

    def _meta(self, step: int) -> dict[str, Any]:
        path = self.directory / _step_dirname(step)
        meta = _read_meta(path / META_FILE)
        if meta.get("format") != SHARDED_FORMAT or meta.get("step") != step:
            raise CorruptCheckpointError(f"corrupt checkpoint file {path / META_FILE}: it does not describe sharded step {step}")
        if meta.get("format_version", 0) > SHARDED_FORMAT_VERSION:
            raise ValueError(f"checkpoint {path} has format version {meta['format_version']}; this craftfn reads up to {SHARDED_FORMAT_VERSION}")
        return meta

    def _metric(self, step: int) -> Optional[float]:
        try:
            value = self._meta(step).get("metrics", {}).get(self.best_metric)
        except CorruptCheckpointError:
            return None
        return value if _metric_ok(value) else None

    def _best(self) -> Optional[int]:
        steps = self._scan()
        ranked = select_steps_to_keep(steps, {s: self._metric(s) for s in steps}, keep_last=0, keep_best=1, mode=self.mode)
        return next(iter(ranked), None)

    def _apply_retention(self) -> None:
        steps = self._scan()
        metrics = {s: self._metric(s) for s in steps} if self.keep_best else {}
        _delete_steps_not_kept(self.directory, steps, metrics, self.keep_last, self.keep_best, self.mode, "ShardedCheckpointManager")

    def _quarantine(self, step: int) -> str:
        return _move_aside(self.directory, step).name

    def _verify(self, step: int, meta: Mapping[str, Any]) -> Optional[str]:
        """Check every file's size and sha256, the files split across the ranks; the first problem, on every rank."""
        path = self.directory / _step_dirname(step)
        mine: Optional[str] = None
        for i, (name, info) in enumerate(sorted(meta.get("files", {}).items())):
            if i % world_size() != rank() or mine is not None:
                continue
            try:
                sha, size = _sha256_file(path / name)
            except OSError as e:
                mine = f"corrupt checkpoint file {path / name}: it could not be read ({e})"
                continue
            if size != info.get("bytes"):
                mine = f"corrupt checkpoint file {path / name}: it has {size} bytes, meta.json records {info.get('bytes')} (truncated or altered)"
            elif sha != info.get("sha256"):
                mine = f"corrupt checkpoint file {path / name}: sha256 {sha} differs from {info.get('sha256')} recorded in meta.json (the file was altered)"
        return next((p for p in self._all_gather(mine) if p), None)

    def _load(self, template: Any, step: int, meta: Mapping[str, Any], donate: bool = False) -> Any:
        import torch.distributed.checkpoint as dcp

        plain = _single_process_form(template)
        wanted, _, _ = _to_state_dict(plain)
        saved = meta.get("tensors", {})
        where = f"restore(step={step}) from {self.directory / _step_dirname(step)}"
        missing = sorted(set(wanted) - set(saved))
        unexpected = sorted(set(saved) - set(wanted) - set(meta.get("scalars", {})))
        differs = [
            f"{k}: checkpoint {saved[k]['dtype']} {tuple(saved[k]['shape'])}, template {str(v.dtype).replace('torch.', '')} {tuple(v.shape)}"
            for k, v in wanted.items()
            if k in saved and (list(v.shape) != saved[k]["shape"] or str(v.dtype).replace("torch.", "") != saved[k]["dtype"])
        ]
        if missing or unexpected or differs:
            parts = [f"{label}: {', '.join(items[:20])}" for label, items in
                     (("missing from the checkpoint", missing), ("in the checkpoint but not the template", unexpected), ("shape/dtype differ", differs)) if items]
            raise CheckpointMismatchError(f"{where}: the checkpoint does not match the template; " + "; ".join(parts))
        # Tensors laid out like the template's (DTensors stay sharded as the template is), loaded in place:
        # new ones, or with donate the template's own (bool leaves were converted, so theirs are new anyway).
        # With donate: the template's own tensors, but bool leaves (converted: new anyway) and tied ones.
        bools = set(meta.get("bool_tensors", []))
        targets = {k: v for k, v in _unshared(wanted).items() if k not in bools} if donate else {}
        fresh = {k: targets[k] if k in targets else torch.empty_like(v) for k, v in wanted.items()}
        reader = dcp.HuggingFaceStorageReader(str(self.directory / _step_dirname(step)))
        try:
            with _one_process_is_intended():
                dcp.load(fresh, storage_reader=reader, no_dist=world_size() == 1)
        except BaseException:
            if donate and isinstance(template, TrainState):
                _mark_donated(template)  # partly overwritten
            raise
        bools = set(meta.get("bool_tensors", []))
        scalars = meta.get("scalars", {})
        pairs, treedef = tree.flatten_with_path(plain)
        leaves = []
        for name, leaf in pairs:
            if name in fresh:
                value = fresh[name].to(torch.bool) if name in bools else fresh[name]
                leaves.append(value)
            else:
                leaves.append(scalars.get(name, leaf))
        restored = tree.unflatten(treedef, leaves)
        cfg = _config_or_none(getattr(template, "tx", None))
        if cfg is not None:
            # Back under the template's data-parallel tx; the last update's norm is not part of a checkpoint.
            restored = restored.replace(tx=template.tx, opt_state=DataParallelState(restored.opt_state, torch.zeros_like(template.opt_state.grad_norm)))
        if donate and isinstance(template, TrainState):
            _mark_donated(template)
        return restored
