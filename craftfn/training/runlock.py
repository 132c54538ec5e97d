"""One trainer per run directory: :class:`RunDirLock`.

Two trainers writing one run directory would overwrite each other's checkpoints, metrics and
weights. A trainer holds ``RUN_DIR/.craftfn-lock`` while it runs: an exclusive ``flock`` on the
file (the kernel drops it when the process ends, however it ends, so the lock of a killed
trainer is never stale) with the holder's pid, host and start time written inside for the
message a second trainer gets. Where the file system has no ``flock`` (some network mounts),
the pid decides: a lock whose process is gone (on this host) is taken over.

The lock file stays in the directory (emptied on release): deleting it would let a waiting
trainer lock a file that no longer has a name.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with RunDirLock(d):
    ...         try:
    ...             RunDirLock(d).acquire()
    ...         except RunDirLockedError as e:
    ...             "in use by another craftfn trainer" in str(e)
    True
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
from pathlib import Path
from typing import Any, Optional, Union

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunDirLock", "RunDirLockedError", "LOCK_FILE"]

LOCK_FILE = ".craftfn-lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


class RunDirLockedError(RuntimeError):
    """Another live trainer holds the run directory; the message names its pid."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunDirLock:
    """An exclusive lock on a run directory for the lifetime of one trainer.

    Args:
        run_dir: the run directory (created if missing).

    Attributes:
        path: the lock file.
        took_over: the holder record of a dead trainer whose lock this one took over, else ``None``.

    Raises:
        RunDirLockedError: (from :meth:`acquire`) another live process holds the lock.

    Example:
        >>> with RunDirLock("runs/demo"):  # doctest: +SKIP
        ...     trainer.fit(state)
    """

    def __init__(self, run_dir: Union[str, os.PathLike]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.took_over: Optional[dict[str, Any]] = None
        self._fd: Optional[int] = None

    def _holder(self, fd: int) -> dict[str, Any]:
        try:
            raw = os.pread(fd, 4096, 0)
            value = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _locked_error(self, holder: dict[str, Any]) -> RunDirLockedError:
        pid = holder.get("pid", "unknown")
        where = f" on {holder['host']}" if holder.get("host") else ""
        since = f" since {holder['started']}" if holder.get("started") else ""
        return RunDirLockedError(
            f"run directory {str(self.run_dir)!r} is in use by another craftfn trainer (pid {pid}{where}{since}); "
            f"two trainers would overwrite each other's checkpoints. Wait for it to finish, stop it (kill {pid}), "
            "or train in another --run_dir"
        )

    def acquire(self) -> RunDirLock:
        """Take the lock (without waiting); returns ``self``."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = self._holder(fd)
            use_pid = fcntl is None
            if not use_pid:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._locked_error(self._holder(fd)) from None
                except OSError as e:
                    if e.errno not in _NO_FLOCK:
                        raise
                    use_pid = True
            pid = holder.get("pid")
            same_host = holder.get("host") in (None, socket.gethostname())
            if use_pid and isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid):
                raise self._locked_error(holder)
            if isinstance(pid, int) and pid != os.getpid():
                self.took_over = holder  # its process is gone: the kernel (or the pid check) says so
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            data = (json.dumps(record) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and let it go (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
