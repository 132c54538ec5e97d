"""Text corpora: the embedded default (the running Python's standard library) and any text file.

The default corpus needs no download and ships nothing: it reads the source of a fixed list of
well-known standard-library modules (:data:`STDLIB_MODULES`) from
``sysconfig.get_paths()["stdlib"]``, in sorted order, up to a byte budget. The exact text depends
on the Python version (it is that version's source), which is fine for a demo job: code is a
corpus with plenty of structure (indentation, keywords, docstrings) that a small model learns
quickly. Modules missing from an unusual installation are skipped.

Example:
    >>> from craftfn.data import stdlib_corpus
    >>> text = stdlib_corpus(max_bytes=10_000)
    >>> len(text.encode("utf-8")) <= 10_000
    True
"""

from __future__ import annotations

import glob
import os
import sysconfig
from typing import Optional, Sequence, Union

__all__ = ["STDLIB_MODULES", "stdlib_corpus", "stdlib_files", "text_file", "corpus_files"]

# Pure-Python modules present in every CPython 3.10+ installation (as ``name.py`` or a package's
# ``name/__init__.py``), kept sorted so the corpus is read in a fixed order.
STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "heapq",
    "inspect",
    "json",
    "logging",
    "os",
    "pathlib",
    "pprint",
    "queue",
    "random",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "typing",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)


def stdlib_files() -> list[str]:
    """Paths of the :data:`STDLIB_MODULES` source files that exist here, in corpus order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for name in STDLIB_MODULES:
        for candidate in (os.path.join(root, name + ".py"), os.path.join(root, name, "__init__.py")):
            if os.path.isfile(candidate):
                files.append(candidate)
                break
    return files


def stdlib_corpus(max_bytes: int = 1_000_000) -> str:
    """The default corpus: standard-library source, at most ``max_bytes`` UTF-8 bytes.

    Files are concatenated in :data:`STDLIB_MODULES` order, each preceded by a ``# file: name``
    line; the last file is cut at the budget (on a character boundary).

    Args:
        max_bytes: the byte budget (positive).

    Returns:
        The text.

    Example:
        >>> stdlib_corpus(max_bytes=40).startswith("# file: abc.py")
        True
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    root = sysconfig.get_paths()["stdlib"]
    parts: list[bytes] = []
    used = 0
    for path in stdlib_files():
        header = f"# file: {os.path.relpath(path, root)}\n".encode()
        with open(path, "rb") as f:
            body = f.read()
        chunk = header + body + b"\n"
        if used + len(chunk) >= max_bytes:
            parts.append(chunk[: max_bytes - used])
            break
        parts.append(chunk)
        used += len(chunk)
    if not parts:
        raise ValueError(f"no standard-library sources found under {root!r}")
    # 'ignore' drops a character cut in half at the budget boundary.
    return b"".join(parts).decode("utf-8", errors="ignore")


def text_file(path: Union[str, os.PathLike], encoding: str = "utf-8") -> str:
    """The contents of a text file, checked.

    Args:
        path: the file.
        encoding: its encoding.

    Returns:
        The text.

    Raises:
        ValueError: naming ``path`` when it is missing, not a file, empty or not decodable.

    Example:
        >>> text = text_file("input.txt")  # doctest: +SKIP
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"data file {p!r} does not exist")
    if not os.path.isfile(p):
        raise ValueError(f"data file {p!r} is not a regular file")
    try:
        with open(p, encoding=encoding) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {p!r} is not valid {encoding} text ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError(f"data file {p!r} is empty")
    return text


_GLOB_CHARS = set("*?[")


def _files_of(spec: str, exclude: Optional[str]) -> list[str]:
    path = os.path.abspath(os.path.expanduser(spec))
    if _GLOB_CHARS & set(spec):
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        if not found:
            raise ValueError(f"data pattern {spec!r} matches no files")
        return found
    if not os.path.exists(path):
        raise ValueError(f"data file {spec!r} does not exist")
    if os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and (exclude is None or os.path.join(root, d) != exclude)]
            found += [os.path.join(root, n) for n in names if not n.startswith(".")]
        if not found:
            raise ValueError(f"data directory {spec!r} holds no files")
        return found
    if not os.path.isfile(path):
        raise ValueError(f"data file {spec!r} is not a regular file")
    return [path]


def corpus_files(source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], exclude: Optional[str] = None) -> list[str]:
    """The files of a corpus, as absolute paths in a fixed order (each once).

    Args:
        source: a text file, a directory (its files, recursively; hidden ones skipped), a glob
            pattern (``data/*.txt``, ``data/**/*.jsonl``), or a list of these.
        exclude: a folder to leave out (e.g. a token cache inside the data directory).

    Returns:
        The paths, sorted within each entry of ``source``, entries in the order given.

    Raises:
        ValueError: naming the entry that does not exist, matches nothing or holds no files.

    Example:
        >>> corpus_files("data/*.txt")  # doctest: +SKIP
        ['/home/me/data/a.txt', '/home/me/data/b.txt']
    """
    specs = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not specs:
        raise ValueError("the corpus source is an empty list: give a file, a directory or a glob pattern")
    exclude = os.path.abspath(exclude) if exclude else None
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)):
            raise TypeError(f"a corpus source must be a path or a list of paths, got {type(spec).__name__}")
        for path in sorted(_files_of(os.fspath(spec), exclude)):
            real = os.path.realpath(path)
            if real not in seen and not (exclude and real.startswith(exclude + os.sep)):
                seen.add(real)
                out.append(path)
    if not out:
        raise ValueError(f"the corpus source {source!r} holds no files")
    return out
