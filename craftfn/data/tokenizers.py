"""Tokenizers small enough to read: bytes (UTF-8) and characters.

A tokenizer's vocabulary is saved with the run as JSON (``to_dict()`` / ``save(path)``) and
restored with :func:`tokenizer_from_dict` / :func:`load_tokenizer`, so a run directory can be
sampled from later without the corpus.

Example:
    >>> from craftfn.data import CharTokenizer, tokenizer_from_dict
    >>> tok = CharTokenizer.from_text("hello world")
    >>> tok.decode(tok.encode("hello"))
    'hello'
    >>> tokenizer_from_dict(tok.to_dict()).vocab_size == tok.vocab_size
    True
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable, Union

import torch

__all__ = ["ByteTokenizer", "CharTokenizer", "Tokenizer", "tokenizer_from_dict", "load_tokenizer", "atomic_write_text"]


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, fsync, rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    # Created like open(path, "w") creates a file: mode 0o666 less the umask (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _ids_list(ids: Union[Iterable[int], torch.Tensor]) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"decode takes one sequence (a 1-d tensor or list), got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


class _Base:
    kind: str = ""
    vocab_size: int

    def encode_tensor(self, text: str) -> torch.Tensor:
        """``encode(text)`` as a 1-d int64 tensor."""
        return torch.tensor(self.encode(text), dtype=torch.int64)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    def encode(self, text: str) -> list[int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError


class ByteTokenizer(_Base):
    """UTF-8 bytes as tokens: ``vocab_size == 256``, any text encodes, nothing to fit.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169])
        'hé'
    """

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 (a sample cut mid-character) become U+FFFD."""
        values = _ids_list(ids)
        bad = [i for i in values if not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must be in [0, 256), got {bad[:5]}")
        return bytes(values).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class CharTokenizer(_Base):
    """One token per distinct character of a corpus (sorted), as in nanoGPT's shakespeare_char.

    Example:
        >>> tok = CharTokenizer.from_text("abcab")
        >>> tok.vocab_size, tok.encode("cab")
        (3, [2, 0, 1])
    """

    kind = "char"

    def __init__(self, chars: Union[str, Iterable[str]]) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character in chars")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat")
        self.chars = "".join(chars)
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters, sorted."""
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer.from_text needs a non-empty str")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"text contains the character {e.args[0]!r}, which is not in this CharTokenizer's "
                f"vocabulary of {self.vocab_size} characters (built from the training corpus)"
            ) from None

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        values = _ids_list(ids)
        bad = [i for i in values if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"CharTokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return "".join(self.chars[i] for i in values)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash((self.kind, self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


Tokenizer = Union[ByteTokenizer, CharTokenizer]


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its :meth:`to_dict` form."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a tokenizer dict needs a 'type' key ('byte' or 'char'), got {d!r:.80}")
    if d["type"] == "byte":
        return ByteTokenizer()
    if d["type"] == "char":
        if not isinstance(d.get("chars"), str):
            raise ValueError("a 'char' tokenizer dict needs 'chars', a string of the vocabulary")
        return CharTokenizer(d["chars"])
    raise ValueError(f"unknown tokenizer type {d['type']!r}; known: 'byte', 'char'")


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Read a tokenizer saved with ``tokenizer.save(path)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path!r} is not valid JSON: {e}") from None
    return tokenizer_from_dict(d)
