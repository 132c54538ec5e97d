"""Text data: tokenizers, corpora and deterministic batching.

Example:
    >>> from craftfn import data
    >>> text = data.stdlib_corpus(max_bytes=20_000)
    >>> tok = data.CharTokenizer.from_text(text)
    >>> tokens = tok.encode_tensor(text)
    >>> train, val = data.train_val_split(tokens, 0.1)
    >>> batch = data.random_window_batch(train, batch_size=4, block_size=32, seed=0, step=0)
    >>> batch["input_ids"].shape
    torch.Size([4, 32])
"""

from craftfn.data.batching import (
    RandomWindows,
    WindowDataset,
    collate,
    epoch_batches,
    num_batches,
    random_window_batch,
    train_val_split,
)
from craftfn.data.corpora import STDLIB_MODULES, stdlib_corpus, stdlib_files, text_file
from craftfn.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    atomic_write_text,
    load_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "tokenizer_from_dict",
    "load_tokenizer",
    "atomic_write_text",
    "STDLIB_MODULES",
    "stdlib_corpus",
    "stdlib_files",
    "text_file",
    "train_val_split",
    "random_window_batch",
    "RandomWindows",
    "WindowDataset",
    "epoch_batches",
    "num_batches",
    "collate",
]
