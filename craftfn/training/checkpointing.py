"""Checkpoints that never lose a run: safetensors files, atomic and asynchronous saves, retention, checksums.

A :class:`CheckpointManager` owns one directory and keeps one sub-directory per step::

    run/checkpoints/
      step_00001000/
        state.safetensors   every tensor leaf of the TrainState, keyed by its tree path
                            (params.fc.weight, buffers.bn.running_mean, opt_state.0.trace.fc.weight, step, rng)
        meta.json           format version, step, metrics, extra (gin config, tokenizer, callback state...),
                            checksum (xxh3_128) and size of state.safetensors, craftfn and torch versions, time

Guarantees:

- **Atomic**: a step is written into a hidden temporary sibling (``.tmp-step_...-<uuid>``), every file and
  the directory are fsynced, and only then is it renamed into place. A crash at any moment leaves either
  the complete new step or no trace of it; leftovers are never taken for a step and are removed when a
  manager is next constructed on the directory.
- **Asynchronous** (``async_save=True``): ``save`` copies the state to host memory before it returns (so the
  caller may donate or mutate the state at once) and writes on a background thread. The next call waits
  for that write, and an error in it is raised by the next call (and logged at once); it is never dropped.
- **Verified**: ``restore`` checks the checksum of ``state.safetensors`` and the self-checksum of
  ``meta.json``; a truncated or altered file raises :class:`CorruptCheckpointError` naming the file.
  The data checksum is xxh3_128 (the ``xxhash`` package: ~20 GB/s, so verifying costs a fraction of
  reading; sha256 ran at ~1 GB/s and made a verified restore 5x ``torch.load``). It guards against
  accidental damage (truncation, bit flips, partial copies), not against a deliberate forger.
  Checkpoints written before (format version 1, ``sha256``) are still read and verified with sha256.
  The file is read once, into the restored tensors, and hashed from that memory (no second copy).
  ``restore(..., donate=True)`` reads into the template's own memory instead of new tensors (the
  template is used up, as a donated step's input): new memory's page faults were most of a restore.
  ``restore(..., step="latest", fallback=True)`` goes back to the newest valid step, warns loudly and moves
  the corrupt step aside (``corrupt-step_...``) so that it is never taken as the newest again.
- **Retention**: the last ``keep_last`` steps and the ``keep_best`` best steps (by ``best_metric``) are kept;
  the newest step and the best step are never deleted, and nothing is deleted before the new step is complete.

``state.safetensors`` is a plain safetensors file: ``safetensors.torch.load_file`` reads it.

Example:
    >>> import tempfile, torch
    >>> from craftfn import TrainState, optim
    >>> from craftfn.training.checkpointing import CheckpointManager
    >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1, momentum=0.9))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with CheckpointManager(d, keep_last=2) as ckpt:
    ...         ckpt.save(0, state, metrics={"loss": 1.0})
    ...         restored = ckpt.restore(state)
    ...         ckpt.all_steps()
    [0]
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import inspect
import json
import logging
import math
import operator
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import xxhash
from torch import nn

from craftfn import tree
from craftfn._files import fsync_path
from craftfn.state import TrainState, _mark_donated, check_live

__all__ = [
    "CheckpointManager",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "CheckpointFallbackWarning",
    "export_params",
    "load_exported",
    "select_steps_to_keep",
    "FORMAT_VERSION",
    "STATE_FILE",
    "META_FILE",
]

logger = logging.getLogger(__name__)

# 2: state.safetensors is checked with xxh3_128 ("files": {STATE_FILE: {"xxh3_128": ..., "bytes": ...}});
# 1: with sha256. Both are read.
FORMAT_VERSION = 2
# Data checksums restore verifies, by the key meta.json records them under.
_FILE_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_FILE_HASH = "xxh3_128"  # what save writes
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_OLD_DIR = re.compile(r"^\.tmp-old-(step_\d{8,})-[0-9a-f]{32}$")
# Every temporary name the manager makes (new, replaced and deleted steps): only these are
# ever removed as leftovers, so a user's own file in the folder (".tmp-notes") is left alone.
_LEFTOVER = re.compile(r"^\.tmp-(?:old-|del-)?step_\d{8,}-[0-9a-f]{32}$")
_CHUNK = 16 << 20  # bytes per write/read/hash call: large enough to stream, small enough to stay in cache for the hash
_MAX_HEADER = 256 << 20

StepSpec = Union[int, str]

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
]:
    if hasattr(torch, _attr):
        _DTYPE_NAMES[getattr(torch, _attr)] = _name
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated, altered or unreadable; the message names the file."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys, shapes or dtypes differ from the template's; the message lists them."""


class CheckpointFallbackWarning(RuntimeWarning):
    """``restore(..., fallback=True)`` skipped a corrupt checkpoint and loaded an older one."""


# --------------------------------------------------------------------------------------------
# Low-level file helpers
# --------------------------------------------------------------------------------------------


_fsync_dir = fsync_path  # one sync helper for every writer (craftfn._files)


def takes_donate(restore: Callable[..., Any]) -> bool:
    """Whether a checkpoint manager's ``restore`` takes ``donate=`` (craftfn's do; a user's may not).

    Example:
        >>> takes_donate(CheckpointManager.restore), takes_donate(lambda template, step="latest": template)
        (True, False)
    """
    try:
        return "donate" in inspect.signature(restore).parameters
    except (TypeError, ValueError):
        return False


