"""Token streams over arrays (shards), splits by document, window starts, per-rank windows."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craftfn import data, distributed


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=5), st.data())
def test_stream_reads_and_gathers_like_the_concatenation(lengths, draw):
    arrays = [np.arange(100 * i, 100 * i + n, dtype=np.uint16) for i, n in enumerate(lengths)]
    # Random ranges of the arrays, in a random order: the stream is their concatenation.
    rows = []
    for _ in range(draw.draw(st.integers(1, 6))):
        i = draw.draw(st.integers(0, len(arrays) - 1))
        a = draw.draw(st.integers(0, lengths[i]))
        b = draw.draw(st.integers(a, lengths[i]))
        rows.append((i, a, b))
    stream = data.TokenStream(arrays, rows)
    flat = np.concatenate([arrays[i][a:b] for i, a, b in rows]).astype(np.int64)
    assert len(stream) == flat.size and np.array_equal(stream.read(0, len(stream)), flat)
    if flat.size >= 3:
        starts = draw.draw(st.lists(st.integers(0, flat.size - 3), min_size=1, max_size=6))
        expected = torch.from_numpy(np.stack([flat[s : s + 3] for s in starts]))
        assert torch.equal(stream.gather(starts, 3), expected)
        lo = draw.draw(st.integers(0, flat.size))
        hi = draw.draw(st.integers(lo, flat.size))
        assert np.array_equal(stream.select([[lo, hi], [0, lo]]).read(0, hi), np.concatenate([flat[lo:hi], flat[:lo]]))


def test_stream_bad_input():
    with pytest.raises(TypeError, match="arrays"):
        data.TokenStream([np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="outside"):
        data.TokenStream([np.arange(3)], [[0, 1, 5]])
    with pytest.raises(IndexError, match="do not fit"):
        data.TokenStream([np.arange(10)]).gather([8], 3)


def test_windows_from_a_stream_equal_windows_from_the_tensor():
    tokens = torch.arange(5000) * 7 % 1013
    stream = data.TokenStream([tokens.numpy().astype(np.uint16)])
    for step in range(10):
        a = data.random_window_batch(tokens, 8, 16, seed=3, step=step)
        b = data.random_window_batch(stream, 8, 16, seed=3, step=step)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    ds_t, ds_s = data.WindowDataset(tokens, 16), data.WindowDataset(stream, 16)
    assert len(ds_t) == len(ds_s)
    for bt, bs in zip(data.WindowBatches(ds_t, 64, 200), data.WindowBatches(ds_s, 64, 200)):
        assert torch.equal(bt["input_ids"], bs["input_ids"])


def test_window_batches_match_the_epoch_batches_they_replace():
    ds = data.WindowDataset(torch.arange(1000), block_size=8)
    old = [b for b in data.epoch_batches(ds, 16, seed=0, epoch=0, shuffle=False)]
    kept, keep = 0, []
    for b in old:  # what lm_task did before: the first 40 windows of the in-order batches
        if kept >= 40:
            break
        take = min(b["input_ids"].shape[0], 40 - kept)
        keep.append({k: v[:take] for k, v in b.items()})
        kept += take
    new = list(data.WindowBatches(ds, 16, max_windows=40))
    assert len(new) == len(keep) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"]) for a, b in zip(keep, new))


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_rows_of_the_global_batch(world):
    tokens = torch.arange(3000)
    for step in range(5):
        whole = data.random_window_batch(tokens, 8, 16, seed=0, step=step)
        parts = [data.random_window_batch(tokens, 8, 16, seed=0, step=step, rank=r, world=world) for r in range(world)]
        for r, part in enumerate(parts):
            assert torch.equal(part["input_ids"], distributed.shard_batch(whole, rank=r, world=world)["input_ids"])
        starts = [data.RandomWindows(tokens, 8, 16, seed=0, rank=r, world=world).starts(step) for r in range(world)]
        assert torch.equal(torch.cat(starts), whole["input_ids"][:, 0])
    with pytest.raises(ValueError, match="multiple of world=3"):
        data.RandomWindows(tokens, 8, 16, rank=0, world=3)
    with pytest.raises(ValueError, match="rank"):
        data.random_window_batch(tokens, 8, 16, seed=0, step=0, rank=2, world=2)


def test_window_starts_beyond_32_bits():
    n = 6_000_000_000
    starts = torch.cat([data.window_starts(n, 256, 64, seed=0, step=s) for s in range(20)])
    assert int(starts.min()) >= 0 and int(starts.max()) < n - 64
    assert int(starts.max()) > 1 << 32  # the whole range is reachable, not just the low 2**32
    small = data.window_starts(1000, 4, 8, seed=0, step=1)  # up to 2**32 tokens: the draws as before
    key = data.batching.random.fold_in(data.batching.random.fold_in(data.batching.random.key(0), data.batching._WINDOW_TAG), 1)
    assert torch.equal(small, data.batching.random.randint(key, (4,), 0, 992))


def test_split_documents_holds_out_whole_documents_fixed_by_the_seed():
    lengths = np.array([5, 50, 7, 30, 12, 40, 9, 22, 15, 10] * 3)
    ends = np.cumsum(lengths)
    train, val = data.split_documents(ends, 0.2, seed=0)
    starts = set(np.concatenate([[0], ends[:-1]]).tolist())
    for lo, hi in np.concatenate([train, val]).tolist():
        assert lo in starts and hi in set(ends.tolist())  # spans start and end at document boundaries
    n_val = int((val[:, 1] - val[:, 0]).sum())
    assert n_val >= 0.2 * ends[-1] and n_val + int((train[:, 1] - train[:, 0]).sum()) == ends[-1]
    again = data.split_documents(ends, 0.2, seed=0)
    other = data.split_documents(ends, 0.2, seed=1)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)
    # One document: the tail, as train_val_split.
    t, v = data.split_documents([100], 0.1, seed=5)
    assert t.tolist() == [[0, 90]] and v.tolist() == [[90, 100]]
    with pytest.raises(ValueError, match="takes all 2 documents"):
        data.split_documents([10, 20], 0.9, seed=0)


def _rss_file_kb() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssFile is read from Linux's /proc")
def test_reading_windows_from_shards_does_not_map_the_corpus(tmp_path):
    # Slicing a memmap maps page-cache pages (whole folios) into the process, so over a long run RSS
    # would grow to the corpus size; windows are read with positioned reads instead.
    path = tmp_path / "shard.bin"
    np.arange(4 << 20, dtype=np.uint32).tofile(path)  # 16 MB, in the page cache now
    stream = data.TokenStream([np.memmap(path, dtype=np.uint32, mode="r")])
    two = stream.select([[0, 2 << 20], [3 << 20, 4 << 20]])
    starts = np.arange(0, len(two) - 64, 8192)  # 384 windows, 32 KB apart
    before = _rss_file_kb()
    one_range, ranges = stream.gather(starts, 64), two.gather(starts, 64)
    grown = _rss_file_kb() - before
    assert torch.equal(one_range[:, 0], torch.from_numpy(starts)) and torch.equal(ranges, torch.from_numpy(two.read(0, len(two))[starts[:, None] + np.arange(64)]))
    assert grown < 1024, f"RssFile grew by {grown} KB reading {2 * len(starts)} windows"
