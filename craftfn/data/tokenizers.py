"""Tokenizers: characters, bytes (UTF-8) and byte-level BPE (Hugging Face ``tokenizers``).

Every tokenizer saves itself as a Hugging Face ``tokenizer.json`` (``save(path)``): the file loads
with ``tokenizers.Tokenizer.from_file`` and encodes text exactly as the craftfn tokenizer does, so a
run directory works with the Hugging Face ecosystem. :func:`load_tokenizer` reads those files, any
other Hugging Face ``tokenizer.json`` (as a :class:`BPETokenizer`) and the older craftfn format
(``{"type": "char", "chars": ...}``) that runs and checkpoints written before carry.

Character and byte tokenizers encode with numpy (no ``tokenizers`` import); special tokens (the
document separator :data:`EOT`) are matched in the text as Hugging Face matches them.

Example:
    >>> from craftfn.data import CharTokenizer, tokenizer_from_dict
    >>> tok = CharTokenizer.from_text("hello world")
    >>> tok.decode(tok.encode("hello"))
    'hello'
    >>> tokenizer_from_dict(tok.to_dict()) == tok
    True
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from craftfn._files import atomic_write, make_dirs

__all__ = [
    "EOT",
    "ByteTokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "Tokenizer",
    "tokenizer_from_dict",
    "load_tokenizer",
    "atomic_write_text",
    "safe_cut",
    "token_dtype",
    "utf8_codepoints",
    "VocabularyError",
]

EOT = "<|endoftext|>"
"""The document separator (GPT-2's end-of-text token): a special token between documents of a corpus."""


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temp file in the same folder, fsync, rename,
    fsync of the folder; the folder is created if missing.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "vocab", "notes.txt")
        >>> atomic_write_text(target, "héllo")
        >>> open(target, encoding="utf-8").read()
        'héllo'
    """
    make_dirs(os.path.dirname(os.path.abspath(os.fspath(path))))
    data = text.encode("utf-8")
    atomic_write(path, lambda write: write(data))


# ----------------------------------------------------------------------------- safe cuts
#
# Long texts are encoded in pieces (a corpus in chunks, a BPE text in batches that use every
# core). A cut is safe when the byte-level BPE pre-tokenizer (GPT-2's regex) would split there
# anyway, so the pieces encode to exactly the tokens of the whole text:
#   1. after a newline that is followed by a printable ASCII character: whitespace runs never
#      swallow a following non-space, and no other token starts with a newline;
#   2. before a space that follows a printable ASCII character and precedes an ASCII letter:
#      " word" is one pre-token, and the token before it ends at the space.
# Both positions are UTF-8 character boundaries, and no special token contains a newline or a space.
_CUT_RULES = {
    str: (re.compile(r"\n(?=[!-~])"), re.compile(r"(?<=[!-~]) (?=[A-Za-z])")),
    bytes: (re.compile(rb"\n(?=[!-~])"), re.compile(rb"(?<=[!-~]) (?=[A-Za-z])")),
}


def safe_cut(text: Union[str, bytes], start: int, stop: int) -> Optional[int]:
    """The first safe cut of ``text`` in ``[start, stop)``: a newline-then-character boundary
    if there is one there, else a space-before-a-word boundary; ``None`` if neither.

    Encoding the pieces of a text cut at safe positions gives the tokens of the whole text for
    every craftfn tokenizer (and any byte-level BPE with GPT-2's pre-tokenizer).

    Example:
        >>> safe_cut("ab\\ncd", 0, 5)
        3
        >>> safe_cut("ab cd", 0, 5), safe_cut("ab  ", 0, 4)
        (2, None)
    """
    after_newline, before_word = _CUT_RULES[type(text)]
    m = after_newline.search(text, start, stop)
    if m is not None:
        return m.end()
    m = before_word.search(text, start, stop)
    return m.start() if m is not None else None


def _pieces(text: str, size: int = 1 << 16) -> list[str]:
    """``text`` cut at safe positions into pieces of about ``size`` characters (never cut unsafely)."""
    cuts = [0]
    pos = size
    n = len(text)
    while pos < n:
        cut = safe_cut(text, pos, min(n, pos + size))
        if cut is None:
            pos += size  # no safe cut in this window: the piece grows
            continue
        cuts.append(cut)
        pos = cut + size
    cuts.append(n)
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def utf8_codepoints(data: bytes) -> np.ndarray:
    """The code points of UTF-8 ``data`` (uint32), decoded strictly: ``UnicodeDecodeError`` at the bad byte.

    Mostly-ASCII text (code, English) decodes only its runs of non-ASCII bytes (each a whole number
    of characters, since ASCII bytes never occur inside one), 2-3x faster than ``bytes.decode``.

    Example:
        >>> utf8_codepoints("hé!".encode()).tolist()
        [104, 233, 33]
    """
    b = np.frombuffer(data, np.uint8)
    if data.isascii():
        return b.astype(np.uint32)
    runs = _non_ascii_runs(b)
    if runs is None:  # dense non-ASCII text: one decode beats many small ones
        return np.frombuffer(data.decode("utf-8").encode("utf-32-le"), np.uint32)
    codes = b.astype(np.uint32)
    keep = np.ones(b.size, bool)
    for start, stop in runs:
        run = _decode_run(data, start, stop)
        codes[start : start + run.size] = run
        keep[start + run.size : stop] = False
    return codes[keep]


def _non_ascii_runs(b: np.ndarray) -> Optional[list[tuple[int, int]]]:
    """``[start, stop)`` of each run of bytes >= 0x80 in ``b`` (uint8), or None when there are too many
    (dense non-ASCII text). In valid UTF-8 each run is a whole number of characters."""
    high = np.flatnonzero(b >= 0x80)
    breaks = np.flatnonzero(np.diff(high) != 1)
    starts = np.concatenate([high[:1], high[breaks + 1]]).tolist()
    stops = (np.concatenate([high[breaks], high[-1:]]) + 1).tolist()
    if len(starts) > 1 + b.size // 256:
        return None
    return list(zip(starts, stops))


def _decode_run(data: bytes, start: int, stop: int) -> np.ndarray:
    """The code points of ``data[start:stop]`` (uint32); ``UnicodeDecodeError`` located in ``data``."""
    try:
        return np.frombuffer(data[start:stop].decode("utf-8").encode("utf-32-le"), np.uint32)
    except UnicodeDecodeError:
        try:  # with the byte after the run, the error reads as bytes.decode's would
            data[start : stop + 1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise UnicodeDecodeError(e.encoding, data, start + e.start, start + e.end, e.reason) from None
        raise  # pragma: no cover - the longer slice cannot decode when the run does not


# ----------------------------------------------------------------------------- helpers


class VocabularyError(ValueError):
    """Text holds a character the tokenizer's vocabulary lacks (``char``, ``byte_offset`` in the encoded UTF-8)."""

    def __init__(self, message: str, char: str, byte_offset: int) -> None:
        super().__init__(message)
        self.char, self.byte_offset = char, byte_offset


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _ids_list(ids: Union[Iterable[int], torch.Tensor, np.ndarray]) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim > 1:
            raise ValueError(f"decode takes one sequence (a 1-d tensor or list), got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _check_ids(name: str, values: list[int], vocab_size: int) -> None:
    bad = [i for i in values if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name}.decode: ids must be in [0, {vocab_size}), got {bad[:5]}")


def _check_special_tokens(special_tokens: Any) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        special_tokens = (special_tokens,)
    specials = tuple(special_tokens)
    if any(not isinstance(s, str) or len(s) < 2 for s in specials) or len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens must be distinct strings of at least 2 characters, got {specials!r}")
    return specials


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids ``[0, vocab_size)``: uint8, uint16 or uint32.

    Example:
        >>> token_dtype(256), token_dtype(257), token_dtype(70_000)
        (dtype('uint8'), dtype('uint16'), dtype('uint32'))
    """
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (what Hugging Face's ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


_BYTE_SYMBOLS = _bytes_to_unicode()
_BYTE_VOCAB = {_BYTE_SYMBOLS[b]: b for b in range(256)}


def _hf_json(vocab: dict[str, int], specials: Sequence[tuple[int, str]], pre_tokenizer: Any, decoder: Any) -> dict[str, Any]:
    """A Hugging Face ``tokenizer.json`` of a BPE model without merges: one token per vocabulary symbol."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, s in specials
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": [],
        },
    }


