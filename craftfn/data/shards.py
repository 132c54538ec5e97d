"""Tokenize a corpus once into token shards on disk; read it memory-mapped afterwards.

:func:`prepare_corpus` encodes text files (and ``.jsonl`` files with a text field) into raw token
shards, as nanoGPT's ``prepare.py`` writes ``train.bin``: ``uint8``/``uint16``/``uint32``, the
smallest that holds the vocabulary. A ``manifest.json`` records the source files (sizes, stat
stamps and hashes), the tokenizer and, per shard, its token count, hashes and stamps. The next
call with the same sources and tokenizer checks them and reuses the shards: a file whose size,
mtime, ctime and inode are unchanged since its hash last matched is trusted by its stat, any
other is hashed in full (``verify=True`` hashes everything; the trade-off is in
:func:`prepare_corpus`). An edited source file has its shard rebuilt, a truncated, altered or
missing shard is reported and rebuilt.

Encoding streams each file in chunks cut at safe positions (:func:`craftfn.data.tokenizers.safe_cut`),
so the shards hold exactly ``tokenizer.encode(corpus text)``; character and byte tokenizers
encode chunks in parallel processes, BPE in Hugging Face's own threads. RAM holds a few chunks,
never the corpus.

A corpus of several files (or any ``.jsonl``) is a sequence of documents, each followed by the
separator :data:`~craftfn.data.EOT`; :meth:`TokenCorpus.split` holds out whole documents for
validation, chosen by the seed. One text file is one document, split at its tail.

Example:
    >>> corpus = prepare_corpus("data/*.txt", tokenizer="bpe", vocab_size=1024)  # doctest: +SKIP
    >>> train, val = corpus.split(val_fraction=0.1, seed=0)  # doctest: +SKIP
    >>> batch = random_window_batch(train, batch_size=8, block_size=256, seed=0, step=0)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import xxhash

from craftfn._files import atomic_write
from craftfn.data.corpora import corpus_files
from craftfn.data.streams import TokenStream, split_documents
from craftfn.data.tokenizers import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    VocabularyError,
    atomic_write_text,
    safe_cut,
    tokenizer_from_dict,
    utf8_codepoints,
)

__all__ = ["TokenCorpus", "prepare_corpus", "default_cache_dir", "CorruptShardError"]

FORMAT = "craftfn-token-shards/1"
MANIFEST = "manifest.json"
CHUNK_BYTES = 8 << 20  # encoded per task: a few of these in RAM at once
LOOKAHEAD_BYTES = 1 << 20  # how far past a chunk's nominal end a safe cut is looked for
SHARD_BYTES = 256 << 20  # small files share a shard up to this many source bytes
HASH_BLOCK = 16 << 20
PARALLEL_MIN_BYTES = 16 << 20  # smaller corpora encode in this process


class CorruptShardError(ValueError):
    """A token shard or its manifest does not match what was recorded (truncated, altered, unreadable)."""


def default_cache_dir() -> str:
    """Where token shards go by default: ``$CRAFTFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/craftfn/tokens``
    (``~/.cache/craftfn/tokens``).

    Example:
        >>> default_cache_dir().endswith("tokens") or "CRAFTFN_CACHE_DIR" in os.environ
        True
    """
    if os.environ.get("CRAFTFN_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["CRAFTFN_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "craftfn", "tokens")


def _hash_file(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _unreadable(path: str, offset: int, e: OSError) -> ValueError:
    return ValueError(f"data file {path!r} cannot be read at byte {offset} ({e.strerror or e})")


# Trusting a file by its stat: a file whose size, mtime_ns, ctime_ns and inode are those recorded when its
# content was last known to match its hash is not read again. Any write moves ctime, which only the kernel
# sets (restoring mtime with ``os.utime`` or ``touch -d`` moves it too), and a replaced file has a new
# inode. Timestamps advance in ticks, though (a few ms on Linux before 6.13, seconds on FAT or old ext
# inodes): a write in the tick of the recorded stat would keep it, as in git's "racy clean" entries. So a
# stamp is only trusted when it was taken a tick after the file's ctime: a source written just before a
# run is hashed again by the next one. Shards a build wrote are settled (:func:`_settle` waits the tick
# out, ~50 ms at the end of a build) so that the next run trusts them: no one else writes a shard in
# the milliseconds after its rename.
STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")
TICK_NS = 50_000_000  # > one kernel timestamp tick (10 ms at HZ=100)
COARSE_TICK_NS = 2_000_000_000  # filesystems that keep whole seconds (FAT: 2 s)


def _stamp(path: Union[str, os.PathLike]) -> dict[str, int]:
    """The file's ``STAT_FIELDS`` and when they were read (``checked_ns``). Raises ``OSError``."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "checked_ns": time.time_ns()}


