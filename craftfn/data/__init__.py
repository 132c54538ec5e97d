"""Text data: tokenizers, corpora, token shards on disk and deterministic batching.

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
    WindowBatches,
    WindowDataset,
    collate,
    epoch_batches,
    num_batches,
    random_window_batch,
    train_val_split,
    window_starts,
)
from craftfn.data.corpora import STDLIB_MODULES, corpus_files, stdlib_corpus, stdlib_files, text_file
from craftfn.data.shards import CorruptShardError, TokenCorpus, default_cache_dir, prepare_corpus
from craftfn.data.streams import TokenStream, split_documents
from craftfn.data.tokenizers import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    VocabularyError,
    atomic_write_text,
    load_tokenizer,
    token_dtype,
    tokenizer_from_dict,
)

__all__ = [
    "EOT",
    "ByteTokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "Tokenizer",
    "VocabularyError",
    "tokenizer_from_dict",
    "load_tokenizer",
    "token_dtype",
    "atomic_write_text",
    "STDLIB_MODULES",
    "stdlib_corpus",
    "stdlib_files",
    "text_file",
    "corpus_files",
    "prepare_corpus",
    "TokenCorpus",
    "CorruptShardError",
    "default_cache_dir",
    "TokenStream",
    "split_documents",
    "train_val_split",
    "window_starts",
    "random_window_batch",
    "RandomWindows",
    "WindowDataset",
    "WindowBatches",
    "epoch_batches",
    "num_batches",
    "collate",
]
