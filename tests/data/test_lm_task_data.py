"""The experiment on token shards and BPE: `lm_task.data` trains from memory-mapped shards (same batches as
the in-memory text), resumes exactly, and a BPE run's tokenizer.json serves `tokenizers` and `craftfn generate`."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest
import safetensors.torch
import tokenizers
import torch

from craftfn import data
from craftfn.cli import main
from craftfn.generation import TextGenerator
from craftfn.generation.run import generate_from_run_dir, load_run

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GIN = str(REPO / "gin" / "char_gpt.gin")
TEXT_GIN = str(REPO / "gin" / "text_file_gpt.gin")
TINY = [
    "--gin.MAX_STEPS=6",
    "--gin.warmup_cosine_decay.warmup_steps=2",
    "--gin.Trainer.eval_every=3",
    "--gin.Trainer.save_every=3",
    "--gin.GPTConfig.n_layer=1",
    "--gin.GPTConfig.n_head=2",
    "--gin.GPTConfig.n_embd=16",
    "--gin.BLOCK_SIZE=16",
    "--gin.lm_task.batch_size=8",
    "--gin.lm_task.eval_windows=16",
    "--gin.train.sample_tokens=12",
    "--gin.train.num_threads=1",
]


def _weights(run):
    return safetensors.torch.load_file(str(run / "model.safetensors"))


def _task(**kw):
    from craftfn import gin_training
    from craftfn.models import GPTConfig

    gin.clear_config()  # the experiment's own defaults, whatever an earlier test configured
    model_config = lambda **sizes: GPTConfig(n_layer=1, n_head=2, n_embd=16, **sizes)  # noqa: E731
    return gin_training.build_language_model_task(model_config=model_config, log=lambda s: None, progress=False, **kw)


def test_shards_and_text_give_the_experiment_the_same_batches(tmp_path):
    text = data.stdlib_corpus(max_bytes=30_000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    common = dict(block_size=16, batch_size=4, eval_windows=40, eval_batch_size=16)
    in_memory = _task(text=text, **common)
    on_disk = _task(data=str(tmp_path / "input.txt"), cache_dir=str(tmp_path / "cache"), **common)
    assert isinstance(on_disk.train_tokens, data.TokenStream) and isinstance(in_memory.train_tokens, torch.Tensor)
    assert on_disk.tokenizer == in_memory.tokenizer
    for step in range(10):
        a, b = in_memory.train_data(step), on_disk.train_data(step)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert len(on_disk.eval_batches) == len(in_memory.eval_batches) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(in_memory.eval_batches, on_disk.eval_batches))
    assert torch.equal(on_disk.token_counts, in_memory.token_counts)


def test_lm_task_verify_data_hashes_the_corpus_again(tmp_path, monkeypatch):
    from craftfn.data import shards

    (tmp_path / "input.txt").write_text(data.stdlib_corpus(max_bytes=5_000), encoding="utf-8")
    common = dict(data=str(tmp_path / "input.txt"), cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4, eval_windows=4)
    _task(**common)
    hashed = []
    real_hash = shards._hash_file
    monkeypatch.setattr(shards, "_hash_file", lambda p: hashed.append(p) or real_hash(p))
    _task(verify_data=True, **common)
    assert any(p.endswith(".bin") for p in hashed)  # without it the shard the build wrote is trusted by its stat


def test_text_file_job_trains_from_shards_and_resumes_exactly(tmp_path, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    text = data.stdlib_corpus(max_bytes=60_000)
    for i in range(6):
        (src / f"part{i}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000], encoding="utf-8")
    args = ["--gin_file", TEXT_GIN, f"--gin.DATA_PATH={src}", *TINY]
    assert main(["train", *args, "--run_dir", str(tmp_path / "straight")]) == 0
    out = capsys.readouterr().out
    assert "tokenizing" in out and "6 file(s)" in out
    # Stop at step 3, then resume from the checkpoint: the batches (and so the weights) are those of the straight run.
    assert main(["train", *args, "--gin.MAX_STEPS=3", "--run_dir", str(tmp_path / "resumed")]) == 0
    assert main(["train", *args, "--run_dir", str(tmp_path / "resumed")]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "tokenizing 0" not in out
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = data.load_tokenizer(tmp_path / "straight" / "tokenizer.json")
    assert tok.special_tokens == (data.EOT,)  # six documents, separated
    assert main(["eval", "--gin_file", TEXT_GIN, f"--gin.DATA_PATH={src}", *TINY, "--run_dir", str(tmp_path / "straight")]) == 0


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    # The default job (the stdlib corpus) with a 1,024-token BPE vocabulary, shrunk to a few steps.
    run = tmp_path_factory.mktemp("bpe") / "run"
    status = main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), *TINY, "--gin.lm_task.tokenizer=bpe", "--gin.lm_task.vocab_size=1024"])
    assert status == 0
    return run


def test_bpe_default_job_trains_with_a_1024_token_vocabulary(bpe_run):
    meta = json.loads((bpe_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert meta  # the run logged
    config = json.loads((bpe_run / "model_config.json").read_text()) if (bpe_run / "model_config.json").exists() else None
    weights = _weights(bpe_run)
    vocab = weights["transformer.wte.weight"].shape[0] if "transformer.wte.weight" in weights else weights["lm_head.weight"].shape[0]
    assert vocab == 1024 and (config is None or config["vocab_size"] == 1024)


def test_bpe_run_tokenizer_json_loads_in_hf_and_round_trips(bpe_run):
    hf = tokenizers.Tokenizer.from_file(str(bpe_run / "tokenizer.json"))
    text = data.stdlib_corpus(max_bytes=5_000) + "\nnon-ASCII too: é ü 😀\n"
    ids = hf.encode(text).ids
    assert hf.get_vocab_size() == 1024 and len(ids) < len(text) / 2
    assert hf.decode(ids) == text
    tok = data.load_tokenizer(bpe_run / "tokenizer.json")
    assert isinstance(tok, data.BPETokenizer) and tok.encode(text) == ids


def test_craftfn_generate_decodes_with_the_bpe_tokenizer(bpe_run, capsys):
    texts = generate_from_run_dir(bpe_run, "def ", max_new_tokens=8, temperature=0.0)
    model, tok = load_run(bpe_run)
    assert isinstance(tok, data.BPETokenizer)
    assert texts == TextGenerator(model, tok).generate("def ", max_new_tokens=8, do_sample=False)
    assert texts[0].startswith("def ") and len(tok.encode(texts[0])) <= len(tok.encode("def ")) + 8
    assert main(["generate", "--run_dir", str(bpe_run), "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == texts[0] + "\n"


def test_checkpoint_meta_carries_the_tokenizer(bpe_run):
    steps = sorted((bpe_run / "checkpoints").iterdir())
    meta = json.loads((steps[-1] / "meta.json").read_text())
    assert data.tokenizer_from_dict(meta["extra"]["tokenizer"]) == data.load_tokenizer(bpe_run / "tokenizer.json")


def test_runs_written_with_the_older_tokenizer_file_still_generate(bpe_run, tmp_path):
    # A run dir of earlier craftfn: tokenizer.json in craftfn's own {"type": "char", "chars": ...} layout.
    from craftfn.models import GPT, GPTConfig

    old = tmp_path / "old"
    old.mkdir()
    chars = "\n abcdef"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=16, n_layer=1, n_head=2, n_embd=16))
    safetensors.torch.save_file({k: v.detach() for k, v in model.named_parameters()}, str(old / "model.safetensors"))
    (old / "tokenizer.json").write_text(json.dumps({"type": "char", "chars": chars}))
    (old / "config.gin").write_text("GPTConfig.n_head = 2\n")
    out = generate_from_run_dir(old, "abc", max_new_tokens=5, temperature=0.0)
    assert out == TextGenerator(model.eval(), data.CharTokenizer(chars)).generate("abc", max_new_tokens=5, do_sample=False)


def test_lm_task_corpus_errors(tmp_path, capsys):
    both = main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(tmp_path / "r"), *TINY, f"--gin.lm_task.data={tmp_path}"])
    assert both == 2 and "exactly one corpus" in capsys.readouterr().err
    no_size = main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(tmp_path / "r"), *TINY, "--gin.lm_task.tokenizer=bpe"])
    assert no_size == 2 and "vocab_size" in capsys.readouterr().err
    bad = main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(tmp_path / "r"), *TINY, "--gin.lm_task.tokenizer=words"])
    assert bad == 2 and "'char', 'byte', 'bpe' or the path of a tokenizer.json" in " ".join(capsys.readouterr().err.split())
