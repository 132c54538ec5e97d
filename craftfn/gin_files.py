"""gin files at the edge: where they are found, how includes resolve, and how command-line bindings win.

Only the CLI imports this module (nothing below the CLI imports gin).

* **Shipped configs.** The repository's top-level ``gin/`` folder ships inside the wheel as the
  package data ``craftfn/configs/``. :func:`shipped_config_dir` finds it in an installed craftfn
  and in a source checkout alike; :func:`list_configs` lists it (``craftfn configs``).
* **Finding a file.** ``--gin_file NAME`` is ``NAME`` as given (relative to the working
  directory, or absolute), else a shipped config of that name (``char_gpt.gin``,
  ``optim/adamw.gin``; a leading ``gin/`` is accepted too). :func:`find_config` raises
  :class:`GinFileNotFoundError` naming every place it looked.
* **Includes.** ``include 'x.gin'`` resolves relative to the *including* file first, then
  against the shipped configs, then the working directory (gin's own rule). craftfn reads
  every file through a gin file reader (gin's public ``gin.config.register_file_reader``) that rewrites
  each include to the file it resolved, so nesting works at any depth.
* **Overrides win.** A command-line binding ``C.p = v`` also replaces every scoped binding
  ``scope/C.p`` the files hold (:func:`parse_config`): what was typed is what runs, also on a
  replayed ``config.gin`` that holds scoped bindings.

Example:
    >>> find_config("char_gpt.gin").name
    'char_gpt.gin'
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import gin
from gin import config_parser

__all__ = [
    "GinFileNotFoundError",
    "shipped_config_dir",
    "list_configs",
    "find_config",
    "resolve_include",
    "is_gin_value",
    "parse_config",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
# Files craftfn has resolved are handed to gin under this prefix, so that craftfn's reader
# (not gin's plain `open`) reads them and resolves their includes in turn.
_RESOLVED = "craftfn:"


class GinFileNotFoundError(FileNotFoundError):
    """A gin file (``--gin_file`` or an ``include``) that is in none of the places searched."""


def shipped_config_dir() -> Path:
    """The folder of the configs craftfn ships: ``craftfn/configs`` when installed from a wheel,
    the checkout's top-level ``gin/`` when run from source (or installed editable).

    Example:
        >>> (shipped_config_dir() / "char_gpt.gin").is_file()
        True
    """
    installed = _PACKAGE_DIR / "configs"
    checkout = _PACKAGE_DIR.parent
    # Only a source checkout's gin/ (next to pyproject.toml): an installed craftfn's parent folder
    # is site-packages, whose gin/ is the gin-config library.
    if installed.is_dir() or not (checkout / "pyproject.toml").is_file():
        return installed
    return checkout / "gin"


def list_configs() -> list[tuple[str, str]]:
    """The shipped configs as ``(name, summary)``: the name to pass to ``--gin_file`` and the first
    sentence of the file's leading comment.

    Example:
        >>> "char_gpt.gin" in dict(list_configs())
        True
    """
    root = shipped_config_dir()
    out = []
    for path in sorted(root.rglob("*.gin"), key=lambda p: (len(p.relative_to(root).parts), str(p))):
        comment = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        text = " ".join(c for c in comment if c)
        end = re.search(r"\.(\s|$)", text)
        sentence = text[: end.start() + 1] if end else text
        if len(sentence) > 100:
            sentence = sentence[:97].rsplit(" ", 1)[0] + " ..."
        out.append((path.relative_to(root).as_posix(), sentence))
    return out


def _shipped_candidates(name: str) -> list[Path]:
    root = shipped_config_dir()
    names = [name]
    if name.startswith("gin/"):  # the checkout's spelling, e.g. gin/char_gpt.gin
        names.append(name[len("gin/") :])
    return [root / n for n in names]


def _first_file(candidates: Sequence[Path], what: str) -> Path:
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise GinFileNotFoundError(f"{what} not found (looked for {looked}); `craftfn configs` lists the shipped configs")


def find_config(name: str) -> Path:
    """The gin file ``--gin_file name`` means: ``name`` itself, else a shipped config.

    Raises:
        GinFileNotFoundError: naming every path tried.

    Example:
        >>> find_config("models/gpt_tiny.gin").parent.name
        'models'
    """
    path = Path(os.path.expanduser(name))
    candidates = [path] if path.is_absolute() else [path, *_shipped_candidates(name)]
    return _first_file(candidates, f"gin file {name!r}")


def resolve_include(name: str, including_file: Path) -> Path:
    """The file ``include 'name'`` in ``including_file`` means: relative to the including file's
    folder, else a shipped config, else relative to the working directory.

    Example:
        >>> resolve_include("models/gpt_small.gin", find_config("char_gpt.gin")).name
        'gpt_small.gin'
    """
    path = Path(os.path.expanduser(name))
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path(including_file).parent / path, *_shipped_candidates(name), path]
    return _first_file(candidates, f"gin file {name!r} included from {str(including_file)!r}")


class _Placeholder(config_parser.ParserDelegate):
    """Parses statements for their keys only: references and macros become None."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> None:
        return None

    def macro(self, macro_name: str) -> None:
        return None