def _byte_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying (writable when the tensor is)."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


class _StreamHash:
    """A file checksum (one of ``_FILE_HASHES``) computed on a helper thread, overlapping the caller's I/O.

    hashlib and xxhash release the GIL for large buffers; chunks are hashed in submission order.
    The caller must keep the hashed memory unchanged until :meth:`hexdigest` or :meth:`close`.
    """

    def __init__(self, algorithm: str, overlap: bool) -> None:
        self._hash = _FILE_HASHES[algorithm]()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="craftfn-hash") if overlap else None
        self._futures: list[concurrent.futures.Future] = []

    def update(self, data: Union[bytes, memoryview]) -> None:
        if self._pool is None:
            self._hash.update(data)
            return
        # No bound on the backlog: the chunks are views of tensors that live on anyway, and an
        # unbounded queue lets the writer reach fsync (disk time) while the hash catches up.
        self._futures.append(self._pool.submit(self._hash.update, data))

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        for f in self._futures:
            f.result()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"checkpoint leaf {name!r} has dtype {dtype}, which safetensors cannot store; "
            f"supported: {sorted(str(d) for d in _DTYPE_NAMES)}"
        ) from None


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> tuple[str, int]:
    """Write contiguous CPU tensors as a safetensors file, fsync it; return (checksum, size).

    Streams every tensor's bytes straight from its memory (no serialized copy) while the
    ``_FILE_HASH`` checksum of the file is computed alongside. The layout is the safetensors one: an 8-byte
    little-endian header size, a JSON header padded with spaces to 8 bytes, then the data,
    ordered by alignment like ``safetensors.torch.save_file``.
    """
    order = sorted(tensors, key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in order:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _dtype_name(name, t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    prefix = len(header_bytes).to_bytes(8, "little") + header_bytes
    sha = _StreamHash(_FILE_HASH, overlap=offset >= 4 * _CHUNK)
    try:
        with open(path, "xb") as f:
            sha.update(prefix)
            f.write(prefix)
            for _, t in order:
                data = _byte_view(t)
                for i in range(0, len(data), _CHUNK):
                    chunk = data[i : i + _CHUNK]
                    sha.update(chunk)
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return sha.hexdigest(), len(prefix) + offset
    finally:
        sha.close()


def _read_safetensors(
    path: Path,
    expected_digest: Optional[str],
    expected_size: Optional[int],
    algorithm: str = _FILE_HASH,
    into: Optional[Callable[[dict[str, tuple[torch.dtype, list[int]]]], Mapping[str, torch.Tensor]]] = None,
) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by :func:`_write_safetensors`, verifying its checksum.

    ``algorithm`` names the checksum ``expected_digest`` is (a key of ``_FILE_HASHES``).

    Each tensor gets its own storage (read straight into it), so later in-place updates or
    ``torch.save`` of one leaf never drag the others along. ``into``, given the validated header
    (``{name: (dtype, shape)}``), may return existing contiguous CPU tensors of those dtypes and
    shapes to read into instead (a donated restore); the bytes are still read and hashed once.
    """
    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"corrupt checkpoint file {path}: {why}")

    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise corrupt("the file is missing") from None
    if expected_size is not None and size != expected_size:
        raise corrupt(f"it has {size} bytes, meta.json records {expected_size} (truncated or altered)")
    sha = _StreamHash(algorithm, overlap=size >= 4 * _CHUNK)
    out: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise corrupt("shorter than the 8-byte safetensors header size")
            n = int.from_bytes(raw, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise corrupt(f"header size {n} does not fit the file size {size}")
            header_bytes = f.read(n)
            sha.update(raw + header_bytes)
            try:
                header = json.loads(header_bytes)
            except (UnicodeDecodeError, ValueError) as e:
                raise corrupt(f"unreadable safetensors header ({e})") from None
            entries = _check_header(header, size - 8 - n, corrupt)
            targets = into({name: (dtype, shape) for name, dtype, shape, _, _ in entries}) if into is not None else {}
            for name, dtype, shape, begin, end in entries:
                t = targets.get(name)
                if t is None:
                    t = torch.empty(shape, dtype=dtype)
                data = _byte_view(t)
                for i in range(0, end - begin, _CHUNK):
                    chunk = data[i : i + _CHUNK]
                    got = f.readinto(chunk)
                    if got != len(chunk):
                        raise corrupt(f"truncated inside tensor {name!r}")
                    sha.update(chunk)
                out[name] = t
            digest = sha.hexdigest()
    except OSError as e:
        raise corrupt(f"could not be read ({e})") from e
    finally:
        sha.close()
    if expected_digest is not None and digest != expected_digest:
        raise corrupt(f"{algorithm} checksum {digest} differs from {expected_digest} recorded in meta.json (the file was altered)")
    return out


def _check_header(header: Any, data_size: int, corrupt: Any) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """Validate a safetensors header before allocating anything: dtypes, shapes, contiguous offsets."""
    if not isinstance(header, dict):
        raise corrupt("the safetensors header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name!r}: {info!r:.200}") from None
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise corrupt(f"header entry {name!r}: shape {shape} does not match data_offsets {[begin, end]}")
        entries.append((name, dtype, shape, begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            raise corrupt(f"header entry {name!r} starts at {begin}, expected {position}")
        position = end
    if position != data_size:
        raise corrupt(f"the header describes {position} data bytes, the file holds {data_size}")
    return entries


def _canonical_json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _meta_text(body: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(_canonical_json(body)).hexdigest()
    return json.dumps({**body, "meta_sha256": digest}, indent=2, sort_keys=True) + "\n"


def _read_meta(path: Path) -> dict[str, Any]:
    """Read and verify a meta.json: its ``meta_sha256`` and its exact canonical layout.

    Together they catch any changed byte: a change of content breaks the checksum, a change
    of whitespace or key order breaks the layout.
    """
    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"corrupt checkpoint file {path}: {why}")

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise corrupt("the file is missing") from None
    except OSError as e:
        raise corrupt(f"could not be read ({e})") from e
    try:
        text = raw.decode("utf-8")
        meta = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"not valid JSON ({e}); truncated or altered") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("meta_sha256"), str):
        raise corrupt("no meta_sha256 checksum")
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    if hashlib.sha256(_canonical_json(body)).hexdigest() != meta["meta_sha256"]:
        raise corrupt("its meta_sha256 checksum does not match its content (the file was altered)")
    if _meta_text(body) != text:
        raise corrupt("its layout differs from the one written (the file was altered)")
    return meta


# --------------------------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------------------------


def _metric_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def select_steps_to_keep(
    steps: Iterable[int],
    metrics: Mapping[int, Optional[float]],
    *,
    keep_last: Optional[int],
    keep_best: int = 0,
    mode: str = "min",
) -> set[int]:
    """The steps retention keeps: the last ``keep_last`` together with the ``keep_best`` best.

    Steps without a (non-NaN) metric are never among the best. Among equal metrics the newer
    step ranks first. With ``keep_last >= 1`` the newest step is always kept, and with
    ``keep_best >= 1`` the best one is; at most ``keep_last + keep_best`` steps are kept.

    Args:
        steps: the existing steps.
        metrics: step -> value of the best metric (or None).
        keep_last: how many of the newest steps to keep (None: all).
        keep_best: how many of the best steps to keep.
        mode: "min" (lower is better) or "max".

    Returns:
        The set of steps to keep.

    Example:
        >>> sorted(select_steps_to_keep([1, 2, 3, 4], {1: 0.1, 2: 0.5, 3: 0.9, 4: 0.7}, keep_last=1, keep_best=1))
        [1, 4]
    """
    steps = sorted(set(steps))
    keep = set(steps) if keep_last is None else set(steps[max(0, len(steps) - keep_last) :] if keep_last else [])
    if keep_best:
        sign = 1.0 if mode == "min" else -1.0
        ranked = sorted((s for s in steps if _metric_ok(metrics.get(s))), key=lambda s: (sign * metrics[s], -s))
        keep.update(ranked[:keep_best])
    return keep


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


def _resolve_step(step: StepSpec, steps: list[int], best_step: Any, directory: Path, best_metric: Optional[str]) -> int:
    """The saved step that ``step`` ('latest', 'best' or an int) names among ``steps`` (sorted); ``best_step()`` finds 'best'."""
    if step == "latest":
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return steps[-1]
    if step == "best":
        best = best_step()
        if best is None:
            raise FileNotFoundError(f"no checkpoint with metric {best_metric!r} in {directory}")
        return best
    if isinstance(step, str):
        raise ValueError(f"step must be 'latest', 'best' or an int, got {step!r}")
    value = _check_step(step)
    if value not in steps:
        raise FileNotFoundError(f"no checkpoint for step {value} in {directory}; saved steps: {steps}")
    return value


def _clean_leftovers(directory: Path, owner: str) -> None:
    """Remove what a crash left in a checkpoint directory: temporary step directories, half-deleted
    ones, replaced ones (a replaced step whose successor never arrived goes back). Only names the
    managers make (``_LEFTOVER``) are touched: a user's own ``.tmp-notes`` stays."""
    for name in sorted(os.listdir(directory)):
        if not _LEFTOVER.match(name):
            continue
        path = directory / name
        m = _OLD_DIR.match(name)
        if m and not (directory / m.group(1)).exists() and path.is_dir():
            # Crashed between moving a replaced step aside and renaming its successor in:
            # the old directory is a complete step, so it goes back (and is never deleted here).
            try:
                os.replace(path, directory / m.group(1))
                logger.warning("%s: recovered %s from an interrupted replacement", owner, m.group(1))
            except OSError as e:
                logger.error("%s: could not move %s back to %s: %s", owner, path, m.group(1), e)
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            logger.warning("%s: could not remove leftover %s: %s", owner, path, e)


def _scan_steps(directory: Path) -> list[int]:
    """The saved steps in ``directory``, sorted: directories spelled as the managers spell them
    (``step_00000100``; a ``step_100`` or ``step_0000000100`` is someone else's and never touched)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        m = _STEP_DIR.match(name)
        if m and name == _step_dirname(int(m.group(1))) and (directory / name).is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _delete_steps_not_kept(
    directory: Path, steps: list[int], metrics: Mapping[int, Optional[float]], keep_last: Optional[int], keep_best: int,
    mode: str, owner: str,
) -> list[int]:
    """Delete the steps retention does not keep (:func:`select_steps_to_keep`); returns them.

    Each directory is renamed first, so a half-deleted one never looks like a step; a failure is
    logged and warned about (the step stays), never raised: saving already succeeded."""
    keep = select_steps_to_keep(steps, metrics, keep_last=keep_last, keep_best=keep_best, mode=mode)
    dropped = [step for step in steps if step not in keep]
    for step in dropped:
        path = directory / _step_dirname(step)
        doomed = directory / f"{_TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex}"
        try:
            os.replace(path, doomed)
            shutil.rmtree(doomed)
        except OSError as e:
            msg = f"{owner}: could not delete old checkpoint {path}: {e}"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return dropped


def _move_aside(directory: Path, step: int) -> Path:
    """Rename a corrupt step to ``corrupt-step_...-<id>`` (kept for inspection, never scanned again)
    and sync the directory; raises ``OSError`` if it cannot."""
    path = directory / _step_dirname(step)
    target = directory / f"corrupt-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, target)
    _fsync_dir(directory)
    return target


def _check_retention(keep_last: Any, keep_best: Any, best_metric: Any, mode: Any) -> None:
    """The retention arguments every checkpoint manager takes (``CheckpointManager``, the sharded one)."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 (the newest step is always kept) or None (keep all), got {keep_last!r}")
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if best_metric is not None and not isinstance(best_metric, str):
        raise TypeError(f"best_metric must be a metric name (str) or None, got {best_metric!r}")
    if keep_best and best_metric is None:
        raise ValueError(f"keep_best={keep_best} needs best_metric=<name of a metric passed to save(metrics=...)>")


def _check_step(step: Any) -> int:
    if isinstance(step, torch.Tensor) and step.dim() == 0 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool):
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be a non-negative int, got {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be a non-negative int, got {value}")
    return value


def _step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _to_json_number(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics[{name!r}] must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, float, str, bool)):  # numpy scalars
        value = value.item()
    return value