_BYTE_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_BYTE_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
_CHAR_DECODER = {"type": "Fuse"}


# ----------------------------------------------------------------------------- the tokenizers


class _Base:
    kind: str = ""
    vocab_size: int
    special_tokens: tuple[str, ...] = ()
    _special_ids: dict[str, int]
    _special_re: Optional[re.Pattern[str]] = None

    def _init_specials(self, special_tokens: Any, first_id: int) -> None:
        self.special_tokens = _check_special_tokens(special_tokens)
        self._special_ids = {s: first_id + i for i, s in enumerate(self.special_tokens)}
        # Longest first: at one position the longest special token wins, as in Hugging Face.
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None

    @property
    def eot_id(self) -> Optional[int]:
        """The id of the document separator :data:`EOT`, or ``None`` when the vocabulary lacks it."""
        return self._special_ids.get(EOT)

    @property
    def eos_token_id(self) -> Optional[int]:
        """:attr:`eot_id` under the name generation looks for (a sample stops at the end of a document)."""
        return self.eot_id

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id (:func:`token_dtype`): what token shards store."""
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        return self.encode_array(text).tolist()

    def encode_tensor(self, text: str) -> torch.Tensor:
        """``encode(text)`` as a 1-d int64 tensor."""
        return torch.from_numpy(self.encode_array(text, np.int64))

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """``encode(text)`` as a 1-d numpy array of ``dtype``; special tokens in the text become their ids."""
        _check_text(text)
        if self._special_re is None or not any(s in text for s in self.special_tokens):
            return self._encode_plain(text).astype(dtype, copy=False)
        parts = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                parts.append(np.array([self._special_ids[piece]]))
            elif piece:
                try:
                    parts.append(self._encode_plain(piece))
                except VocabularyError as e:  # report the offset in the whole text
                    offset = len("".join(self._special_re.split(text)[:i]).encode("utf-8")) + e.byte_offset
                    raise VocabularyError(str(e), e.char, offset) from None
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    def encode_bytes(self, data: bytes, dtype: Any = np.int64) -> np.ndarray:
        """``encode_array`` of UTF-8 ``data``; raises ``UnicodeDecodeError`` when it is not UTF-8."""
        return self.encode_array(data.decode("utf-8"), dtype)

    def _encode_plain(self, text: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_json(self) -> str:
        """The Hugging Face ``tokenizer.json`` text of this tokenizer."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer to ``path`` (atomically) as a Hugging Face ``tokenizer.json``.

        Example:
            >>> import tokenizers
            >>> ByteTokenizer().save("tokenizer.json")  # doctest: +SKIP
            >>> tokenizers.Tokenizer.from_file("tokenizer.json").encode("hé").ids  # doctest: +SKIP
            [104, 195, 169]
        """
        atomic_write_text(path, self.to_json() + "\n")


    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``folder``: what transformers'
        ``AutoTokenizer.from_pretrained(folder)`` loads (a ``PreTrainedTokenizerFast``; :data:`EOT`,
        when the vocabulary has it, is its end-of-sequence token).

        Example:
            >>> ByteTokenizer([EOT]).save_pretrained("exported")  # doctest: +SKIP
            >>> transformers.AutoTokenizer.from_pretrained("exported").eos_token  # doctest: +SKIP
            '<|endoftext|>'
        """
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if self.eot_id is not None:
            config["eos_token"] = EOT
        self.save(os.path.join(folder, "tokenizer.json"))
        atomic_write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=1) + "\n")
    def _specials_decoded(self, values: list[int], plain: Any) -> str:
        """Decode ``values`` with ``plain`` (a list of regular ids -> str), special ids as their text."""
        first = self.vocab_size - len(self.special_tokens)
        if not self.special_tokens or all(i < first for i in values):
            return plain(values)
        out, run = [], []
        for i in values:
            if i >= first:
                out.append(plain(run))
                out.append(self.special_tokens[i - first])
                run = []
            else:
                run.append(i)
        out.append(plain(run))
        return "".join(out)