def _racy(stamp: dict[str, Any]) -> bool:
    """Whether a write could still follow ``stamp`` without changing it (taken within a tick of the ctime)."""
    tick = COARSE_TICK_NS if stamp["ctime_ns"] % 1_000_000_000 == 0 else TICK_NS
    return stamp["checked_ns"] - stamp["ctime_ns"] < tick


def _trusted(now: dict[str, Any], recorded: Optional[dict[str, Any]]) -> bool:
    """Whether a file stamped ``now`` is unchanged since ``recorded`` (a stamp taken when its hash was known good)."""
    if not recorded or any(recorded.get(k) != now[k] for k in STAT_FIELDS) or "checked_ns" not in recorded:
        return False
    return not _racy(recorded)


def _settle(stamps: Sequence[tuple[Union[str, os.PathLike], dict[str, Any]]]) -> None:
    """Make the racy stamps of files this process just wrote trustworthy: wait out the tick, stat again, and
    move ``checked_ns`` forward where nothing changed; a file that changed keeps its racy stamp and is
    hashed by the next run."""
    racy = [(path, stamp) for path, stamp in stamps if _racy(stamp)]
    if not racy:
        return
    wait_ns = max(s["ctime_ns"] + (COARSE_TICK_NS if s["ctime_ns"] % 1_000_000_000 == 0 else TICK_NS) - s["checked_ns"] for _, s in racy)
    time.sleep(max(0, min(wait_ns, COARSE_TICK_NS)) / 1e9 + 0.001)
    for path, stamp in racy:
        try:
            now = _stamp(path)
        except OSError:
            continue
        if all(now[k] == stamp[k] for k in STAT_FIELDS):
            stamp["checked_ns"] = now["checked_ns"]


def _source_record(path: str, previous: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Path, stat stamp (:func:`_stamp`) and content hash of a source file.

    The hash of ``previous`` (the manifest's record of this path) is kept without reading the file
    when its stamp is trusted (:func:`_trusted`: size, ``mtime_ns``, ``ctime_ns`` and inode unchanged).
    An edited file is rehashed and its shard rebuilt, even with its mtime restored (ctime moves);
    what is not detected is a file changed underneath the filesystem (disk corruption) or a clock
    set back to the same nanosecond. ``previous=None`` hashes the file in full.
    """
    try:
        stamp = _stamp(path)
        if previous is not None and "xxh3_128" in previous and _trusted(stamp, previous):
            return {"path": path, **{k: previous[k] for k in (*STAT_FIELDS, "checked_ns")}, "xxh3_128": previous["xxh3_128"]}
        digest = _hash_file(path)
    except OSError as e:
        raise _unreadable(path, 0, e) from None
    return {"path": path, **stamp, "xxh3_128": digest}


def _same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["path"], a["size"], a["xxh3_128"]) == (b["path"], b["size"], b["xxh3_128"])


# ----------------------------------------------------------------------------- chunks (run in worker processes)


class _Chunk(NamedTuple):
    """Nominal bytes ``[start, stop)`` of a file; the worker moves both ends to safe cuts."""

    path: str
    start: int
    stop: int
    size: int
    jsonl: bool


def _boundary(f: Any, pos: int, size: int, jsonl: bool) -> int:
    """The first safe cut at or after ``pos``: a line start (``.jsonl``), else :func:`safe_cut`."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos - 1)
    window = f.read(LOOKAHEAD_BYTES + 1)  # from the byte before pos: a cut looks one byte back
    if jsonl:
        base = pos - 1
        while True:
            i = window.find(b"\n")
            if i >= 0:
                return base + i + 1
            base += len(window)
            window = f.read(LOOKAHEAD_BYTES)
            if not window:
                return size
    cut = safe_cut(window, 0, len(window))
    if cut is None:
        # No newline or word boundary within a megabyte: any character boundary (a byte-level BPE
        # may then encode the few bytes around it differently from one whole-text call).
        cut = next((i for i in range(1, len(window)) if window[i] & 0xC0 != 0x80), len(window))
    return min(size, pos - 1 + cut)


def _read_chunk(chunk: _Chunk) -> tuple[int, bytes]:
    try:
        with open(chunk.path, "rb") as f:
            a = _boundary(f, chunk.start, chunk.size, chunk.jsonl)
            b = _boundary(f, chunk.stop, chunk.size, chunk.jsonl)
            if b <= a:
                return a, b""
            f.seek(a)
            return a, f.read(b - a)
    except OSError as e:  # a disk error or a file made unreadable after it was hashed
        raise _unreadable(chunk.path, chunk.start, e) from None


def _utf8_error(path: str, offset: int, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"data file {path!r} is not valid UTF-8 text ({e.reason} at byte {offset + e.start})")


def _documents(chunk: _Chunk, offset: int, data: bytes, field: str) -> list[str]:
    """The texts of the ``.jsonl`` lines in ``data`` (file bytes from ``offset``)."""
    docs = []
    pos = 0
    for line in data.split(b"\n"):
        where = offset + pos
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            raise _utf8_error(chunk.path, where, e) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {chunk.path!r}: the line at byte {where} is not valid JSON ({e.msg})") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"data file {chunk.path!r}: the line at byte {where} has no string field {field!r}")
        if text:
            docs.append(text)
    return docs


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Optional[Tokenizer], field: str, separator: str, dtype: Any, count: bool = True) -> None:
    _WORKER.update(tokenizer=tokenizer, field=field, separator=separator, dtype=dtype, count=count)


def _count_chunk(chunk: _Chunk) -> np.ndarray:
    """Pass 1 of a character vocabulary: how often each code point occurs in the chunk."""
    offset, data = _read_chunk(chunk)
    try:
        if chunk.jsonl:
            codes = np.frombuffer("".join(_documents(chunk, offset, data, _WORKER["field"])).encode("utf-32-le"), np.uint32)
        else:
            return _count_utf8(data)
    except UnicodeDecodeError as e:
        raise _utf8_error(chunk.path, offset, e) from None
    return np.bincount(codes) if codes.size else np.zeros(0, np.int64)


_ASCII = bytes(range(128))


def _count_utf8(data: bytes) -> np.ndarray:
    """Code-point histogram of UTF-8 ``data``: ASCII from a byte histogram, the rest from its non-ASCII bytes
    alone (a small decode), without a code-point array of the whole chunk.

    Non-ASCII bytes that decode when joined may still be invalid in place (a lead byte cut off by
    ASCII): pass 2 decodes strictly and reports that with its offset before any shard is written.
    """
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=128)[:128]
    high = data.translate(None, _ASCII)
    if not high:
        return counts
    try:
        codes = np.frombuffer(high.decode("utf-8").encode("utf-32-le"), np.uint32)
    except UnicodeDecodeError:
        utf8_codepoints(data)  # raises the error located in data
        raise  # pragma: no cover - joined runs of valid UTF-8 decode
    rest = np.bincount(codes)
    rest[:128] += counts
    return rest


