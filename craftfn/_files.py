"""Atomic file writes (internal): one writer for every file craftfn puts next to the user's.

A file appears whole or not at all: the bytes go to a temp file in the same folder, are fsynced, the
temp file is renamed over the target, and the folder is fsynced so that the rename itself survives a
power cut. On any error the temp file is removed and the previous file (if any) is untouched.
Kept at the bottom of the package (standard library only) so data, checkpoints and the CLI share it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_path(path: PathLike) -> None:
    """Flush a file's bytes, or a folder's entries (new names, renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, produce: Callable[[Callable[[bytes], object]], None]) -> None:
    """Write the bytes ``produce(write)`` passes to ``write`` as ``path``, atomically.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "hello.txt")
        >>> atomic_write(target, lambda write: write(b"hello\\n"))
        >>> open(target, "rb").read()
        b'hello\\n'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    # Created like open(path, "w") creates a file: mode 0o666 less the umask (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            produce(f.write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_path(folder)


def make_dirs(path: PathLike) -> None:
    """``os.makedirs(path, exist_ok=True)``, with each folder it creates made durable (its parent fsynced)."""
    path = os.path.abspath(os.fspath(path))
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        fsync_path(os.path.dirname(folder))