class ByteTokenizer(_Base):
    """UTF-8 bytes as tokens: ids 0-255 are the bytes (then any special tokens); any text encodes.

    Args:
        special_tokens: extra tokens after the bytes, e.g. ``(EOT,)`` for a corpus of many documents.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169])
        'hé'
        >>> ByteTokenizer(special_tokens=[EOT]).encode("a<|endoftext|>")
        [97, 256]
    """

    kind = "byte"

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        self._init_specials(special_tokens, 256)
        self.vocab_size = 256 + len(self.special_tokens)

    def _encode_plain(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def encode_bytes(self, data: bytes, dtype: Any = np.int64) -> np.ndarray:
        if self.special_tokens and any(s.encode() in data for s in self.special_tokens):
            return super().encode_bytes(data, dtype)
        utf8_codepoints(data)  # the bytes are the ids; this checks they are UTF-8 text
        return np.frombuffer(data, np.uint8).astype(dtype)

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 (a sample cut mid-character) become U+FFFD."""
        values = _ids_list(ids)
        _check_ids("ByteTokenizer", values, self.vocab_size)
        return self._specials_decoded(values, lambda run: bytes(run).decode("utf-8", errors="replace"))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``tokenizer.json`` content: a BPE without merges over GPT-2's 256 byte symbols."""
        specials = [(256 + i, s) for i, s in enumerate(self.special_tokens)]
        return _hf_json(dict(_BYTE_VOCAB), specials, dict(_BYTE_PRE_TOKENIZER), dict(_BYTE_DECODER))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and other.special_tokens == self.special_tokens

    def __hash__(self) -> int:
        return hash((self.kind, self.special_tokens))

    def __repr__(self) -> str:
        return f"ByteTokenizer(special_tokens={list(self.special_tokens)})" if self.special_tokens else "ByteTokenizer()"


class CharTokenizer(_Base):
    """One token per distinct character of a corpus (sorted), as in nanoGPT's shakespeare_char.

    Args:
        chars: the vocabulary, in id order.
        special_tokens: extra tokens after the characters, e.g. ``(EOT,)``.

    Example:
        >>> tok = CharTokenizer.from_text("abcab")
        >>> tok.vocab_size, tok.encode("cab")
        (3, [2, 0, 1])
    """

    kind = "char"

    def __init__(self, chars: Union[str, Iterable[str]], special_tokens: Sequence[str] = ()) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character in chars")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat")
        self.chars = "".join(chars)
        self._init_specials(special_tokens, len(chars))
        self.vocab_size = len(chars) + len(self.special_tokens)
        self._itos = list(chars)
        # A lookup table over every code point (2-4 MB): encoding is one gather, unknown characters read -1.
        self._lut = np.full(0x110000, -1, np.int32)
        self._lut[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
        # ASCII bytes go through bytes.translate (one C pass) when every ASCII id fits a byte;
        # 255 marks an ASCII character missing from the vocabulary.
        ascii_ids = self._lut[:128]
        self._ascii_table: Optional[bytes] = None
        if int(ascii_ids.max()) < 255:
            self._ascii_table = bytes(np.where(ascii_ids < 0, 255, ascii_ids).tolist() + [0] * 128)

    @classmethod
    def from_text(cls, text: str, special_tokens: Sequence[str] = ()) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters, sorted."""
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer.from_text needs a non-empty str")
        return cls(sorted(set(text)), special_tokens)

    def _lookup(self, codes: np.ndarray, text: Union[str, bytes]) -> np.ndarray:
        ids = self._lut.take(codes)
        if ids.size and int(ids.min()) < 0:
            i = int(np.argmax(ids < 0))
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            char = text[i]
            offset = len(text[:i].encode("utf-8"))
            raise VocabularyError(
                f"text contains the character {char!r} (at byte {offset}), which is not in this CharTokenizer's "
                f"vocabulary of {len(self.chars)} characters (built from the training corpus)",
                char,
                offset,
            )
        return ids

    def _encode_plain(self, text: str) -> np.ndarray:
        return self._lookup(np.frombuffer(text.encode("utf-32-le"), np.uint32), text)

    def encode_bytes(self, data: bytes, dtype: Any = np.int64) -> np.ndarray:
        if self.special_tokens and any(s.encode() in data for s in self.special_tokens):
            return super().encode_bytes(data, dtype)
        fast = self._encode_utf8(data, np.dtype(dtype))
        if fast is not None:
            return fast
        return self._lookup(utf8_codepoints(data), data).astype(dtype, copy=False)

    def _encode_utf8(self, data: bytes, dtype: np.dtype) -> Optional[np.ndarray]:
        """Mostly-ASCII ``data`` encoded without a code-point array: ASCII runs through ``bytes.translate``,
        each non-ASCII run decoded (strictly) and looked up. None when the slow path must run: dense
        non-ASCII text, or a character missing from the vocabulary (the slow path names it and its offset)."""
        if self._ascii_table is None:
            return None
        b = np.frombuffer(data, np.uint8)
        runs = [] if data.isascii() else _non_ascii_runs(b)
        if runs is None:
            return None
        translated = data.translate(self._ascii_table)
        if b"\xff" in translated:  # an ASCII character the vocabulary lacks
            return None
        ids = np.frombuffer(translated, np.uint8)
        pieces, pos = [], 0
        for start, stop in runs:
            run = self._lut.take(_decode_run(data, start, stop))
            if run.size and int(run.min()) < 0:
                return None
            pieces += [ids[pos:start], run]
            pos = stop
        pieces.append(ids[pos:])
        if len(pieces) == 1:
            return ids.astype(dtype)
        return np.concatenate([p.astype(dtype, copy=False) for p in pieces])

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        values = _ids_list(ids)
        _check_ids("CharTokenizer", values, self.vocab_size)
        return self._specials_decoded(values, lambda run: "".join(self._itos[i] for i in run))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``tokenizer.json`` content: a BPE without merges whose symbols are the characters."""
        specials = [(len(self.chars) + i, s) for i, s in enumerate(self.special_tokens)]
        return _hf_json({c: i for i, c in enumerate(self.chars)}, specials, None, dict(_CHAR_DECODER))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and (other.chars, other.special_tokens) == (self.chars, self.special_tokens)

    def __hash__(self) -> int:
        return hash((self.kind, self.chars, self.special_tokens))

    def __repr__(self) -> str:
        extra = f", special_tokens={list(self.special_tokens)}" if self.special_tokens else ""
        return f"CharTokenizer(vocab_size={self.vocab_size}{extra})"


def _hf() -> Any:
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - a core dependency
        raise ImportError("BPE tokenizers need Hugging Face tokenizers: pip install tokenizers") from None
    return tokenizers


class BPETokenizer(_Base):
    """A Hugging Face ``tokenizers.Tokenizer``: byte-level BPE trained by :meth:`train`, or any ``tokenizer.json``.

    Long texts are encoded in pieces cut at safe positions (:func:`safe_cut`), in parallel on
    every core, with the same ids as one ``tokenizer.encode(text)`` call for byte-level BPEs.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.

    Example:
        >>> tok = BPETokenizer.train(["def f(x):\\n    return x\\n" * 50], vocab_size=300)
        >>> tok.vocab_size <= 300, tok.decode(tok.encode("def f(x):"))
        (True, 'def f(x):')
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        hf = _hf()
        if not isinstance(tokenizer, hf.Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError("the tokenizer has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        added = sorted(tokenizer.get_added_tokens_decoder().items())
        self.special_tokens = tuple(t.content for _, t in added if t.special)
        self._special_ids = {s: vocab[s] for s in self.special_tokens}
        self._json = tokenizer.to_str()
        d = json.loads(self._json)
        pre = d.get("pre_tokenizer") or {}
        # Safe cuts hold for GPT-2's pre-tokenizer regex; other tokenizers encode a text in one call.
        self._piecewise = d.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (EOT,),
        min_frequency: int = 0,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Train a byte-level BPE (GPT-2's pre-tokenizer, 256 byte symbols, merges) on ``texts``.

        Args:
            texts: the training text, as one or more strings (e.g. chunks of a corpus).
            vocab_size: the vocabulary size, special tokens included (at least ``256 + len(special_tokens)``).
            special_tokens: tokens never split, placed first (ids 0, 1, ...).
            min_frequency: merges seen fewer times are not learned.
            show_progress: Hugging Face's progress bar.

        Returns:
            The tokenizer (deterministic: the same texts give the same vocabulary).

        Example:
            >>> BPETokenizer.train(["aaaa bbbb"] * 10, vocab_size=260).vocab_size
            260
        """
        hf = _hf()
        specials = _check_special_tokens(special_tokens)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size must be an int of at least {256 + len(specials)} for a byte-level BPE "
                f"(256 byte symbols and {len(specials)} special token(s)), got {vocab_size!r}"
            )
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        pieces = (p for t in texts for p in _pieces(t, 1 << 20))
        tok.train_from_iterator(pieces, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        """A tokenizer from the content of a Hugging Face ``tokenizer.json``."""
        try:
            return cls(_hf().Tokenizer.from_str(json.dumps(d)))
        except Exception as e:  # tokenizers raises its own exception type
            if isinstance(e, (TypeError, ValueError)):
                raise
            raise ValueError(f"not a Hugging Face tokenizer.json: {e}") from None

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        _check_text(text)
        pieces = _pieces(text) if self._piecewise else [text]
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(pieces, add_special_tokens=False)
        parts = [np.asarray(e.ids, dtype) for e in encodings]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        values = _ids_list(ids)
        _check_ids("BPETokenizer", values, self.vocab_size)
        return self._tok.decode(values, skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self._json)

    def to_json(self) -> str:
        return self._json

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other._json == self._json

    def __hash__(self) -> int:
        return hash((self.kind, self._json))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = Union[ByteTokenizer, CharTokenizer, BPETokenizer]


def _merge_free(d: dict[str, Any]) -> Optional[tuple[dict[str, int], list[str]]]:
    """``(vocab, special tokens)`` of a merge-free BPE file as craftfn writes it, else ``None``."""
    model = d.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return None
    if d.get("normalizer") is not None or d.get("post_processor") is not None or model.get("unk_token") is not None:
        return None
    if model.get("dropout") is not None or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        return None
    added = sorted(d.get("added_tokens") or [], key=lambda t: t.get("id", -1))
    if any(not t.get("special") or t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    if [t.get("id") for t in added] != list(range(len(vocab), len(vocab) + len(added))):
        return None
    return vocab, [t["content"] for t in added]


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its :meth:`to_dict` form (a Hugging Face ``tokenizer.json``) or the older
    craftfn form (``{"type": "byte"}``, ``{"type": "char", "chars": ...}``).

    Example:
        >>> tokenizer_from_dict({"type": "char", "chars": "ab"}) == CharTokenizer("ab")
        True
    """
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer dict must be a dict, got {type(d).__name__}")
    if "type" in d and "model" not in d:  # craftfn's format before tokenizer.json followed Hugging Face's
        if d["type"] == "byte":
            return ByteTokenizer()
        if d["type"] == "char":
            if not isinstance(d.get("chars"), str):
                raise ValueError("a 'char' tokenizer dict needs 'chars', a string of the vocabulary")
            return CharTokenizer(d["chars"])
        raise ValueError(f"unknown tokenizer type {d['type']!r}; known: 'byte', 'char' (or a Hugging Face tokenizer.json)")
    if "model" not in d:
        raise ValueError(f"a tokenizer dict needs a 'model' (a Hugging Face tokenizer.json) or a 'type' key, got {d!r:.80}")
    found = _merge_free(d)
    if found is not None:
        vocab, specials = found
        pre, dec = d.get("pre_tokenizer"), d.get("decoder")
        if (
            isinstance(pre, dict) and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
            and isinstance(dec, dict) and dec.get("type") == "ByteLevel" and vocab == _BYTE_VOCAB
        ):
            return ByteTokenizer(specials)
        if pre is None and dec == _CHAR_DECODER and all(len(k) == 1 for k in vocab):
            return CharTokenizer(sorted(vocab, key=vocab.__getitem__), specials)
    return BPETokenizer.from_dict(d)


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Read a ``tokenizer.json``: one craftfn saved (any version) or any Hugging Face tokenizer file.

    Example:
        >>> tok = load_tokenizer("runs/char_gpt/tokenizer.json")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path!r} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return tokenizer_from_dict(d)
    except ValueError as e:
        raise ValueError(f"tokenizer file {path!r}: {e}") from None