def _encode_chunk(chunk: _Chunk) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, int, int]:
    """``(token ids, their histogram or None, positions of the separator id, separators added, source bytes)``.

    The file's last chunk ends with the separator. The histogram is skipped for character
    tokenizers, whose counts come from pass 1.
    """
    tok: Tokenizer = _WORKER["tokenizer"]
    dtype, separator = _WORKER["dtype"], _WORKER["separator"]
    offset, data = _read_chunk(chunk)
    try:
        if chunk.jsonl:
            docs = _documents(chunk, offset, data, _WORKER["field"])
            ids = tok.encode_array("".join(d + separator for d in docs), dtype)
            added = len(docs) if separator else 0
        else:
            last = offset + len(data) == chunk.size and len(data) > 0
            ids = tok.encode_bytes(data + separator.encode() if last else data, dtype)
            added = 1 if last and separator else 0
    except UnicodeDecodeError as e:
        raise _utf8_error(chunk.path, offset, e) from None
    except VocabularyError as e:
        raise ValueError(
            f"data file {chunk.path!r}: the character {e.char!r} near byte {offset + e.byte_offset} is not in the "
            f"tokenizer's vocabulary of {tok.vocab_size}"
        ) from None
    counts = np.bincount(ids, minlength=tok.vocab_size) if _WORKER["count"] else None
    eots = np.flatnonzero(ids == tok.eot_id) if separator else np.zeros(0, np.int64)
    return ids, counts, eots, added, len(data)


def _chunks(path: str, size: int) -> list[_Chunk]:
    jsonl = path.endswith(".jsonl")
    return [_Chunk(path, a, min(a + CHUNK_BYTES, size), size, jsonl) for a in range(0, size, CHUNK_BYTES)]


@contextlib.contextmanager
def _pool(workers: int, tokenizer: Optional[Tokenizer], field: str, separator: str, dtype: Any, count: bool = True) -> Iterator[Any]:
    """``imap`` over chunks: forked worker processes, or this process (one worker, or no fork on this platform)."""
    args = (tokenizer, field, separator, dtype, count)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux"):
        # fork: the workers need numpy and the tokenizer only, and start in milliseconds.
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=args) as pool:
            yield lambda fn, items: pool.imap(fn, items)
        return
    _init_worker(*args)
    yield lambda fn, items: map(fn, items)


# ----------------------------------------------------------------------------- the corpus


