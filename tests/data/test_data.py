"""Data: tokenizers, corpora, deterministic batches (across processes), epochs, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craftfn import data


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=50))
def test_byte_tokenizer_round_trip(text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_tensor(text).tolist() == ids


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=50))
def test_char_tokenizer_round_trip(text):
    tok = data.CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.decode(tok.encode(text)) == text
    assert data.tokenizer_from_dict(tok.to_dict()) == tok


def test_tokenizer_save_load(tmp_path):
    tok = data.CharTokenizer.from_text("hello, world\n")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"  # Hugging Face's format (see test_tokenizer_files.py)
    assert data.load_tokenizer(path) == tok
    data.ByteTokenizer().save(path)
    assert data.load_tokenizer(path) == data.ByteTokenizer()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_tokenizer_errors(tmp_path):
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([3])
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        data.tokenizer_from_dict({"type": "bpe"})
    with pytest.raises(ValueError, match="does not exist"):
        data.load_tokenizer(tmp_path / "nope.json")


def test_stdlib_corpus_is_fixed_and_bounded():
    text = data.stdlib_corpus(max_bytes=50_000)
    assert len(text.encode("utf-8")) <= 50_000
    assert text.startswith("# file: abc.py\n")
    assert text == data.stdlib_corpus(max_bytes=50_000)
    assert data.stdlib_corpus(max_bytes=60_000).startswith(text[:-10])
    assert list(data.STDLIB_MODULES) == sorted(data.STDLIB_MODULES)
    assert len(data.stdlib_files()) == len(data.STDLIB_MODULES)  # all present in CPython 3.10+
    with pytest.raises(ValueError, match="max_bytes"):
        data.stdlib_corpus(max_bytes=0)


def test_text_file(tmp_path):
    p = tmp_path / "input.txt"
    p.write_text("to be or not to be\n")
    assert data.text_file(p) == "to be or not to be\n"
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="missing.txt.*does not exist"):
        data.text_file(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        data.text_file(empty)
    with pytest.raises(ValueError, match="not a regular file"):
        data.text_file(tmp_path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bin.txt.*not valid utf-8"):
        data.text_file(binary)


def test_train_val_split():
    train, val = data.train_val_split(torch.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            data.train_val_split(torch.arange(100), bad)
    with pytest.raises(ValueError, match="empty"):
        data.train_val_split(torch.arange(3), 0.01)


_BATCH_SCRIPT = """
import sys, torch
from craftfn import data
tokens = torch.arange(10_000) * 7 % 1009
b = data.random_window_batch(tokens, batch_size=4, block_size=16, seed=123, step=int(sys.argv[1]))
print(b["input_ids"].tolist())
"""


def _batch_here(step):
    tokens = torch.arange(10_000) * 7 % 1009
    return data.random_window_batch(tokens, batch_size=4, block_size=16, seed=123, step=step)


def test_batch_identical_across_processes_and_runs():
    here = _batch_here(5)["input_ids"].tolist()
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _BATCH_SCRIPT, "5"], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here
    # A step given as a 0-d tensor (as TrainState.step) gives the same batch.
    assert _batch_here(torch.tensor(5))["input_ids"].tolist() == here


def test_batches_differ_across_steps_and_seeds_and_are_windows():
    tokens = torch.arange(10_000) * 7 % 1009
    batches = [_batch_here(s)["input_ids"] for s in range(20)]
    assert len({tuple(b.flatten().tolist()) for b in batches}) == 20
    other_seed = data.random_window_batch(tokens, 4, 16, seed=124, step=5)["input_ids"]
    assert not torch.equal(other_seed, batches[5])
    b = _batch_here(3)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert b["input_ids"].dtype == torch.int64
    src = data.RandomWindows(tokens, 4, 16, seed=123)
    assert torch.equal(src[7]["labels"], _batch_here(7)["labels"])


def test_random_windows_cover_the_stream_uniformly():
    tokens = torch.arange(101)
    starts = torch.cat([data.random_window_batch(tokens, 64, 1, seed=0, step=s)["input_ids"][:, 0] for s in range(50)])
    counts = torch.bincount(starts, minlength=100)
    assert counts.min() > 0 and counts.max() < 3 * counts.float().mean()


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_iteration_covers_each_example_once(drop_last):
    ds = data.WindowDataset(torch.arange(10 * 23 + 1), block_size=10)
    assert len(ds) == 23
    epochs = []
    for epoch in range(2):
        batches = list(data.epoch_batches(ds, 5, seed=0, epoch=epoch, drop_last=drop_last))
        assert len(batches) == data.num_batches(23, 5, drop_last)
        starts = torch.cat([b["input_ids"][:, 0] for b in batches]) // 10
        if drop_last:
            assert len(starts) == 20 and len(set(starts.tolist())) == 20
        else:
            assert sorted(starts.tolist()) == list(range(23))
        for b in batches:
            assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        epochs.append(starts.tolist())
    assert epochs[0] != epochs[1]  # a new order every epoch
    again = torch.cat([b["input_ids"][:, 0] for b in data.epoch_batches(ds, 5, seed=0, epoch=1, drop_last=drop_last)]) // 10
    assert again.tolist() == epochs[1]


def test_epoch_batches_generic_dataset_and_no_shuffle():
    ds = [{"x": torch.tensor([float(i)])} for i in range(7)]
    batches = list(data.epoch_batches(ds, 3, seed=0, epoch=0, shuffle=False))
    assert [b["x"].flatten().tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    shuffled = torch.cat([b["x"] for b in data.epoch_batches(ds, 3, seed=0, epoch=0)]).flatten()
    assert sorted(shuffled.tolist()) == list(range(7))


def test_batching_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        data.random_window_batch(torch.arange(10), 2, 10, seed=0, step=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.random_window_batch(torch.arange(10), 0, 4, seed=0, step=0)
    with pytest.raises(TypeError, match="tokens"):
        data.random_window_batch(torch.zeros(10), 2, 4, seed=0, step=0)
    with pytest.raises(ValueError, match="epoch"):
        list(data.epoch_batches(data.WindowDataset(torch.arange(20), 4), 2, seed=0, epoch=-1))
    with pytest.raises(IndexError):
        data.WindowDataset(torch.arange(20), 4)[4]
