"""Token shards: tokenized once, equal to in-memory encoding, reused when unchanged, rebuilt when stale,
truncated or altered shards detected, many files and .jsonl as documents, bad input named."""

import fcntl
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from craftfn import data
from craftfn.data import shards

CORPUS = data.stdlib_corpus(max_bytes=120_000)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few KB and forked workers even for tiny corpora: the chunked, parallel path in miniature."""
    monkeypatch.setattr(shards, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(shards, "LOOKAHEAD_BYTES", 1024)
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 0)


def _prepare(source, cache, tokenizer="char", logs=None, **kw):
    return data.prepare_corpus(source, tokenizer, cache_dir=cache, progress=False, log=(logs.append if logs is not None else lambda s: None), **kw)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_memmap_windows_equal_the_in_memory_windows(tmp_path, small_chunks, kind):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS, encoding="utf-8")
    corpus = _prepare(path, tmp_path / "cache", kind, vocab_size=400 if kind == "bpe" else None, num_workers=2)
    # The in-memory path of lm_task.text: encode the whole text, split its tail, draw windows.
    tok = corpus.tokenizer
    if kind == "char":
        assert tok == data.CharTokenizer.from_text(CORPUS)
    tokens = tok.encode_tensor(CORPUS)
    assert torch.equal(corpus.tokens.to_tensor(), tokens)  # 30 chunks, 2 processes, the same tokens
    assert torch.equal(torch.from_numpy(corpus.token_counts), torch.bincount(tokens, minlength=tok.vocab_size))
    train_t, val_t = data.train_val_split(tokens, 0.1)
    train_s, val_s = corpus.split(0.1, seed=0)
    for step in range(20):
        a = data.random_window_batch(train_t, 8, 32, seed=7, step=step)
        b = data.random_window_batch(train_s, 8, 32, seed=7, step=step)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    for a, b in zip(data.WindowBatches(data.WindowDataset(val_t, 32), 16), data.WindowBatches(data.WindowDataset(val_s, 32), 16)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert corpus.tokens.arrays[0].dtype == tok.dtype and isinstance(corpus.tokens.arrays[0], np.memmap)


def _docs(folder, n=12):
    folder.mkdir()
    texts = [f"document {i}\n" + CORPUS[i * 3000 : i * 3000 + 1000 + 400 * i] for i in range(n)]
    texts[3] += f"a literal {data.EOT} ends a document too\n"  # as in GPT-2 data: the text names the separator
    for i, t in enumerate(texts[:-2]):
        (folder / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
    with open(folder / "rest.jsonl", "w", encoding="utf-8") as f:
        for t in texts[-2:]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n\n")  # blank lines are skipped
    return texts


def test_many_files_and_jsonl_are_documents_with_separators(tmp_path, small_chunks):
    texts = _docs(tmp_path / "src")
    corpus = _prepare(tmp_path / "src", tmp_path / "cache", num_workers=2)
    tok = corpus.tokenizer
    assert tok.special_tokens == (data.EOT,)
    tokens = corpus.tokens.to_tensor()
    assert tokens.tolist() == tok.encode("".join(t + data.EOT for t in texts))
    assert torch.equal(torch.from_numpy(corpus.token_counts), torch.bincount(tokens, minlength=tok.vocab_size))
    texts[3:4] = texts[3].split(data.EOT)  # the literal separates documents like the ones added between files
    assert len(corpus.document_ends) == len(texts)
    train, val = corpus.split(0.25, seed=0)
    eot = tok.eot_id
    val_ids = val.to_tensor()
    assert len(val) >= 0.25 * corpus.num_tokens and int(val_ids[-1]) == eot  # whole documents, separators included
    assert sorted(tok.decode(val_ids.tolist()).split(data.EOT)[:-1] + tok.decode(train.to_tensor().tolist()).split(data.EOT)[:-1]) == sorted(texts)
    assert torch.equal(corpus.split(0.25, seed=0)[1].to_tensor(), val_ids)  # the seed fixes the split
    assert not torch.equal(corpus.split(0.25, seed=1)[1].to_tensor(), val_ids)  # another seed, other documents
    # A glob and a list of files name the same corpus.
    listed = _prepare([tmp_path / "src" / "doc*.txt", tmp_path / "src" / "rest.jsonl"], tmp_path / "cache")
    assert torch.equal(listed.tokens.to_tensor(), corpus.tokens.to_tensor())


def _hash_calls(monkeypatch):
    """The paths ``shards`` hashes in full, in order."""
    hashed = []
    real_hash = shards._hash_file
    monkeypatch.setattr(shards, "_hash_file", lambda p: hashed.append(os.path.basename(p)) or real_hash(p))
    return hashed


def _older_than_a_tick():
    """Let a file just written age past a timestamp tick: a stamp taken within the tick is not trusted."""
    time.sleep(shards.TICK_NS / 1e9 + 0.01)


def test_second_call_reuses_the_verified_shards(tmp_path, monkeypatch):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS)
    _older_than_a_tick()
    first = _prepare(path, tmp_path / "cache")
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"}
    logs = []
    hashed = _hash_calls(monkeypatch)
    second = _prepare(path, tmp_path / "cache", logs=logs)
    assert any("reusing" in line and "verified" in line for line in logs), logs
    assert hashed == []  # the source and the shards the build wrote are trusted by their stat: nothing is read
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"} == files
    assert torch.equal(first.tokens.to_tensor(), second.tokens.to_tensor()) and first.tokenizer == second.tokenizer


def test_edited_source_file_rebuilds_its_shard_only(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", 1)  # one shard per file
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(CORPUS[:20_000])
    (src / "b.txt").write_text(CORPUS[20_000:40_000])
    before = _prepare(src, tmp_path / "cache")
    shard_a, shard_b = before.manifest["shards"]
    (src / "b.txt").write_text(CORPUS[20_000:39_000] + "edited")  # same characters: the vocabulary holds
    logs = []
    after = _prepare(src, tmp_path / "cache", logs=logs)
    assert any("changed" in line and "b.txt" in line for line in logs), logs
    new_a, new_b = after.manifest["shards"]
    assert new_a == shard_a and new_b["xxh3_128"] != shard_b["xxh3_128"]  # a reused, b rebuilt
    expected = after.tokenizer.encode(CORPUS[:20_000] + data.EOT + CORPUS[20_000:39_000] + "edited" + data.EOT)
    assert after.tokens.to_tensor().tolist() == expected
    assert not (tmp_path / "cache" / after.path.split("/")[-1] / shard_b["file"]).exists()  # the stale shard is gone
    # A new character changes the vocabulary: every shard is re-encoded with the new ids.
    (src / "a.txt").write_text(CORPUS[:20_000] + "\u2603")
    logs.clear()
    third = _prepare(src, tmp_path / "cache", logs=logs)
    assert "\u2603" in third.tokenizer.chars and any("tokenizer differs" in line for line in logs)
    assert third.tokens.to_tensor().tolist() == third.tokenizer.encode(CORPUS[:20_000] + "\u2603" + data.EOT + CORPUS[20_000:39_000] + "edited" + data.EOT)


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_damaged_shard_is_detected_and_rebuilt(tmp_path, damage):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS)
    good = _prepare(path, tmp_path / "cache")
    expected = good.tokens.to_tensor()
    shard = tmp_path / "cache" / good.path.split("/")[-1] / good.manifest["shards"][0]["file"]
    del good
    raw = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "alter":
        shard.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    else:
        shard.unlink()
    logs = []
    again = _prepare(path, tmp_path / "cache", logs=logs)
    message = {"truncate": "truncated", "alter": "does not match the hash", "delete": "missing"}[damage]
    assert any(message in line and "rebuilding" in line for line in logs), logs
    assert torch.equal(again.tokens.to_tensor(), expected)


def test_changed_tokenizer_request_gets_its_own_shards(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS[:30_000])
    char = _prepare(path, tmp_path / "cache", "char")
    byte = _prepare(path, tmp_path / "cache", "byte")
    assert char.path != byte.path and byte.tokens.to_tensor().tolist() == list(CORPUS[:30_000].encode())
    bpe = _prepare(path, tmp_path / "cache", "bpe", vocab_size=300, bpe_train_bytes=10_000)  # trained on a sample
    assert bpe.tokenizer.vocab_size == 300 and bpe.tokens.to_tensor().tolist() == bpe.tokenizer.encode(CORPUS[:30_000])
    assert _prepare(path, tmp_path / "cache", "bpe", vocab_size=300, bpe_train_bytes=10_000).tokenizer == bpe.tokenizer


def test_a_given_tokenizer_is_used_as_it_is(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("abcabc\n" * 100)
    tok = data.CharTokenizer("\nabcd")
    corpus = _prepare(path, tmp_path / "cache", tok)
    assert corpus.tokenizer == tok and corpus.tokens.read(0, 4).tolist() == [1, 2, 3, 1]
    path.write_text("abcabc\n" * 100 + "xyz")
    with pytest.raises(ValueError, match=r"input.txt.*'x' near byte 700 is not in the tokenizer's vocabulary"):
        _prepare(path, tmp_path / "cache", tok)


def test_concurrent_callers_wait_for_the_one_that_builds(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS[:10_000])
    first = _prepare(path, tmp_path / "cache")
    lock = first.path + ".lock"
    logs, done = [], []
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another process is building
        t = threading.Thread(target=lambda: done.append(_prepare(path, tmp_path / "cache", logs=logs)))
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive() and any("waiting for another process" in line for line in logs)
        fcntl.flock(f, fcntl.LOCK_UN)
    t.join(timeout=60)
    assert done and torch.equal(done[0].tokens.to_tensor(), first.tokens.to_tensor())


def test_bad_input_names_the_file_and_offset(tmp_path, small_chunks):
    src = tmp_path / "src"
    src.mkdir()
    good = "hello world\n" * 1000
    (src / "a.txt").write_text(good)
    (src / "b.txt").write_bytes(good.encode() + b"\xff\xfe" + good.encode())  # bad bytes in its third chunk
    with pytest.raises(ValueError, match=r"b.txt.*not valid UTF-8.*at byte 12000"):
        _prepare(src, tmp_path / "cache", "byte", num_workers=2)
    with pytest.raises(ValueError, match=r"b.txt.*not valid UTF-8.*at byte 12000"):
        _prepare(src, tmp_path / "cache", "char", num_workers=2)
    (src / "b.txt").unlink()
    (src / "c.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"c.jsonl.*line at byte 17 is not valid JSON"):
        _prepare(src, tmp_path / "cache", "byte")
    (src / "c.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl.*line at byte 17 has no string field 'text'"):
        _prepare(src, tmp_path / "cache", "byte")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        _prepare(empty, tmp_path / "cache")
    with pytest.raises(ValueError, match="does not exist"):
        _prepare(tmp_path / "missing.txt", tmp_path / "cache")
    with pytest.raises(ValueError, match="matches no files"):
        _prepare(str(tmp_path / "*.nothing"), tmp_path / "cache")
    with pytest.raises(ValueError, match="needs vocab_size"):
        _prepare(src / "a.txt", tmp_path / "cache", "bpe")
    with pytest.raises(ValueError, match="at least 257"):
        _prepare(src / "a.txt", tmp_path / "cache", "bpe", vocab_size=100)
    with pytest.raises(ValueError, match="only for tokenizer='bpe'"):
        _prepare(src / "a.txt", tmp_path / "cache", "char", vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer must be"):
        _prepare(src / "a.txt", tmp_path / "cache", "words")


def test_unreadable_file_is_named_with_the_byte_offset(tmp_path, small_chunks, monkeypatch):
    # Fault injection: tests run as root in CI, where chmod cannot make a file unreadable.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 1000)
    (src / "b.txt").write_text("hello world\n" * 1000)
    opens = []

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("b.txt"):
            opens.append(path)
            if len(opens) == fail_at:
                raise OSError(5, "Input/output error", str(path)) if fail_at > 1 else PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(shards, "open", failing_open, raising=False)
    fail_at = 1  # hashing the file
    with pytest.raises(ValueError, match=r"b.txt' cannot be read at byte 0 \(Permission denied\)"):
        _prepare(src, tmp_path / "cache", "byte", num_workers=1)
    opens.clear()
    fail_at = 3  # its second chunk, after the hash and the first chunk
    with pytest.raises(ValueError, match=r"b.txt' cannot be read at byte 4096 \(Input/output error\)"):
        _prepare(src, tmp_path / "cache", "byte", num_workers=1)


def test_bpe_vocabulary_larger_than_the_text_allows_is_reported(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("ab ab abc\n")
    logs = []
    corpus = _prepare(path, tmp_path / "cache", "bpe", vocab_size=1024, logs=logs)
    assert corpus.tokenizer.vocab_size < 1024
    assert any(f"has {corpus.tokenizer.vocab_size}" in line and "too little text for 1024" in line for line in logs), logs


def test_source_edited_with_size_and_mtime_restored_is_rehashed_and_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS[:30_000])
    _older_than_a_tick()
    first = _prepare(path, tmp_path / "cache")
    hashed = _hash_calls(monkeypatch)
    _prepare(path, tmp_path / "cache")
    assert path.name not in hashed  # size, mtime, ctime and inode unchanged: the recorded hash is kept
    st = path.stat()
    path.write_text(CORPUS[1:30_000] + "x")  # same size and characters, different text
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored; ctime moves regardless
    logs = []
    after = _prepare(path, tmp_path / "cache", logs=logs)
    assert path.name in hashed and any("changed" in line for line in logs), logs
    assert after.manifest["shards"][0]["xxh3_128"] != first.manifest["shards"][0]["xxh3_128"]
    assert after.tokens.to_tensor().tolist() == after.tokenizer.encode(CORPUS[1:30_000] + "x")


def _flip_byte_in_place(path, offset=100):
    """Alter one byte of ``path`` in place (same inode and size) and put its mtime back: only ctime moves."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    return st