class TokenCorpus:
    """A tokenized corpus in token shards (what :func:`prepare_corpus` returns).

    Attributes:
        path: the folder of the shards and ``manifest.json``.
        tokenizer: the tokenizer that made them.
        tokens: every token, a :class:`TokenStream` over the memory-mapped shards.
        document_ends: end offsets of the documents in ``tokens`` (one document: ``[len(tokens)]``).
        token_counts: how often each id occurs (for the unigram entropy), int64 ``(vocab_size,)``.
        manifest: the verified manifest.
    """

    def __init__(self, path: str, tokenizer: Tokenizer, tokens: TokenStream, document_ends: np.ndarray, token_counts: np.ndarray, manifest: dict[str, Any]) -> None:
        self.path, self.tokenizer, self.tokens = path, tokenizer, tokens
        self.document_ends, self.token_counts, self.manifest = document_ends, token_counts, manifest

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def split(self, val_fraction: float, seed: int) -> tuple[TokenStream, TokenStream]:
        """``(train, validation)`` streams: whole documents chosen by ``seed`` (:func:`split_documents`)."""
        train, val = split_documents(self.document_ends, val_fraction, seed)
        return self.tokens.select(train), self.tokens.select(val)

    def __repr__(self) -> str:
        return f"TokenCorpus({self.num_tokens:,} tokens, {len(self.document_ends):,} documents, {self.tokenizer!r}, {self.path!r})"


def _request(tokenizer: Union[str, Tokenizer], vocab_size: Optional[int], bpe_train_bytes: int) -> dict[str, Any]:
    """What the caller asked for (part of the cache key and of the manifest)."""
    if isinstance(tokenizer, (ByteTokenizer, CharTokenizer, BPETokenizer)):
        if vocab_size is not None:
            raise ValueError(f"vocab_size={vocab_size} is only for tokenizer='bpe' (a given tokenizer has its vocabulary)")
        return {"tokenizer": "given", "xxh3_128": xxhash.xxh3_128_hexdigest(tokenizer.to_json().encode())}
    if tokenizer in ("char", "byte"):
        if vocab_size is not None:
            raise ValueError(f"vocab_size={vocab_size} is only for tokenizer='bpe'; the {tokenizer!r} tokenizer's vocabulary comes from the text")
        return {"tokenizer": tokenizer}
    if tokenizer == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer='bpe' needs vocab_size (e.g. 1024 for a small model, 50257 like GPT-2)")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an int of at least 257 for a byte-level BPE (256 bytes and {EOT}), got {vocab_size!r}")
        if isinstance(bpe_train_bytes, bool) or not isinstance(bpe_train_bytes, int) or bpe_train_bytes < 1:
            raise ValueError(f"bpe_train_bytes must be a positive int, got {bpe_train_bytes!r}")
        return {"tokenizer": "bpe", "vocab_size": vocab_size, "train_bytes": bpe_train_bytes}
    raise ValueError(f"tokenizer must be 'char', 'byte', 'bpe' or a craftfn tokenizer, got {tokenizer!r}")


def _slug(source: Any) -> str:
    first = source if isinstance(source, (str, os.PathLike)) else (list(source) or ["corpus"])[0]
    name = os.path.basename(os.path.normpath(os.fspath(first))) or "corpus"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40]