def _statements(text: str) -> list[Any]:
    return list(config_parser.ConfigParser(text, _Placeholder()))


def is_gin_value(text: str) -> bool:
    """Whether gin parses ``text`` as a value (a literal, ``@reference``, ``%MACRO`` or a container of them).

    Example:
        >>> is_gin_value("['bias', @f(), %M]"), is_gin_value("[bias, ln_]")
        (True, False)
    """
    try:
        config_parser.ConfigParser(text, _Placeholder()).parse_value()
    except SyntaxError:
        return False
    return True


_INCLUDE = re.compile(r"""^(\s*include\s+)(['"])(.*?)\2""")

# Every (scope, selector, parameter) a file bound inside a scope, collected while reading.
_SCOPED: list[tuple[str, str, str]] = []


def _with_resolved_includes(text: str, path: Path) -> str:
    lines = text.splitlines(keepends=True)
    try:
        statements = _statements(text)
    except SyntaxError:
        return text  # gin parses the file next and reports the error with its location
    for st in statements:
        if isinstance(st, config_parser.BindingStatement) and st.scope and st.arg_name:
            _SCOPED.append((st.scope, st.selector, st.arg_name))
        if isinstance(st, config_parser.IncludeStatement):
            i = st.location.line_num - 1
            target = resolve_include(st.filename, path)
            lines[i] = _INCLUDE.sub(lambda m, t=target: f"{m.group(1)}{m.group(2)}{_RESOLVED}{t}{m.group(2)}", lines[i], count=1)
    return "".join(lines)


def _is_resolved(path: str) -> bool:
    return path.startswith(_RESOLVED)


def _read_resolved(path: str) -> io.StringIO:
    real = Path(path[len(_RESOLVED) :])
    f = io.StringIO(_with_resolved_includes(real.read_text(encoding="utf-8"), real))
    f.name = str(real)  # gin's error locations name the real file
    return f


gin.config.register_file_reader(_read_resolved, _is_resolved)


class _DropPathNotFound(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_gin_search() -> Iterator[None]:
    """Drop gin's "Path not found" log lines while parsing: gin's package-resource reader logs one
    (as an error) for every file it does not own before craftfn's reader reads it."""
    root = logging.getLogger()
    quiet = _DropPathNotFound()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


class _Binding(NamedTuple):
    text: str
    scope: str
    selector: str
    arg_name: str


def _split_bindings(bindings: Sequence[str]) -> list[_Binding]:
    """Each command-line binding string, split into its statements (a string may hold several)."""
    out = []
    for text in bindings:
        statements = _statements(text)
        lines = text.splitlines(keepends=True)
        starts = [st.location.line_num - 1 for st in statements] + [len(lines)]
        for st, begin, end in zip(statements, starts, starts[1:]):
            if isinstance(st, config_parser.BindingStatement):
                out.append(_Binding("".join(lines[begin:end]).strip(), st.scope, st.selector, st.arg_name))
            else:
                out.append(_Binding("".join(lines[begin:end]).strip(), "", "", ""))
    return out


def _same_configurable(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return gin.get_configurable(a) is gin.get_configurable(b)
    except (ValueError, KeyError):  # unknown or ambiguous: only the same spelling matches
        return False


def _with_scoped_copies(bindings: Sequence[_Binding], scoped: Sequence[tuple[str, str, str]]) -> list[str]:
    out = []
    for b in bindings:
        out.append(b.text)
        if b.scope or not b.arg_name:
            continue  # already scoped, a macro, or not a binding
        scopes = dict.fromkeys(s for s, sel, arg in scoped if arg == b.arg_name and _same_configurable(sel, b.selector))
        out.extend(f"{s}/{b.text}" for s in scopes)
    return out


def parse_config(files: Sequence[Path], bindings: Sequence[str], finalize: bool = True) -> None:
    """Parse ``files`` (in order, includes resolved as described above), then ``bindings``.

    A binding ``C.p = v`` without a scope also rebinds ``scope/C.p`` for every scope in which
    the files bind ``C.p``: a command-line override wins over a scoped binding of a replayed
    config. Later bindings win over earlier ones, scoped or not.

    Args:
        files: gin files (e.g. from :func:`find_config`).
        bindings: binding strings (``"NAME = VALUE"``), in command-line order.
        finalize: lock the config afterwards (``gin.finalize``).

    Example:
        >>> parse_config([find_config("models/gpt_tiny.gin")], ["GPTConfig.n_layer = 3"])  # doctest: +SKIP
    """
    split = _split_bindings(bindings)  # syntax errors surface before any file is read
    del _SCOPED[:]
    with _quiet_gin_search():
        gin.parse_config_files_and_bindings([f"{_RESOLVED}{Path(f).resolve()}" for f in files], None, finalize_config=False)
    gin.parse_config(_with_scoped_copies(split, list(_SCOPED)))
    if finalize:
        gin.finalize()