def _built(tmp_path):
    """A source older than a tick and its shards: ``(source, its tokens, the token shard's path)``."""
    path = tmp_path / "input.txt"
    path.write_text(CORPUS[:30_000])
    _older_than_a_tick()
    good = _prepare(path, tmp_path / "cache")
    return path, good.tokens.to_tensor().tolist(), Path(good.path) / good.manifest["shards"][0]["file"]


def test_shard_altered_in_place_with_mtime_restored_is_caught(tmp_path, monkeypatch):
    path, expected, shard = _built(tmp_path)
    hashed = _hash_calls(monkeypatch)
    _prepare(path, tmp_path / "cache")
    assert hashed == []  # trusted by its stat, so what follows is the stat catching the edit
    before = _flip_byte_in_place(shard)
    assert shard.stat().st_ctime_ns != before.st_ctime_ns  # the kernel moved ctime
    logs = []
    again = _prepare(path, tmp_path / "cache", logs=logs)
    assert hashed == [shard.name]  # the stamp no longer matches: hashed in full, found altered
    assert any("does not match the hash" in line and "rebuilding" in line for line in logs), logs
    assert again.tokens.to_tensor().tolist() == expected


def test_verify_hashes_every_file_and_catches_what_a_stat_cannot(tmp_path, monkeypatch):
    path, expected, shard = _built(tmp_path)
    folder = shard.parent
    # Damage below the filesystem (a failing disk) changes bytes, not the stat: simulated by recording the
    # altered file's stamp in the manifest, as if it had passed its last check.
    _flip_byte_in_place(shard)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["stat"]["file"] = {**shards._stamp(shard), "checked_ns": time.time_ns() + 10**9}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    hashed = _hash_calls(monkeypatch)
    assert _prepare(path, tmp_path / "cache").tokens.to_tensor().tolist() != expected  # the trade-off: trusted
    assert hashed == []
    logs = []
    checked = _prepare(path, tmp_path / "cache", logs=logs, verify=True)
    assert hashed[0] == path.name and shard.name in hashed  # the source and the shard read in full
    assert any("does not match the hash" in line and "rebuilding" in line for line in logs), logs
    assert checked.tokens.to_tensor().tolist() == expected
    hashed.clear()
    _prepare(path, tmp_path / "cache", verify=True)  # rebuilt and unchanged: verify still reads everything
    assert sorted(hashed) == sorted([path.name] + [s[k] for s in checked.manifest["shards"] for k in ("file", "documents_file", "counts_file")])
    with pytest.raises(TypeError, match="verify must be a bool"):
        _prepare(path, tmp_path / "cache", verify="yes")


def test_a_stamp_taken_within_a_timestamp_tick_is_not_trusted(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("abc")
    stamp = shards._stamp(path)  # within a tick of the write: a same-tick write could keep this stat
    assert shards._racy(stamp) and not shards._trusted(shards._stamp(path), stamp)
    shards._settle([(path, stamp)])  # waits out the tick; nothing changed, so the stamp now holds
    assert not shards._racy(stamp) and shards._trusted(shards._stamp(path), stamp)
    path.write_text("abd")
    assert not shards._trusted(shards._stamp(path), stamp)