def _check_json(argname: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{argname} must be JSON-serializable (dicts, lists, str, numbers, bool, None): {e}") from None


class CheckpointManager:
    """Save and restore TrainStates as safetensors checkpoints, one directory per step.

    Args:
        directory: where the step directories live (created if missing). One manager
            writes to a directory at a time.
        keep_last: how many of the newest steps to keep (``None``: keep all). At least 1.
        keep_best: how many of the best steps (by ``best_metric``) to keep besides.
        best_metric: the name of the metric (in ``save(..., metrics=)``) that ranks steps;
            needed for ``keep_best`` and ``restore(step="best")``.
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. accuracy).
        async_save: write on a background thread (``save`` returns after the copy to host memory).
            The manager keeps one host copy of the state for this (reused between saves).

    Example:
        >>> import tempfile, torch
        >>> from craftfn import TrainState, optim
        >>> state = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     ckpt = CheckpointManager(d, keep_last=1, keep_best=1, best_metric="loss")
        ...     for step, loss in [(10, 0.5), (20, 0.7), (30, 0.9)]:
        ...         ckpt.save(step, state, metrics={"loss": loss})
        ...     ckpt.all_steps(), ckpt.best_step(), ckpt.metadata("best")["metrics"]
        ...     ckpt.close()
        ([10, 30], 10, {'loss': 0.5})
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        *,
        keep_last: Optional[int] = 3,
        keep_best: int = 0,
        best_metric: Optional[str] = None,
        mode: str = "min",
        async_save: bool = True,
    ) -> None:
        _check_retention(keep_last, keep_best, best_metric, mode)
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.mode = mode
        self.async_save = bool(async_save)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"CheckpointManager: cannot create the checkpoint directory ({e.strerror})", str(self.directory)) from e
        self._lock = threading.RLock()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="craftfn-ckpt") if self.async_save else None
        self._pending: Optional[concurrent.futures.Future] = None
        self._staging: dict[str, torch.Tensor] = {}
        self._metric_cache: dict[int, Optional[float]] = {}
        self._closed = False
        _clean_leftovers(self.directory, type(self).__name__)

    # ---- public API ---------------------------------------------------------------------

    def save(self, step: int, state: Any, metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
        """Save ``state`` as step ``step`` (asynchronously by default).

        The state is copied to host memory before this returns, so the caller may mutate or
        donate it right away. Waits for the previous asynchronous write first and raises its
        error, if it failed.

        Args:
            step: the step number (an int >= 0); an existing step of that number is replaced.
            state: a TrainState (or any pytree of tensors and JSON scalars).
            metrics: numbers (or 1-element tensors) recorded in meta.json; ``best_metric`` ranks steps.
            extra: a JSON-serializable dict stored in meta.json, e.g.
                ``{"callbacks": {...}, "gin_config": "...", "tokenizer": {...}}``.

        Raises:
            OSError: the write failed (disk full, permission denied); the message names the path
                and the cause, and earlier checkpoints are untouched.

        Example:
            >>> ckpt.save(100, state, metrics={"loss": 0.25}, extra={"data": {"epoch": 1}})  # doctest: +SKIP
        """
        with self._lock:
            self._check_open()
            step = _check_step(step)
            self._wait_pending()
            if isinstance(state, TrainState):
                check_live(state)
            metrics_json = _check_json("metrics", {str(k): _to_json_number(str(k), v) for k, v in dict(metrics or {}).items()})
            extra_json = _check_json("extra", dict(extra or {}))
            tensors, scalars = self._snapshot(state)
            body = {
                "format": "craftfn.checkpoint",
                "format_version": FORMAT_VERSION,
                "step": step,
                "metrics": metrics_json,
                "extra": extra_json,
                "scalars": scalars,
                "craftfn_version": _craftfn_version(),
                "torch_version": torch.__version__,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "unix_time": time.time(),
            }
            latest = self._latest_on_disk()
            if latest is not None and latest > step:
                msg = (
                    f"CheckpointManager.save(step={step}) in {self.directory}: newer steps exist (latest {latest}), "
                    f"probably from an earlier run; retention keeps the newest steps, so step {step} may be deleted at once"
                )
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if self._executor is not None:
                self._pending = self._executor.submit(self._write_logged, step, tensors, body)
            else:
                self._write(step, tensors, body)

    def restore(self, template: Any, step: StepSpec = "latest", fallback: bool = False, donate: bool = False) -> Any:
        """Load a checkpoint into the structure of ``template``.

        Args:
            template: a state with the wanted structure (e.g. a freshly created TrainState);
                static fields (``apply_fn``, ``tx``) come from it, and each tensor is placed on
                the device of the template's leaf (a ``meta``-device leaf loads onto the CPU).
            step: ``"latest"``, ``"best"`` or a step number.
            fallback: with ``step="latest"``: if the newest checkpoint is corrupt, warn loudly, move
                it aside (``corrupt-step_...``) and try the next older one.
            donate: read the checkpoint straight into the template's CPU tensors instead of new
                ones (as a donated step reuses its input's buffers). New memory costs the kernel's
                page faults, a large share of a restore: reading into the template's memory, already
                mapped, made a 0.4 GB restore 3x faster in a new process. The template is then
                used up: a ``TrainState`` template is marked donated (``DonatedStateError`` on use)
                once the restore succeeds, or once a failed one has overwritten any of its memory
                (a damaged file); a key/shape/dtype mismatch or a missing checkpoint leaves it
                intact. Leaves that share memory with another leaf, are not contiguous or not on
                the CPU get new tensors. Without ``donate`` the restored state shares no memory
                with the template.

        Returns:
            The restored state.

        Raises:
            FileNotFoundError: no such checkpoint.
            CorruptCheckpointError: a file failed its checksum (the message names it).
            CheckpointMismatchError: keys, shapes or dtypes differ from the template (listed).

        Example:
            >>> state = ckpt.restore(TrainState.create(model=model, tx=tx), step="latest", fallback=True)  # doctest: +SKIP
        """
        if not isinstance(donate, bool):
            raise TypeError(f"restore: donate must be a bool, got {donate!r}")
        with self._lock:
            self._check_open()
            self._wait_pending()
            if isinstance(template, TrainState):
                check_live(template, "template")
            if fallback and step != "latest":
                raise ValueError(f"restore: fallback=True goes back from step='latest' only, got step={step!r}")
            into = _ReadInto(template) if donate else None
            try:
                state = self._restore(template, step, fallback, into)
            except BaseException:
                if into is not None and into.written and isinstance(template, TrainState):
                    _mark_donated(template)
                raise
            if into is not None and isinstance(template, TrainState):
                _mark_donated(template)
            return state

    def _restore(self, template: Any, step: StepSpec, fallback: bool, into: Optional[_ReadInto]) -> Any:
        """:meth:`restore` once its arguments are checked (under the lock)."""
        if not fallback:
            return self._restore_step(template, self._resolve(step), into)
        skipped = []
        for candidate in reversed(self._scan()):
            try:
                state = self._restore_step(template, candidate, into)
            except CorruptCheckpointError as e:
                moved = self._quarantine(candidate)
                msg = (
                    f"CheckpointManager.restore: checkpoint step {candidate} in {self.directory} is corrupt and was "
                    f"skipped{f' (moved to {moved.name})' if moved else ''}: {e}"
                )
                logger.error(msg)
                warnings.warn(msg, CheckpointFallbackWarning, stacklevel=3)
                skipped.append(str(e))
                continue
            if skipped:
                msg = f"CheckpointManager.restore: fell back to step {candidate} after skipping {len(skipped)} corrupt checkpoint(s)"
                logger.error(msg)
                warnings.warn(msg, CheckpointFallbackWarning, stacklevel=3)
            return state
        if skipped:
            raise CorruptCheckpointError(f"no valid checkpoint in {self.directory}; every one is corrupt: " + "; ".join(skipped))
        raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")

    def metadata(self, step: StepSpec = "latest") -> dict[str, Any]:
        """The verified contents of a step's meta.json (``step``, ``metrics``, ``extra``, ``files``, versions, time).

        Example:
            >>> ckpt.metadata(100)["metrics"]  # doctest: +SKIP
            {'loss': 0.25}
        """
        with self._lock:
            self._wait_pending()
            return _read_meta(self._step_path(self._resolve(step)) / META_FILE)

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first (after any pending write completes).

        Example:
            >>> ckpt.all_steps()  # doctest: +SKIP
            [100, 200]
        """
        with self._lock:
            self._wait_pending()
            return self._scan()

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The step with the best ``best_metric`` (ties: the newer), or ``None``.

        Raises:
            ValueError: the manager has no ``best_metric``.
        """
        if self.best_metric is None:
            raise ValueError("best_step needs CheckpointManager(..., best_metric=<metric name>)")
        with self._lock:
            steps = self.all_steps()
            metrics = {s: self._metric(s) for s in steps}
            ranked = select_steps_to_keep(steps, metrics, keep_last=0, keep_best=1, mode=self.mode)
            return next(iter(ranked), None)

    def wait(self) -> None:
        """Block until the pending asynchronous write is done; raise its error if it failed."""
        with self._lock:
            self._wait_pending()

    def close(self) -> None:
        """Wait for the pending write (raising its error) and release the background thread."""
        with self._lock:
            if self._closed:
                return
            try:
                self._wait_pending()
            finally:
                self._closed = True
                if self._executor is not None:
                    self._executor.shutdown()
                self._staging.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep_last={self.keep_last}, keep_best={self.keep_best}, "
            f"best_metric={self.best_metric!r}, mode={self.mode!r}, async_save={self.async_save})"
        )

    # ---- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CheckpointManager for {self.directory} is closed")

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _step_path(self, step: int) -> Path:
        return self.directory / _step_dirname(step)

    def _scan(self) -> list[int]:
        return _scan_steps(self.directory)

    def _latest_on_disk(self) -> Optional[int]:
        steps = self._scan()
        return steps[-1] if steps else None

    def _resolve(self, step: StepSpec) -> int:
        return _resolve_step(step, self._scan(), self.best_step, self.directory, self.best_metric)

    def _metric(self, step: int) -> Optional[float]:
        if step not in self._metric_cache:
            try:
                meta = _read_meta(self._step_path(step) / META_FILE)
                value = meta.get("metrics", {}).get(self.best_metric)
            except CorruptCheckpointError as e:
                logger.warning("CheckpointManager: cannot read the metrics of step %d: %s", step, e)
                value = None
            self._metric_cache[step] = value if _metric_ok(value) else None
        return self._metric_cache[step]

    def _snapshot(self, state: Any) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
        """Split the leaves into contiguous CPU tensors and JSON scalars; copy them when async."""
        pairs, _ = tree.flatten_with_path(state)
        tensors: list[tuple[str, torch.Tensor]] = []
        scalars: dict[str, Any] = {}
        seen: set[str] = set()
        for name, leaf in pairs:
            if name in seen:
                raise ValueError(f"two leaves of the state have the same path {name!r}; rename one")
            seen.add(name)
            if isinstance(leaf, torch.Tensor):
                tensors.append((name, leaf.detach()))
            elif isinstance(leaf, (bool, int, float, str)):
                scalars[name] = leaf
            else:
                raise TypeError(
                    f"state leaf {name!r} is a {type(leaf).__name__}; checkpoints hold tensors and JSON scalars "
                    "(int, float, bool, str). Mark it static (struct.field(static=True)) or convert it."
                )
        for name, t in tensors:
            _dtype_name(name, t.dtype)
        if self._executor is None:
            # Synchronous: the write finishes before save returns, so the state's own memory is used.
            return [(n, t if (t.device.type == "cpu" and t.is_contiguous()) else t.contiguous().cpu()) for n, t in tensors], scalars
        out = []
        devices = set()
        for name, t in tensors:
            buf = self._staging.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                # Reused between saves: copying into warm memory is several times faster than into fresh pages.
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
                self._staging[name] = buf
            buf.copy_(t, non_blocking=t.device.type == "cuda")
            if t.device.type != "cpu":
                devices.add(t.device)
            out.append((name, buf))
        for name in set(self._staging) - seen:
            del self._staging[name]
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return out, scalars

    def _write_logged(self, step: int, tensors: list[tuple[str, torch.Tensor]], body: dict[str, Any]) -> None:
        try:
            self._write(step, tensors, body)
        except BaseException as e:
            # Also logged right away: should the process end before the next call, it is not silent.
            logger.error("CheckpointManager: background save of step %d failed: %s", step, e)
            raise

    def _write(self, step: int, tensors: list[tuple[str, torch.Tensor]], body: dict[str, Any]) -> None:
        final = self._step_path(step)
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"
        old: Optional[Path] = None
        current: Path = tmp
        try:
            os.mkdir(tmp)
            current = tmp / STATE_FILE
            sha, size = _write_safetensors(
                current, tensors, {"format": "pt", "craftfn_format_version": str(FORMAT_VERSION), "step": str(step)}
            )
            body = {**body, "files": {STATE_FILE: {_FILE_HASH: sha, "bytes": size}}}
            current = tmp / META_FILE
            with open(current, "x", encoding="utf-8") as f:
                f.write(_meta_text(body))
                f.flush()
                os.fsync(f.fileno())
            current = tmp
            _fsync_dir(tmp)
            if final.exists():
                # Replacing a step: move the old one aside first; a crash in between is repaired
                # at construction (the old directory is renamed back when the new one is missing).
                old = self.directory / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex}"
                current = final
                os.replace(final, old)
            current = final
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not final.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, final)
            if not isinstance(e, OSError):
                raise
            raise OSError(
                e.errno,
                f"CheckpointManager: could not save step {step} to {final} ({e.strerror or e}); "
                "earlier checkpoints are untouched",
                str(getattr(e, "filename", None) or current),
            ) from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._metric_cache.pop(step, None)
        if self.best_metric is not None:
            value = body["metrics"].get(self.best_metric)
            self._metric_cache[step] = value if _metric_ok(value) else None
        self._apply_retention()

    def _apply_retention(self) -> None:
        steps = self._scan()
        metrics = {s: self._metric(s) for s in steps} if self.keep_best else {}
        for step in _delete_steps_not_kept(self.directory, steps, metrics, self.keep_last, self.keep_best, self.mode, "CheckpointManager"):
            self._metric_cache.pop(step, None)

    def _quarantine(self, step: int) -> Optional[Path]:
        try:
            target = _move_aside(self.directory, step)
        except OSError as e:
            logger.error("CheckpointManager: could not move corrupt checkpoint %s aside: %s", self._step_path(step), e)
            return None
        self._metric_cache.pop(step, None)
        return target

    def _restore_step(self, template: Any, step: int, into: Optional[_ReadInto] = None) -> Any:
        path = self._step_path(step)
        meta = _read_meta(path / META_FILE)
        info = meta.get("files", {}).get(STATE_FILE, {})
        algorithm = next((a for a in _FILE_HASHES if isinstance(info, dict) and a in info), None)
        if meta.get("step") != step or algorithm is None:
            raise CorruptCheckpointError(f"corrupt checkpoint file {path / META_FILE}: it does not describe step {step}")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint {path} has format version {meta['format_version']}; this craftfn reads up to {FORMAT_VERSION}"
            )
        scalars = meta.get("scalars", {})
        reader = None if into is None else (lambda header: into(header, scalars))
        loaded = _read_safetensors(path / STATE_FILE, info[algorithm], info.get("bytes"), algorithm, into=reader)
        return _fill_template(template, loaded, scalars, f"restore(step={step}) from {path}")


def _fill_template(template: Any, tensors: dict[str, torch.Tensor], scalars: Mapping[str, Any], where: str) -> Any:
    pairs, treedef = tree.flatten_with_path(template)
    _check_template(pairs, tensors, scalars, where)
    leaves = []
    for name, leaf in pairs:
        if name not in tensors:
            leaves.append(scalars[name])
            continue
        t = tensors[name]
        if leaf.device.type not in ("cpu", "meta"):
            t = t.to(leaf.device)
        if leaf.requires_grad:
            t.requires_grad_(True)
        leaves.append(t)
    return tree.unflatten(treedef, leaves)


def _check_template(pairs: list[tuple[str, Any]], tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing every key, shape and dtype that differs between
    the checkpoint (``tensors``, ``scalars``) and the template's ``(path, leaf)`` pairs."""
    names = [n for n, _ in pairs]
    saved = set(tensors) | set(scalars)
    missing = [n for n in names if n not in saved]
    unexpected = sorted(saved - set(names))
    differs = []
    for name, leaf in pairs:
        if name in tensors:
            t = tensors[name]
            if not isinstance(leaf, torch.Tensor):
                differs.append(f"{name}: checkpoint has a tensor, template has {type(leaf).__name__}")
            elif (why := tree.leaf_mismatch(t, leaf, dtype="equal", device=False, labels=("checkpoint", "template"))) is not None:
                differs.append(f"{name}: {why}")
        elif name in scalars and isinstance(leaf, torch.Tensor):
            differs.append(f"{name}: checkpoint has a {type(scalars[name]).__name__}, template has a tensor")
    if missing or unexpected or differs:
        def show(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")

        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {show(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not the template: {show(unexpected)}")
            fields = sorted({n.split(".")[0] for n in unexpected} - {n.split(".")[0] for n in names})
            if fields:
                # E.g. a step with loss scaling turns a TrainState into precision.LossScaledTrainState.
                parts.append(
                    f"the saved state had field(s) {fields} that the template lacks: build the template with the "
                    "same state class (e.g. precision.with_loss_scale(state, DynamicLossScale(...)) for loss_scale)"
                )
        if differs:
            parts.append(f"shape/dtype differ: {show(differs)}")
        raise CheckpointMismatchError(f"{where}: the checkpoint does not match the template; " + "; ".join(parts))


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The non-empty tensors whose memory no other one of ``tensors`` shares (a DTensor: its local
    shard's): a donated restore reads into these only, as two tied leaves must not be filled from
    two saved tensors."""

    def memory(t: torch.Tensor) -> int:
        return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()

    owners = collections.Counter(memory(t) for t in tensors.values())
    return {n: t for n, t in tensors.items() if t.numel() > 0 and owners[memory(t)] == 1}


class _ReadInto:
    """A donated restore's destinations: the template's tensors the file's bytes are read into.

    Only contiguous CPU tensors (``torch.Tensor``/``nn.Parameter``) whose memory no other leaf of the
    template shares are used (two tied leaves must not be filled from two saved tensors); the other
    leaves get new tensors as in a plain restore. Nothing is written unless the whole header matches
    the template (keys, shapes, dtypes): otherwise the plain path reads the file, so a damaged file
    is still reported as corrupt and a mismatch as a mismatch, with the template untouched.
    ``written`` tells whether any of the template's memory was overwritten.
    """

    def __init__(self, template: Any) -> None:
        self.pairs = tree.flatten_with_path(template)[0]
        self.written = False
        # Plain strided CPU tensors only (not DTensors, sparse or other subclasses, whose memory is not one buffer).
        tensors = [
            (n, t)
            for n, t in self.pairs
            if type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.layout == torch.strided
        ]
        self.targets = {n: t for n, t in _unshared(dict(tensors)).items() if t.is_contiguous() and not (t.is_conj() or t.is_neg())}

    def __call__(self, header: dict[str, tuple[torch.dtype, list[int]]], scalars: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
        stand_ins = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (dtype, shape) in header.items()}
        try:
            _check_template(self.pairs, stand_ins, scalars, "")
        except CheckpointMismatchError:
            return {}
        targets = {n: t for n, t in self.targets.items() if n in header}
        self.written = self.written or bool(targets)
        return targets


def _craftfn_version() -> str:
    import craftfn

    return getattr(craftfn, "__version__", "unknown")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_params(
    state: TrainState, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None
) -> list[str]:
    """Write the model weights of ``state`` as a safetensors file keyed like ``model.state_dict()``.

    Every key of the template module's ``state_dict()`` is written (parameters and persistent
    buffers), tied weights once, under the name ``safetensors.torch.save_model`` keeps (the first
    in sorted order; the header's metadata maps each dropped name to it, as ``save_model``
    does). So ``safetensors.torch.load_model(model, path)`` loads the file strictly, and
    :func:`load_exported` loads it (or a file with tied weights under each name). When
    ``apply_fn`` is a function rather than a module, the keys are the params' and buffers'
    tree paths. The file is written atomically.

    Args:
        state: a TrainState (its ``apply_fn`` module gives the key names).
        path: the file to write.
        metadata: extra ``str -> str`` entries for the safetensors header (e.g. the model config).

    Returns:
        The keys written.

    Example:
        >>> export_params(state, "model.safetensors", {"note": "final"})  # doctest: +SKIP
        ['bias', 'weight']
    """
    check_live(state)
    module = state.apply_fn
    params = dict(tree.flatten_with_path(state.params)[0])
    buffers = dict(tree.flatten_with_path(state.buffers)[0])
    out: dict[str, torch.Tensor] = {}
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    if isinstance(module, nn.Module):
        by_identity = {id(p): n for n, p in module.named_parameters()}
        by_identity.update({id(b): n for n, b in module.named_buffers()})
        unknown = []
        for key, ref in module.state_dict(keep_vars=True).items():
            if not isinstance(ref, torch.Tensor):
                raise ValueError(f"export_params: state_dict entry {key!r} is not a tensor ({type(ref).__name__}); cannot export it")
            name = key if (key in params or key in buffers) else by_identity.get(id(ref))
            value = params.get(name, buffers.get(name)) if name is not None else None
            if value is None:
                unknown.append(key)
                continue
            if value.shape != ref.shape:
                raise ValueError(f"export_params: {key!r} has shape {tuple(value.shape)} in the state, {tuple(ref.shape)} in the module")
            out[key] = value
        if unknown:
            raise ValueError(f"export_params: no value in state.params or state.buffers for state_dict keys {unknown[:20]}")
        for kept, dropped in _tied_names(module).items():
            for name in dropped:
                out.pop(name, None)
                header.setdefault(name, kept)
    else:
        for name, value in {**params, **buffers}.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"export_params: leaf {name!r} is not a tensor")
            out[name] = value
    path = Path(path)
    tensors = [(k, v.detach().contiguous().cpu()) for k, v in out.items()]
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        _write_safetensors(tmp, tensors, header)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent if str(path.parent) else ".")
    return list(out)


def _tied_names(module: nn.Module) -> dict[str, list[str]]:
    """``{kept name: [other names of the same tensor]}`` over ``module.state_dict()``; the kept name
    is the first in sorted order, safetensors' rule (``save_model``/``load_model``)."""
    groups: dict[int, list[str]] = {}
    for key, ref in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(ref), []).append(key)
    return {sorted(names)[0]: sorted(names)[1:] for names in groups.values() if len(names) > 1}


def load_exported(module: nn.Module, path: Union[str, os.PathLike]) -> dict[str, str]:
    """Load a weights file (:func:`export_params`, ``safetensors.torch.save_model``, or an older
    export with tied weights under each name) into ``module``, strictly, in place.

    Every ``state_dict()`` key must be in the file, directly or through a tied name; a key the
    module does not have, or a shape that differs, is an error.

    Args:
        module: the model to fill (e.g. ``GPT(config)``).
        path: a safetensors file.

    Returns:
        The file's header metadata (``{}`` when it has none).

    Raises:
        ValueError: naming the missing and unexpected keys, or the unreadable file.

    Example:
        >>> load_exported(GPT(config), "runs/char_gpt/model.safetensors")  # doctest: +SKIP
        {'format': 'pt', ...}
    """
    import safetensors
    import safetensors.torch

    try:
        tensors = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read the weights in {str(path)!r}: {e}") from None
    expected = module.state_dict()
    for kept, others in _tied_names(module).items():
        present = next((n for n in (kept, *others) if n in tensors), None)
        for name in (kept, *others):
            if present is not None and name not in tensors:
                tensors[name] = tensors[present]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"the weights in {str(path)!r} do not fit the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
        )
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # shapes
        raise ValueError(f"the weights in {str(path)!r} do not fit the model: {' '.join(str(e).split())}") from None
    return metadata

