"""tokenizer.json is Hugging Face's format: `tokenizers` loads craftfn's files and encodes as craftfn does;
craftfn loads its older files, checkpoints' tokenizer dicts, and other Hugging Face tokenizers."""

import json

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from craftfn import data
from craftfn.data.tokenizers import _pieces, safe_cut, utf8_codepoints

# Text with what breaks naive tokenizer files: newlines, tabs, runs of spaces, accents, emoji, quotes, JSON escapes.
ALPHABET = "ab \n\t  é😀'\"\\{}0<|>endoftx"
texts = st.text(alphabet=ALPHABET, min_size=1, max_size=60)


def _hf_loaded(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    return tokenizers.Tokenizer.from_file(str(path))


@settings(max_examples=30, deadline=None)
@given(text=texts, with_eot=st.booleans())
def test_char_tokenizer_json_loads_in_hf_and_encodes_alike(tmp_path_factory, text, with_eot):
    # The literal "<|endoftext|>" can occur in the text: both must read it as the special token.
    text = text.replace("x", data.EOT) if with_eot else text
    tok = data.CharTokenizer.from_text(text, special_tokens=[data.EOT] if with_eot else [])
    folder = tmp_path_factory.mktemp("t")
    hf = _hf_loaded(tok, folder)
    assert data.load_tokenizer(folder / "tokenizer.json") == tok
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.get_vocab_size() == tok.vocab_size
    assert hf.decode(tok.encode(text), skip_special_tokens=False) == text == tok.decode(tok.encode(text))


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=60) | texts, with_eot=st.booleans())
def test_byte_tokenizer_json_loads_in_hf_and_encodes_alike(tmp_path_factory, text, with_eot):
    tok = data.ByteTokenizer(special_tokens=[data.EOT] if with_eot else [])
    folder = tmp_path_factory.mktemp("t")
    hf = _hf_loaded(tok, folder)
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text), skip_special_tokens=False) == tok.decode(tok.encode(text))
    assert data.load_tokenizer(folder / "tokenizer.json") == tok


@pytest.fixture(scope="module")
def bpe():
    return data.BPETokenizer.train([data.stdlib_corpus(max_bytes=300_000)], vocab_size=512)


def test_bpe_trains_deterministically_to_the_requested_size(bpe):
    again = data.BPETokenizer.train([data.stdlib_corpus(max_bytes=300_000)], vocab_size=512)
    assert again == bpe and again.to_json() == bpe.to_json()
    assert bpe.vocab_size == 512 and bpe.eot_id is not None
    assert bpe.dtype == np.uint16


def test_bpe_json_round_trips_in_hf_and_in_craftfn(bpe, tmp_path):
    text = data.stdlib_corpus(max_bytes=60_000)
    hf = _hf_loaded(bpe, tmp_path)
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode()) / 2  # the merges compress
    assert hf.encode(text).ids == ids
    assert hf.decode(ids) == text == bpe.decode(ids)
    loaded = data.load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, data.BPETokenizer) and loaded == bpe and loaded.encode(text) == ids


# Code-like text built from pieces rich in whitespace runs, where a careless cut changes pre-tokens
# ("\n\n\n" is one pre-token before a newline, four spaces merge into one token).
code_like = st.lists(
    st.sampled_from(["\n", "\n\n", "\n\n\n", " ", "  ", "    ", "\t", "\r\n", "def", " x", "x1", "é", "😀", ".", "'s", "(", ")", "\u00a0", "\u2028"]),
    max_size=120,
).map("".join)


@settings(max_examples=60, deadline=None)
@given(code_like, st.integers(1, 40))
def test_pieces_cut_at_safe_positions_encode_like_the_whole_text(bpe, text, size):
    # craftfn encodes long texts (and corpus chunks) piecewise; the cuts must not change a single token.
    pieces = _pieces(text, size)
    assert "".join(pieces) == text
    hf = bpe.hf_tokenizer
    whole = hf.encode(text, add_special_tokens=False).ids
    assert [i for p in pieces for i in hf.encode(p, add_special_tokens=False).ids] == whole
    assert bpe.encode(text) == whole
    # Every position safe_cut can return, not only those the piece size happened to pick.
    for cut in {safe_cut(text, p, len(text)) for p in range(len(text))} - {None}:
        assert 0 < cut < len(text)
        assert hf.encode(text[:cut], add_special_tokens=False).ids + hf.encode(text[cut:], add_special_tokens=False).ids == whole, cut


def test_safe_cut_rules():
    assert safe_cut("ab\ncd", 0, 5) == 3  # after a newline, before a character
    assert safe_cut("ab\n cd", 0, 6) is None  # "\n " is one whitespace run
    assert safe_cut("ab cd", 0, 5) == 2  # before " cd"
    assert safe_cut("a  cd", 0, 5) is None  # inside a run of spaces
    assert safe_cut(b"ab\ncd", 0, 5) == 3


def test_older_craftfn_tokenizer_files_and_checkpoint_dicts_load(tmp_path):
    # Run directories and checkpoints (meta.json extra.tokenizer) written before this format.
    old_char = {"type": "char", "chars": "\n abc"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(old_char))
    tok = data.load_tokenizer(tmp_path / "tokenizer.json")
    assert tok == data.CharTokenizer("\n abc") and tok.encode("cab\n") == [4, 2, 3, 0]
    assert data.tokenizer_from_dict({"type": "byte"}) == data.ByteTokenizer()
    # and today's dicts round-trip
    for t in (data.ByteTokenizer([data.EOT]), data.CharTokenizer("xyz", [data.EOT])):
        assert data.tokenizer_from_dict(t.to_dict()) == t


def test_foreign_hf_tokenizer_loads_as_bpe(tmp_path):
    # A WordLevel tokenizer is no craftfn layout: it is wrapped, not misread as char or byte.
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = data.load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, data.BPETokenizer) and tok.encode("hello world") == [0, 1] and tok.vocab_size == 3
    # A merge-free BPE with a normalizer is not craftfn's char layout either.
    d = data.CharTokenizer("ab").to_dict()
    d["normalizer"] = {"type": "Lowercase"}
    assert isinstance(data.tokenizer_from_dict(d), data.BPETokenizer)


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        data.load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(ValueError, match="bad.json"):
        data.load_tokenizer(bad)
    with pytest.raises(ValueError, match="vocab_size must be an int of at least 257"):
        data.BPETokenizer.train(["abc"], vocab_size=200)
    with pytest.raises(data.VocabularyError, match="'z'.*at byte 3"):
        data.CharTokenizer("abé").encode("aéz")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n\t\u00e9\u20ac\U0001f600", max_size=80), st.integers(0, 79), st.sampled_from([None, b"\x80", b"\xc3", b"\xff"]))
def test_char_encode_bytes_fast_path_equals_the_code_point_lookup(text, where, damage):
    tok = data.CharTokenizer(sorted(set(text) | set("ab é")), [data.EOT])  # may lack the tab, euro or emoji
    raw = text.encode()
    if damage is not None and raw:
        raw = raw[: where % len(raw)] + damage + raw[where % len(raw) + 1 :]

    def outcome(encode):
        try:
            return encode().tolist()
        except (UnicodeDecodeError, ValueError) as e:
            return f"{type(e).__name__}: {e}"

    slow = outcome(lambda: tok._lookup(utf8_codepoints(raw), raw).astype(np.uint16))
    assert outcome(lambda: tok.encode_bytes(raw, np.uint16)) == slow
