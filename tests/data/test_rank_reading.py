"""Under torchrun each rank reads only its rows of every global batch from the token shards, and a
2-rank run over shards trains like one process over the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from craftfn import data, distributed

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("corpus")
    text = data.stdlib_corpus(max_bytes=80_000)
    for i in range(8):
        (src / f"part{i}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000], encoding="utf-8")
    return src


def test_two_ranks_read_disjoint_rows_of_each_global_batch(tmp_path, corpus_dir):
    out = tmp_path / "reads"
    proc = _torchrun(str(HERE / "rank_reader.py"), str(corpus_dir), str(tmp_path / "cache"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    corpus = data.prepare_corpus(corpus_dir, "char", cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    train, _ = corpus.split(0.1, seed=0)
    for step in range(5):
        whole = data.random_window_batch(train, 8, 16, seed=0, step=step)
        starts = data.window_starts(len(train), 8, 16, seed=0, step=step).tolist()
        for r, got in enumerate(ranks):
            # Rank r read exactly its 4 windows of this step (rows 4r..4r+3), nothing of the other rank's.
            assert got["starts"][step * 4 : step * 4 + 4] == starts[r * 4 : r * 4 + 4]
            assert got["batches"][step] == distributed.shard_batch(whole, rank=r, world=2)["input_ids"].tolist()
    assert all(len(got["starts"]) == 5 * 4 for got in ranks)
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1  # one build for both ranks


GIN = """
include '{models}'
BLOCK_SIZE = 16
lm_task.data = '{data}'
lm_task.cache_dir = '{cache}'
lm_task.tokenizer = 'char'
lm_task.model_config = @GPTConfig
lm_task.block_size = %BLOCK_SIZE
lm_task.batch_size = 8
lm_task.eval_windows = 16
GPTConfig.n_layer = 1
GPTConfig.n_embd = 32
train.optimizer = @sgd()
sgd.learning_rate = 0.1
sgd.momentum = 0.9
Trainer.max_steps = 4
Trainer.eval_every = 2
Trainer.save_every = 2
train.console_every = 1
train.sample_tokens = 8
"""


def test_torchrun_on_token_shards_matches_one_process(tmp_path, corpus_dir):
    gin_file = tmp_path / "shards.gin"
    gin_file.write_text(GIN.format(models=REPO / "gin" / "models" / "gpt_small.gin", data=corpus_dir, cache=tmp_path / "cache"))
    two = _torchrun("-m", "craftfn", "train", "--gin_file", str(gin_file), "--run_dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "craftfn", "train", "--gin_file", str(gin_file), "--run_dir", str(tmp_path / "one")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "reusing" in one.stdout  # the torchrun job built the shards; this run verified and reused them
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