def _source_spec(source: Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        return os.path.abspath(os.path.expanduser(os.fspath(source)))
    return [os.path.abspath(os.path.expanduser(os.fspath(s))) for s in source]


@contextlib.contextmanager
def _locked(path: str, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock between processes (the ranks of a torchrun job, two runs): one builds, the others wait.

    A file lock, not a collective: waiting for a long build cannot time out a process group.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"craftfn: waiting for another process that is tokenizing this corpus (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(folder: Path, log: Callable[[str], None]) -> Optional[dict[str, Any]]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        return manifest
    except (ValueError, OSError, AttributeError) as e:
        log(f"craftfn: the token manifest {str(path)!r} is unreadable ({e}); re-tokenizing")
        return None


def _check_file(path: Path, size: int, digest: str, what: str, recorded: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Check a shard file against the manifest; its stamp. Trusted by its stamp (:func:`_trusted`), else hashed in full."""
    try:
        now = _stamp(path)
    except FileNotFoundError:
        raise CorruptShardError(f"{what} {str(path)!r} is missing") from None
    if now["size"] != size:
        raise CorruptShardError(f"{what} {str(path)!r} has {now['size']} bytes, the manifest records {size} (truncated or altered)")
    if recorded is not None and _trusted(now, recorded):
        return recorded
    if _hash_file(str(path)) != digest:
        raise CorruptShardError(f"{what} {str(path)!r} does not match the hash in the manifest (altered)")
    return now


# A shard's three files: (manifest key of the name, of the hash, what it is).
_SHARD_FILES = (("file", "xxh3_128", "token shard"), ("documents_file", "documents_xxh3_128", "document index"), ("counts_file", "counts_xxh3_128", "token counts"))


def _verify_shard(folder: Path, shard: dict[str, Any], itemsize: int, vocab_size: int, full: bool) -> dict[str, Any]:
    """``shard`` with fresh stamps if its files match the manifest (``full``: every file hashed), else ``CorruptShardError``."""
    sizes = {"file": shard["num_tokens"] * itemsize, "documents_file": shard["num_documents"] * 8, "counts_file": vocab_size * 8}
    recorded = {} if full else shard.get("stat", {})
    stat = {key: _check_file(folder / shard[key], sizes[key], shard[digest], what, recorded.get(key)) for key, digest, what in _SHARD_FILES}
    return {**shard, "stat": stat}


def _write_atomic(path: Path, chunks: Callable[[Any], None]) -> str:
    """Write a file atomically (:func:`craftfn._files.atomic_write`); ``chunks(write)`` produces the
    bytes. Returns their xxh3-128."""
    h = xxhash.xxh3_128()

    def produce(write: Callable[[bytes], object]) -> None:
        def hashed_write(b: bytes) -> None:
            write(b)
            h.update(b)

        chunks(hashed_write)

    atomic_write(path, produce)
    return h.hexdigest()


def _groups(sources: list[dict[str, Any]]) -> list[list[int]]:
    """Consecutive non-empty sources grouped into shards of about :data:`SHARD_BYTES` of text."""
    groups: list[list[int]] = []
    size = SHARD_BYTES
    for i, s in enumerate(sources):
        if s["size"] == 0:
            continue
        if size >= SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += s["size"]
    return groups


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False, dynamic_ncols=True)


def _char_vocabulary(
    sources: list[dict[str, Any]], old: dict[int, tuple[str, list[int]]], workers: int, field: str, progress: bool
) -> dict[int, tuple[str, list[int]]]:
    """The distinct characters of each source and how often each occurs (reusing those of unchanged sources)."""
    found = dict(old)
    todo = [i for i, s in enumerate(sources) if i not in found and s["size"] > 0]
    total = sum(sources[i]["size"] for i in todo)
    with _progress(total, "counting characters", progress and total > 0) as bar, _pool(workers if total >= PARALLEL_MIN_BYTES else 1, None, field, "", None) as imap:
        for i in todo:
            counts = np.zeros(0, np.int64)
            chunks = _chunks(sources[i]["path"], sources[i]["size"])
            for c, chunk in zip(imap(_count_chunk, chunks), chunks):
                if c.size > counts.size:
                    c, counts = counts, c
                counts[: c.size] += c
                bar.update(chunk.stop - chunk.start)
            codes = np.flatnonzero(counts)
            found[i] = ("".join(map(chr, codes)), counts[codes].tolist())
    return found


def _char_counts(tok: CharTokenizer, sources: list[dict[str, Any]], group: list[int], num_eot: int, separators: int) -> np.ndarray:
    """Token counts of a character shard from its files' character counts (pass 1), without a second histogram.

    ``num_eot`` separator ids were written: ``separators`` added between documents, the rest
    were ``EOT`` literals in the text, counted as characters in pass 1.
    """
    counts = np.zeros(tok.vocab_size, np.int64)
    for i in group:
        chars, char_counts = sources[i]["chars"], sources[i]["char_counts"]
        np.add.at(counts, tok.encode_array(chars), np.asarray(char_counts, np.int64))
    if tok.eot_id is not None:
        literals = num_eot - separators
        if literals:
            for c in EOT:
                counts[tok.encode_array(c)[0]] -= literals
        counts[tok.eot_id] = num_eot
    return counts


def _bpe_sample(sources: list[dict[str, Any]], budget: int, field: str) -> Iterator[str]:
    """About ``budget`` bytes of text for BPE training: 1 MiB pieces evenly spaced over the corpus."""
    total = sum(s["size"] for s in sources)
    piece = 1 << 20
    every = max(1, total // budget)  # take one piece in `every`
    _init_worker(None, field, "", None)
    index = 0
    for s in sources:
        for chunk in _chunks(s["path"], s["size"]):
            for a in range(chunk.start, chunk.stop, piece):
                if index % every == 0:
                    sub = chunk._replace(start=a, stop=min(a + piece, chunk.stop))
                    offset, data = _read_chunk(sub)
                    if sub.jsonl:
                        yield from _documents(sub, offset, data, field)
                    else:
                        try:
                            yield data.decode("utf-8")
                        except UnicodeDecodeError as e:
                            raise _utf8_error(sub.path, offset, e) from None
                index += 1


def _encode_shard(
    folder: Path, index: int, group: list[int], sources: list[dict[str, Any]], tok: Tokenizer, separator: str,
    field: str, workers: int, bar: Any,
) -> dict[str, Any]:
    """Encode the sources of one shard into ``shard-*.bin`` (+ document index and counts); its manifest entry."""
    dtype = tok.dtype
    name = f"shard-{index:05d}-" + xxhash.xxh3_64_hexdigest(json.dumps([tok.to_json(), [sources[i]["xxh3_128"] for i in group]]).encode())
    counts = np.zeros(tok.vocab_size, np.int64)
    doc_ends: list[np.ndarray] = []
    num_tokens = separators = 0
    chunks = [c for i in group for c in _chunks(sources[i]["path"], sources[i]["size"])]
    # BPE runs its own threads. Character and byte ids of text files are cheap to compute (~140 MB/s a
    # core) next to sending them back from worker processes: on 2 cores this process alone encoded at
    # 83 MB/s, two workers at 60 MB/s (benchmarks/data_bench.py). JSON lines still go to the workers.
    in_process = workers <= 1 or isinstance(tok, BPETokenizer) or not any(c.jsonl for c in chunks)
    from_pass1 = isinstance(tok, CharTokenizer) and all("char_counts" in sources[i] for i in group)

    def produce(write: Callable[[bytes], None]) -> None:
        nonlocal num_tokens, counts, separators
        with _pool(1 if in_process else workers, tok, field, separator, dtype, count=not from_pass1) as imap:
            for ids, chunk_counts, eots, added, nbytes in imap(_encode_chunk, chunks):
                separators += added
                write(ids.tobytes())
                if chunk_counts is not None:
                    counts += chunk_counts
                doc_ends.append(eots.astype(np.int64) + num_tokens + 1)
                num_tokens += ids.size
                bar.update(nbytes)

    digest = _write_atomic(folder / f"{name}.bin", produce)
    for i in group:  # a file edited while it was read would leave shards that match neither version
        st = os.stat(sources[i]["path"])
        if (st.st_size, st.st_mtime_ns) != (sources[i]["size"], sources[i]["mtime_ns"]):
            raise ValueError(f"data file {sources[i]['path']!r} changed while it was being tokenized; run again")
    ends = np.concatenate(doc_ends) if doc_ends else np.zeros(0, np.int64)
    if from_pass1:
        counts = _char_counts(tok, sources, group, ends.size, separators)
    if ends.size == 0 or ends[-1] != num_tokens:  # no separator: the shard ends its last document
        ends = np.append(ends, num_tokens).astype(np.int64)
    doc_digest = _write_atomic(folder / f"{name}.docs", lambda write: write(ends.tobytes()))
    counts_digest = _write_atomic(folder / f"{name}.counts", lambda write: write(counts.tobytes()))
    # Stamped as written (the hashes are of the bytes written); racy until prepare_corpus settles them.
    stat = {key: _stamp(folder / f"{name}{suffix}") for key, suffix in (("file", ".bin"), ("documents_file", ".docs"), ("counts_file", ".counts"))}
    return {
        "file": f"{name}.bin",
        "sources": group,
        "num_tokens": num_tokens,
        "xxh3_128": digest,
        "documents_file": f"{name}.docs",
        "num_documents": int(ends.size),
        "documents_xxh3_128": doc_digest,
        "counts_file": f"{name}.counts",
        "counts_xxh3_128": counts_digest,
        "stat": stat,
    }


def _open(folder: Path, manifest: dict[str, Any], tok: Tokenizer) -> TokenCorpus:
    dtype = np.dtype(manifest["dtype"])
    arrays, ends, counts = [], [], np.zeros(tok.vocab_size, np.int64)
    offset = 0
    for shard in manifest["shards"]:
        arrays.append(np.memmap(folder / shard["file"], dtype=dtype, mode="r", shape=(shard["num_tokens"],)))
        ends.append(np.fromfile(folder / shard["documents_file"], dtype=np.int64) + offset)
        counts += np.fromfile(folder / shard["counts_file"], dtype=np.int64)
        offset += shard["num_tokens"]
    document_ends = np.concatenate(ends)
    if manifest["separator"] is None:  # shards of one document, or a tokenizer without a separator
        document_ends = np.array([offset], np.int64)
    return TokenCorpus(str(folder), tok, TokenStream(arrays), document_ends, counts, manifest)


def prepare_corpus(
    source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    tokenizer: Union[str, Tokenizer] = "char",
    *,
    vocab_size: Optional[int] = None,
    bpe_train_bytes: int = 64 << 20,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    jsonl_field: str = "text",
    num_workers: Optional[int] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    verify: bool = False,
) -> TokenCorpus:
    """Tokenize ``source`` into token shards once, or reuse the verified shards of an earlier call.

    Reuse checks every source and shard file against the manifest. A file is hashed in full (xxh3,
    ~3 GB/s) unless its size, ``mtime_ns``, ``ctime_ns`` and inode are those recorded when its hash
    last matched (after the build that wrote it, or a full check): any write or replacement moves
    them, restoring mtime included, so edited sources are re-tokenized and altered, truncated or
    missing shards rebuilt. What a stat cannot see is a change below the filesystem (a failing
    disk, a corrupting copy that keeps times and inodes): ``verify=True`` (gin:
    ``lm_task.verify_data = True``) hashes everything, as every reuse did before; it costs about a
    second per 3 GB of text and shards. A file changed within one timestamp tick of a check is
    hashed again on the next run (as git's "racy" entries).

    Args:
        source: a text file, a directory, a glob pattern or a list of these
            (:func:`craftfn.data.corpus_files`); ``.jsonl`` files hold one JSON object per line
            with the text in ``jsonl_field``. Files must be UTF-8.
        tokenizer: ``"char"`` (the corpus's characters), ``"byte"``, ``"bpe"`` (a byte-level BPE of
            ``vocab_size`` trained on up to ``bpe_train_bytes`` of the corpus) or a tokenizer
            (e.g. :func:`craftfn.data.load_tokenizer` of a ``tokenizer.json``).
        vocab_size: the BPE vocabulary size, :data:`EOT` included.
        bpe_train_bytes: how much text (evenly spaced pieces) the BPE is trained on.
        cache_dir: where the shards go (default :func:`default_cache_dir`); one folder per
            source and tokenizer, with a lock file so concurrent callers build once.
        jsonl_field: the text field of ``.jsonl`` records.
        num_workers: encoding processes (default: the CPUs this process may use).
        progress: show progress bars (tqdm) while encoding.
        log: receives one line per decision (built, reused, rebuilt and why).
        verify: hash every source and shard in full, trusting no recorded stat.

    Returns:
        The :class:`TokenCorpus`.

    Raises:
        ValueError: naming the file (and byte offset) that is missing, not UTF-8, malformed JSON,
            or holds a character the given tokenizer lacks; an empty corpus; a bad argument.

    Example:
        >>> corpus = prepare_corpus("input.txt", tokenizer="byte", cache_dir="/tmp/tokens")  # doctest: +SKIP
        >>> corpus.tokens.read(0, 5)  # doctest: +SKIP
        array([70, 105, 114, 115, 116])
    """
    request = _request(tokenizer, vocab_size, bpe_train_bytes)
    if not isinstance(jsonl_field, str) or not jsonl_field:
        raise ValueError(f"jsonl_field must be a non-empty str, got {jsonl_field!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {verify!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1):
        raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))) if cache_dir is not None else Path(default_cache_dir())
    files = corpus_files(source, exclude=str(root))
    key = xxhash.xxh3_64_hexdigest(json.dumps([FORMAT, _source_spec(source), request, jsonl_field]).encode())
    folder = root / f"{_slug(source)}-{request['tokenizer']}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    with _locked(str(folder) + ".lock", log):
        t0 = time.perf_counter()
        old = _read_manifest(folder, log)
        recorded = {s.get("path"): s for s in old.get("sources", [])} if old is not None else {}
        sources = [_source_record(p, None if verify else recorded.get(p)) for p in files]
        total = sum(s["size"] for s in sources)
        if total == 0:
            raise ValueError(f"the corpus {source!r} is empty: its {len(files)} file(s) hold no text")
        multi_document = len([s for s in sources if s["size"]]) > 1 or any(p.endswith(".jsonl") for p in files)
        if old is not None and (old.get("request") != request or old.get("jsonl_field") != jsonl_field):
            old = None
        unchanged = {}  # new source index -> old source record, for sources whose content is the same
        if old is not None:
            by_path = {s["path"]: s for s in old["sources"]}
            unchanged = {i: by_path[s["path"]] for i, s in enumerate(sources) if s["path"] in by_path and _same_source(by_path[s["path"]], s)}
            changed = [s["path"] for i, s in enumerate(sources) if i not in unchanged]
            removed = sorted(set(by_path) - {s["path"] for s in sources})
            if changed or removed:
                what = ", ".join(os.path.basename(p) for p in (changed + removed)[:3]) + (" ..." if len(changed) + len(removed) > 3 else "")
                log(f"craftfn: the corpus changed since its token shards were made ({what}); re-tokenizing what changed")

        specials = [EOT] if multi_document else []
        if request["tokenizer"] == "byte":
            tok: Tokenizer = ByteTokenizer(specials)
        elif request["tokenizer"] == "char":
            old_chars = {i: (rec["chars"], rec["char_counts"]) for i, rec in unchanged.items() if "chars" in rec and "char_counts" in rec}
            chars = _char_vocabulary(sources, old_chars, num_workers, jsonl_field, progress)
            for i, (c, n) in chars.items():
                sources[i]["chars"], sources[i]["char_counts"] = c, n
            vocabulary = sorted(set("".join(c for c, _ in chars.values())))
            if not vocabulary:
                raise ValueError(f"the corpus {source!r} is empty: its documents hold no text")
            tok = CharTokenizer(vocabulary, specials)
        elif request["tokenizer"] == "bpe":
            if old is not None and len(unchanged) == len(sources) == len(old["sources"]):
                tok = tokenizer_from_dict(old["tokenizer"])
            else:
                log(f"craftfn: training a {request['vocab_size']}-token byte-level BPE on up to {request['train_bytes'] / 1e6:.0f} MB of the corpus")
                t_bpe = time.perf_counter()
                tok = BPETokenizer.train(_bpe_sample(sources, request["train_bytes"], jsonl_field), request["vocab_size"])
                log(f"craftfn: BPE trained in {time.perf_counter() - t_bpe:.1f} s ({tok.vocab_size} tokens)")
                if tok.vocab_size < request["vocab_size"]:  # the trainer stops when no pair repeats
                    log(
                        f"craftfn: the corpus has too little text for {request['vocab_size']} BPE tokens: the vocabulary "
                        f"has {tok.vocab_size} (every pair of tokens that repeats is merged); the model is sized to it"
                    )
        else:
            tok = tokenizer  # type: ignore[assignment]
        separator = EOT if multi_document and tok.eot_id is not None else ""
        if multi_document and not separator:
            log(f"craftfn: the tokenizer has no {EOT} token: documents are joined without a separator and split as one")

        dtype = tok.dtype
        old_shards = {}
        if old is not None and old.get("tokenizer") == tok.to_dict() and old.get("dtype") == dtype.name:
            old_paths = [s["path"] for s in old["sources"]]
            for shard in old["shards"]:
                old_shards[tuple(old_paths[i] for i in shard["sources"])] = shard
        elif old is not None and old.get("shards"):
            log("craftfn: the tokenizer differs from the one the token shards were made with; re-tokenizing everything")

        shards, reused, built_bytes, built = [], 0, 0, []
        groups = _groups(sources)
        workers = 1
        todo_bytes = 0
        hashed_files = sum(s["checked_ns"] != recorded.get(s["path"], {}).get("checked_ns") for s in sources)
        plan: list[tuple[list[int], Optional[dict[str, Any]]]] = []
        for group in groups:
            prior = old_shards.get(tuple(sources[i]["path"] for i in group))
            if prior is not None and all(i in unchanged for i in group):
                try:
                    before = prior.get("stat", {})
                    prior = _verify_shard(folder, prior, dtype.itemsize, tok.vocab_size, full=verify)
                    hashed_files += sum(prior["stat"][key] is not before.get(key) for key, _, _ in _SHARD_FILES)
                except CorruptShardError as e:
                    log(f"craftfn: {e}; rebuilding it")
                    prior = None
            else:
                prior = None
            plan.append((group, prior))
            if prior is None:
                todo_bytes += sum(sources[i]["size"] for i in group)
        if todo_bytes:
            workers = num_workers if todo_bytes >= PARALLEL_MIN_BYTES else 1
            log(
                f"craftfn: tokenizing {todo_bytes / 1e6:,.1f} MB of {len(files)} file(s) into {folder} "
                f"({tok!r}, {dtype.name}, encoded in {1 if isinstance(tok, BPETokenizer) or not any(p.endswith('.jsonl') for p in files) else workers} process(es))"
            )
        t_encode = time.perf_counter()
        with _progress(todo_bytes, "tokenizing", progress and todo_bytes > 0) as bar:
            for index, (group, prior) in enumerate(plan):
                if prior is not None:
                    shards.append({**prior, "sources": group})
                    reused += 1
                    continue
                shards.append(_encode_shard(folder, index, group, sources, tok, separator, jsonl_field, workers, bar))
                built.append(shards[-1])
                built_bytes += sum(sources[i]["size"] for i in group)
        manifest = {
            "format": FORMAT,
            "source": _source_spec(source),
            "request": request,
            "jsonl_field": jsonl_field,
            "tokenizer": tok.to_dict(),
            "dtype": dtype.name,
            "separator": tok.eot_id if separator else None,
            "num_tokens": int(sum(s["num_tokens"] for s in shards)),
            "sources": sources,
            "shards": shards,
        }
        _settle([(folder / shard[key], shard["stat"][key]) for shard in built for key, _, _ in _SHARD_FILES])
        if built_bytes or old is None or manifest != old:
            atomic_write_text(folder / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
        keep = {MANIFEST} | {s[k] for s in shards for k in ("file", "documents_file", "counts_file")}
        for leftover in folder.iterdir():  # shards of earlier versions, temp files of a crashed build
            if leftover.name not in keep:
                with contextlib.suppress(OSError):
                    leftover.unlink()
        elapsed = time.perf_counter() - t0
        if built_bytes:
            seconds = time.perf_counter() - t_encode
            log(
                f"craftfn: {manifest['num_tokens']:,} tokens in {len(shards)} shard(s) ({reused} reused); "
                f"encoded {built_bytes / 1e6:,.1f} MB in {seconds:.1f} s ({built_bytes / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
            )
        else:
            trusted = len(sources) + 3 * len(shards) - hashed_files
            log(
                f"craftfn: reusing {manifest['num_tokens']:,} tokens in {len(shards)} verified shard(s) in {folder} ({elapsed:.1f} s; "
                f"{hashed_files} file(s) hashed, {trusted} unchanged since their last check by size, times and inode)"
            )
        return _open(folder, manifest, tok)
